"""JPEG decoding on the scoring actor's device (``score.decode=gpu``): nvJPEG on a GPU.

The CPU contract (``decode.decode_image``) decodes a JPEG's luma at 1/s of its size in the
DCT domain (PIL draft mode: s in 8, 4, 2, 1, the largest that keeps both sides >= the cache
size), then resizes it, bilinear and antialiased, to ``cache_size`` and again to
``image_size``. On a device the same chain runs as::

    bytes --torchvision.io.decode_jpeg(list, mode=GRAY, device)--> uint8 (1, H, W)   full size
          --s x s mean (the DCT-domain downscale's low-pass)-----> (1, ceil(H/s), ceil(W/s))
          --antialiased bilinear to cache_size, round---------------> uint8 (S, S)
          --to_model_size's resize--------------------------------> uint8 (1, N, N)

A full decode followed by an s x s mean is what a DCT-domain downscale approximates, so the
pixels differ from the CPU path by a grey level or so (measured: benchmarks/RESULTS.md,
"GPU decode parity"); the model sees what training saw to within that. The same code runs with
``device="cpu"`` (torchvision's libjpeg-turbo), which is how the tests cover it.

Only files :func:`cxr_ray.data.decode.device_jpeg` accepted (8-bit baseline JPEG, gray or
YCbCr, complete, within ``data.max_pixels``) come here; a file the device decoder still refuses
is returned as ``None`` so the caller decodes it on the CPU, with the CPU path's own error.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg


def draft_scale(width: int, height: int, size: int) -> int:
    """PIL's draft-mode scale for a ``width x height`` JPEG wanted at ``size x size``: the
    largest of 8, 4, 2, 1 that is <= ``min(width // size, height // size)``."""
    fit = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if fit >= s), 1)


def resize_gray(x: torch.Tensor, size: int) -> torch.Tensor:
    """float ``(1, 1, H, W)`` -> uint8 ``(1, 1, size, size)``: antialiased bilinear, rounded
    (PIL's ``resize(BILINEAR)`` on an 'L' image, ``to_model_size``'s resize)."""
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def finish_on_device(gray: torch.Tensor, cache_size: int, image_size: int) -> torch.Tensor:
    """A full-size decoded luma plane uint8 ``(1, H, W)`` -> uint8 ``(1, N, N)`` by the contract's
    chain (module doc): draft-scale mean, resize to ``cache_size``, then to ``image_size``."""
    height, width = gray.shape[-2:]
    x = gray[None].float()
    s = draft_scale(width, height, cache_size)
    if s > 1:
        x = F.avg_pool2d(x, s, ceil_mode=True)  # edge windows average the pixels they hold
    cached = resize_gray(x, cache_size)
    return resize_gray(cached.float(), image_size)[0] if image_size != cache_size else cached[0]


def _tensor(blob: bytes) -> torch.Tensor:
    """The bytes as the 1-D uint8 tensor ``decode_jpeg`` takes (a copy: bytes are read-only)."""
    return torch.from_numpy(np.frombuffer(blob, np.uint8).copy())


# Pixels one decode_jpeg call decodes at once (the planes it returns sit on the device together):
# 256 MP is 256 MB of uint8 planes, 80 files at 2000x1600; a call never takes more.
CALL_PIXELS = 256_000_000


def _calls(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of ``sizes`` grouped into consecutive calls of at most :data:`CALL_PIXELS` pixels
    (a file alone when it is larger)."""
    calls, current, pixels = [], [], 0
    for i, (width, height) in enumerate(sizes):
        if current and pixels + width * height > CALL_PIXELS:
            calls.append(current)
            current, pixels = [], 0
        current.append(i)
        pixels += width * height
    return calls + [current] if current else calls


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """``decode_jpeg`` of ``data`` in one batched call; when it fails, each file alone (one bad
    file costs only itself); None where a file is refused."""
    with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec on every call
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.GRAY, device=device))
        except RuntimeError:
            planes: list[torch.Tensor | None] = []
            for d in data:
                try:
                    planes.append(decode_jpeg(d, mode=ImageReadMode.GRAY, device=device))
                except RuntimeError:
                    planes.append(None)
            return planes


def decode_batch(blobs: Sequence[bytes], sizes: Sequence[tuple[int, int]], cache_size: int, image_size: int,
                 device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode JPEG ``blobs`` on ``device`` into uint8 ``(1, N, N)`` images on that device.

    Batched ``decode_jpeg`` calls of at most :data:`CALL_PIXELS` pixels, each plane finished to
    the model's size and released before the next call. An entry is ``None`` where the device
    decoder refused the file, its size is not the header's ``sizes[i]`` (width, height), or the
    device ran out of memory on it: the caller decodes those on the CPU."""
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(blobs)
    for call in _calls(sizes):
        planes = _decode([_tensor(blobs[i]) for i in call], device)
        for k, i in enumerate(call):
            plane, planes[k] = planes[k], None  # released once finished
            width, height = sizes[i]
            if plane is None or plane.dim() != 3 or tuple(plane.shape) != (1, height, width):
                continue
            try:
                out[i] = finish_on_device(plane, cache_size, image_size)
            except RuntimeError:  # out of device memory (or a kernel refused it): the CPU path decides
                out[i] = None
        del planes
    return out
