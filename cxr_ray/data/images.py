"""Files and cached pixels to model-size uint8 images: the first steps of the preprocessing
contract (``data/preprocessing.py``), shared by the cache pipeline, scoring and Grad-CAM::

    file --decode.decode_path--> uint8 (S, S)   S = contract.cache_size
         --to_model_size-------> uint8 (1, N, N) N = contract.image_size

No torch at import: scoring's read + decode tasks import this module, and each new Ray worker
process would otherwise spend ~3 s importing torch before its first file. ``to_model_size``
imports it when a resize is needed (S != N).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cxr_ray.data.decode import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S, decode_path


def pixels_to_array(pixels: Any, size: int) -> np.ndarray:
    """Cached ``pixels`` column (bytes of ``size*size`` uint8 each) -> uint8 ``(B, size, size)``."""
    buf = b"".join(bytes(p) for p in pixels)
    return np.frombuffer(buf, dtype=np.uint8).reshape(len(pixels), size, size)


def to_model_size(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 ``(B, S, S)`` -> uint8 ``(B, 1, N, N)``, antialiased resize when S != N."""
    x = images[:, None]
    if images.shape[-1] == image_size:
        return np.ascontiguousarray(x)
    import torch  # deferred: see the module doc
    import torch.nn.functional as F

    t = torch.tensor(x, dtype=torch.float32)  # copies: Ray batches are read-only
    t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", antialias=True,
                      align_corners=False)
    return t.round_().clamp_(0, 255).to(torch.uint8).numpy()


def load_images(paths: Sequence[str], cache_size: int, image_size: int, listing_errors: Sequence[str] | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                max_file_mb: float = DEFAULT_MAX_FILE_MB, for_device: bool = False) -> dict[str, np.ndarray]:
    """Files -> model-size uint8 images the way training saw them: each decoded at the cache
    size (``decode.decode_path``), then resized to the model's size (:func:`to_model_size`).

    Returns ``image`` ``(B, 1, N, N)``, the original ``width`` / ``height`` and ``error``
    (``""`` when decoded). Never raises for a bad file: one refused by the listing
    (``listing_errors``), or that cannot be read or decoded, gets a black image, zero size
    and the reason. Used by scoring's decode tasks and by Grad-CAM alike.

    ``for_device`` (scoring with ``score.decode=gpu``): JPEGs a device decoder takes
    (``decode.device_jpeg``) are read and header-checked only; their bytes are in ``encoded``
    (``b""`` for the rows decoded here) and their ``image`` is black until the actor decodes them."""
    listed = listing_errors if listing_errors is not None else [""] * len(paths)
    pixels = np.zeros((len(paths), cache_size, cache_size), np.uint8)
    width, height = np.zeros(len(paths), np.int32), np.zeros(len(paths), np.int32)
    errors = np.full(len(paths), "", dtype=object)
    encoded = np.full(len(paths), b"", dtype=object)
    for i, (path, listing_error) in enumerate(zip(paths, listed)):
        d = decode_path(path, cache_size, max_pixels, timeout_s, listing_error or "", max_file_mb, for_device)
        pixels[i], width[i], height[i], errors[i] = d.pixels, d.width, d.height, d.error or ""
        encoded[i] = d.encoded or b""
    out = {"image": to_model_size(pixels, image_size), "width": width, "height": height, "error": errors}
    return {**out, "encoded": encoded} if for_device else out
