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

``checkpoint.json`` may also hold ``tta``: per test-time augmentation mode (``cxr_ray/apps/tta.py``)
the temperature, bias and threshold chosen on validation with that mode's views, written after
training by :func:`write_tta_decisions`; they enter the digest.

An *ensemble* checkpoint (``"kind": "ensemble"``, written by ``cxr_ray/apps/ensemble.py``) has no
``model.pt``: ``members/<i>/model.pt`` and ``members/<i>/config.yaml`` hold each member, and its
``config.yaml`` is the members' shared preprocessing (the first member's config). It loads,
evaluates and scores exactly like one checkpoint: the model is the mean of the members' logits.

Inference rebuilds the model from ``config.yaml`` and the preprocessing from the stored
contract (:attr:`LoadedCheckpoint.preprocessing`), never from flags or today's defaults.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import os
import pickle
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import cxr_ray
from cxr_ray.config import ExperimentConfig
from cxr_ray.data.catalog import CLASSES
from cxr_ray.data.preprocessing import Preprocessing, resolve_preprocessing
from cxr_ray.errors import CheckpointError
from cxr_ray.storage import uri as store

log = logging.getLogger(__name__)

MODEL_FILE, CONFIG_FILE, META_FILE, STATE_FILE = "model.pt", "config.yaml", "checkpoint.json", "train_state.pt"
MEMBERS_DIR = "members"  # an ensemble's members
# checkpoint.json's format: 2 = every field and each file's hash in the digest (format_version
# absent: written before it, digest of the files and a few fields, or none at all)
FORMAT_VERSION = 2
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_MEMBERS = 64  # an ensemble's members (each is fetched and loaded)
MAX_FILE_BYTES = 4 << 30  # one weights or config file of a checkpoint (ResNet-50: ~100 MB)


# What a key absent from an older checkpoint's checkpoint.json meant when that checkpoint was
# written: the one place these defaults live (CheckpointMeta.from_json applies them).
OLDER_DEFAULTS: dict[str, Any] = {
    "kind": "model",  # before ensembles: every checkpoint was one model
    "threshold_rule": "given",  # before the rule was recorded
    "val_precision": "fp32",  # before bf16 validation: thresholds were chosen in fp32
    "temperature": 1.0, "logit_bias": 0.0,  # before calibration: sigmoid(logit)
    "tta": {},  # before test-time augmentation decisions
    "drift_reference": None,  # before the drift report: nothing to compare with
    "metrics": {}, "epoch": None, "members": [], "versions": {},
    "class_map": {"0": "NORMAL", "1": "PNEUMONIA"}, "positive_class": "PNEUMONIA",
    "format_version": None,  # before format 2 (the digest scheme differs: verify_meta)
}


@dataclass(frozen=True)
class CheckpointMeta:
    """``checkpoint.json`` as typed fields, with :data:`OLDER_DEFAULTS` for keys an older
    checkpoint lacks. The raw dict stays the record (it is what the digest covers)."""

    kind: str
    threshold: float
    threshold_rule: str
    val_precision: str
    temperature: float
    logit_bias: float
    tta: dict[str, Any]
    drift_reference: dict[str, Any] | None
    metrics: dict[str, Any]
    epoch: int | None
    members: list[dict[str, Any]]
    versions: dict[str, str]
    class_map: dict[str, str]
    positive_class: str
    format_version: int | None
    digest: str

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> "CheckpointMeta":
        """The typed view of a ``checkpoint.json`` dict (after :func:`verify_meta` set its digest)."""
        d = {**OLDER_DEFAULTS, **{k: v for k, v in meta.items() if v is not None}}
        return cls(kind=str(d["kind"]), threshold=float(d["threshold"]), threshold_rule=str(d["threshold_rule"]),
                   val_precision=str(d["val_precision"]), temperature=float(d["temperature"] or 1.0),
                   logit_bias=float(d["logit_bias"] or 0.0), tta=dict(d["tta"] or {}),
                   drift_reference=d["drift_reference"], metrics=dict(d["metrics"] or {}), epoch=d["epoch"],
                   members=list(d["members"] or []), versions=dict(d["versions"] or {}),
                   class_map=dict(d["class_map"]), positive_class=str(d["positive_class"]),
                   format_version=d["format_version"], digest=str(d.get("digest", "")))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``checkpoint.json`` of the checkpoint at ``path`` (a folder or URI) as a dict: the one
    reader of that file. :class:`CheckpointError` when it is missing or not a JSON object."""
    where = store.join(str(path), META_FILE)
    try:
        meta = json.loads(store.read_bytes(where))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a cxr_ray checkpoint: {META_FILE} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{where} is not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    return meta


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
    drift_reference = metrics.pop("drift_reference", None)  # the validation pass's summary (cxr_ray/analysis/drift.py)
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
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_files(folder: Path, names: list[str]) -> dict[str, bytes]:
    """Each of ``names`` in ``folder`` read once, through one handle (what is hashed is what is
    loaded); a missing, non-regular or oversized (:data:`MAX_FILE_BYTES`) file is a
    :class:`CheckpointError`."""
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
    _write_json(str(folder), sealed)
    return sealed


def write_fetched_meta(folder: Path, meta: dict[str, Any], digest: str) -> None:
    """The ``checkpoint.json`` of a fetched copy in the local cache: the source's content with
    the digest that keys the copy (computed for checkpoints from before digests)."""
    _write_json(str(folder), {**meta, "digest": digest})


def _write_json(path: str, meta: dict[str, Any]) -> None:
    """Write ``meta`` as the ``checkpoint.json`` of the checkpoint at ``path`` (folder or URI):
    the one place the file is written (by :func:`write_meta`, :func:`write_tta_decisions`,
    :func:`write_fetched_meta`)."""
    store.write_bytes(store.join(path, META_FILE), json.dumps(meta, indent=1).encode())


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

    meta = read_meta(path)
    meta["tta"] = {**(meta.get("tta") or {}), **{m: _jsonable(d) for m, d in decisions.items()}}
    if meta.get("format_version"):  # the files' hashes are in it: no file is read again
        meta.update(base_digest=meta_digest(meta, without=("tta",)), digest=meta_digest(meta))
    else:  # a checkpoint from before format 2 keeps that time's digest scheme
        base = base or meta.get("base_digest") or meta["digest"]
        meta.update(base_digest=base, digest=tta_digest(base, meta["tta"]))
    _write_json(path, meta)
    return meta["digest"]


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) else v)
            for k, v in metrics.items()}


def safe_load(path: str | os.PathLike, data: bytes | None = None) -> Any:
    """``torch.load(weights_only=True)`` of the file at ``path`` (or of its bytes ``data``, already
    read); a file that would run code on load is refused."""
    try:
        return torch.load(_io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load, the file holds more than tensors and plain "
                              f"data (it could run code on load): {e}") from e
