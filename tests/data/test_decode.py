import io

import numpy as np
import pytest
from PIL import Image

from cxr_ray.data.decode import ImageDecodeError, decode_image
from cxr_ray.data.synthetic import chest_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gray():
    return chest_image(256, True, np.random.default_rng(0))


def _check(pixels, w, h, size, ref=None, tol=6.0):
    assert pixels.shape == (size, size) and pixels.dtype == np.uint8
    if ref is not None:
        assert np.abs(pixels.astype(float) - ref.astype(float)).mean() < tol


def test_modes_decode_to_one_channel(gray):
    ref, _, _ = decode_image(_encode(Image.fromarray(gray), "PNG"), 64)
    cases = {
        "L jpeg": _encode(Image.fromarray(gray), "JPEG", quality=95),
        "RGB jpeg": _encode(Image.fromarray(gray).convert("RGB"), "JPEG", quality=95),
        "RGB png": _encode(Image.fromarray(gray).convert("RGB"), "PNG"),
        "RGBA png": _encode(Image.fromarray(gray).convert("RGBA"), "PNG"),
        "P png": _encode(Image.fromarray(gray).convert("P"), "PNG"),
        "CMYK jpeg": _encode(Image.fromarray(gray).convert("CMYK"), "JPEG", quality=95),
    }
    for name, data in cases.items():
        pixels, w, h = decode_image(data, 64, name)
        assert (w, h) == (256, 256), name
        _check(pixels, w, h, 64, ref, tol=8.0 if "P " in name or "CMYK" in name else 4.0)


def test_16bit_png_uses_full_range():
    arr = (np.linspace(0, 4095, 128 * 96).reshape(96, 128)).astype(np.uint16)  # 12-bit in 16-bit file
    data = _encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels, w, h = decode_image(data, 32)
    assert (w, h) == (128, 96)
    assert pixels.min() <= 5 and pixels.max() >= 250  # stretched, not near-black


def test_large_jpeg_draft_matches_full_decode():
    img = Image.fromarray(chest_image(512, True, np.random.default_rng(1))).resize((2000, 1600))
    data = _encode(img, "JPEG", quality=90)
    fast, w, h = decode_image(data, 224)
    full, _, _ = decode_image(data, 224, draft=False)
    assert (w, h) == (2000, 1600)
    assert np.abs(fast.astype(float) - full.astype(float)).mean() < 2.0


def test_small_and_huge_sizes():
    for side in (200, 3000):
        img = Image.fromarray(chest_image(128, False, np.random.default_rng(2))).resize((side, side))
        pixels, w, _ = decode_image(_encode(img, "JPEG"), 128)
        assert w == side and pixels.shape == (128, 128)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not a recognised image"),
])
def test_bad_bytes_named(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as e:
        decode_image(data, 64, "/x/bad.jpeg")
    assert e.value.path == "/x/bad.jpeg"


def test_truncated_jpeg(gray):
    data = _encode(Image.fromarray(gray), "JPEG")
    with pytest.raises(ImageDecodeError, match="cannot decode") as e:
        decode_image(data[: len(data) // 3], 64, "/x/cut.jpeg")
    assert "/x/cut.jpeg" in str(e.value)


def _dicom_bytes(tmp_path, name, pixels, **kw) -> bytes:
    from cxr_ray.data.synthetic import write_dicom

    return write_dicom(tmp_path / name, pixels, **kw).read_bytes()


def test_dicom_monochrome1_is_inverted_and_window_applied(tmp_path, gray):
    pytest.importorskip("pydicom")
    raw = gray.astype(np.uint16) * 16  # 12-bit values
    mono2, w, h = decode_image(_dicom_bytes(tmp_path, "a.dcm", raw), 64, "a.dcm")
    assert (w, h) == (256, 256) and mono2.dtype == np.uint8
    ref, _, _ = decode_image(_encode(Image.fromarray(gray), "PNG"), 64)
    assert np.corrcoef(mono2.ravel(), ref.ravel())[0, 1] > 0.99  # same picture
    mono1, _, _ = decode_image(_dicom_bytes(tmp_path, "b", 4095 - raw, photometric="MONOCHROME1"), 64, "b")
    assert np.abs(mono1.astype(int) - mono2).max() <= 1  # bone stays bright after inversion
    # A narrow window saturates everything outside it: many more pure black/white pixels.
    narrow, _, _ = decode_image(_dicom_bytes(tmp_path, "c", raw, window=(float(np.median(raw)), 300.0)), 64, "c")
    extreme = lambda a: np.mean((a == 0) | (a == 255))  # noqa: E731
    assert extreme(narrow) > extreme(mono2) + 0.2


def test_bad_dicom_files_raise_named_errors(tmp_path, gray):
    pytest.importorskip("pydicom")
    with pytest.raises(ImageDecodeError, match="x.dcm: .*DICOM"):
        decode_image(b"\0" * 128 + b"DICM" + b"\x02\x00garbage", 64, "x.dcm")
    data = _dicom_bytes(tmp_path, "t.dcm", gray.astype(np.uint16))
    with pytest.raises(ImageDecodeError, match="t.dcm"):
        decode_image(data[: len(data) // 2], 64, "t.dcm")  # truncated pixel data
