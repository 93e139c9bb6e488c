"""Models made of models: test-time augmentation (:class:`TTAModel`, the mean logit over fixed
views of each image) and ensembles (:class:`EnsembleModel`, the mean of members' logits).
``checkpoint/load.py`` builds them from a checkpoint; ``apps/tta.py`` and ``apps/ensemble.py``
choose their thresholds. TTA modes (``config.TTA_MODES``):

- ``none``: the image as is;
- ``hflip``: the image and its left-right mirror (2 forwards);
- ``crop5``: the centre and the four corners of a ``CROP_SCALE`` crop, each resized back to
  the model's input size and then normalised by the checkpoint's preprocessing contract, as
  training normalises its random zoom-in crops (5 forwards). With ``per_image`` normalisation
  each view is standardised on its own pixels, not on the whole image's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cxr_ray.config import TTA_MODES
from cxr_ray.data.preprocessing import Preprocessing
from cxr_ray.data.transforms import normalize, unnormalize
from cxr_ray.errors import CheckpointError

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


class EnsembleModel(nn.Module):
    """The mean of ``members``' PNEUMONIA logits ``(B, 1)``; ``names`` are their model names
    (Grad-CAM finds each member's layer by it)."""

    def __init__(self, members: list[nn.Module], names: list[str]):
        super().__init__()
        self.members, self.names = nn.ModuleList(members), list(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], 0).mean(0)


def base_models(model: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """The networks inside ``model`` with their model names: an ensemble's members, the
    network inside a :class:`TTAModel`, or ``model`` itself (named ``name``)."""
    model = base_model(model)
    if isinstance(model, EnsembleModel):
        return list(zip(model.members, model.names))
    return [(model, name)]
