"""Training images/s: the Ray Train path (1 worker) vs a plain-PyTorch loop, same cached data.

    python benchmarks/train_throughput.py [--model simple_cnn] [--size 128] [--epochs 3]
    python benchmarks/train_throughput.py --device cuda --model resnet50 --size 224   # on a GPU
    python benchmarks/train_throughput.py --precision       # fp32 vs bf16 training on this CPU

Both paths run the project's own ``engine.train_one_epoch`` with the same model, batch size,
augmentation and data (the decode-once cache of the shared real images), in the same run:
the plain loop reads the cache with pyarrow into memory and batches a fresh seeded
permutation of it every epoch with numpy, on all the machine's cores (torch's default
threads); the Ray path is ``cxr-ray train``'s TorchTrainer with Ray Data shards and its
default resources (``train.cpus_per_worker=0``: auto), shuffled per epoch as in training.
Ratio = ray / plain (target >= 0.85 on the 2-core development machine).
Both run the precision ``train.amp=auto`` picks here (bf16 on a CPU with AMX / AVX-512 BF16).
With ``--device cuda`` it also reports ResNet-50 images/s with and without bf16 + channels_last.

``--precision``: the plain loop in fp32 vs bf16 (both channels_last, as cxr_ray runs them) for
ResNet-50 (unfreeze_depth 1, 224 px) and simple_cnn (128 px), on the same batches, plus the
validation ROC-AUC of a short simple_cnn run in each precision (evaluated in it). Targets on the
AMX development machine: >= 2x (ResNet-50), >= 1.3x (simple_cnn), |dAUC| <= 0.01.
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
from cxr_ray.data.images import pixels_to_array, to_model_size  # noqa: E402
from cxr_ray.data.preprocessing import resolve_preprocessing  # noqa: E402
from cxr_ray.data.transforms import Collate  # noqa: E402
from cxr_ray.engine.loop import make_optimizer, make_scheduler, predict, train_one_epoch
from cxr_ray.engine.precision import prefers_channels_last, resolve_precision
from cxr_ray.models.registry import build_model  # noqa: E402


def load_train_arrays(cache_uri: str, cache_size: int, image_size: int, split: str = "train"):
    """The cache's ``split`` as uint8 images, labels and keys (plain pyarrow, no Ray)."""
    t = pq.read_table(f"{cache_uri}/data", columns=["pixels", "label", "key", "split", "error"]).to_pandas()
    t = t[(t["split"] == split) & t["error"].isna()]
    images = to_model_size(pixels_to_array(t["pixels"].tolist(), cache_size), image_size)
    return images, t["label"].to_numpy(np.float32), t["key"].to_numpy(np.int64)


def plain_epochs(cfg: ExperimentConfig, arrays, epochs: int, device: torch.device,
                 precision: str = "fp32", channels_last: bool = False, val=None) -> float | tuple[float, float]:
    """Images/s of a plain PyTorch loop over in-memory arrays (epochs after the first); with
    ``val`` arrays also the validation ROC-AUC of the trained model, in the same precision."""
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
        collate = Collate(resolve_preprocessing(cfg), device, cfg.augment, seed=0, epoch=epoch,
                          channels_last=channels_last)
        batches = (collate({"image": images[order[i:i + bs]], "label": labels[order[i:i + bs]],
                            "key": keys[order[i:i + bs]]}) for i in range(0, len(order), bs))
        rates.append(train_one_epoch(model, batches, opt, sched, loss_fn, device, precision).images_per_s)
    rate = float(np.mean(rates[1:] if len(rates) > 1 else rates))
    if val is None:
        return rate
    from sklearn.metrics import roc_auc_score

    collate = Collate(resolve_preprocessing(cfg), device, channels_last=channels_last)
    images, labels, _ = val
    probs, y, _ = predict(model, (collate({"image": images[i:i + bs], "label": labels[i:i + bs]})
                                  for i in range(0, len(labels), bs)), device, precision)
    return rate, float(roc_auc_score(y, probs))


def precision_table(args: argparse.Namespace) -> None:
    """fp32 vs bf16 training rates of both models and the AUC of a short simple_cnn run in each."""
    import ray

    from cxr_ray.cluster import init_ray
    from cxr_ray.data.cache import prepare_cache

    device = torch.device("cpu")
    base = ExperimentConfig().replace(**{
        "data.root": str(real_root()), "data.cache_dir": f"{args.workdir}/cache", "data.image_size": 224,
        "model.weights": "none", "model.width": 16, "train.batch_size": 16, "train.lr": 0.003})
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    cache = prepare_cache(base)
    ray.shutdown()
    train = load_train_arrays(cache.uri, cache.size, 224)
    print(f"\n{torch.get_num_threads()} threads; bf16 fast on this CPU: {resolve_precision('auto', device) == 'bf16'}")
    print("\n| model | images/epoch | fp32 img/s | bf16 img/s | bf16 / fp32 |\n|---|---|---|---|---|")
    for name, size, depth, n, epochs in (("resnet50", 224, 1, args.limit, 2), ("simple_cnn", 128, 4, None, 3)):
        cfg = base.replace(**{"model.name": name, "model.unfreeze_depth": depth, "data.image_size": size})
        arrays = tuple(a[:n] for a in (to_model_size(train[0][:, 0], size), *train[1:]))
        cl = prefers_channels_last(device)
        fp32 = plain_epochs(cfg, arrays, epochs, device, "fp32", cl)
        bf16 = plain_epochs(cfg, arrays, epochs, device, "bf16", cl)
        print(f"| {name} {size}px b16{' channels_last' if cl else ''} | {len(arrays[1])} | {fp32:.1f} | "
              f"{bf16:.1f} | {bf16 / fp32:.2f}x |")
    cfg = base.replace(**{"model.name": "simple_cnn", "data.image_size": 128})
    arrays = (to_model_size(train[0][:, 0], 128), *train[1:])
    val = load_train_arrays(cache.uri, cache.size, 128, split="val")
    aucs = {p: plain_epochs(cfg, arrays, args.epochs, device, p, val=val)[1] for p in ("fp32", "bf16")}
    print(f"\nsimple_cnn 128px, {args.epochs} epochs on {len(arrays[1])} images, validation ROC-AUC on "
          f"{len(val[1])} images: fp32 {aucs['fp32']:.4f}, bf16 {aucs['bf16']:.4f} "
          f"(difference {aucs['bf16'] - aucs['fp32']:+.4f})")


def ray_epochs(cfg: ExperimentConfig, cache, epochs: int) -> float:
    """Images/s reported by the Ray Train workers (epochs after the first)."""
    from cxr_ray.training.train import run_training

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
    p.add_argument("--precision", action="store_true", help="fp32 vs bf16 training on this CPU")
    p.add_argument("--limit", type=int, default=256, help="--precision: ResNet-50 images per epoch")
    args = p.parse_args(argv)
    if args.precision:
        precision_table(args)
        return 0
    device = torch.device(args.device)
    cfg = ExperimentConfig().replace(**{
        "data.root": str(real_root()), "data.image_size": args.size, "data.cache_dir": f"{args.workdir}/cache",
        "model.name": args.model, "model.weights": "none", "model.width": 16, "model.unfreeze_depth": 4,
        "train.batch_size": args.batch_size, "train.use_gpu": device.type == "cuda"})
    if device.type == "cuda":
        arrays = _arrays_without_ray(cfg)
        fp32 = plain_epochs(cfg, arrays, args.epochs, device)
        fast = plain_epochs(cfg, arrays, args.epochs, device, "bf16", channels_last=True)
        print(f"| {args.model} {args.size}px batch {args.batch_size} | fp32 {fp32:.0f} img/s | bf16+channels_last "
              f"{fast:.0f} img/s | {fast / fp32:.2f}x |")
        return 0
    import ray

    from cxr_ray.cluster import init_ray
    from cxr_ray.data.cache import prepare_cache

    init_ray()  # the local Ray cxr-ray itself starts (worker niceness included)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cache = prepare_cache(cfg)
    arrays = load_train_arrays(cache.uri, cache.size, args.size)
    # Plain loop (all cores: torch's default threads) before and after the Ray run, averaged:
    # this 2-core machine drifts by +-10% between minutes, which would bias a single baseline.
    precision, cl = resolve_precision(cfg.train.amp, device), prefers_channels_last(device)
    before = plain_epochs(cfg, arrays, args.epochs, device, precision, cl)
    ray_rate = ray_epochs(cfg, cache, args.epochs)
    after = plain_epochs(cfg, arrays, args.epochs, device, precision, cl)
    plain = (before + after) / 2
    ray.shutdown()
    print(f"\nplain loop before/after the Ray run: {before:.1f} / {after:.1f} img/s (both in {precision})")
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
    images = np.stack([decode_file(p, resolve_preprocessing(cfg).image_size)[0] for p in df["path"]])[:, None]
    return images, df["label"].to_numpy(np.float32), np.arange(len(df), dtype=np.int64)


if __name__ == "__main__":
    sys.exit(main())
