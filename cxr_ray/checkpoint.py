"""Checkpoints: a folder with the weights, the full config, the threshold and provenance.

Layout::

    model.pt          state dict of the (unwrapped) model, loaded with weights_only=True
    config.yaml       the full ExperimentConfig the model was trained with
    checkpoint.json   preprocessing: the contract from file to model input (data/preprocessing.py;
                      absent in checkpoints written before it was stored: their config's, with
                      that time's constants), threshold, the rule that chose it and the precision it was chosen in
                      (threshold_rule, val_precision), the temperature and bias that calibrate
                      the probabilities, ``sigmoid(logit / temperature + logit_bias)``
                      (absent: 1 and 0), class map, the validation metrics at it,
                      epoch, versions of torch/torchvision/ray/cxr_ray, ``format_version``
                      (2), ``files`` (each weight/config file's SHA-256) and ``digest``: a
                      SHA-256 of all of checkpoint.json's content (:func:`meta_digest`;
                      the model's identity: scoring output's ``model`` column, the URI
                      fetch cache), checked on every load before any file is unpickled
    train_state.pt    optimizer, scheduler, early stopping, epoch (resuming training only)

``checkpoint.json`` may also hold ``tta``: per test-time augmentation mode (``cxr_ray/tta.py``)
the temperature, bias and threshold chosen on validation with that mode's views, written after
training by :func:`write_tta_decisions`; they enter the digest.

An *ensemble* checkpoint (``"kind": "ensemble"``, written by ``cxr_ray/ensemble.py``) has no
``model.pt``: ``members/<i>/model.pt`` and ``members/<i>/config.yaml`` hold each member, and its
``config.yaml`` is the members' shared preprocessing (the first member's config). It loads,
evaluates and scores exactly like one checkpoint: the model is the mean of the members' logits.

Inference rebuilds the model from ``config.yaml`` and the preprocessing from the stored
contract (:attr:`LoadedCheckpoint.preprocessing`), never from flags or today's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

import cxr_ray
from cxr_ray.config import ExperimentConfig
from cxr_ray.data.catalog import CLASSES
from cxr_ray.data.preprocessing import (
    Preprocessing,
    PreprocessingError,
    resolve_preprocessing,
    stored_preprocessing,
)

log = logging.getLogger(__name__)

MODEL_FILE, CONFIG_FILE, META_FILE, STATE_FILE = "model.pt", "config.yaml", "checkpoint.json", "train_state.pt"
MEMBERS_DIR = "members"  # an ensemble's members
# checkpoint.json's format: 2 = every field and each file's hash in the digest (format_version
# absent: written before it, digest of the files and a few fields, or none at all)
FORMAT_VERSION = 2
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_MEMBERS = 64  # an ensemble's members (each is fetched and loaded)
MAX_FILE_BYTES = 4 << 30  # one weights or config file of a checkpoint (ResNet-50: ~100 MB)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or unsafe to load; names the path."""


def versions() -> dict[str, str]:
    """Versions recorded in every checkpoint."""
    import torchvision

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # scoring/evaluation can run without Ray in the process
        ray_version = "absent"
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "ray": ray_version,
            "cxr_ray": cxr_ray.__version__}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, cfg: ExperimentConfig, threshold: float,
                    metrics: dict[str, Any], epoch: int, train_state: dict[str, Any] | None = None,
                    val_precision: str = "fp32", temperature: float | None = None,
                    logit_bias: float | None = None, preprocessing: Preprocessing | None = None) -> Path:
    """Write a checkpoint folder (see module doc) and return its path.

    ``preprocessing``: the contract the model was trained with (default: resolved from ``cfg``).
    ``val_precision``: the precision of the validation pass that chose ``threshold``; the
    threshold belongs to it (bf16 and fp32 probabilities differ slightly). ``temperature``,
    ``logit_bias``: probabilities are ``sigmoid(logit / temperature + logit_bias)`` and
    ``threshold`` is on that scale.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    torch.save(state, out / MODEL_FILE)
    cfg.to_yaml(out / CONFIG_FILE)
    contract = (preprocessing or resolve_preprocessing(cfg)).to_dict()
    metrics = dict(metrics)
    drift_reference = metrics.pop("drift_reference", None)  # the validation pass's summary (cxr_ray/drift.py)
    meta = {"preprocessing": contract, "threshold": float(threshold),
            "threshold_rule": metrics.get("threshold_rule", "given"),
            "val_precision": val_precision, "class_map": {str(i): c for i, c in enumerate(CLASSES)},
            "positive_class": CLASSES[1], "epoch": int(epoch), "metrics": _jsonable(metrics),
            "versions": versions()}
    if temperature is not None:
        meta["temperature"] = float(temperature)
    if logit_bias is not None:
        meta["logit_bias"] = float(logit_bias)
    if drift_reference is not None:
        meta["drift_reference"] = drift_reference
    write_meta(out, meta)
    if train_state is not None:
        torch.save(train_state, out / STATE_FILE)
    return out


def _sha256(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_files(folder: Path, names: list[str]) -> dict[str, bytes]:
    """Each of ``names`` in ``folder`` read once, through one handle (what is hashed is what is
    loaded); a missing, non-regular or oversized (:data:`MAX_FILE_BYTES`) file is a
    :class:`CheckpointError`."""
    import stat

    out = {}
    for name in names:
        path = folder / name
        try:
            with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
                    raise CheckpointError(f"{path}: not a regular file of at most {MAX_FILE_BYTES >> 30} GiB")
                out[name] = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            raise CheckpointError(f"{folder} is not a cxr_ray checkpoint: {name} is missing") from None
        if len(out[name]) > MAX_FILE_BYTES:
            raise CheckpointError(f"{path}: grew past {MAX_FILE_BYTES >> 30} GiB while read")
    return out


def meta_digest(meta: dict[str, Any], without: tuple[str, ...] = ()) -> str:
    """``sha256:<hex>`` of a format-2 ``checkpoint.json``'s content: every field (the files'
    hashes, threshold, calibration, preprocessing, class map, positive class, precision, TTA
    entries, ensemble members, metrics ...) but the digests themselves and ``without``, as
    canonical JSON. Anything that changes a decision or its meaning changes it."""
    import hashlib

    body = {k: v for k, v in meta.items() if k not in ("digest", "base_digest", *without)}
    canonical = json.dumps(json.loads(json.dumps(body)), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def seal(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as a format-2 ``checkpoint.json`` for the files in ``folder``: the format version,
    each weight/config file's SHA-256 (``files``), ``base_digest`` (everything but the TTA
    decisions) and ``digest`` (everything). The one place checkpoint.json is made."""
    meta = {k: v for k, v in meta.items() if k not in ("digest", "base_digest")}
    meta["format_version"] = FORMAT_VERSION
    meta["files"] = {name: _sha256(data) for name, data in read_files(folder, checkpoint_files(meta)).items()}
    return {**meta, "base_digest": meta_digest(meta, without=("tta",)), "digest": meta_digest(meta)}


def write_meta(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Seal ``meta`` (:func:`seal`) and write it as ``folder``'s checkpoint.json; returns it."""
    sealed = seal(folder, meta)
    (folder / META_FILE).write_text(json.dumps(sealed, indent=1))
    return sealed


def check_digest_string(digest: Any, where: str) -> str:
    """``digest`` when it is ``sha256:`` + 64 lowercase hex digits (it names cache folders);
    else :class:`CheckpointError`."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise CheckpointError(f"{where}: digest {str(digest)[:80]!r} is not 'sha256:' + 64 hex digits: refused")
    return digest


def verify_meta(folder: Path, meta: dict[str, Any], blobs: dict[str, bytes] | None = None) -> str:
    """The digest of the checkpoint in ``folder`` after checking it against its files and its
    checkpoint.json; :class:`CheckpointError` when anything changed after it was saved, or a
    format-2 checkpoint has no (or a malformed) digest. Checkpoints written before format 2
    keep that time's digest (computed when they predate digests). ``blobs``: the files' bytes
    already read (:func:`read_files`; default: read here)."""
    blobs = blobs if blobs is not None else read_files(folder, checkpoint_files(meta))
    version = meta.get("format_version")
    if version is None:  # before format 2: that time's digest of files and a few fields
        actual = expected_digest(folder, meta, blobs)
        if "digest" in meta and check_digest_string(meta["digest"], str(folder)) != actual:
            raise _changed(folder, actual, meta["digest"])
        return actual
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {version!r}; this cxr_ray reads {FORMAT_VERSION} and "
                              f"older (a newer cxr_ray wrote it)")
    if "digest" not in meta:
        raise CheckpointError(f"{folder}: {META_FILE} of format {version} has no digest: refused (its content "
                              f"cannot be checked)")
    stored = check_digest_string(meta["digest"], str(folder))
    files = meta.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(checkpoint_files(meta)):
        raise CheckpointError(f"{folder}: {META_FILE} does not list the hashes of {checkpoint_files(meta)}")
    for name, expected in files.items():
        if _sha256(blobs[name]) != expected:
            raise _changed(folder, f"{name} {_sha256(blobs[name])}", f"{name} {expected}")
    actual = meta_digest(meta)
    if actual != stored:
        raise _changed(folder, actual, stored)
    if "base_digest" in meta and meta["base_digest"] != meta_digest(meta, without=("tta",)):
        raise _changed(folder, meta_digest(meta, without=("tta",)), str(meta["base_digest"]))
    return stored


def _changed(folder: Path, actual: str, stored: str) -> CheckpointError:
    return CheckpointError(f"{folder}: the weights, config.yaml or checkpoint.json changed after the checkpoint "
                           f"was saved (digest {actual[:19]}..., checkpoint.json says {stored[:19]}...); "
                           f"re-export it instead of editing it in place")


def checkpoint_files(meta: dict[str, Any]) -> list[str]:
    """The files (relative paths) that hold a checkpoint's weights and configs: model.pt and
    config.yaml, or for an ensemble its config.yaml and every member's model.pt and config.yaml."""
    if meta.get("kind") == "ensemble":
        members = meta.get("members")
        if not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS:
            raise CheckpointError(f"an ensemble's {META_FILE} must list 2 to {MAX_MEMBERS} members, found "
                                  f"{len(members) if isinstance(members, list) else type(members).__name__}")
        return [CONFIG_FILE] + [f"{MEMBERS_DIR}/{i}/{name}" for i in range(len(members))
                                for name in (MODEL_FILE, CONFIG_FILE)]
    return [MODEL_FILE, CONFIG_FILE]


def content_digest(folder: Path, threshold: float, temperature: float | None = None,
                   files: list[str] | None = None, bias: float | None = None,
                   preprocessing: dict[str, Any] | None = None, blobs: dict[str, bytes] | None = None) -> str:
    """``sha256:<hex>`` of the weight and config ``files`` (default model.pt, config.yaml), the
    threshold, and the temperature, bias and preprocessing contract (when the checkpoint has
    them): what decides every score."""
    import hashlib

    h = hashlib.sha256()
    for name in files or (MODEL_FILE, CONFIG_FILE):
        h.update(blobs[name] if blobs is not None else (folder / name).read_bytes())
    h.update(repr(float(threshold)).encode())
    if temperature is not None:
        h.update(f"T={float(temperature)!r}".encode())
    if bias is not None:
        h.update(f"b={float(bias)!r}".encode())
    if preprocessing is not None:
        h.update(f"pre={json.dumps(preprocessing, sort_keys=True)}".encode())
    return f"sha256:{h.hexdigest()}"


def tta_digest(base: str, tta: dict[str, Any]) -> str:
    """The digest of a checkpoint with TTA decisions: ``base`` (:func:`content_digest`) and
    every mode's threshold, temperature and bias."""
    import hashlib

    decisions = {m: [float(d["threshold"]), float(d["temperature"]), float(d.get("logit_bias", 0.0))]
                 for m, d in sorted(tta.items())}
    return "sha256:" + hashlib.sha256(f"{base}|tta={json.dumps(decisions)}".encode()).hexdigest()


def expected_digest(folder: Path, meta: dict[str, Any], blobs: dict[str, bytes] | None = None) -> str:
    """What a checkpoint from before format 2's ``meta["digest"]`` must be for the files in ``folder``."""
    base = content_digest(folder, float(meta["threshold"]), meta.get("temperature"), checkpoint_files(meta),
                          meta.get("logit_bias"), meta.get("preprocessing"), blobs)
    return tta_digest(base, meta["tta"]) if meta.get("tta") else base


def write_tta_decisions(path: str, decisions: dict[str, dict[str, Any]], base: str = "") -> str:
    """Add (or replace) TTA modes' decisions in the ``checkpoint.json`` of the checkpoint at
    ``path`` (a folder or URI) and update its digest; returns the new digest. ``base`` (checkpoints
    from before format 2 only): its digest without TTA (default: recorded in it; give it for
    checkpoints saved before digests)."""
    from cxr_ray.data import io

    meta = json.loads(io.read_bytes(io.join(path, META_FILE)))
    meta["tta"] = {**(meta.get("tta") or {}), **{m: _jsonable(d) for m, d in decisions.items()}}
    if meta.get("format_version"):  # the files' hashes are in it: no file is read again
        meta.update(base_digest=meta_digest(meta, without=("tta",)), digest=meta_digest(meta))
    else:  # a checkpoint from before format 2 keeps that time's digest scheme
        base = base or meta.get("base_digest") or meta["digest"]
        meta.update(base_digest=base, digest=tta_digest(base, meta["tta"]))
    io.write_bytes(io.join(path, META_FILE), json.dumps(meta, indent=1).encode())
    return meta["digest"]


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) else v)
            for k, v in metrics.items()}


def safe_load(path: str | os.PathLike, data: bytes | None = None) -> Any:
    """``torch.load(weights_only=True)`` of the file at ``path`` (or of its bytes ``data``, already
    read); a file that would run code on load is refused."""
    import io as _io

    try:
        return torch.load(_io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load, the file holds more than tensors and plain "
                              f"data (it could run code on load): {e}") from e


@dataclass
class LoadedCheckpoint:
    """A model ready for inference with the config and threshold it was trained with."""

    path: str
    model: nn.Module
    cfg: ExperimentConfig
    threshold: float
    meta: dict[str, Any]
    tta: str = "none"  # the test-time augmentation the model applies (see with_tta)

    @property
    def tta_modes(self) -> list[str]:
        """The TTA modes this checkpoint has a validation-chosen temperature and threshold for."""
        return sorted(self.meta.get("tta") or {})

    def with_tta(self, mode: str) -> "LoadedCheckpoint":
        """This checkpoint applying test-time augmentation ``mode``: the model averages the
        views' logits, and the temperature, threshold and their precision are the ones chosen on
        validation with the same views. ``none`` returns it unchanged; a mode it has no
        decision for is a :class:`CheckpointError`."""
        from cxr_ray.tta import TTAModel, check_tta_decision

        if mode == "none":
            return self
        decision = (self.meta.get("tta") or {}).get(mode)
        if decision is None:
            raise CheckpointError(
                f"{self.path} has no threshold chosen with TTA {mode!r} (it has: {self.tta_modes or 'none'}); "
                f"a plain threshold does not fit averaged logits. Fit one on its validation split: "
                f"cxr-ray fit-tta --checkpoint {self.path} --tta {mode}")
        check_tta_decision(self.path, mode, decision, self.preprocessing)  # chosen with today's views
        meta = {**self.meta, "threshold": decision["threshold"], "temperature": decision["temperature"],
                "logit_bias": decision.get("logit_bias", 0.0),
                "threshold_rule": decision.get("threshold_rule", self.meta.get("threshold_rule")),
                "val_precision": decision.get("val_precision", self.val_precision)}
        return dataclasses.replace(self, model=TTAModel(self.model, mode, self.preprocessing),
                                   threshold=float(decision["threshold"]),
                                   meta=meta, tta=mode)

    @property
    def preprocessing(self) -> Preprocessing:
        """The contract from file to model input it was trained with (see ``data/preprocessing.py``)."""
        return stored_preprocessing(self.meta, self.cfg)

    @property
    def drift_reference(self) -> dict[str, Any] | None:
        """The summary of its validation pass that new images are compared with (``cxr_ray/drift.py``);
        None for checkpoints saved before it existed, and under TTA (its logits are another model's)."""
        return None if self.tta != "none" else self.meta.get("drift_reference")

    @property
    def is_ensemble(self) -> bool:
        return self.meta.get("kind") == "ensemble"

    @property
    def digest(self) -> str:
        """The content digest (see :func:`content_digest`)."""
        return str(self.meta["digest"])

    @property
    def temperature(self) -> float:
        """Probabilities are ``sigmoid(logit / temperature + logit_bias)`` (1.0 for checkpoints without one)."""
        return float(self.meta.get("temperature") or 1.0)

    @property
    def logit_bias(self) -> float:
        """The calibration's bias (0.0 for checkpoints without one: temperature scaling only)."""
        return float(self.meta.get("logit_bias") or 0.0)

    @property
    def val_precision(self) -> str:
        """The precision its threshold was chosen in (``fp32`` for checkpoints before it was recorded)."""
        return str(self.meta.get("val_precision", "fp32"))

    def precision(self, setting: str, device: torch.device, why: str = "") -> str:
        """``bf16`` / ``fp32`` for applying this model on ``device`` under a ``score.amp``-style
        ``setting``: ``auto`` keeps the threshold's own precision where the device runs it fast
        (``engine.resolve_precision``), and says so (or ``why``) when it cannot."""
        from cxr_ray.engine import resolve_precision

        chosen = resolve_precision(setting, device, stored=self.val_precision)
        if chosen != self.val_precision:
            log.warning("%s: its threshold was chosen in %s; applying it in %s (%s): probabilities differ "
                        "slightly (bf16 vs fp32 on real images: max 0.02, >= 99.5%% same decisions)",
                        self.path, self.val_precision, chosen,
                        why or (f"amp={setting}" if setting != "auto" else f"{device.type} has no fast bf16"))
        return chosen

    @property
    def model_id(self) -> str:
        """Which model: folder name, epoch and the first 12 hex digits of the content digest,
        so a checkpoint re-exported at the same path is a different model."""
        from cxr_ray.data import io

        path = str(self.path).rstrip("/")
        path = path if io.is_uri(path) else str(Path(path).resolve())
        run, name = path.rsplit("/", 2)[-2:]
        what = f"ensemble of {len(self.meta['members'])}" if self.is_ensemble else f"epoch{self.meta.get('epoch')}"
        tta = f"+tta={self.tta}" if self.tta != "none" else ""
        return f"{run}/{name}@{what}#{self.digest.split(':', 1)[1][:12]}{tta}"


def fetch_checkpoint(uri: str) -> Path:
    """A local copy of a checkpoint folder at ``s3://`` / ``gs://`` ..., cached by content.

    Its small ``checkpoint.json`` is read every time; the copy is keyed on the digest in it,
    so a checkpoint re-exported at the same URI is fetched again, never served stale.
    (Checkpoints saved before digests existed are fetched, then keyed on their computed digest.)
    """
    import shutil

    import pyarrow.fs as pafs

    from cxr_ray.config import DataConfig
    from cxr_ray.data import io

    cache = Path(DataConfig().resolved_cache_dir) / "checkpoints"  # $CXR_RAY_CACHE or ~/.cache/cxr_ray
    fs, src = io.resolve(uri)
    if fs.get_file_info(src).type != pafs.FileType.Directory:
        raise CheckpointError(f"{uri} is not a cxr_ray checkpoint: no such folder")
    if fs.get_file_info(f"{src}/{META_FILE}").type != pafs.FileType.File:
        raise CheckpointError(f"{uri} is not a cxr_ray checkpoint: {META_FILE} is missing")
    meta = json.loads(io.read_bytes(io.join(uri, META_FILE)))
    if not isinstance(meta, dict):
        raise CheckpointError(f"{uri}: {META_FILE} is not a JSON object")
    if "digest" in meta or meta.get("format_version"):  # it names a cache folder: only sha256:<64 hex>
        check_digest_string(meta.get("digest"), uri)
        hit = _cached_copy(cache / _digest_key(meta["digest"]), meta["digest"])
        if hit is not None:
            return hit
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: a copy placed here is trusted by name
    tmp = Path(tempfile.mkdtemp(prefix="fetch.tmp", dir=cache))  # one per fetch: actors on a node race
    try:
        for name in checkpoint_files(meta):
            info = fs.get_file_info(f"{src}/{name}")
            if info.type != pafs.FileType.File:
                raise CheckpointError(f"{uri} is not a cxr_ray checkpoint: {name} is missing")
            if info.size is not None and info.size > MAX_FILE_BYTES:
                raise CheckpointError(f"{uri}/{name} is {info.size} bytes, over {MAX_FILE_BYTES >> 30} GiB")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(io.read_bytes(io.join(uri, name)))
        digest = verify_meta(tmp, meta)  # a copy that does not match is never cached
        # the same meta, with the digest that keys the copy (computed for checkpoints from before digests)
        (tmp / META_FILE).write_text(json.dumps({**meta, "digest": digest}))
        local = cache / _digest_key(digest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(local)
    except OSError:  # another process on this node placed the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if _cached_copy(local, digest) is None:
            raise
    return local


def _cached_copy(local: Path, digest: str) -> Path | None:
    """``local`` when it is a cached copy whose checkpoint.json claims ``digest`` (the load then
    checks its files and content against it); a stale or foreign folder is removed, None."""
    import shutil

    try:
        cached = json.loads((local / META_FILE).read_text())
    except (OSError, ValueError):
        cached = None
    if isinstance(cached, dict) and cached.get("digest") == digest and not local.is_symlink():
        return local
    if local.exists() or local.is_symlink():
        log.warning("checkpoint cache %s does not hold %s; fetching it again", local, digest[:19])
        if local.is_symlink():
            local.unlink()
        else:
            shutil.rmtree(local, ignore_errors=True)
    return None


def _digest_key(digest: str) -> str:
    """The cache folder name of a checked digest (:func:`check_digest_string`): all 64 hex digits."""
    return digest.split(":", 1)[-1]


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Rebuild the model from a checkpoint folder (no pretrained download: weights come from it).

    ``path`` may be a local folder or a URI (``s3://``, ``gs://``; fetched once into the cache).
    """
    from cxr_ray.data import io

    folder = fetch_checkpoint(str(path)) if io.is_uri(str(path)) else Path(path)
    if (folder / "model.json").is_file() and not (folder / CONFIG_FILE).is_file():
        source = json.loads((folder / "model.json").read_text()).get("source", {}).get("checkpoint")
        raise CheckpointError(f"{folder} is a model exported by cxr-ray export, not a checkpoint; pass the "
                              f"checkpoint it came from ({source}); score.backend=onnxruntime runs its ONNX export")
    if not (folder / META_FILE).is_file():
        raise CheckpointError(f"{folder} is not a cxr_ray checkpoint: {META_FILE} is missing")
    meta = json.loads((folder / META_FILE).read_text())
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder}: {META_FILE} is not a JSON object")
    blobs = read_files(folder, checkpoint_files(meta))  # read once: what is verified is what is loaded
    meta["digest"] = verify_meta(folder, meta, blobs)  # before any file is unpickled; older ones: computed
    cfg = ExperimentConfig.from_saved(yaml.safe_load(blobs[CONFIG_FILE].decode()))
    if meta.get("kind") == "ensemble":
        from cxr_ray.ensemble import EnsembleModel

        members = [_load_model(folder, blobs, f"{MEMBERS_DIR}/{i}/") for i in range(len(meta["members"]))]
        model: nn.Module = EnsembleModel([m for m, _ in members], [c.model.name for _, c in members])
    else:
        model, cfg = _load_model(folder, blobs)
    try:
        stored_preprocessing(meta, cfg)
    except PreprocessingError as e:
        raise CheckpointError(f"{folder}: {e}") from e
    model.eval()
    return LoadedCheckpoint(str(path), model, cfg, float(meta["threshold"]), meta)


def _load_model(folder: Path, blobs: dict[str, bytes], prefix: str = "") -> tuple[nn.Module, ExperimentConfig]:
    """The model of ``prefix`` model.pt, built from its config.yaml (no pretrained download),
    from the bytes already read and verified (``blobs``, keyed by path in ``folder``)."""
    from cxr_ray.models import build_model

    cfg = ExperimentConfig.from_saved(yaml.safe_load(blobs[prefix + CONFIG_FILE].decode()))
    model = build_model(dataclasses.replace(cfg.model, weights="none"))
    where = folder / (prefix + MODEL_FILE)
    state = safe_load(where, blobs[prefix + MODEL_FILE])  # a file that would run code is refused as such
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where} does not match model {cfg.model.name!r}: {e}") from e
    return model, cfg


def load_train_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """Optimizer/scheduler/early-stopping state for resuming, or None when absent."""
    f = Path(path) / STATE_FILE
    return safe_load(f) if f.is_file() else None
