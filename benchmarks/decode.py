"""Per-core JPEG decode to the model input: cxr_ray's PIL decode (draft = libjpeg DCT scaling)
against libjpeg-turbo's DCT scaling through simplejpeg, on archive-sized grayscale X-rays.

    pip install simplejpeg        # not a dependency of cxr_ray: this measures whether it should be
    python benchmarks/decode.py [--n 40] [--size 224] [--sizes 2000x1600,3000x2500]

The archive-sized JPEGs are the shared real images upscaled (as the Kaggle originals are
~400-2900 px a side), made once under the temp folder. Each method turns the same in-memory
JPEG bytes into the same ``size x size`` uint8 image in one process on one core (file reads
left out): ``pil-full`` is a full decode then resize (the reference), ``pil-draft`` is
``cxr_ray.data.decode.decode_image`` (what the cache build and scoring run), ``simplejpeg`` is
``decode_jpeg(min_width=size, min_height=size)`` then the same resize. Prints img/s per core,
the ratio to ``pil-draft`` and the mean / max absolute pixel difference from the reference and
from ``pil-draft``, in one table.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import real_root, upscaled_copy
from PIL import Image

from cxr_ray.data.decode import decode_image


def simplejpeg_decode(data: bytes, size: int) -> np.ndarray:
    """libjpeg-turbo with DCT scaling to the smallest scale >= ``size``, then cxr_ray's resize."""
    import simplejpeg

    arr = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=size, min_height=size)
    gray = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 else arr)
    return np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


METHODS = {
    "pil-full": lambda data, size: decode_image(data, size, draft=False)[0],
    "pil-draft": lambda data, size: decode_image(data, size)[0],
    "simplejpeg": simplejpeg_decode,
}


def rate(fn, blobs: list[bytes], size: int, min_s: float = 3.0) -> tuple[float, list[np.ndarray]]:
    """Images per second of ``fn`` over ``blobs`` (repeated for at least ``min_s``), and its outputs."""
    outs = [fn(b, size) for b in blobs]  # warm-up, and the outputs compared below
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s:
        for b in blobs:
            fn(b, size)
        n += len(blobs)
    return n / (time.perf_counter() - start), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="images per archive size (default 40)")
    ap.add_argument("--size", type=int, default=224, help="model-input side in pixels (default 224)")
    ap.add_argument("--sizes", default="2000x1600,3000x2500", help="archive sizes WxH (comma-separated)")
    args = ap.parse_args()
    try:
        import simplejpeg
    except ImportError:
        raise SystemExit("benchmarks/decode.py compares against simplejpeg: pip install simplejpeg") from None
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"one core, one process; model input {args.size} px; simplejpeg {simplejpeg.__version__}, "
          f"Pillow {Image.__version__}")
    print(f"{'archive':>10} {'method':>11} {'img/s/core':>11} {'vs draft':>9} "
          f"{'|d| ref mean/max':>17} {'|d| draft mean/max':>19}")
    for spec in args.sizes.split(","):
        w, h = (int(v) for v in spec.split("x"))
        folder = upscaled_copy(real_root(), Path(tempfile.gettempdir()) / f"cxr_ray_decode_{w}x{h}_{args.n}",
                               size=(w, h), limit=args.n)
        files = sorted(p for p in folder.glob("*/*/*") if p.suffix.lower() in (".jpeg", ".jpg"))
        blobs = [f.read_bytes() for f in files]
        assert all(Image.open(io.BytesIO(b)).size == (w, h) for b in blobs[:3])
        results = {name: rate(fn, blobs, args.size) for name, fn in METHODS.items()}
        ref, draft = results["pil-full"][1], results["pil-draft"][1]
        for name, (r, outs) in results.items():
            d_ref = [np.abs(a.astype(np.int16) - b) for a, b in zip(outs, ref)]
            d_dr = [np.abs(a.astype(np.int16) - b) for a, b in zip(outs, draft)]
            print(f"{spec:>10} {name:>11} {r:>11.1f} {r / results['pil-draft'][0]:>8.2f}x "
                  f"{np.mean([d.mean() for d in d_ref]):>9.2f}/{max(int(d.max()) for d in d_ref):<7d} "
                  f"{np.mean([d.mean() for d in d_dr]):>10.2f}/{max(int(d.max()) for d in d_dr):<7d}")


if __name__ == "__main__":
    main()
