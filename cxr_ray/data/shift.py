"""A simulated acquisition shift: the same chest X-rays as if taken on other scanners.

For **checking** how a model and its stored threshold hold up on images made differently from
the training data (exposure, contrast, sharpness, noise, compression), never for training or
tuning. Each "scanner" is a fixed, deterministic chain of image operations on uint8 images;
:func:`shifted_copy` gives every image one of them (a seeded mix, as in a hospital with
several machines). Parameters are set in pixels at 224 px and scale with the image size.

The families deliberately go beyond the training augmentations (JPEG re-compression and a
resolution loss are not augmentations), so a model cannot pass the check only by having
seen exactly these operations; but they are still a simulation, not a real other site.
"""

from __future__ import annotations

import io as _io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

Op = Callable[[Image.Image, np.random.Generator], Image.Image]


def _gamma(g: float) -> Op:
    lut = [int(round(255 * (i / 255) ** g)) for i in range(256)]
    return lambda img, rng: img.point(lut)


def _contrast(c: float) -> Op:
    def op(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        a = np.asarray(img, dtype=np.float32)
        return Image.fromarray(np.clip((a - a.mean()) * c + a.mean(), 0, 255).astype(np.uint8))
    return op


def _blur(sigma_224: float) -> Op:
    return lambda img, rng: img.filter(ImageFilter.GaussianBlur(sigma_224 * img.width / 224))


def _sharpen(percent: int) -> Op:
    return lambda img, rng: img.filter(ImageFilter.UnsharpMask(radius=1.5 * img.width / 224,
                                                               percent=percent, threshold=0))


def _noise(std: float) -> Op:
    def op(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        a = np.asarray(img, dtype=np.float32) + rng.normal(0, std * 255, (img.height, img.width))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return op


def _jpeg(quality: int) -> Op:
    def op(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        buf = _io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return Image.open(_io.BytesIO(buf.getvalue())).convert("L")
    return op


def _resolution(factor: float) -> Op:
    def op(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        small = img.resize((max(8, int(img.width * factor)), max(8, int(img.height * factor))),
                           Image.Resampling.BILINEAR)
        return small.resize(img.size, Image.Resampling.BILINEAR)
    return op


# name -> chain of operations. Chosen before measuring any model, to span the directions a
# different acquisition moves an image (brighter/darker, flatter/harder, softer/sharper,
# noisier, compressed), each moderate: a radiologist would still read every image.
SCANNERS: dict[str, list[Op]] = {
    "low_dose": [_noise(0.035), _jpeg(60)],
    "soft_detector": [_resolution(0.5), _blur(0.8), _gamma(0.8)],
    "overexposed": [_gamma(0.6), _contrast(0.75)],
    "hard_processing": [_gamma(1.35), _contrast(1.2), _sharpen(120)],
}


def apply_scanner(image: np.ndarray, scanner: str, seed: int = 0) -> np.ndarray:
    """One uint8 ``(H, W)`` image as taken on ``scanner`` (a key of :data:`SCANNERS`)."""
    if scanner not in SCANNERS:
        raise ValueError(f"unknown scanner {scanner!r}; expected one of {list(SCANNERS)}")
    rng = np.random.default_rng(seed)
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L")
    for op in SCANNERS[scanner]:
        img = op(img, rng)
    return np.asarray(img, dtype=np.uint8)


def shifted_copy(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """uint8 ``(B, H, W)`` images -> the same images, each from one simulated scanner.

    Returns the shifted images and each image's scanner name. Scanners are assigned in
    equal shares by a seeded permutation, so both classes meet every scanner.
    """
    names = list(SCANNERS)
    rng = np.random.default_rng(seed)
    which = [names[i % len(names)] for i in rng.permutation(len(images))]
    out = np.stack([apply_scanner(img, s, seed=seed * 100_003 + i) for i, (img, s) in enumerate(zip(images, which))])
    return out.reshape(images.shape), which
