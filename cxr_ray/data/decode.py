"""Decode any chest X-ray file to one 8-bit channel at a square working size.

Handles 8-bit grayscale, RGB, RGBA, palette, CMYK JPEG, 16-bit PNG and DICOM (with the
optional ``pydicom`` extra: modality and VOI LUT / windowing applied, MONOCHROME1 inverted),
from ~200 to ~4000 px. Large JPEGs are decoded with PIL's draft mode: libjpeg scales by 1/2, 1/4 or
1/8 in the DCT domain while decoding, so a 2000x1600 X-ray is never fully decompressed
when the model needs 224 px. The result is then resized (antialiased) to ``size x size``;
like the shared 224 px copies, the aspect ratio is not kept (the whole chest stays in view).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io as _io
import os
import re
import stat
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr_ray.storage import uri as store

if TYPE_CHECKING:
    import pyarrow as pa
    from pydicom.dataset import Dataset

T = TypeVar("T")
# data.max_pixels's default: a 4000x4000 detector image is 16 MP; a header claiming more than
# 100 MP is a corrupt or hostile file whose decode would need gigabytes.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_READ_TIMEOUT_S = 60.0
# data.max_file_mb's default (MB of 2**20 bytes): an uncompressed 16-bit 4000x4000 DICOM is
# 32 MB; a file of more than 512 MB is not one chest X-ray, and reading it would hold it whole.
DEFAULT_MAX_FILE_MB = 512.0
_MB = 2**20
_READ_CHUNK = 8 * _MB  # read size once a file turns out longer than its stat/metadata said


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


def _open_dicom(data: bytes, path: str, max_pixels: int) -> Image.Image:
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
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        frames = max(int(getattr(ds, "NumberOfFrames", 1) or 1), 1)
        samples = max(int(getattr(ds, "SamplesPerPixel", 1) or 1), 1)
        _check_dicom_budget(path, cols, rows, frames, samples, max_pixels)  # from the header, before decoding
        if frames > 1:  # refused from the header too: decoding every frame first could take gigabytes
            raise ImageDecodeError(path, f"multi-frame DICOM ({frames} frames) is not a chest radiograph")
        arr = ds.pixel_array
    except ImageDecodeError:
        raise
    except InvalidDicomError as e:
        raise ImageDecodeError(path, f"not a valid DICOM file ({e})") from e
    except (AttributeError, KeyError) as e:
        raise ImageDecodeError(path, f"DICOM file has no pixel data ({e})") from e
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken/unsupported data
        raise ImageDecodeError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (RGB, YBR converted by pydicom): average to one channel
        if not photometric.startswith(("RGB", "YBR")):
            raise ImageDecodeError(path, f"unsupported DICOM pixel layout {arr.shape} ({photometric})")
        return Image.fromarray(arr[..., :3].astype(np.float32).mean(axis=-1))
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    try:
        values = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    except Exception as e:  # noqa: BLE001 - malformed LUT/window tags raise many types
        raise ImageDecodeError(path, f"cannot apply the DICOM LUT/window ({type(e).__name__}: {e})") from e
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return Image.fromarray(np.ascontiguousarray(values))


# The memory data.max_pixels allows a decode, per pixel: Pillow holds a pixel of its widest
# modes (RGB, RGBA, CMYK, I, F) in 32 bits, so an image at the limit takes 4 bytes a pixel.
_BUDGET_BYTES_PER_PIXEL = 4
# A DICOM sample, once the modality LUT (rescale) and VOI LUT (window) steps have run: both
# return float64 arrays, the widest array the DICOM decode holds (pixel_array itself has
# BitsAllocated, usually 16, and the result is float32).
_DICOM_BYTES_PER_SAMPLE = 8


def _check_dicom_budget(path: str, cols: int, rows: int, frames: int, samples: int, max_pixels: int) -> None:
    """:class:`ImageDecodeError` when a DICOM header claims more than ``max_pixels`` allows.

    The budget is memory: an image of ``max_pixels`` pixels may take
    ``max_pixels * 4`` bytes (:data:`_BUDGET_BYTES_PER_PIXEL`). A DICOM decode holds
    ``rows * cols * frames * SamplesPerPixel`` samples, each as a float64 (8 bytes) after the
    LUT steps, so it may hold half as many samples as an image has pixels: 50 M at the default
    100 MP (a 16-bit 3000x3000 radiograph is 9 M, a 4000x4000 one 16 M). Every sample is
    counted at 8 bytes, also for colour data that skips the LUT steps: an upper bound.
    """
    total = cols * rows * frames * samples
    needed, allowed = total * _DICOM_BYTES_PER_SAMPLE, max_pixels * _BUDGET_BYTES_PER_PIXEL
    if needed > allowed:
        raise ImageDecodeError(path, f"DICOM header claims {cols}x{rows} x {frames} frame(s) x {samples} sample(s) "
                                     f"= {total / 1e6:.1f} M samples, {needed / 1e6:.0f} MB as float64, over the "
                                     f"{allowed / 1e6:.0f} MB data.max_pixels={max_pixels} allows (4 bytes a pixel; "
                                     f"corrupt or not an X-ray)")


def _check_pixels(path: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(path, f"image header claims {width}x{height} = {width * height / 1e6:.0f} MP, "
                                     f"over data.max_pixels={max_pixels} (corrupt or not an X-ray)")


def _raise_pil_limit(max_pixels: int) -> None:
    """PIL refuses images over ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open`` with its own
    exception type; keep its limit at or above ours so that our check and message apply."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


# The Pillow formats a file may be read as, by its name's extension. Anything else (bytes
# without a name, no extension, an unknown one) may be one of _RASTER_FORMATS: never EPS
# (Pillow runs Ghostscript on it), PDF, or any of Pillow's other, rarely used parsers.
_RASTER_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_FORMATS_BY_EXTENSION = {".png": ("PNG",), ".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".jpe": ("JPEG",),
                         ".jfif": ("JPEG",), ".bmp": ("BMP",), ".tif": ("TIFF",), ".tiff": ("TIFF",),
                         ".gif": ("GIF",)}


def allowed_formats(path: str) -> tuple[str, ...]:
    """The Pillow formats ``path`` may be decoded as: its extension's own (``.png`` -> PNG,
    ``.jpg``/``.jpeg`` -> JPEG, ``.bmp``, ``.tif``/``.tiff``, ``.gif``), else (``<bytes>``, no
    or another extension) the common raster formats PNG, JPEG, BMP and TIFF."""
    ext = os.path.splitext(path.replace("\\", "/").rsplit("/", 1)[-1])[1].lower()
    return _FORMATS_BY_EXTENSION.get(ext, _RASTER_FORMATS)


def decode_image(data: bytes, size: int, path: str = "<bytes>", draft: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to a ``(size, size)`` uint8 array.

    Returns ``(pixels, original_width, original_height)``. Raises :class:`ImageDecodeError`
    naming ``path`` for empty, truncated, non-image or unsupported files, and for a header
    that claims more than ``max_pixels`` (checked before any pixel is decoded). Only the
    formats :func:`allowed_formats` gives for ``path`` are tried (EPS saved as ``x.png`` is
    not a PNG, and never reaches Ghostscript). ``draft=False`` forces a full decode (used by
    the benchmark as the reference).
    """
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    if is_dicom(data, path):
        img = _open_dicom(data, path, max_pixels)
        width, height = img.size
        return _finish(img, width, height, size, path)
    _raise_pil_limit(max_pixels)
    formats = allowed_formats(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_io.BytesIO(data), formats=formats)  # reads the header only
            width, height = img.size
            _check_pixels(path, width, height, max_pixels)
            if draft and img.format == "JPEG" and img.mode in ("L", "RGB"):
                img.draft("L", (size, size))  # DCT-domain downscale, never below size
            img.load()
    except UnidentifiedImageError as e:
        raise ImageDecodeError(path, f"not a recognised image file (read as {'/'.join(formats)}, "
                                     f"the formats its name allows)") from e
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses inside Image.open, before the size is known to us; its message has it
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageDecodeError(path, f"image header claims {int(claimed.group(1)) / 1e6:.0f} MP, over "
                                     f"data.max_pixels={max_pixels} (corrupt or not an X-ray)"
                               if claimed else f"image header claims too many pixels ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(path, f"cannot decode ({e})") from e
    return _finish(img, width, height, size, path)


_JPEG_EOI = b"\xff\xd9"
# The largest image a device decode takes (2000x1600 X-rays are 3.2 MP; 4000x4000 detectors 16):
# the device path decodes at full size, so a larger one decodes on the CPU, where the draft mode
# scales it in the DCT domain and holds a 64th of it.
DEVICE_MAX_PIXELS = 40_000_000
_SOF_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential, Huffman: what nvJPEG decodes
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn: markers without a length field


def jpeg_frames(data: bytes) -> list[tuple[int, int, int]] | None:
    """The start-of-frame markers of a JPEG's header, ``(marker, width, height)`` each, read up to
    its start of scan; None when the marker walk fails (not a well-formed JPEG header)."""
    frames, i = [], 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _NO_LENGTH:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return None
        if marker == 0xDA:  # start of scan: the header ends
            return frames
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            frames.append((marker, width, height))
        i += 2 + length
    return None


def device_jpeg(data: bytes, path: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """``(width, height)`` when a device decoder (nvJPEG, ``data/device_decode.py``) can take
    ``data`` as the CPU path would: an 8-bit sequential JPEG with exactly one frame header, gray
    or YCbCr (not Adobe RGB), that ends with its EOI marker (a truncated file goes to the CPU
    path, which reports it), within ``max_pixels`` and :data:`DEVICE_MAX_PIXELS`, at least 8 px a
    side. None for anything else (PNG, DICOM, CMYK, progressive, 12-bit, two frame headers ...),
    which the CPU path decodes or refuses. Reads the header only; raises
    :class:`ImageDecodeError` for a header over ``max_pixels``, as :func:`decode_image` would."""
    if data[:3] != b"\xff\xd8\xff" or "JPEG" not in allowed_formats(path) or is_dicom(data, path):
        return None
    if data[-1024:].rstrip(b"\x00")[-2:] != _JPEG_EOI:
        return None
    frames = jpeg_frames(data)
    if not frames or len(frames) != 1 or frames[0][0] not in _SOF_SEQUENTIAL:
        return None  # what a device decoder would size its output from is ambiguous, or not its kind
    _raise_pil_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_io.BytesIO(data), formats=("JPEG",))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError, OSError,
            SyntaxError, ValueError):
        return None  # the CPU path gives the file its error
    width, height = img.size
    _check_pixels(path, width, height, max_pixels)
    if (width, height) != frames[0][1:] or width * height > DEVICE_MAX_PIXELS:
        return None
    sequential = not img.info.get("progressive") and getattr(img, "bits", 8) == 8
    adobe_rgb = img.mode == "RGB" and img.info.get("adobe_transform") == 0  # components are R, G, B
    if not sequential or adobe_rgb or img.mode not in ("L", "RGB") or width < 8 or height < 8:
        return None
    return width, height


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


class _Reader:
    """One reused daemon thread that runs reads for :func:`_call_with_timeout` (a new thread
    per file cost ~0.15 ms, a third of a small JPEG's decode). A read that times out keeps
    its thread; the next read gets a fresh one, so one stalled file never stalls the next."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self, fn: Callable[[], T], timeout_s: float, path: str) -> T:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cxr-ray-read")
            pool = self._pool
        future = pool.submit(fn)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            with self._lock:
                if self._pool is pool:
                    self._pool = None  # abandon the blocked thread (it ends if the read returns)
            pool.shutdown(wait=False, cancel_futures=True)
            raise ImageDecodeError(path, f"read did not finish within data.read_timeout_s={timeout_s:g} s "
                                         f"(a stalled network mount, or a pipe nobody writes to)") from None


_READER = threading.local()


def _call_with_timeout(fn: Callable[[], T], timeout_s: float, path: str) -> T:
    """``fn()`` on a reader thread; :class:`ImageDecodeError` when it has not returned in
    ``timeout_s`` (<= 0: no limit, run here). A read blocked in the kernel cannot be
    cancelled: its thread is abandoned and the job goes on."""
    if timeout_s <= 0:
        return fn()
    if not hasattr(_READER, "reader"):  # one per calling thread: concurrent callers never queue
        _READER.reader = _Reader()
    return _READER.reader.run(fn, timeout_s, path)


_FILE_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def check_regular_file(path: str) -> os.stat_result:
    """``os.stat(path)``; :class:`ImageDecodeError` unless the local ``path`` is (a symlink
    to) a regular file.

    Opening a FIFO blocks until someone writes to it, and a device never ends: both are
    refused from ``stat`` alone, before anything is opened.
    """
    try:
        st = os.stat(path)
        mode = st.st_mode
    except FileNotFoundError as e:
        if os.path.islink(path):
            raise ImageDecodeError(path, f"broken symlink (it points to {os.readlink(path)!r}, "
                                         f"which does not exist)") from e
        raise ImageDecodeError(path, f"cannot read file ({e})") from e
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file ({e})") from e
    if not stat.S_ISREG(mode):
        raise ImageDecodeError(path, f"not a regular file: {_FILE_KINDS.get(stat.S_IFMT(mode), 'special')}")
    return st


def check_file_size(path: str, size: int, max_file_mb: float) -> None:
    """:class:`ImageDecodeError` when a file's ``size`` (bytes, from ``stat`` or the object's
    metadata, before anything is read) is over ``max_file_mb`` MB (2**20 bytes)."""
    if size > max_file_mb * _MB:
        raise ImageDecodeError(path, f"file is {size / _MB:,.1f} MB ({size:,} bytes), over "
                                     f"data.max_file_mb={max_file_mb:g} (not a single chest X-ray)")


# Filesystems whose reads can stall (network, FUSE, cluster filesystems): reads from them run
# under the read timeout; local disks are read directly (the watchdog thread's hand-off costs
# about as much as decoding a small JPEG).
_STALLABLE_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "lustre", "gpfs", "glusterfs",
                 "beegfs", "afs", "davfs", "sshfs", "fuse")


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[tuple[str, str], ...]:
    """(mount point, filesystem type) of this machine, longest mount point first; empty when
    unknown (no /proc: every local read then runs under the timeout)."""
    try:
        with open("/proc/self/mounts") as f:
            rows = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return ()
    rows = [(mp.replace("\\040", " "), fs) for mp, fs in rows]
    return tuple(sorted(rows, key=lambda r: len(r[0]), reverse=True))


def _may_stall(path: str) -> bool:
    """True for a local path on a network/FUSE filesystem (or when the mounts are unknown)."""
    mounts = _mounts()
    if not mounts:
        return True
    full = os.path.realpath(path)
    for mount_point, fs_type in mounts:
        if full == mount_point or full.startswith(mount_point.rstrip("/") + "/"):
            return fs_type.split(".")[0] in _STALLABLE_FS
    return True


def _check_before_open(path: str, timeout_s: float, max_file_mb: float) -> float:
    """Refuse a local file (a path or ``file://`` URI) from ``stat`` alone: not a regular file
    (:func:`check_regular_file`), or over ``max_file_mb``. Returns the timeout its read runs
    under: 0 (read here, no watchdog thread) for a plain path on a local disk, else ``timeout_s``
    (network/FUSE mounts and URIs; an object store's checks run in :func:`_open_checked`)."""

    if store.is_uri(path) and not path.startswith("file://"):
        return timeout_s
    local = store.resolve(path)[1] if store.is_uri(path) else path
    check_file_size(path, check_regular_file(local).st_size, max_file_mb)
    return timeout_s if store.is_uri(path) or _may_stall(path) else 0


@contextlib.contextmanager
def _open_checked(path: str, max_file_mb: float) -> Iterator[pa.NativeFile]:
    """``path`` (local path or URI) opened for random access, undecompressed, and refused
    before its first byte is read when its size is over ``max_file_mb``: the size of the open
    handle is ``fstat``'s for a local file, and for an object store its metadata (the
    Content-Length of the HEAD request the open makes: no request is added)."""
    import pyarrow as pa
    import pyarrow.fs as pafs


    fs, inner = store.resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):  # one descriptor: checked is what is read
        fd = os.open(inner, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in must not block
        with pa.PythonFile(os.fdopen(fd, "rb"), mode="r") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ImageDecodeError(path, "not a regular file (it changed after it was listed)")
            check_file_size(path, f.size(), max_file_mb)
            yield f
        return
    with fs.open_input_file(inner) as f:
        check_file_size(path, f.size(), max_file_mb)
        yield f


def _read_capped(f: pa.NativeFile, path: str, max_file_mb: float) -> bytes:
    """All of ``f``, in one read when its size held; a file longer than its size said (it
    grows, a device swapped in after ``stat``) is read in chunks and refused once it holds
    more than ``max_file_mb``: at most the limit plus one chunk is ever in memory."""
    parts, total, want = [], 0, f.size() + 1
    while True:
        chunk = f.read(want)  # fewer bytes than asked only at the end of the file
        parts.append(chunk)
        total += len(chunk)
        if total > max_file_mb * _MB:
            raise ImageDecodeError(path, f"file grew past data.max_file_mb={max_file_mb:g} while being read "
                                         f"(over {total / _MB:,.1f} MB; not a single chest X-ray)")
        if len(chunk) < want:
            return b"".join(parts)
        want = _READ_CHUNK


def read_file(path: str, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
              max_file_mb: float = DEFAULT_MAX_FILE_MB) -> bytes:
    """The bytes of one local file or URI; :class:`ImageDecodeError` naming it when it is
    not a regular file, is over ``max_file_mb`` MB (from ``stat`` / the object's metadata,
    before a byte is read), cannot be read, or a read from a network/FUSE filesystem or object
    store does not finish within ``timeout_s``."""
    timeout_s = _check_before_open(path, timeout_s, max_file_mb)

    def read() -> bytes:
        with _open_checked(path, max_file_mb) as f:
            return _read_capped(f, path, max_file_mb)

    try:
        return _call_with_timeout(read, timeout_s, path)
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file ({e})") from e


@dataclass(frozen=True)
class DecodedFile:
    """One file's outcome: pixels ``(size, size)`` uint8 (zeros when ``error``), original
    size (0 when unknown), SHA-1 of the bytes ("" when unread) and ``error`` (None when decoded)."""

    pixels: np.ndarray
    width: int
    height: int
    sha1: str
    error: str | None
    encoded: bytes | None = None  # with for_device: the undecoded bytes a device decoder takes (pixels: zeros)


def decode_path(path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                timeout_s: float = DEFAULT_READ_TIMEOUT_S, listing_error: str = "",
                max_file_mb: float = DEFAULT_MAX_FILE_MB, for_device: bool = False) -> DecodedFile:
    """Read and decode one file; never raises for a bad file: every failure, expected or not,
    becomes ``error`` (the exception's type and message for unexpected ones), so one file
    never stops a batch job. A ``listing_error`` (the listing already knows the file cannot be
    read) is the error, and nothing is read. Used by the cache build and by scoring alike.
    ``for_device``: a file :func:`device_jpeg` accepts is read and its header checked, not
    decoded; its bytes come back in ``encoded`` for the scoring actor's device decoder."""
    if listing_error:
        return DecodedFile(np.zeros((size, size), np.uint8), 0, 0, "", listing_error)
    sha1 = ""
    try:
        data = read_file(path, timeout_s, max_file_mb)
        sha1 = hashlib.sha1(data).hexdigest()
        header = device_jpeg(data, path, max_pixels) if for_device else None
        if header is not None:
            return DecodedFile(np.zeros((size, size), np.uint8), *header, sha1, None, data)
        pixels, width, height = decode_image(data, size, path, max_pixels=max_pixels)
        return DecodedFile(pixels, width, height, sha1, None)
    except ImageDecodeError as e:
        error = e.reason
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the job
        error = f"unexpected {type(e).__name__} while decoding: {e}"
    return DecodedFile(np.zeros((size, size), np.uint8), 0, 0, sha1, error)


def decode_file(path: str, size: int) -> tuple[np.ndarray, int, int]:
    """Read and decode one file (default limits); raises :class:`ImageDecodeError` naming it."""
    return decode_image(read_file(path), size, path)


def dicom_patient_id(path: str, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                     max_file_mb: float = DEFAULT_MAX_FILE_MB) -> str | None:
    """A DICOM file's PatientID (header only, no pixel data), or None when unreadable or empty.

    Reads at most the header through pyarrow (local path or URI), with the checks and the
    timeout of :func:`read_file`: a FIFO, device or folder is never opened, a file over
    ``max_file_mb`` never read, and a read that has not finished in ``timeout_s`` abandoned.
    None also when pydicom is missing: decoding then reports the file (with the reason for a
    refusal), and the caller falls back to the file name.
    """
    try:
        timeout_s = _check_before_open(path, timeout_s, max_file_mb)
        ds = _call_with_timeout(lambda: _read_patient_header(path, max_file_mb), timeout_s, path)
    except Exception:  # noqa: BLE001 - refused, broken, no pydicom: decoding reports the file, with its reason
        return None
    value = str(getattr(ds, "PatientID", "") or "").strip()
    return value or None


def _read_patient_header(path: str, max_file_mb: float) -> Dataset:
    """``path``'s PatientID element as a pydicom Dataset, read from the header alone (the
    file opened by :func:`_open_checked`, so over ``max_file_mb`` it is never read)."""
    import pydicom

    with _open_checked(path, max_file_mb) as f:
        return pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
