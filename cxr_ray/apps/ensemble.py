"""Ensembles of checkpoints: the mean of the members' logits, as one checkpoint.

``cxr-ray ensemble --from runs/<tune experiment> --top-k 3 --out DIR`` (or ``--checkpoints A B
C``) writes an ensemble checkpoint (layout: ``cxr_ray/checkpoint/format.py``): every member's weights
and config, their shared preprocessing, and a calibration (temperature, bias) and threshold
fitted on the members' shared validation split with the ensemble's own logits (and one per TTA mode of
``metric.tta``). ``load_checkpoint`` returns it like any checkpoint, so ``evaluate``, ``score``
(each scoring actor loads every member once), ``explain`` and ``export`` accept it.

Members may differ in anything the search tunes (``unfreeze_depth``, dropout, learning rate,
even the architecture and weights) but not in what the image becomes before the model (their
preprocessing contracts, ``data/preprocessing.py``) nor in the data and split they were
validated on (:data:`VALIDATION`): a member trained on another split could have trained on the
images the ensemble's threshold is chosen on.
"""

from __future__ import annotations

import dataclasses
import io as std_io
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cxr_ray.apps.tta import fit_tta_decisions, format_decisions, validation_decision
from cxr_ray.checkpoint import (
    CONFIG_FILE,
    MEMBERS_DIR,
    META_FILE,
    MODEL_FILE,
    LoadedCheckpoint,
    load_checkpoint,
    read_meta,
    versions,
    write_meta,
)
from cxr_ray.data.cache import prepare_cache
from cxr_ray.data.catalog import CLASSES
from cxr_ray.data.preprocessing import Preprocessing
from cxr_ray.errors import EnsembleError
from cxr_ray.models.registry import ignored_settings
from cxr_ray.models.wrappers import EnsembleModel
from cxr_ray.storage import uri as store

VALIDATION = ("data.root", "data.val_split", "data.val_fraction", "data.seed")
# shown per member
MEMBER_SETTINGS = ("model.name", "model.weights", "model.unfreeze_depth", "model.width", "model.dropout", "train.lr")


def check_members(ckpts: list[LoadedCheckpoint]) -> None:
    """Refuse members whose preprocessing contracts or :data:`VALIDATION` settings differ, or
    that are ensembles themselves; the error names the setting and each member's value."""
    if len(ckpts) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 checkpoints, got {len(ckpts)}")
    for c in ckpts:
        if c.is_ensemble:
            raise EnsembleError(f"{c.path} is an ensemble already; pass its members instead")
    for c in ckpts[1:]:
        diff = ckpts[0].preprocessing.differences(c.preprocessing)
        if diff:
            raise EnsembleError(f"members differ in preprocessing (the image each member sees would differ): "
                                f"{ckpts[0].path} vs {c.path}: {'; '.join(diff)}")
    for key in VALIDATION:
        values = [c.cfg.get(key) for c in ckpts]
        if len(set(map(repr, values))) > 1:
            why = "the threshold would be chosen on images some member may have trained on"
            listed = "; ".join(f"{c.path}: {v!r}" for c, v in zip(ckpts, values))
            raise EnsembleError(f"members differ in {key} ({why}): {listed}")


def _stored_contract(path: str) -> Preprocessing | None:
    """A checkpoint's stored preprocessing contract without loading its weights (None: not stored)."""
    pre = read_meta(path).get("preprocessing")
    return Preprocessing.from_dict(pre) if pre else None


def _same_preprocessing(a: Preprocessing | None, b: Preprocessing | None) -> bool:
    """Equal contracts (where their constants come from aside); two unstored (older) ones count as equal."""
    return (a is None and b is None) or (a is not None and b is not None and not a.differences(b))


def top_k_checkpoints(experiment: str, k: int) -> list[str]:
    """The best-epoch checkpoints of the ``k`` best trials of a tune experiment (its
    ``trials.csv``, ranked by the experiment's metric; failed trials, trials without a
    checkpoint and, in a search over backbones, trials whose preprocessing differs from the
    best trial's are skipped)."""
    path = store.join(experiment.rstrip("/"), "trials.csv")
    if not store.exists(path):
        raise EnsembleError(f"--from {experiment}: not a cxr_ray tune experiment (trials.csv missing)")

    table = pd.read_csv(std_io.BytesIO(store.read_bytes(path)))
    ok = table[table["checkpoint_path"].notna() & (table["stop_reason"] != "failed")]
    paths = [p for p in ok["checkpoint_path"] if store.exists(store.join(p, META_FILE))]
    if paths:
        best = _stored_contract(paths[0])
        paths = [p for p in paths if _same_preprocessing(best, _stored_contract(p))]
    if len(paths) < k:
        raise EnsembleError(f"--from {experiment}: asked for the top {k} trials, only {len(paths)} have a "
                            f"checkpoint with the best trial's preprocessing")
    return paths[:k]


def build_ensemble(sources: list[str | LoadedCheckpoint], out: str, cache: Any = None, amp: str = "auto",
                   replace: bool = False) -> LoadedCheckpoint:
    """Write the ensemble checkpoint of ``sources`` (checkpoint folders, URIs or loaded checkpoints) to ``out`` and
    return it loaded. ``cache``: the prepared cache of the members' data (else prepared from
    the first member's config; needs Ray). The temperature and threshold (and each TTA mode's
    of the first member's ``metric.tta``) are fitted on its validation split. An existing
    ``out`` is refused unless ``replace``."""


    if store.exists(out) and not replace:
        raise EnsembleError(f"--out {out} exists; choose a new folder (an ensemble is never written over another)")
    ckpts = [s if isinstance(s, LoadedCheckpoint) else load_checkpoint(s) for s in sources]
    check_members(ckpts)
    first = ckpts[0]
    cache = cache or prepare_cache(first.cfg, preprocessing=first.preprocessing)
    precision = first.precision(amp, torch.device("cpu"))
    model = EnsembleModel([c.model for c in ckpts], [c.cfg.model.name for c in ckpts])
    draft = dataclasses.replace(first, model=model, meta={**first.meta, "temperature": 1.0, "logit_bias": 0.0})
    decision = validation_decision(draft, cache, precision)
    members = [{"source": c.path, "model_id": c.model_id, "digest": c.digest,
                "settings": {k: c.cfg.get(k) for k in MEMBER_SETTINGS},
                "val": {k: c.info.metrics.get(k) for k in ("roc_auc", "pauc", "recall", "specificity")}}
               for c in ckpts]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ensemble"
        for i, c in enumerate(ckpts):
            d = folder / MEMBERS_DIR / str(i)
            d.mkdir(parents=True)
            torch.save({k: v.detach().cpu() for k, v in c.model.state_dict().items()}, d / MODEL_FILE)
            c.cfg.to_yaml(d / CONFIG_FILE)
        first.cfg.to_yaml(folder / CONFIG_FILE)
        meta = {"kind": "ensemble", "members": members, "combine": "mean of logits",
                "preprocessing": first.preprocessing.to_dict(),
                "threshold": decision["threshold"], "threshold_rule": decision["threshold_rule"],
                "val_precision": precision, "temperature": decision["temperature"],
                "logit_bias": decision["logit_bias"],
                "class_map": {str(i): c for i, c in enumerate(CLASSES)}, "positive_class": CLASSES[1],
                "epoch": -1, "metrics": {k: v for k, v in decision.items() if k != "drift_reference"},
                "drift_reference": decision.get("drift_reference"), "versions": versions()}
        write_meta(folder, meta)
        fit_tta_decisions(str(folder), cache, first.cfg.metric.tta_modes, amp=precision)
        store.copy_tree(str(folder), out)
    return load_checkpoint(out)


def format_ensemble(ckpt: LoadedCheckpoint) -> list[str]:
    """Lines for the terminal: each member's settings and validation metrics, then the
    ensemble's validation metrics at its own threshold, temperature and TTA modes."""

    lines = []
    for i, m in enumerate(ckpt.info.members):
        s, v = m["settings"], m["val"]
        shown = [k for k in s if k not in ignored_settings(s.get("model.name"))]
        knobs = ", ".join(f"{k.split('.')[-1]}={s[k]:.3g}" if isinstance(s[k], float) else f"{k.split('.')[-1]}={s[k]}"
                          for k in shown)
        val = ", ".join(f"{k} {v[k]:.4f}" for k in ("roc_auc", "pauc") if v.get(k) is not None)
        lines.append(f"[ensemble] member {i}: {m['model_id']} ({knobs}); val {val or 'metrics not recorded'}")
    lines += format_decisions(ckpt.info.tta, ckpt.info.metrics, prefix="[ensemble]")
    return lines
