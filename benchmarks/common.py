"""Helpers shared by the benchmarks: the shared real images and their original-size copies."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from PIL import Image

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr-kaggle-224-dev"


def real_root() -> Path:
    """The shared 224 px images (``$CXR_RAY_REAL_DATA`` overrides); exits when absent."""
    root = Path(os.environ.get("CXR_RAY_REAL_DATA", REAL_ROOT))
    if not (root / "train").is_dir():
        raise SystemExit(f"benchmark needs the shared real images at {root} (set CXR_RAY_REAL_DATA)")
    return root


def upscaled_copy(src: Path, dst: Path, size: tuple[int, int] = (2000, 1600), limit: int = 0,
                  quality: int = 90) -> Path:
    """Copy the dataset layout with every image upscaled to ``size`` as a grayscale JPEG,
    like the original dataset's large X-rays. Reuses ``dst`` when already complete."""
    files = sorted(p for p in src.glob("*/*/*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if limit and limit < len(files):  # every k-th file, so each split/class folder keeps its share
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    done = dst / ".complete"
    if done.exists() and done.read_text() == f"{len(files)} {size}":
        return dst
    for f in files:
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("L").resize(size, Image.Resampling.BICUBIC).save(out, quality=quality)
    done.write_text(f"{len(files)} {size}")
    return dst


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    """Run ``fn`` (returns an item count) and return (count, seconds)."""
    start = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - start
