"""Data benchmarks: JPEG draft decode, and the training pipeline vs ImageFolder + DataLoader.

    python benchmarks/data_pipeline.py [--epochs 3] [--limit 600] [--workdir /tmp/cxr-bench]

1. Decode: ``decode_image`` with JPEG draft mode vs a full decode + resize of the same
   2000x1600 JPEGs (one process), images/s and the mean absolute pixel difference.
2. Pipeline, on the shared 224 px copies and on the same images upscaled to 2000x1600 JPEGs:
   images/s of the cxr_ray training pipeline (Ray Data reading the decode-once cache, with
   flip/rotation/zoom/brightness/contrast augmentation and normalisation) against torchvision
   ``ImageFolder`` + ``DataLoader(num_workers=2)`` decoding the JPEGs with the same
   augmentations, measured in the same run over the same epochs. The one-time cache build is
   reported separately; the ratio is over the training epochs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_root, timed, upscaled_copy  # noqa: E402

from cxr_ray.config import ExperimentConfig  # noqa: E402
from cxr_ray.data.decode import decode_image  # noqa: E402
from cxr_ray.data.preprocessing import resolve_preprocessing  # noqa: E402
from cxr_ray.models.specs import IMAGENET_GRAY_MEAN as GRAY_MEAN  # noqa: E402
from cxr_ray.models.specs import IMAGENET_GRAY_STD as GRAY_STD


def bench_decode(root: Path, size: int, n: int) -> dict:
    """Draft-mode vs full decode on the first ``n`` large JPEGs."""
    files = sorted(root.glob("*/*/*.jpeg"))[:n]
    blobs = [f.read_bytes() for f in files]
    fast_n, fast_s = timed(lambda: sum(1 for b in blobs if decode_image(b, size) is not None))
    full_n, full_s = timed(lambda: sum(1 for b in blobs if decode_image(b, size, draft=False) is not None))
    diffs = [np.abs(decode_image(b, size)[0].astype(float) - decode_image(b, size, draft=False)[0]).mean()
             for b in blobs[:50]]
    return {"draft_img_s": fast_n / fast_s, "full_img_s": full_n / full_s,
            "speedup": full_s / fast_s, "mean_abs_diff": float(np.mean(diffs))}


def baseline_loader(root: Path, cfg: ExperimentConfig, batch_size: int):
    """torchvision ImageFolder + DataLoader(num_workers=2) with the same augmentations."""
    from torchvision import datasets
    from torchvision import transforms as T

    a, n = cfg.augment, resolve_preprocessing(cfg).image_size
    tf = T.Compose([
        T.Grayscale(1),
        T.RandomResizedCrop(n, scale=(a.scale_min ** 2, 1.0), ratio=(1.0, 1.0), antialias=True),
        T.RandomHorizontalFlip(a.hflip_p),
        T.RandomRotation(a.rotation_deg),
        T.ColorJitter(brightness=a.brightness, contrast=a.contrast),
        T.ToTensor(),
        T.Normalize([GRAY_MEAN], [GRAY_STD]),
    ])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=2,
                                       persistent_workers=True)


def run_baseline(loader, epochs: int) -> tuple[int, float]:
    def go() -> int:
        n = 0
        for _ in range(epochs):
            for x, _ in loader:
                n += len(x)
        return n
    next(iter(loader))  # start the worker processes outside the timing, as a fair warm-up
    return timed(go)


def run_cxr_ray(root: Path, cfg: ExperimentConfig, epochs: int, batch_size: int):
    """(cache build seconds, images, seconds over the epochs) of the cxr_ray pipeline."""
    from cxr_ray.data.cache import prepare_cache
    from cxr_ray.data.pipeline import TorchCollate, split_datasets
    from cxr_ray.data.preprocessing import resolve_preprocessing

    cfg = cfg.replace(**{"data.root": str(root), "data.val_split": "official"})
    _, build_s = timed(lambda: prepare_cache(cfg).meta["n_images"])
    cache = prepare_cache(cfg)  # reused: the cache was built just above
    ds = split_datasets(cache, resolve_preprocessing(cfg).image_size, ("train",), cfg.data.materialize_gb)["train"]

    def go() -> int:
        n = 0
        for epoch in range(epochs):
            collate = TorchCollate(resolve_preprocessing(cfg), "cpu", cfg.augment, seed=0, epoch=epoch)
            for x, _ in ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                              local_shuffle_buffer_size=4 * batch_size, prefetch_batches=2):
                n += len(x)
        return n
    n, s = timed(go)
    return build_s, n, s


def compare(name: str, root: Path, cfg: ExperimentConfig, epochs: int, batch_size: int) -> dict:
    base_n, base_s = run_baseline(baseline_loader(root, cfg, batch_size), epochs)
    build_s, ours_n, ours_s = run_cxr_ray(root, cfg, epochs, batch_size)
    row = {"input": name, "baseline_img_s": base_n / base_s, "cxr_ray_img_s": ours_n / ours_s,
           "ratio": (ours_n / ours_s) / (base_n / base_s), "cache_build_s": build_s,
           "epochs": epochs, "images_per_epoch": ours_n // epochs}
    print(f"[bench] {name}: baseline {row['baseline_img_s']:.0f} img/s, cxr_ray {row['cxr_ray_img_s']:.0f} "
          f"img/s, ratio {row['ratio']:.2f}x (one-time cache build {build_s:.1f}s)", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="model input size")
    p.add_argument("--limit", type=int, default=600, help="images in the 2000x1600 copy (0 = all)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "cxr-bench"))
    args = p.parse_args(argv)

    import ray

    work = Path(args.workdir)
    shutil.rmtree(work / "cache", ignore_errors=True)  # report the real one-time cache build
    small = real_root()
    print(f"[bench] making 2000x1600 JPEG copies of {args.limit or 'all'} images in {work} ...", flush=True)
    large = upscaled_copy(small, work / "large", limit=args.limit)
    cfg = ExperimentConfig().replace(**{"data.image_size": args.size, "data.cache_dir": str(work / "cache")})

    d = bench_decode(large, args.size, 200)
    print(f"[bench] decode 2000x1600 JPEG -> {args.size}px: draft {d['draft_img_s']:.0f} img/s, full decode + "
          f"resize {d['full_img_s']:.0f} img/s, speedup {d['speedup']:.2f}x, mean |diff| "
          f"{d['mean_abs_diff']:.2f} / 255", flush=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [compare("shared 224px JPEGs", small, cfg, args.epochs, args.batch_size),
            compare("2000x1600 JPEGs", large, cfg, args.epochs, args.batch_size)]
    ray.shutdown()

    print("\n| input | ImageFolder+DataLoader(2) img/s | cxr_ray pipeline img/s | ratio | one-time cache build |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} ({r['images_per_epoch']} imgs x {r['epochs']} epochs) | {r['baseline_img_s']:.0f} | "
              f"{r['cxr_ray_img_s']:.0f} | {r['ratio']:.2f}x | {r['cache_build_s']:.1f} s |")
    print(f"\ndecode speedup (draft vs full, 2000x1600 -> {args.size}px): {d['speedup']:.2f}x, "
          f"mean |diff| {d['mean_abs_diff']:.2f}/255")
    return 0


if __name__ == "__main__":
    sys.exit(main())
