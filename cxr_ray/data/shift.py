"""A simulated shift: the same chest X-rays as if taken on other scanners, or framed otherwise.

For **checking** how a model and its stored threshold hold up on images made differently from
the training data (exposure, contrast, sharpness, noise, compression), never for training or
tuning. Each "scanner" is a fixed, deterministic chain of image operations on uint8 images;
:func:`shifted_copy` gives every image one of them (a seeded mix, as in a hospital with
several machines). Parameters are set in pixels at 224 px and scale with the image size.

Two families: ``acquisition`` (:data:`SCANNERS`: exposure, contrast, sharpness, noise,
compression) and ``framing`` (:data:`FRAMINGS`: tighter and looser crops, added and removed
margins, another aspect). Framing differs by class in the Kaggle training data (NORMAL films
show more neck, shoulders and black margin; run ``cxr-ray audit``), so a model can learn where
the body sits in the frame; a site that frames its films otherwise then moves NORMAL scores.

The families deliberately go beyond the training augmentations (JPEG re-compression and a
resolution loss are not augmentations; the framing ops crop and resize where augmentation
warps), so a model cannot pass the check only by having seen exactly these operations; but
they are still a simulation, not a real other site.
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


def _crop(share: float) -> Op:
    """Tighter framing: ``share`` of the side cut from every edge, resized back."""
    def op(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        dx, dy = round(img.width * share), round(img.height * share)
        return img.crop((dx, dy, img.width - dx, img.height - dy)).resize(img.size, Image.Resampling.BILINEAR)
    return op


def _pad(left: float, top: float, right: float, bottom: float) -> Op:
    """Looser framing: the film shrunk into the frame with black margins of these shares of the side."""
    def op(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = img.size
        box = (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
        out = Image.new("L", img.size, 0)
        out.paste(img.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR), box[:2])
        return out
    return op


def _trim_dark(level: float = 0.1) -> Op:
    """Margins removed: outer rows and columns darker than ``level`` of the range cut, resized back."""
    def op(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        a = np.asarray(img, dtype=np.float32)
        lit_rows = np.flatnonzero(a.mean(axis=1) > level * 255)
        lit_cols = np.flatnonzero(a.mean(axis=0) > level * 255)
        if len(lit_rows) < 8 or len(lit_cols) < 8:
            return img
        box = (int(lit_cols[0]), int(lit_rows[0]), int(lit_cols[-1]) + 1, int(lit_rows[-1]) + 1)
        return img.crop(box).resize(img.size, Image.Resampling.BILINEAR)
    return op


def _aspect(width_share: float) -> Op:
    """Another aspect ratio: the central ``width_share`` of the width stretched to the frame."""
    def op(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        dx = round(img.width * (1 - width_share) / 2)
        return img.crop((dx, 0, img.width - dx, img.height)).resize(img.size, Image.Resampling.BILINEAR)
    return op


# Framings, chosen before measuring any model: the directions in which a site frames films
# otherwise (tighter, looser, more neck, margins trimmed by the export, another aspect)
FRAMINGS: dict[str, list[Op]] = {
    "tight_crop": [_crop(0.10)],
    "loose_margin": [_pad(0.08, 0.08, 0.08, 0.08)],
    "more_neck": [_pad(0.0, 0.15, 0.0, 0.0)],
    "margins_removed": [_trim_dark()],
    "narrow_aspect": [_aspect(0.85)],
}
FAMILIES: dict[str, dict[str, list[Op]]] = {"acquisition": SCANNERS, "framing": FRAMINGS}


def apply_scanner(image: np.ndarray, scanner: str, seed: int = 0) -> np.ndarray:
    """One uint8 ``(H, W)`` image as taken on ``scanner`` or framed by ``scanner`` (a key of
    :data:`SCANNERS` or :data:`FRAMINGS`)."""
    ops = SCANNERS.get(scanner) or FRAMINGS.get(scanner)
    if ops is None:
        raise ValueError(f"unknown shift {scanner!r}; expected one of {list(SCANNERS) + list(FRAMINGS)}")
    rng = np.random.default_rng(seed)
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L")
    for op in ops:
        img = op(img, rng)
    return np.asarray(img, dtype=np.uint8)


def shifted_copy(images: np.ndarray, seed: int = 0, family: str = "acquisition") -> tuple[np.ndarray, list[str]]:
    """uint8 ``(B, H, W)`` images -> the same images, each from one simulated scanner (or
    framing, ``family="framing"``).

    Returns the shifted images and each image's shift name. Shifts are assigned in equal
    shares by a seeded permutation, so both classes meet every one.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown shift family {family!r}; expected one of {list(FAMILIES)}")
    names = list(FAMILIES[family])
    rng = np.random.default_rng(seed)
    which = [names[i % len(names)] for i in rng.permutation(len(images))]
    out = np.stack([apply_scanner(img, s, seed=seed * 100_003 + i) for i, (img, s) in enumerate(zip(images, which))])
    return out.reshape(images.shape), which
