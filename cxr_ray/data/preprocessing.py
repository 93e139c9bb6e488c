"""The preprocessing contract: how a file becomes the tensor a model sees, decided once.

Like timm's ``resolve_data_config``, :func:`resolve_preprocessing` turns ``(model, weights,
data config)`` into one small :class:`Preprocessing`; it is stored in every checkpoint
(``checkpoint.json`` ``preprocessing``) and the cache, training, evaluation, scoring,
explanations and export all build their transforms from it::

    file --decode (PIL bilinear; JPEGs DCT-downscaled first)--> uint8 (S, S)   S = cache_size
         --antialiased bilinear resize (when S != N)--------> uint8 (1, N, N)  N = image_size
         --[augment: training only]--> x = pixel / 255 in [0, 1]
         --normalise--> fixed:     (x - mean) / std          (value range [-mean/std, (1-mean)/std])
                        per_image: (x - mean(x)) / std(x) * scale

A checkpoint written before contracts were recorded gets :func:`legacy_preprocessing`: the
constants of that time, written out here so that no later change of a default moves its scores.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from cxr_ray.config import ExperimentConfig
from cxr_ray.errors import ConfigError, PreprocessingError
from cxr_ray.models.specs import pretrained_info

log = logging.getLogger(__name__)

NORMALIZE_MODES = ("fixed", "per_image")
# What checkpoints without a recorded contract used: ImageNet's RGB statistics averaged, for
# data.normalize=fixed (per_image had no scale). Frozen: never derive these from today's code.
LEGACY_MEAN = (0.485 + 0.456 + 0.406) / 3
LEGACY_STD = (0.229 + 0.224 + 0.225) / 3


@dataclass(frozen=True)
class Preprocessing:
    """Everything between a file and the model input; see the module doc for the chain."""

    cache_size: int  # side of the decoded square gray image (the decode-once cache)
    image_size: int  # side the model sees
    normalize: str  # "fixed" or "per_image"
    mean: float = LEGACY_MEAN  # fixed: (x - mean) / std, x = pixel / 255
    std: float = LEGACY_STD
    scale: float = 1.0  # per_image: the standardised image times this
    channels: int = 1  # channels the model's first layer takes (the gray image)
    interpolation: str = "bilinear"  # both resizes (the second antialiased)
    source: str = "imagenet"  # whose constants: imagenet, txrv, none (random init), file, legacy

    def __post_init__(self) -> None:
        problems = []
        if not 16 <= self.image_size <= self.cache_size <= 4096:
            problems.append(f"sizes must satisfy 16 <= image_size ({self.image_size}) <= cache_size "
                            f"({self.cache_size}) <= 4096")
        if self.normalize not in NORMALIZE_MODES:
            problems.append(f"normalize must be one of {list(NORMALIZE_MODES)}, got {self.normalize!r}")
        if not (self.std > 0 and self.scale > 0):
            problems.append(f"std and scale must be > 0, got {self.std}, {self.scale}")
        if self.channels != 1 or self.interpolation != "bilinear":
            problems.append(f"only 1 channel and bilinear resizing exist, got {self.channels}, {self.interpolation!r}")
        if problems:
            raise PreprocessingError("preprocessing: " + "; ".join(problems))

    @property
    def value_range(self) -> tuple[float, float] | None:
        """The model input's range for ``fixed`` (e.g. [-1024, 1024] for TorchXRayVision); None for per_image."""
        if self.normalize != "fixed":
            return None
        return (0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        """A stored contract; unknown or missing fields are a :class:`PreprocessingError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PreprocessingError(f"preprocessing: unknown field(s) {unknown}; this cxr_ray knows {sorted(names)} "
                                     f"(was the checkpoint written by a newer version?)")
        try:
            return cls(**data)
        except TypeError as e:
            raise PreprocessingError(f"preprocessing: {e}") from e

    def describe(self) -> str:
        """One line for logs: ``224 px (decoded at 256), 1 channel, per_image x1 (imagenet)``."""
        decode = f" (decoded at {self.cache_size})" if self.cache_size != self.image_size else ""
        if self.normalize == "fixed":
            lo, hi = self.value_range
            norm = f"fixed to [{lo:.4g}, {hi:.4g}]"
        else:
            norm = f"per_image x{self.scale:g}"
        return f"{self.image_size} px{decode}, {self.channels} channel, {norm} ({self.source})"

    def differences(self, other: "Preprocessing") -> list[str]:
        """Fields where ``other`` differs, as ``field: a vs b`` (empty when they agree)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if k != "source" and mine[k] != theirs[k]]


def resolve_preprocessing(cfg: ExperimentConfig) -> Preprocessing:
    """The contract for training ``cfg``: the weights' own (``models.specs.pretrained_info``:
    size, constants, default normalisation) where ``data.image_size`` is 0 and
    ``data.normalize`` is ``auto``, the data config's where it sets them."""

    info = pretrained_info(cfg.model.name, cfg.model.weights, cfg.model.weights_format)
    size = cfg.data.image_size or info.image_size
    cache = cfg.data.cache_size or size
    if cache < size:
        raise ConfigError(f"data.cache_size: expected >= the image size ({size}"
                          f"{'' if cfg.data.image_size else f', the size {info.source} weights use'}) so the "
                          f"cache is never upscaled, got {cache}")
    if cfg.data.image_size and cfg.data.image_size != info.image_size and info.source == "txrv":
        _warn_size(cfg.model.weights, cfg.data.image_size, info.image_size)
    mode = info.normalize if cfg.data.normalize == "auto" else cfg.data.normalize
    return Preprocessing(cache_size=cache, image_size=size, normalize=mode, mean=info.mean, std=info.std,
                         scale=info.per_image_scale, source=info.source)


@functools.lru_cache(maxsize=None)
def _warn_size(weights: str, size: int, native: int) -> None:
    """Once per process: the weights run at another size than they were trained at."""
    log.warning("data.image_size=%d: %s was trained at %d px (data.image_size=0 uses its size)", size, weights, native)


def legacy_preprocessing(cfg: ExperimentConfig) -> Preprocessing:
    """The contract of a checkpoint written before contracts were stored: its config's sizes
    and normalisation with the constants of that time (``LEGACY_MEAN``/``LEGACY_STD``, scale 1)."""
    return Preprocessing(cache_size=cfg.data.cache_size or cfg.data.image_size, image_size=cfg.data.image_size,
                         normalize=cfg.data.normalize, mean=LEGACY_MEAN, std=LEGACY_STD, scale=1.0,
                         source="legacy")


def stored_preprocessing(meta: Mapping[str, Any], cfg: ExperimentConfig) -> Preprocessing:
    """A checkpoint's contract: ``meta["preprocessing"]``, or :func:`legacy_preprocessing` of its config."""
    if "preprocessing" in meta:
        return Preprocessing.from_dict(meta["preprocessing"])
    return legacy_preprocessing(cfg)
