"""What each way of shuffling the training split costs per epoch, and how well it mixes classes.

    python benchmarks/shuffle.py [--size 128] [--epochs 3] [--batch-size 32]

On the shared real images (train split carved as in training), one process, a local Ray with
2 CPUs. For each strategy it iterates whole epochs of the training Dataset through
``pipeline.epoch_batches`` with the training collate (augmentation + normalisation, no model)
and prints seconds per epoch (epochs after the first), the share of batches holding both
classes, and the largest difference in PNEUMONIA share between an epoch's two halves.

Strategies: ``before`` (the cache in path order, as it was written before, with the old
4 x batch local buffer), on today's cache (written in a seeded random order): ``none`` (no
buffer), ``buffer-4xbatch``, ``cxr_ray`` (what training uses: per-epoch seeded block order +
``SHUFFLE_BUFFER`` local buffer) and ``random_shuffle`` (a full Ray Data shuffle every epoch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_root  # noqa: E402

from cxr_ray.config import ExperimentConfig  # noqa: E402
from cxr_ray.data import pipeline  # noqa: E402
from cxr_ray.data.pipeline import TorchCollate, epoch_batches, split_dataset  # noqa: E402
from cxr_ray.data.preprocessing import resolve_preprocessing  # noqa: E402


def measure(ds, batch_size: int, epochs: int, cfg: ExperimentConfig, buffer: int | None) -> dict:
    """Seconds per epoch (after the first) and class mixing of ``ds`` read ``epochs`` times."""
    times, mixed, half_gap = [], [], []
    for epoch in range(epochs):
        old = pipeline.SHUFFLE_BUFFER
        if buffer is not None:
            pipeline.SHUFFLE_BUFFER = buffer
        collate = TorchCollate(resolve_preprocessing(cfg), "cpu", cfg.augment, seed=0, epoch=epoch)
        start = time.perf_counter()
        labels = [y.numpy() for _, y in epoch_batches(ds, batch_size, collate,
                                                     shuffle_seed=0 if buffer != 0 else None, epoch=epoch)]
        times.append(time.perf_counter() - start)
        pipeline.SHUFFLE_BUFFER = old
        mixed.append(np.mean([0 < y.sum() < len(y) for y in labels]))
        flat = np.concatenate(labels)
        half_gap.append(abs(flat[: len(flat) // 2].mean() - flat[len(flat) // 2:].mean()))
    return {"s_per_epoch": float(np.mean(times[1:] if epochs > 1 else times)),
            "mixed": float(np.min(mixed)), "half_gap": float(np.max(half_gap))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "cxr-bench"))
    args = p.parse_args(argv)
    import ray

    from cxr_ray.data.cache import prepare_cache

    ray.init(num_cpus=2, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    cfg = ExperimentConfig().replace(**{"data.root": str(real_root()), "data.image_size": args.size,
                                        "data.cache_dir": f"{args.workdir}/cache"})
    cache = prepare_cache(cfg)
    base = split_dataset(cache, "train", args.size).materialize()
    from ray.data import RandomSeedConfig

    seed = RandomSeedConfig(seed=0, reseed_after_execution=True)
    path_sorted = split_dataset(cache, "train", args.size, with_paths=True).sort("path").materialize()
    strategies = {
        "before: path-sorted cache, 4 x batch buffer": (path_sorted, 4 * args.batch_size),
        "none": (base, 0),
        "buffer-4xbatch": (base, 4 * args.batch_size),
        "cxr_ray": (base.randomize_block_order(seed=seed), None),
        "random_shuffle": (base.random_shuffle(seed=seed), 0),
    }
    rows = {name: measure(ds, args.batch_size, args.epochs, cfg, buf) for name, (ds, buf) in strategies.items()}
    ray.shutdown()
    n = sum(cache.split_counts("train"))
    print(f"\n{n} training images at {args.size} px, batch {args.batch_size}, {args.epochs} epochs "
          f"(times: epochs after the first; mixing: worst epoch)")
    print("| strategy | s/epoch | vs none | batches with both classes | half-epoch PNEUMONIA share gap |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['s_per_epoch']:.2f} | {r['s_per_epoch'] / rows['none']['s_per_epoch']:.2f}x | "
              f"{100 * r['mixed']:.0f}% | {100 * r['half_gap']:.1f} points |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
