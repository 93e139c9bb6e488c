"""Training images/s: the Ray Train path (1 worker) vs a plain-PyTorch loop, same cached data.

    python benchmarks/train_throughput.py [--model simple_cnn] [--size 128] [--epochs 3]
    python benchmarks/train_throughput.py --device cuda --model resnet50 --size 224   # on a GPU

Both paths run the project's own ``engine.train_one_epoch`` with the same model, batch size,
augmentation and data (the decode-once cache of the shared real images), in the same run:
the plain loop reads the cache with pyarrow into memory and batches a fresh seeded
permutation of it every epoch with numpy, on all the machine's cores (torch's default
threads); the Ray path is ``cxr-ray train``'s TorchTrainer with Ray Data shards and its
default resources (``train.cpus_per_worker=0``: auto), shuffled per epoch as in training.
Ratio = ray / plain (target >= 0.85 on the 2-core development machine).
With ``--device cuda`` it also reports ResNet-50 images/s with and without bf16 + channels_last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_root  # noqa: E402

from cxr_ray.config import ExperimentConfig  # noqa: E402
from cxr_ray.data.transforms import Collate, pixels_to_array, to_model_size  # noqa: E402
from cxr_ray.engine import make_optimizer, make_scheduler, train_one_epoch  # noqa: E402
from cxr_ray.models import build_model  # noqa: E402


def load_train_arrays(cache_uri: str, cache_size: int, image_size: int):
    """The cache's train split as uint8 images, labels and keys (plain pyarrow, no Ray)."""
    t = pq.read_table(f"{cache_uri}/data", columns=["pixels", "label", "key", "split", "error"]).to_pandas()
    t = t[(t["split"] == "train") & t["error"].isna()]
    images = to_model_size(pixels_to_array(t["pixels"].tolist(), cache_size), image_size)
    return images, t["label"].to_numpy(np.float32), t["key"].to_numpy(np.int64)


def plain_epochs(cfg: ExperimentConfig, arrays, epochs: int, device: torch.device,
                 amp: bool = False, channels_last: bool = False) -> float:
    """Images/s of a plain PyTorch loop over in-memory arrays (epochs after the first)."""
    images, labels, keys = arrays
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bs = cfg.train.batch_size
    steps = (len(labels) + bs - 1) // bs
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, steps, steps * epochs)
    loss_fn = nn.BCEWithLogitsLoss()
    rates = []
    for epoch in range(epochs):
        order = np.random.default_rng((cfg.train.seed, epoch)).permutation(len(labels))  # reshuffled per epoch
        collate = Collate(device, cfg.augment, seed=0, epoch=epoch, channels_last=channels_last,
                          normalize=cfg.data.normalize)
        batches = (collate({"image": images[order[i:i + bs]], "label": labels[order[i:i + bs]],
                            "key": keys[order[i:i + bs]]}) for i in range(0, len(order), bs))
        rates.append(train_one_epoch(model, batches, opt, sched, loss_fn, device, amp=amp).images_per_s)
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def ray_epochs(cfg: ExperimentConfig, cache, epochs: int) -> float:
    """Images/s reported by the Ray Train workers (epochs after the first)."""
    from cxr_ray.train import run_training

    cfg = cfg.replace(**{"train.epochs": epochs, "train.patience": epochs + 1, "train.num_workers": 1,
                         "train.storage_path": tempfile.mkdtemp(prefix="cxr-bench-runs-")})
    result = run_training(cfg, cache, progress=False)
    if result.error:
        raise result.error
    df = result.metrics_dataframe
    rates = df["train_images_per_s"].to_numpy()
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="simple_cnn", choices=["simple_cnn", "resnet50"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "cxr-bench"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = ExperimentConfig().replace(**{
        "data.root": str(real_root()), "data.image_size": args.size, "data.cache_dir": f"{args.workdir}/cache",
        "model.name": args.model, "model.weights": "none", "model.width": 16, "model.unfreeze_depth": 4,
        "train.batch_size": args.batch_size, "train.use_gpu": device.type == "cuda"})
    if device.type == "cuda":
        arrays = _arrays_without_ray(cfg)
        fp32 = plain_epochs(cfg, arrays, args.epochs, device)
        fast = plain_epochs(cfg, arrays, args.epochs, device, amp=True, channels_last=True)
        print(f"| {args.model} {args.size}px batch {args.batch_size} | fp32 {fp32:.0f} img/s | bf16+channels_last "
              f"{fast:.0f} img/s | {fast / fp32:.2f}x |")
        return 0
    import ray

    from cxr_ray.data.cache import prepare_cache
    from cxr_ray.runtime import init_ray

    init_ray(num_cpus=2)  # the local Ray cxr-ray itself starts (worker niceness included)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cache = prepare_cache(cfg)
    arrays = load_train_arrays(cache.uri, cache.size, args.size)
    # Plain loop (all cores: torch's default threads) before and after the Ray run, averaged:
    # this 2-core machine drifts by +-10% between minutes, which would bias a single baseline.
    before = plain_epochs(cfg, arrays, args.epochs, device)
    ray_rate = ray_epochs(cfg, cache, args.epochs)
    after = plain_epochs(cfg, arrays, args.epochs, device)
    plain = (before + after) / 2
    ray.shutdown()
    print(f"\nplain loop before/after the Ray run: {before:.1f} / {after:.1f} img/s")
    print(f"\n| model | images/epoch | plain PyTorch ({torch.get_num_threads()} threads) img/s | "
          f"Ray Train (1 worker, defaults) img/s | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} {args.size}px b{args.batch_size} | {len(arrays[1])} | {plain:.1f} | {ray_rate:.1f} | "
          f"{ray_rate / plain:.2f}x |")
    return 0


def _arrays_without_ray(cfg: ExperimentConfig):
    """Synthetic-free GPU path: decode the shared images directly (no Ray on the GPU machine)."""
    from cxr_ray.data.catalog import assign_splits, load_catalog
    from cxr_ray.data.decode import decode_file

    df = assign_splits(load_catalog(cfg.data.root), cfg.data)
    df = df[df["split"] == "train"]
    images = np.stack([decode_file(p, cfg.data.image_size)[0] for p in df["path"]])[:, None]
    return images, df["label"].to_numpy(np.float32), np.arange(len(df), dtype=np.int64)


if __name__ == "__main__":
    sys.exit(main())
