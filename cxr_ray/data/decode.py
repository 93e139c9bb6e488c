"""Decode any chest X-ray file to one 8-bit channel at a square working size.

Handles 8-bit grayscale, RGB, RGBA, palette, CMYK JPEG, 16-bit PNG and DICOM (with the
optional ``pydicom`` extra: modality and VOI LUT / windowing applied, MONOCHROME1 inverted),
from ~200 to ~4000 px. Large JPEGs are decoded with PIL's draft mode: libjpeg scales by 1/2, 1/4 or
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


DICOM_EXTENSIONS = (".dcm", ".dicom")


def is_dicom(data: bytes, path: str = "") -> bool:
    """True for a DICOM Part 10 file (``DICM`` at byte 128) or a ``.dcm``/``.dicom`` name."""
    return data[128:132] == b"DICM" or path.lower().endswith(DICOM_EXTENSIONS)


def _dicom_luts():
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pydicom >= 3
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _open_dicom(data: bytes, path: str) -> Image.Image:
    """A DICOM file as a float ('F') image, as a radiologist's viewer would show it.

    Applies the modality LUT (rescale slope/intercept), then the VOI LUT or the first
    window centre/width, and inverts MONOCHROME1 (where low values are white) so that
    bone is bright as in every other input.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:
        raise ImageDecodeError(path, "DICOM file, but pydicom is not installed "
                                     "(pip install 'cxr_ray[dicom]')") from e
    try:
        ds = pydicom.dcmread(_io.BytesIO(data), force=path.lower().endswith(DICOM_EXTENSIONS))
        arr = ds.pixel_array
    except InvalidDicomError as e:
        raise ImageDecodeError(path, f"not a valid DICOM file ({e})") from e
    except (AttributeError, KeyError) as e:
        raise ImageDecodeError(path, f"DICOM file has no pixel data ({e})") from e
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken/unsupported data
        raise ImageDecodeError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(path, f"multi-frame DICOM ({frames} frames) is not a chest radiograph")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (RGB, YBR converted by pydicom): average to one channel
        if not photometric.startswith(("RGB", "YBR")):
            raise ImageDecodeError(path, f"unsupported DICOM pixel layout {arr.shape} ({photometric})")
        return Image.fromarray(arr[..., :3].astype(np.float32).mean(axis=-1))
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    values = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return Image.fromarray(np.ascontiguousarray(values))


def decode_image(data: bytes, size: int, path: str = "<bytes>", draft: bool = True
                 ) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to a ``(size, size)`` uint8 array.

    Returns ``(pixels, original_width, original_height)``. Raises :class:`ImageDecodeError`
    naming ``path`` for empty, truncated, non-image or unsupported files. ``draft=False``
    forces a full decode (used by the benchmark as the reference).
    """
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    if is_dicom(data, path):
        img = _open_dicom(data, path)
        width, height = img.size
        return _finish(img, width, height, size, path)
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
    return _finish(img, width, height, size, path)


def _finish(img: Image.Image, width: int, height: int, size: int, path: str
            ) -> tuple[np.ndarray, int, int]:
    """One channel, resized to ``size x size``, as uint8 (high bit depths min-max stretched)."""
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


def dicom_patient_id(path: str) -> str | None:
    """A DICOM file's PatientID (header only, no pixel data), or None when unreadable or empty.

    Reads at most the header through pyarrow (local path or URI). None also when pydicom is
    missing: decoding then reports the file, and the caller falls back to the file name.
    """
    try:
        import pydicom
    except ImportError:
        return None
    from cxr_ray.data import io

    fs, p = io.resolve(path)
    try:
        with fs.open_input_file(p) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
    except Exception:  # noqa: BLE001 - a broken file is reported by decoding, with its reason
        return None
    value = str(getattr(ds, "PatientID", "") or "").strip()
    return value or None
