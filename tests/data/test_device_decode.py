"""score.decode=gpu's decoder, run on the CPU (the same code runs on CUDA): which files it takes,
and that its pixels follow the CPU contract (PIL draft decode + antialiased resizes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxr_ray.data.decode import ImageDecodeError, decode_image, device_jpeg, jpeg_frames
from cxr_ray.data.device_decode import decode_batch, draft_scale
from cxr_ray.data.images import to_model_size
from cxr_ray.data.synthetic import chest_image


def jpeg(width: int, height: int, seed: int = 0, mode: str = "L", **save) -> bytes:
    """A synthetic chest X-ray as JPEG bytes of ``width x height`` in ``mode``."""
    img = Image.fromarray(chest_image(256, seed % 2 == 1, np.random.default_rng(seed))).resize(
        (width, height), Image.Resampling.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def cpu_contract(data: bytes, cache: int, size: int) -> np.ndarray:
    """What the read + decode tasks give: decode_image at the cache size, then to_model_size."""
    return to_model_size(decode_image(data, cache)[0][None], size)[0]


def test_device_jpeg_takes_sequential_8bit_jpegs_and_leaves_the_rest_to_the_cpu_path():
    assert device_jpeg(jpeg(300, 200)) == (300, 200)
    assert device_jpeg(jpeg(300, 200, mode="RGB"), "x.jpg") == (300, 200)
    assert device_jpeg(jpeg(300, 200, progressive=True)) is None
    assert device_jpeg(jpeg(300, 200, mode="CMYK")) is None
    assert device_jpeg(jpeg(300, 200)[:-40]) is None  # truncated: the CPU path names the error
    assert device_jpeg(jpeg(300, 200), "scan.png") is None  # a name allows its own format only
    png = io.BytesIO()
    Image.new("L", (300, 200)).save(png, format="PNG")
    assert device_jpeg(png.getvalue()) is None
    assert device_jpeg(b"\0" * 128 + b"DICM" + jpeg(300, 200)) is None
    assert device_jpeg(jpeg(4, 300)) is None  # too small: the CPU path refuses it by name
    with pytest.raises(ImageDecodeError, match="max_pixels"):  # the header check runs before any decode
        device_jpeg(jpeg(300, 200), "big.jpeg", max_pixels=300 * 200 - 1)
    big = io.BytesIO()
    Image.new("L", (7000, 6000)).save(big, format="JPEG")  # 42 MP: decoded on the CPU, scaled while decoding
    assert device_jpeg(big.getvalue()) is None


def test_device_jpeg_refuses_what_a_device_decoder_could_read_otherwise_than_pil():
    """A second frame header (a device decoder may size its output from the other one: 9000 x
    9000 here, 300 x 200 in PIL's view), and Adobe RGB (in gray mode a decoder may take the first
    component, red, where PIL computes luma): both go to the CPU path."""
    good = jpeg(300, 200, mode="RGB")
    fake_sof = b"\xff\xc0\x00\x11\x08" + (9000).to_bytes(2, "big") * 2 + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    two_frames = good[:2] + fake_sof + good[2:]
    assert jpeg_frames(two_frames) is not None and len(jpeg_frames(two_frames)) == 2
    assert device_jpeg(two_frames) is None
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0: RGB components
    assert Image.open(io.BytesIO(good[:2] + adobe + good[2:])).info.get("adobe_transform") == 0
    assert device_jpeg(good[:2] + adobe + good[2:]) is None
    assert jpeg_frames(good) == [(0xC0, 300, 200)] and device_jpeg(good) == (300, 200)


def test_draft_scale_is_pils():
    for width, height, size in [(2000, 1600, 224), (2000, 1600, 128), (300, 200, 80), (1000, 900, 80),
                                (333, 257, 80), (224, 224, 224)]:
        img = Image.open(io.BytesIO(jpeg(width, height)))
        img.draft("L", (size, size))
        s = draft_scale(width, height, size)
        assert img.size == (-(-width // s), -(-height // s)), (width, height, size)


@pytest.mark.parametrize("cache,size", [(80, 48), (224, 224)])
def test_device_decode_follows_the_cpu_contract(cache, size):
    """Full decode + the draft scale's s x s mean + the same resizes: a fifth of a grey level on
    average from the CPU path's DCT-domain downscale (measured 0.11-0.24, at most 2 levels), at
    every draft scale (1, 2, 4, 8), upscaling a small file too."""
    shapes = [(100, 90), (333, 257), (700, 500), (1000, 900), (2000, 1600), (2500, 2000)]
    blobs = [jpeg(w, h, seed=i) for i, (w, h) in enumerate(shapes)]
    out = decode_batch(blobs, shapes, cache, size, "cpu")
    assert {draft_scale(w, h, cache) for w, h in shapes} == {1, 2, 4, 8}
    for blob, image, shape in zip(blobs, out, shapes):
        assert image is not None and image.shape == (1, size, size) and image.dtype.is_floating_point is False
        diff = np.abs(image[0].numpy().astype(np.int16) - cpu_contract(blob, cache, size)[0])
        assert diff.mean() < 0.4 and diff.max() <= 3, (shape, diff.mean(), diff.max())


JUNK_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"junk" * 50 + b"\xff\xd9"  # SOI, junk, EOI


def test_a_file_the_device_refuses_comes_back_none_and_the_rest_decode():
    good = jpeg(300, 200)
    out = decode_batch([good, JUNK_JPEG, good], [(300, 200), (300, 200), (301, 200)], 80, 48, "cpu")
    assert out[0] is not None and out[0].shape == (1, 48, 48)
    assert out[1] is None  # the batched call failed on it: each file alone, this one refused
    assert out[2] is None  # not the size its header gave: the CPU path decides
