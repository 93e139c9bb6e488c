"""GPU readiness: one command that proves cxr_ray's GPU paths and measures them (< 5 min).

    python benchmarks/gpu_check.py                                   # on a GPU machine (no Ray needed)
    python benchmarks/gpu_check.py --images .gpu_sample --out $OUT/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --tiny               # the CPU smoke run the tests do
    python benchmarks/gpu_check.py --make-sample .gpu_sample         # copy ~200 real images to carry

It runs the project's own code, not copies: ``engine.train_one_epoch`` (the Ray-free training
step Ray Train workers run) on ``models.build_model``'s ResNet-50, and ``score.Predictor`` /
``score.read_and_decode`` (the scoring job's actor and decode task). Sections:

1. training images/s at 224 px for unfreeze depths 0, 2, 4; fp32 vs bf16 autocast + channels_last;
   peak GPU memory of each;
2. inference images/s of the Predictor (bf16, channels_last, batch 256), eager vs ``torch.compile``;
3. bf16 vs fp32 probabilities on the same batch: max absolute difference;
4. the scoring pipeline's CPU side: read + decode + resize of real images upscaled to 2000x1600
   (like original X-rays) in one process per core, against the GPU inference rate: which is
   the limit.

Ends with a short table; ``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout (the GPU machine has no install)

from cxr_ray.checkpoint import save_checkpoint  # noqa: E402
from cxr_ray.config import ExperimentConfig, ScoreConfig, TrainConfig  # noqa: E402
from cxr_ray.data.transforms import normalize  # noqa: E402
from cxr_ray.engine import make_optimizer, train_one_epoch  # noqa: E402
from cxr_ray.models import build_model  # noqa: E402
from cxr_ray.score import Predictor, read_and_decode  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cxr-kaggle-224-dev"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def resnet_cfg(depth: int, size: int) -> ExperimentConfig:
    return ExperimentConfig().replace(**{"model.name": "resnet50", "model.weights": "none",
                                         "model.unfreeze_depth": depth, "data.image_size": size})


def train_rate(depth: int, amp: bool, args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of engine.train_one_epoch over device-resident batches; peak memory."""
    cfg = resnet_cfg(depth, args.size)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    bs = args.train_batch
    x = normalize(torch.randint(0, 256, (bs, 1, args.size, args.size), dtype=torch.uint8, device=device),
                  cfg.data.normalize)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.arange(bs, device=device) % 2).float()
    opt = make_optimizer(model, TrainConfig(lr=1e-4))
    loss_fn = nn.BCEWithLogitsLoss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train_one_epoch(model, [(x, y)] * args.warmup, opt, None, loss_fn, device, amp=amp)
    sync(device)
    start = time.perf_counter()
    res = train_one_epoch(model, [(x, y)] * args.steps, opt, None, loss_fn, device, amp=amp)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, opt
    return {"depth": depth, "precision": "bf16+cl" if amp else "fp32", "batch": bs,
            "images_per_s": res.images / seconds, "peak_gib": peak, "loss": res.loss}


@torch.no_grad()
def calibrated_model(cfg: ExperimentConfig, images: np.ndarray, device: torch.device) -> nn.Module:
    """A random-weight ResNet-50 whose head is rescaled so the batch's logits are ~N(0, 2^2).

    Untrained, its logits are huge and every probability is 0 or 1, which would hide any
    bf16-vs-fp32 difference; rescaled, probabilities spread over (0, 1) as a trained model's do.
    """
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    # the normalisation the Predictor applies (cfg.data.normalize), or the logits seen here are
    # not the ones it produces and the rescaling misses
    z = model(normalize(torch.from_numpy(images).to(device), cfg.data.normalize)).squeeze(1)
    scale = 2.0 / z.std().clamp_min(1e-6)
    head = model.fc[-1]
    head.weight.mul_(scale)
    head.bias.copy_((head.bias - z.mean()) * scale)
    return model.cpu()


def make_predictor(ckpt: str, device: torch.device, amp: bool, compile_: bool, batch: int) -> Predictor:
    score = ScoreConfig(batch_size=batch, gpus_per_actor=1.0 if device.type == "cuda" else 0.0,
                        amp=amp, compile=compile_, torch_threads=os.cpu_count() or 1)
    from dataclasses import asdict

    return Predictor(ckpt, asdict(score))


def infer_rate(pred: Predictor, images: np.ndarray, args: argparse.Namespace, device: torch.device
               ) -> tuple[float, float]:
    """(images/s over timed calls, seconds of the first call: warm-up or compilation)."""
    start = time.perf_counter()
    pred.probabilities(images)
    sync(device)
    first = time.perf_counter() - start
    for _ in range(max(0, args.warmup - 1)):
        pred.probabilities(images)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        pred.probabilities(images)
    sync(device)
    return len(images) * args.steps / (time.perf_counter() - start), first


def _decode_chunk(job: tuple[list[str], int, int]) -> int:
    paths, cache_size, image_size = job
    out = read_and_decode({"path": np.asarray(paths, dtype=object), "label": np.zeros(len(paths), np.int8)},
                          cache_size, image_size)
    return int(sum(e == "" for e in out["error"]))


def upscale(src: Path, dst: Path, n: int, size: tuple[int, int]) -> list[str]:
    """Up to ``n`` real images from ``src`` as ``size`` JPEGs in ``dst`` (like original X-rays)."""
    from PIL import Image

    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:n]
    if not files:
        raise SystemExit(f"no images under {src}; pass --images DIR")
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        p = dst / f"x{i:05d}.jpeg"
        Image.open(f).convert("L").resize(size, Image.Resampling.BICUBIC).save(p, quality=90)
        out.append(str(p))
    return out


def decode_rate(paths: list[str], workers: int, image_size: int, repeat: int) -> float:
    """Images/s of score.read_and_decode in ``workers`` processes (chunks of 32 files)."""
    jobs = [(paths[i:i + 32], image_size, image_size) for i in range(0, len(paths), 32)] * repeat
    ctx = mp.get_context("spawn")  # no CUDA state in forked children
    with ctx.Pool(workers) as pool:
        pool.map(_decode_chunk, jobs[:workers])  # start-up and imports outside the timing
        start = time.perf_counter()
        ok = sum(pool.map(_decode_chunk, jobs))
        seconds = time.perf_counter() - start
    assert ok == len(paths) * repeat, f"{len(paths) * repeat - ok} images failed to decode"
    return ok / seconds


def make_sample(out: Path, n: int) -> None:
    """Copy ``n`` shared real images (both classes) into ``out`` to carry to a GPU machine."""
    files = sorted(SHARED.rglob("*.jpeg"))
    step = max(1, len(files) // n)
    out.mkdir(parents=True, exist_ok=True)
    for f in files[::step][:n]:
        shutil.copy(f, out / f"{f.parent.name}_{f.name}")
    print(f"copied {min(n, len(files[::step]))} images to {out}")


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    t0 = time.perf_counter()
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cpus": os.cpu_count(), "size": args.size}
    print(f"[gpu_check] {info}", flush=True)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows use TF32 tensor cores, as PyTorch users do
    torch.backends.cudnn.allow_tf32 = True

    train = []
    for depth in (0, 2, 4):
        for amp in (False, True):
            if amp and device.type != "cuda":
                continue  # bf16 autocast is a CUDA path in engine.autocast
            r = train_rate(depth, amp, args, device)
            train.append(r)
            print(f"[train] depth {depth} {r['precision']}: {r['images_per_s']:.0f} img/s, "
                  f"peak {r['peak_gib']:.1f} GiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.infer_batch, 1, args.size, args.size), dtype=np.uint8)
        model = calibrated_model(resnet_cfg(4, args.size), images, device)
        ckpt = str(save_checkpoint(Path(tmp) / "ckpt", model, resnet_cfg(4, args.size), 0.5, {}, 0))
        amp = device.type == "cuda"
        eager = make_predictor(ckpt, device, amp=amp, compile_=False, batch=args.infer_batch)
        eager_rate, _ = infer_rate(eager, images, args, device)
        print(f"[infer] eager: {eager_rate:.0f} img/s", flush=True)
        fp32 = make_predictor(ckpt, device, amp=False, compile_=False, batch=args.infer_batch)
        p_amp, p_fp32 = eager.probabilities(images), fp32.probabilities(images)
        max_diff = float(np.abs(p_amp - p_fp32).max())
        print(f"[agree] max |p_bf16 - p_fp32| = {max_diff:.2e} (p spread {p_fp32.min():.3f}..{p_fp32.max():.3f})",
              flush=True)
        del eager, fp32
        compiled_rate, compile_s = float("nan"), float("nan")
        if not args.no_compile:
            compiled = make_predictor(ckpt, device, amp=amp, compile_=True, batch=args.infer_batch)
            compiled_rate, compile_s = infer_rate(compiled, images, args, device)
            print(f"[infer] torch.compile: {compiled_rate:.0f} img/s (first call {compile_s:.0f} s)", flush=True)
            del compiled

        src = Path(args.images) if args.images else SHARED
        paths = upscale(src, Path(tmp) / "big", args.decode_images, tuple(args.original_size))
        workers = args.decode_workers or os.cpu_count() or 1
        decode = decode_rate(paths, workers, args.size, args.decode_repeat)
        print(f"[decode] {decode:.0f} img/s on {workers} processes", flush=True)

    limit = "decoding (CPU)" if decode < eager_rate else "the GPU"
    result = {"info": info, "train": train,
              "inference": {"batch": args.infer_batch, "eager_images_per_s": eager_rate,
                            "compiled_images_per_s": compiled_rate, "compile_first_call_s": compile_s},
              "bf16_vs_fp32_max_abs_diff": max_diff,
              "fp32_probability_range": [float(p_fp32.min()), float(p_fp32.max())],
              "decode": {"workers": workers, "images_per_s": decode, "original_size": args.original_size},
              "limit": limit, "seconds": time.perf_counter() - t0}
    print(format_table(result))
    return result


def format_table(r: dict) -> str:
    """The short table the check ends with."""
    lines = [f"\n== cxr_ray GPU check: {r['info']['device']}, torch {r['info']['torch']}, "
             f"{r['info']['cpus']} CPUs, {r['info']['size']} px ==",
             f"{'ResNet-50 training step':<34}{'batch':>6}{'img/s':>9}{'peak GiB':>10}"]
    for t in r["train"]:
        lines.append(f"{'  unfreeze ' + str(t['depth']) + ', ' + t['precision']:<34}{t['batch']:>6}"
                     f"{t['images_per_s']:>9.0f}{t['peak_gib']:>10.1f}")
    inf = r["inference"]
    lines += [f"{'inference (Predictor), eager':<34}{inf['batch']:>6}{inf['eager_images_per_s']:>9.0f}",
              f"{'inference, torch.compile':<34}{inf['batch']:>6}{inf['compiled_images_per_s']:>9.0f}"
              f"   (first call {inf['compile_first_call_s']:.0f} s)",
              f"{'decode 2000x1600 -> model input':<34}{r['decode']['workers']:>6}{r['decode']['images_per_s']:>9.0f}"
              f"   (processes)",
              f"bf16 vs fp32 probabilities: max abs diff {r['bf16_vs_fp32_max_abs_diff']:.2e}"
              f" (p over {r['fp32_probability_range'][0]:.3f}..{r['fp32_probability_range'][1]:.3f})",
              f"scoring limit: {r['limit']}; check took {r['seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tests, CPU)")
    p.add_argument("--images", help="folder of real images (default: ../shared/data/cxr-kaggle-224-dev)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--make-sample", metavar="DIR", help="copy ~200 shared real images to DIR and exit")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--decode-images", type=int, default=192)
    p.add_argument("--decode-repeat", type=int, default=3)
    p.add_argument("--decode-workers", type=int, default=0, help="default: all cores")
    p.add_argument("--original-size", type=int, nargs=2, default=[2000, 1600])
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    if args.make_sample:
        make_sample(Path(args.make_sample), 200)
        return 0
    if args.tiny:  # same code paths, toy sizes
        args.train_batch, args.infer_batch, args.size = 2, 4, 64
        args.steps, args.warmup, args.decode_images, args.decode_repeat = 1, 1, 8, 1
        args.original_size, args.decode_workers = [300, 240], min(2, os.cpu_count() or 1)
        args.no_compile = True
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=lambda v: None if v != v else v))
    return 0 if all(math.isfinite(t["images_per_s"]) for t in result["train"]) else 1


if __name__ == "__main__":
    sys.exit(main())
