"""Loading a checkpoint: the model rebuilt from its folder (or a URI, fetched once into a
content-keyed cache), its config, threshold and decisions, checked against ``checkpoint.json``'s
digest before any file is unpickled (layout and format: ``checkpoint/format.py``).

Inference rebuilds the model from ``config.yaml`` and the preprocessing from the stored
contract (:attr:`LoadedCheckpoint.preprocessing`), never from flags or today's defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.nn as nn
import yaml

from cxr_ray.checkpoint.format import (
    CONFIG_FILE,
    MAX_FILE_BYTES,
    MEMBERS_DIR,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointMeta,
    check_digest_string,
    checkpoint_files,
    read_files,
    read_meta,
    safe_load,
    verify_meta,
    write_fetched_meta,
)
from cxr_ray.config import DataConfig, ExperimentConfig
from cxr_ray.data.preprocessing import Preprocessing, stored_preprocessing
from cxr_ray.engine.precision import inference_precision
from cxr_ray.errors import CheckpointError, PreprocessingError
from cxr_ray.models.registry import build_model
from cxr_ray.models.wrappers import EnsembleModel, TTAModel, check_tta_decision
from cxr_ray.storage import uri as store

log = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    """A model ready for inference with the config and threshold it was trained with."""

    path: str
    model: nn.Module
    cfg: ExperimentConfig
    threshold: float
    meta: dict[str, Any]
    tta: str = "none"  # the test-time augmentation the model applies (see with_tta)

    @functools.cached_property
    def info(self) -> CheckpointMeta:
        """Its ``checkpoint.json`` as typed fields, with the defaults for keys older checkpoints lack
        (built once: ``meta`` is not changed after loading; ``with_tta`` makes a new checkpoint)."""
        return CheckpointMeta.from_json(self.meta)

    @property
    def tta_modes(self) -> list[str]:
        """The TTA modes this checkpoint has a validation-chosen temperature and threshold for."""
        return sorted(self.info.tta)

    def with_tta(self, mode: str) -> "LoadedCheckpoint":
        """This checkpoint applying test-time augmentation ``mode``: the model averages the
        views' logits, and the temperature, threshold and their precision are the ones chosen on
        validation with the same views. ``none`` returns it unchanged; a mode it has no
        decision for is a :class:`CheckpointError`."""
        if mode == "none":
            return self
        decision = self.info.tta.get(mode)
        if decision is None:
            raise CheckpointError(
                f"{self.path} has no threshold chosen with TTA {mode!r} (it has: {self.tta_modes or 'none'}); "
                f"a plain threshold does not fit averaged logits. Fit one on its validation split: "
                f"cxr-ray fit-tta --checkpoint {self.path} --tta {mode}")
        check_tta_decision(self.path, mode, decision, self.preprocessing)  # chosen with today's views
        meta = {**self.meta, "threshold": decision["threshold"], "temperature": decision["temperature"],
                "logit_bias": decision.get("logit_bias", 0.0),
                "threshold_rule": decision.get("threshold_rule", self.info.threshold_rule),
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
        """The summary of its validation pass that new images are compared with (``cxr_ray/analysis/drift.py``);
        None for checkpoints saved before it existed, and under TTA (its logits are another model's)."""
        return None if self.tta != "none" else self.info.drift_reference

    @property
    def is_ensemble(self) -> bool:
        return self.info.kind == "ensemble"

    @property
    def digest(self) -> str:
        """The content digest (see :func:`content_digest`)."""
        return str(self.meta["digest"])

    @property
    def temperature(self) -> float:
        """Probabilities are ``sigmoid(logit / temperature + logit_bias)`` (1.0 for checkpoints without one)."""
        return self.info.temperature

    @property
    def logit_bias(self) -> float:
        """The calibration's bias (0.0 for checkpoints without one: temperature scaling only)."""
        return self.info.logit_bias

    @property
    def val_precision(self) -> str:
        """The precision its threshold was chosen in (``fp32`` for checkpoints before it was recorded)."""
        return self.info.val_precision

    def precision(self, setting: str, device: torch.device, why: str = "") -> str:
        """``bf16`` / ``fp32`` for applying this model on ``device`` under a ``score.amp``-style
        ``setting``: ``auto`` keeps the threshold's own precision where the device runs it fast
        (``engine/precision.py``), and says so (or ``why``) when it cannot."""
        return inference_precision(setting, device, self.val_precision, str(self.path), why)

    @property
    def model_id(self) -> str:
        """Which model: folder name, epoch and the first 12 hex digits of the content digest,
        so a checkpoint re-exported at the same path is a different model."""
        path = str(self.path).rstrip("/")
        path = path if store.is_uri(path) else str(Path(path).resolve())
        run, name = path.rsplit("/", 2)[-2:]
        what = f"ensemble of {len(self.info.members)}" if self.is_ensemble else f"epoch{self.info.epoch}"
        tta = f"+tta={self.tta}" if self.tta != "none" else ""
        return f"{run}/{name}@{what}#{self.digest.split(':', 1)[1][:12]}{tta}"


def fetch_checkpoint(uri: str) -> Path:
    """A local copy of a checkpoint folder at ``s3://`` / ``gs://`` ..., cached by content.

    Its small ``checkpoint.json`` is read every time; the copy is keyed on the digest in it,
    so a checkpoint re-exported at the same URI is fetched again, never served stale.
    (Checkpoints saved before digests existed are fetched, then keyed on their computed digest.)
    """
    cache = Path(DataConfig().resolved_cache_dir) / "checkpoints"  # $CXR_RAY_CACHE or ~/.cache/cxr_ray
    fs, src = store.resolve(uri)
    if fs.get_file_info(src).type != pafs.FileType.Directory:
        raise CheckpointError(f"{uri} is not a cxr_ray checkpoint: no such folder")
    if fs.get_file_info(f"{src}/{META_FILE}").type != pafs.FileType.File:
        raise CheckpointError(f"{uri} is not a cxr_ray checkpoint: {META_FILE} is missing")
    meta = read_meta(uri)
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
            (tmp / name).write_bytes(store.read_bytes(store.join(uri, name)))
        digest = verify_meta(tmp, meta)  # a copy that does not match is never cached
        # the same meta, with the digest that keys the copy (computed for checkpoints from before digests)
        write_fetched_meta(tmp, meta, digest)
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
    try:
        cached = read_meta(local)
    except (OSError, CheckpointError):
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
    folder = fetch_checkpoint(str(path)) if store.is_uri(str(path)) else Path(path)
    if (folder / "model.json").is_file() and not (folder / CONFIG_FILE).is_file():
        source = json.loads((folder / "model.json").read_text()).get("source", {}).get("checkpoint")
        raise CheckpointError(f"{folder} is a model exported by cxr-ray export, not a checkpoint; pass the "
                              f"checkpoint it came from ({source}); score.backend=onnxruntime runs its ONNX export")
    if not (folder / META_FILE).is_file():
        raise CheckpointError(f"{folder} is not a cxr_ray checkpoint: {META_FILE} is missing")
    meta = read_meta(folder)
    blobs = read_files(folder, checkpoint_files(meta))  # read once: what is verified is what is loaded
    meta["digest"] = verify_meta(folder, meta, blobs)  # before any file is unpickled; older ones: computed
    cfg = ExperimentConfig.from_saved(yaml.safe_load(blobs[CONFIG_FILE].decode()))
    if CheckpointMeta.from_json(meta).kind == "ensemble":
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
