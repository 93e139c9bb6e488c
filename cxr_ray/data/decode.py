"""Decode any chest X-ray file to one 8-bit channel at a square working size.

Handles 8-bit grayscale, RGB, RGBA, palette, CMYK JPEG and 16-bit PNG, from ~200 to
~4000 px. Large JPEGs are decoded with PIL's draft mode: libjpeg scales by 1/2, 1/4 or
1/8 in the DCT domain while decoding, so a 2000x1600 X-ray is never fully decompressed
when the model needs 224 px. The result is then resized (antialiased) to ``size x size``;
like the shared 224 px copies, the aspect ratio is not kept (the whole chest stays in view).
"""

from __future__ import annotations

import io as _io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# A hospital export can hold huge scans; a 4000x4000 image is 16 MP, far below this.
Image.MAX_IMAGE_PIXELS = 200_000_000


class ImageDecodeError(ValueError):
    """An image could not be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _to_gray(img: Image.Image) -> Image.Image:
    """One channel, 8-bit ('L') or float ('F') for high-bit-depth images."""
    if img.mode == "L":
        return img
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit: keep the precision until resized
        return Image.fromarray(np.asarray(img).astype(np.float32))
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent -> black film
        img = Image.alpha_composite(background, img)
    return img.convert("L")  # RGB, CMYK, P, 1, YCbCr ...


def _stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linearly map a float image's [min, max] to [0, 255] (12-bit data in 16-bit files)."""
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip((arr - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def decode_image(data: bytes, size: int, path: str = "<bytes>", draft: bool = True
                 ) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to a ``(size, size)`` uint8 array.

    Returns ``(pixels, original_width, original_height)``. Raises :class:`ImageDecodeError`
    naming ``path`` for empty, truncated, non-image or unsupported files. ``draft=False``
    forces a full decode (used by the benchmark as the reference).
    """
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_io.BytesIO(data))
            width, height = img.size
            if draft and img.format == "JPEG" and img.mode in ("L", "RGB"):
                img.draft("L", (size, size))  # DCT-domain downscale, never below size
            img.load()
    except UnidentifiedImageError as e:
        raise ImageDecodeError(path, "not a recognised image file") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(path, f"cannot decode ({e})") from e
    if width < 8 or height < 8:
        raise ImageDecodeError(path, f"image is {width}x{height}, too small to be an X-ray")
    try:
        gray = _to_gray(img)
        gray = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    except (OSError, ValueError) as e:
        raise ImageDecodeError(path, f"unsupported image mode {img.mode!r} ({e})") from e
    arr = np.asarray(gray)
    pixels = arr if arr.dtype == np.uint8 else _stretch_to_uint8(arr.astype(np.float32))
    return np.ascontiguousarray(pixels), width, height


def decode_file(path: str, size: int) -> tuple[np.ndarray, int, int]:
    """Read and decode one local file or URI; see :func:`decode_image`."""
    from cxr_ray.data import io

    try:
        data = io.read_bytes(path)
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file ({e})") from e
    return decode_image(data, size, path)
