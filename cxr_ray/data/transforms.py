"""The tensor transforms of the preprocessing contract (``data/preprocessing.py``): training,
evaluation, scoring, explanations and export all go through here after ``data/images.py``.

The chain for every image is::

    file --decode.decode_image--> uint8 (S, S)      # S = contract.cache_size, done once and cached
         --images.to_model_size-> uint8 (1, N, N)   # N = contract.image_size
         --augment (train only)-> float [0, 1]
         --normalize-----------> float: fixed (x - mean) / std, or per_image standardised x scale

One channel is normalised with a single mean/std. Feeding that gray image to a network whose
first convolution has its RGB weights summed is *exactly* equivalent to feeding the gray image
replicated to 3 channels (see ``models/backbones.py``), at a third of the first layer's input work.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cxr_ray.config import AugmentConfig
from cxr_ray.data.preprocessing import Preprocessing


def normalize(x: torch.Tensor, contract: Preprocessing) -> torch.Tensor:
    """uint8 or [0, 1] float ``(B, 1, H, W)`` images -> the normalised float32 the model sees.

    ``fixed``: the contract's mean/std for every image. ``per_image``: each image to zero mean
    and unit standard deviation (times the contract's scale), so a scanner's overall exposure
    and contrast do not reach the model.
    """
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    if contract.normalize == "per_image":
        # mean and (unbiased) std of each image, as means of row means: the same values, but no
        # sum runs over a whole image, so they stay exact to fp32 in every runtime (ONNX
        # Runtime's one-pass reductions over 50k pixels were off by 2e-5 and moved logits 1e-4)
        n = x.shape[1] * x.shape[2] * x.shape[3]
        mean = x.mean(dim=3, keepdim=True).mean(dim=(1, 2), keepdim=True)
        centred = x - mean
        var = centred.square().mean(dim=3, keepdim=True).mean(dim=(1, 2), keepdim=True) * (n / max(n - 1, 1))
        z = centred / var.sqrt().clamp(min=1e-3)
        return z * contract.scale if contract.scale != 1.0 else z
    return (x - contract.mean) / contract.std


def unnormalize(x: torch.Tensor, contract: Preprocessing) -> torch.Tensor:
    """:func:`normalize`'s output back on the [0, 1] pixel scale, as far as it matters to
    :func:`normalize` again: ``fixed``: ``x * std + mean`` (its inverse); ``per_image``: ``x`` as is,
    an affine map of the pixels, which per-image standardisation of any crop of it removes (so
    ``normalize(crop)`` is the crop of the pixels standardised; a crop of nearly one grey level,
    std below 1e-3 in either scale, aside: the clamp)."""
    if contract.normalize == "per_image":
        return x
    return x * contract.std + contract.mean


def batch_seed(seed: int, epoch: int, keys: np.ndarray) -> int:
    """A seed for one batch that depends only on the run seed, epoch and the batch's images."""
    digest = zlib.crc32(np.ascontiguousarray(keys).tobytes())
    return (seed * 1_000_003 + epoch * 7_919 + digest) % (2**63)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)``, ~5x faster on CPU.

    Computed as two broadcast multiply-adds over pixel-centre coordinates instead of a
    batched matmul against a materialised (B, h*w, 3) base grid.
    """
    ys = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    xy = t[:, :, 0] * xs.view(1, 1, 1, w) + t[:, :, 1] * ys.view(1, 1, h, 1) + t[:, :, 2]
    return xy.permute(0, 2, 3, 1)  # (B, h, w, 2) with (x, y) last, as grid_sample expects


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(B, 1, H, W)`` float batch (reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def blur_sigma(size: int) -> float:
    """Blur/sharpen scale: 1.5 px at 224 px, proportional to the image side, at least 0.5 px."""
    return max(0.5, 1.5 * size / 224)


def _acquisition(x: torch.Tensor, cfg: AugmentConfig, uniform: Any, generator: torch.Generator) -> torch.Tensor:
    """Exposure (gamma), blur or sharpening, and noise: how scanners differ, not lungs."""
    b = x.shape[0]
    if cfg.gamma > 0:
        x = x.clamp(min=1e-4) ** torch.exp(uniform(-cfg.gamma, cfg.gamma)).to(x.device).view(b, 1, 1, 1)
    if cfg.blur > 0 or cfg.sharpen > 0:
        amount = uniform(-cfg.blur, cfg.sharpen).to(x.device).view(b, 1, 1, 1)  # < 0 blurs, > 0 sharpens
        x = x + amount * (x - gaussian_blur(x, sigma=blur_sigma(x.shape[-1])))
    if cfg.noise > 0:
        std = uniform(0.0, cfg.noise).view(b, 1, 1, 1)
        x = x + (std * torch.randn(x.shape, generator=generator)).to(x.device)
    return x


def _borders(x: torch.Tensor, cfg: AugmentConfig, uniform: Any, generator: torch.Generator) -> torch.Tensor:
    """Black bands at each side with probability ``border_p``, up to ``border_max`` of the side:
    where the film ends (collimation, margins) must not tell the class."""
    b, _, h, w = x.shape
    keep = torch.ones_like(x)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    for side in range(4):
        on = torch.rand(b, generator=generator) < cfg.border_p
        depth = (uniform(0.0, cfg.border_max) * (h if side < 2 else w)).floor().long() * on
        d = depth.view(b, 1, 1)
        band = {0: rows < d, 1: rows >= h - d, 2: cols < d, 3: cols >= w - d}[side]
        keep[:, 0] *= (~band).to(x.dtype).to(x.device)
    return x * keep


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random flip, rotation, zoom in and out, translation, aspect jitter, black borders,
    acquisition changes (gamma, blur/sharpen, noise) and brightness/contrast on a
    ``(B, 1, H, W)`` batch.

    Input uint8 or float in [0, 1]; output float in [0, 1]. Flip, rotation, zoom, translation
    and aspect are one affine warp per image (a single batched ``grid_sample``; what falls
    outside the film is black, as a margin is); parameters come from ``generator`` so a seeded
    generator gives the same result. The geometric ones break framing cues (where the body sits,
    how much margin and neck a film shows), which differ by class in the Kaggle data.
    """
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    b = x.shape[0]
    if not cfg.enabled or b == 0:
        return x

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle = uniform(-cfg.rotation_deg, cfg.rotation_deg) * (math.pi / 180.0)
    scale = uniform(cfg.scale_min, cfg.scale_max)  # share of the image's side shown: < 1 zooms in, > 1 out
    flip = torch.where(torch.rand(b, generator=generator) < cfg.hflip_p, -1.0, 1.0)
    slack = (1.0 - scale).clamp(min=0.0) + cfg.translate * 2  # room to move the window (in [-1, 1] units)
    tx, ty = uniform(-1, 1) * slack, uniform(-1, 1) * slack
    stretch = torch.exp(uniform(-cfg.aspect, cfg.aspect)) if cfg.aspect > 0 else torch.ones(b)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos * flip / stretch, -sin / stretch, tx], 1),
        torch.stack([sin * flip * stretch, cos * stretch, ty], 1),
    ], 1).to(x.device)
    grid = _affine_grid(theta, x.shape[-2], x.shape[-1])
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.border_p > 0:
        x = _borders(x, cfg, uniform, generator)
    x = _acquisition(x, cfg, uniform, generator)
    brightness = uniform(-cfg.brightness, cfg.brightness).to(x.device).view(b, 1, 1, 1)
    contrast = uniform(1 - cfg.contrast, 1 + cfg.contrast).to(x.device).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)


class Collate:
    """``iter_torch_batches`` collate_fn: model-input batch -> ``(images, labels)`` on ``device``.

    Input columns: ``image`` uint8 ``(B, 1, N, N)``, ``label`` (B,), ``key`` int64 (B,) (a
    stable per-image id). Normalised by the ``preprocessing`` contract. With ``augment`` set
    (training) each batch is augmented with a generator seeded by (seed, epoch, the batch's
    keys), so a run is reproducible under a seed however Ray Data's threads interleave
    batches. Evaluation passes ``augment=None``.
    """

    def __init__(self, preprocessing: Preprocessing, device: torch.device | str = "cpu",
                 augment: AugmentConfig | None = None, seed: int = 0, epoch: int = 0, channels_last: bool = False):
        self.device = torch.device(device)
        self.preprocessing = preprocessing
        self.augment_cfg = augment
        self.seed, self.epoch = seed, epoch
        self.channels_last = channels_last

    def __call__(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"]
        if isinstance(images, torch.Tensor):  # decoded on a device already (scoring's score.decode=gpu)
            x = images.to(self.device, non_blocking=True)
        else:
            images = np.asarray(images)
            if not images.flags.writeable:  # Ray hands out read-only views of its object store
                images = images.copy()
            x = torch.from_numpy(images).to(self.device, non_blocking=True)
        y = torch.tensor(np.asarray(batch["label"], dtype=np.float32), device=self.device)
        if self.augment_cfg is not None and self.augment_cfg.enabled:
            g = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, batch["key"]))
            x = augment(x, self.augment_cfg, g)
        x = normalize(x, self.preprocessing)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y
