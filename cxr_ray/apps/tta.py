"""Choosing test-time augmentation decisions: per TTA mode (the views are in
``models/wrappers.py``), the temperature and threshold chosen on the validation split with the
same views, stored in ``checkpoint.json`` under ``tta``.

Averaging views changes the logits' scale and spread, so a mode gets its own temperature and
threshold (``fit_tta_decisions``); ``LoadedCheckpoint.with_tta`` applies them. A mode a
checkpoint has no decision for is refused, never run with the plain model's threshold, and so
is a crop5 decision chosen with views cut from the normalised image (before
``wrappers.VIEWS_VERSION`` 2) for a ``per_image`` contract, whose views have changed since.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from cxr_ray.analysis.calibration import fit_decision
from cxr_ray.checkpoint import LoadedCheckpoint, load_checkpoint, write_tta_decisions
from cxr_ray.inference.predictor import predict_split
from cxr_ray.models.wrappers import VIEWS_VERSION, TTAModel

DECISION_KEYS = ("threshold", "temperature", "logit_bias", "threshold_rule", "roc_auc", "pauc", "recall", "specificity",
                 "specificity_lower_bound", "val_ece_before", "val_ece", "n")


def validation_decision(ckpt: LoadedCheckpoint, cache: Any, precision: str) -> dict[str, Any]:
    """Fit ``ckpt``'s calibration and threshold (``calibration.fit_decision`` with its own
    ``metric`` config) on the validation split of ``cache``, running ``ckpt.model`` as it is
    (plain, TTA-wrapped or an ensemble) in ``precision``, in this process."""
    preds = predict_split(ckpt, cache, "val", precision=precision)
    d = fit_decision(preds["logit"].to_numpy(), preds["label"].to_numpy(), preds["patient"].to_numpy(),
                     ckpt.cfg.metric)
    return {**{k: d[k] for k in DECISION_KEYS}, "val_precision": precision}


def fit_tta_decisions(path: str, cache: Any, modes: tuple[str, ...], amp: str = "auto") -> dict[str, dict]:
    """For each TTA mode, the temperature and threshold chosen on the validation split of
    ``cache`` with that mode's views, written into the checkpoint at ``path`` (its digest
    changes: see ``checkpoint.write_tta_decisions``); returns them. ``amp``: as ``evaluate
    --amp`` (``auto``: the precision the checkpoint's own threshold was chosen in, where fast)."""
    if not modes:
        return {}
    ckpt = load_checkpoint(path)
    precision = ckpt.precision(amp, torch.device("cpu"))
    out = {}
    for mode in modes:
        tta = dataclasses.replace(ckpt, model=TTAModel(ckpt.model, mode, ckpt.preprocessing))
        out[mode] = {**validation_decision(tta, cache, precision), "views_version": VIEWS_VERSION}
    write_tta_decisions(path, out, base=ckpt.meta.get("base_digest") or ckpt.digest)
    return out


def format_decisions(decisions: dict[str, dict], base: dict | None = None, prefix: str = "[tta]") -> list[str]:
    """One line per mode (and ``base``, the plain model's): validation ROC-AUC, pAUC, recall
    and specificity at its threshold, temperature and ECE."""
    nan = float("nan")  # (metrics of checkpoints saved before a key existed)
    rows = ([("none", base)] if base else []) + list(decisions.items())
    return [f"{prefix} {mode:<6} val roc_auc {d.get('roc_auc', nan):.4f}, pAUC {d.get('pauc', nan):.4f}; recall "
            f"{d.get('recall', nan):.4f}, specificity {d.get('specificity', nan):.4f} at threshold "
            f"{d.get('threshold', nan):.4f}; temperature {d.get('temperature', 1.0):.3f}, bias "
            f"{d.get('logit_bias', 0.0):+.3f}, ECE {d.get('val_ece_before', nan):.4f} -> {d.get('val_ece', nan):.4f}"
            for mode, d in rows]
