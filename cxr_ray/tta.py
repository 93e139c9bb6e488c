"""Test-time augmentation: the mean logit over a few fixed views of each image.

Modes (``TTA_MODES``):

- ``none``: the image as is;
- ``hflip``: the image and its left-right mirror (2 forwards);
- ``crop5``: the centre and the four corners of a ``CROP_SCALE`` crop, each resized back to
  the model's input size and then normalised by the checkpoint's preprocessing contract, as
  training normalises its random zoom-in crops (5 forwards). With ``per_image`` normalisation
  each view is standardised on its own pixels, not on the whole image's.

Averaging views changes the logits' scale and spread, so a mode gets its own temperature and
threshold, chosen on the validation split with the same views (``fit_tta_decisions``) and stored
in ``checkpoint.json`` under ``tta``; ``LoadedCheckpoint.with_tta`` applies them. A mode a
checkpoint has no decision for is refused, never run with the plain model's threshold, and so
is a crop5 decision chosen with views cut from the normalised image (before
:data:`VIEWS_VERSION` 2) for a ``per_image`` contract, whose views have changed since.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cxr_ray.config import TTA_MODES
from cxr_ray.data.preprocessing import Preprocessing
from cxr_ray.data.transforms import normalize, unnormalize

CROP_SCALE = 0.875  # side of each crop5 view as a share of the image side (196 of 224 px)
# Recorded in every TTA decision fit_tta_decisions writes. 2: crop5 views normalised after cropping
# (1, unrecorded: cut from the normalised image, which per_image normalisation made a different view).
VIEWS_VERSION = 2


def crop_boxes(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of the crop5 views of an ``h`` x ``w`` image: the
    centre, then the top-left, top-right, bottom-left and bottom-right corners."""
    ch, cw = max(1, round(h * CROP_SCALE)), max(1, round(w * CROP_SCALE))
    tops = [((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    return [(t, s, ch, cw) for t, s in tops]


def views(x: torch.Tensor, mode: str, contract: Preprocessing) -> list[torch.Tensor]:
    """The views for ``mode`` (see the module doc) of a batch ``(B, C, H, W)`` that ``contract``
    normalised, each normalised by ``contract`` as the model's input.

    ``hflip`` mirrors ``x``: the same pixels, so the same normalisation. Each ``crop5`` view is
    cut from the pixels (``transforms.unnormalize``), resized back to ``H`` x ``W`` and then
    normalised (``transforms.normalize``), as training normalises its zoom-in crops.
    """
    if mode == "none":
        return [x]
    if mode == "hflip":
        return [x, torch.flip(x, dims=(-1,))]
    if mode == "crop5":
        h, w = x.shape[-2:]
        pixels = unnormalize(x, contract)
        return [normalize(F.interpolate(pixels[..., t:t + ch, s:s + cw], size=(h, w), mode="bilinear",
                                        align_corners=False), contract)
                for t, s, ch, cw in crop_boxes(h, w)]
    raise ValueError(f"TTA mode {mode!r}: expected one of {list(TTA_MODES)}")


class TTAModel(nn.Module):
    """``model`` applied to every view of ``mode`` of a batch normalised by ``contract`` (the
    checkpoint's preprocessing); returns the mean logit ``(B, 1)``."""

    def __init__(self, model: nn.Module, mode: str, contract: Preprocessing):
        super().__init__()
        if mode not in TTA_MODES or mode == "none":
            raise ValueError(f"TTA mode {mode!r}: expected one of {[m for m in TTA_MODES if m != 'none']}")
        self.model, self.mode, self.contract = model, mode, contract

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = [self.model(v) for v in views(x, self.mode, self.contract)]
        return torch.stack(out, 0).mean(0)


def check_tta_decision(path: str, mode: str, decision: dict, contract: Preprocessing) -> None:
    """A ``CheckpointError`` when the stored ``decision`` of ``mode`` was chosen with other views
    than :func:`views` makes now: crop5 on a ``per_image`` contract before :data:`VIEWS_VERSION` 2
    (its temperature and threshold belong to the old views' logits)."""
    from cxr_ray.checkpoint import CheckpointError

    found = int(decision.get("views_version", 1))
    if mode == "crop5" and contract.normalize == "per_image" and found < VIEWS_VERSION:
        raise CheckpointError(
            f"{path}: its crop5 temperature and threshold were chosen with views version {found} (views cut "
            f"from the per_image-normalised image); crop5 views are now normalised after cropping (version "
            f"{VIEWS_VERSION}), so they no longer fit. Choose them again: cxr-ray fit-tta --checkpoint {path} "
            f"--tta crop5")


def base_model(model: nn.Module) -> nn.Module:
    """The network inside a :class:`TTAModel` (Grad-CAM explains the image as it is)."""
    return model.model if isinstance(model, TTAModel) else model


def parse_modes(text: str, key: str = "metric.tta") -> tuple[str, ...]:
    """``"hflip,crop5"`` -> ``("hflip", "crop5")``; ``""`` / ``"none"`` -> ``()``."""
    from cxr_ray.config import ConfigError

    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip() and m.strip() != "none"))
    bad = [m for m in modes if m not in TTA_MODES]
    if bad:
        raise ConfigError(f"{key}: unknown TTA mode(s) {bad}; expected a comma-separated subset of "
                          f"{[m for m in TTA_MODES if m != 'none']}")
    return modes


DECISION_KEYS = ("threshold", "temperature", "logit_bias", "threshold_rule", "roc_auc", "pauc", "recall", "specificity",
                 "specificity_lower_bound", "val_ece_before", "val_ece", "n")


def validation_decision(ckpt, cache, precision: str) -> dict:
    """Fit ``ckpt``'s calibration and threshold (``calibration.fit_decision`` with its own
    ``metric`` config) on the validation split of ``cache``, running ``ckpt.model`` as it is
    (plain, TTA-wrapped or an ensemble) in ``precision``, in this process."""
    from cxr_ray.calibration import fit_decision
    from cxr_ray.evaluate import predict_split

    preds = predict_split(ckpt, cache, "val", precision=precision)
    d = fit_decision(preds["logit"].to_numpy(), preds["label"].to_numpy(), preds["patient"].to_numpy(),
                     ckpt.cfg.metric)
    return {**{k: d[k] for k in DECISION_KEYS}, "val_precision": precision}


def fit_tta_decisions(path: str, cache, modes: tuple[str, ...], amp: str = "auto") -> dict[str, dict]:
    """For each TTA mode, the temperature and threshold chosen on the validation split of
    ``cache`` with that mode's views, written into the checkpoint at ``path`` (its digest
    changes: see ``checkpoint.write_tta_decisions``); returns them. ``amp``: as ``evaluate
    --amp`` (``auto``: the precision the checkpoint's own threshold was chosen in, where fast)."""
    import dataclasses

    from cxr_ray.checkpoint import load_checkpoint, write_tta_decisions

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
