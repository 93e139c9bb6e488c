"""GPU readiness: one command that proves cxr_ray's GPU paths and measures them (< 8 min).

    python benchmarks/gpu_check.py                                   # on a GPU machine (Ray: see 5.)
    python benchmarks/gpu_check.py --images .gpu_sample --out $OUT/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --tiny               # the CPU smoke run the tests do
    python benchmarks/gpu_check.py --make-sample .gpu_sample         # copy the shared real images to carry

It runs the project's own code, not copies: ``engine.train_one_epoch`` (the Ray-free training
step Ray Train workers run) on ``models.registry.build_model``'s ResNet-50, and ``score.ScoreActor`` /
``score.read_and_decode`` (the scoring job's actor and decode task). Sections:

1. training images/s at 224 px for unfreeze depths 0, 2, 4; fp32 vs bf16 autocast + channels_last;
   peak GPU memory of each;
2. inference images/s of the ScoreActor (bf16, channels_last, batch 256), eager vs ``torch.compile``;
3. bf16 vs fp32 probabilities on the same batch: max absolute difference, on a random-weight
   model whose head is rescaled (a worst case: see ``calibrated_model``) and on a ResNet-50
   trained here for a few seconds on the real sample, scored on held-out patients (max and mean
   difference, ROC-AUC both ways, decisions that flip at the fp32 threshold);
4. the scoring pipeline's CPU side: read + decode + resize of real images upscaled to 2000x1600
   (like original X-rays) in one process per core, against the GPU inference rate: which is
   the limit;
5. Ray on the machine (skipped with ``--no-ray``; the machine has no Ray: carry its wheels, see
   docs/cluster.md "The GPU check"): a 1-worker Ray Train fine-tune through ``workflows.train``
   (images/s of its best epoch against section 1's raw step), then ``cxr-ray score``'s
   ``run_score`` with one GPU actor on archive-sized JPEGs, ``score.decode=cpu`` and ``gpu``
   (images/s end to end against section 2's inference rate).

Ends with a short table; ``--out`` also writes it as JSON.

The project needs torch >= 2.10 (older releases' ``weights_only=True`` loader can run code:
CVE-2026-24747); the GPU machine's torch 2.11 meets it, and the check says so when one does not.
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
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout (the GPU machine has no install)
sys.path.insert(0, str(ROOT / "benchmarks"))  # decode_parity, for section 5

from cxr_ray.apps.score.stages import ScoreActor, read_and_decode  # noqa: E402
from cxr_ray.checkpoint import save_checkpoint  # noqa: E402
from cxr_ray.config import ExperimentConfig, ScoreConfig, TrainConfig  # noqa: E402
from cxr_ray.data.catalog import patient_id  # noqa: E402
from cxr_ray.data.preprocessing import resolve_preprocessing  # noqa: E402
from cxr_ray.data.transforms import normalize  # noqa: E402
from cxr_ray.engine.loop import make_optimizer, train_one_epoch  # noqa: E402
from cxr_ray.models.registry import build_model  # noqa: E402

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
                  resolve_preprocessing(cfg))
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.arange(bs, device=device) % 2).float()
    opt = make_optimizer(model, TrainConfig(lr=1e-4))
    loss_fn = nn.BCEWithLogitsLoss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train_one_epoch(model, [(x, y)] * args.warmup, opt, None, loss_fn, device, "bf16" if amp else "fp32")
    sync(device)
    start = time.perf_counter()
    res = train_one_epoch(model, [(x, y)] * args.steps, opt, None, loss_fn, device, "bf16" if amp else "fp32")
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
    # the normalisation the ScoreActor applies (resolve_preprocessing(cfg)), or the logits seen here are
    # not the ones it produces and the rescaling misses
    z = model(normalize(torch.from_numpy(images).to(device), resolve_preprocessing(cfg))).squeeze(1)
    scale = 2.0 / z.std().clamp_min(1e-6)
    head = model.fc[-1]
    head.weight.mul_(scale)
    head.bias.copy_((head.bias - z.mean()) * scale)
    return model.cpu()


def load_sample(src: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real images under ``src/{NORMAL,PNEUMONIA}/``: (uint8 images, labels, patient ids)."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")
                   and p.parent.name.upper() in ("NORMAL", "PNEUMONIA"))
    if not files:
        raise SystemExit(f"no NORMAL/PNEUMONIA images under {src}; make a sample with --make-sample")
    labels = np.array([p.parent.name.upper() == "PNEUMONIA" for p in files], np.int8)
    out = read_and_decode({"path": np.asarray([str(p) for p in files], dtype=object), "label": labels},
                          size, size)
    bad = [str(files[i]) for i, e in enumerate(out["error"]) if e]
    if bad:
        raise SystemExit(f"{len(bad)} sample images failed to decode, e.g. {bad[0]}")
    patients = np.array([patient_id(p.name) for p in files])
    return np.asarray(out["image"]).reshape(len(files), 1, size, size), labels, patients


def trained_agreement(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    """bf16 vs fp32 ScoreActor on a ResNet-50 trained (from random weights, bf16) on the sample.

    Patients are split 80/20 by a hash of the id; the model trains ``--agree-epochs`` epochs on
    the 80% and both Predictors score the held-out 20%.
    """
    images, labels, patients = load_sample(Path(args.images) if args.images else SHARED, args.size)
    held = np.array([zlib.crc32(p.encode()) % 5 == 0 for p in patients])
    if args.tiny:
        held[:2], held[2:] = True, False  # toy sample: a fixed tiny split
    cfg = resnet_cfg(4, args.size)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    amp = device.type == "cuda"
    if amp:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    pos = float((labels[~held] == 0).sum()) / max(1, int((labels[~held] == 1).sum()))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos, device=device))
    x_all = torch.from_numpy(images[~held]).to(device)
    y_all = torch.from_numpy(labels[~held]).float().to(device)
    gen = torch.Generator().manual_seed(0)
    bs = min(args.agree_batch, len(x_all))
    start = time.perf_counter()
    for _ in range(args.agree_epochs):
        order = torch.randperm(len(x_all), generator=gen).to(device)
        batches = []
        for i in range(0, len(order) - bs + 1, bs):
            x = normalize(x_all[order[i:i + bs]], resolve_preprocessing(cfg))
            if amp:
                x = x.contiguous(memory_format=torch.channels_last)
            batches.append((x, y_all[order[i:i + bs]]))
        res = train_one_epoch(model, batches, opt, None, loss_fn, device, "bf16" if amp else "fp32")
    sync(device)
    train_s = time.perf_counter() - start
    ckpt = str(save_checkpoint(tmp / "trained", model.float().cpu().to(memory_format=torch.contiguous_format),
                               cfg, 0.5, {}, args.agree_epochs))
    del model, opt
    x_held, y_held = images[held], labels[held]
    p_amp = make_predictor(ckpt, device, amp=amp, compile_=False, batch=args.infer_batch).probabilities(x_held)
    p_fp32 = make_predictor(ckpt, device, amp=False, compile_=False, batch=args.infer_batch).probabilities(x_held)
    diff = np.abs(p_amp.astype(np.float64) - p_fp32)
    both = len(np.unique(y_held)) == 2
    return {"train_images": int((~held).sum()), "held_out_images": int(held.sum()),
            "epochs": args.agree_epochs, "train_seconds": train_s, "final_train_loss": res.loss,
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "auc_fp32": float(roc_auc_score(y_held, p_fp32)) if both else float("nan"),
            "auc_bf16": float(roc_auc_score(y_held, p_amp)) if both else float("nan"),
            "flips_at_0.5": int(((p_amp >= 0.5) != (p_fp32 >= 0.5)).sum()),
            "fp32_probability_range": [float(p_fp32.min()), float(p_fp32.max())]}


def make_predictor(ckpt: str, device: torch.device, amp: bool, compile_: bool, batch: int) -> ScoreActor:
    score = ScoreConfig(batch_size=batch, gpus_per_actor=1.0 if device.type == "cuda" else 0.0,
                        amp="bf16" if amp else "fp32", compile=compile_, torch_threads=os.cpu_count() or 1)
    from dataclasses import asdict

    return ScoreActor(ckpt, asdict(score))


def infer_rate(pred: ScoreActor, images: np.ndarray, args: argparse.Namespace, device: torch.device
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


def make_sample(out: Path) -> None:
    """Copy the shared real images, in their layout ``{train,val}/{NORMAL,PNEUMONIA}/`` (~12 MB),
    to ``out``: what the machine needs (the Ray section trains on it)."""
    files = sorted(SHARED.rglob("*.jpeg"))
    for f in files:
        (out / f.relative_to(SHARED)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, out / f.relative_to(SHARED))
    print(f"copied {len(files)} images to {out}")


def ray_checks(args: argparse.Namespace, device: torch.device, src: Path, tmp: Path, infer: float,
               raw_train: float) -> dict:
    """cxr_ray's Ray jobs on this machine (needs Ray; ``--no-ray`` skips): a 1-worker Ray Train
    fine-tune of ResNet-50 (unfreeze depth 4, ``train.use_gpu=auto``, random weights: the machine
    has no network) on ``src`` (a ``train/`` layout) through ``workflows.train``, images/s of its
    best epoch against the raw-torch step above; then ``run_score`` with one GPU actor (on CPU
    with ``--device cpu``) on ``--score-images`` of ``src`` upscaled to ``--original-size``, with
    ``score.decode=cpu`` and ``gpu``, images/s each against the inference-only rate."""
    from dataclasses import replace

    import ray

    from cxr_ray.apps import workflows
    from cxr_ray.apps.score.job import run_score
    from cxr_ray.cluster import release_ray

    cfg = ExperimentConfig().replace(**{
        "data.root": str(src), "data.cache_dir": str(tmp / "cache"), "data.image_size": 32 if args.tiny else args.size,
        "model.name": "resnet50", "model.weights": "none", "model.unfreeze_depth": 4,
        "train.epochs": args.ray_epochs, "train.patience": args.ray_epochs, "train.batch_size": args.agree_batch,
        "train.storage_path": str(tmp / "runs"), "train.name": "gpu-check", "metric.tta": "none"})
    try:  # workflows.train starts a local Ray; the score jobs run on it
        start = time.perf_counter()
        outcome = workflows.train(cfg, say=lambda line: print(line, flush=True))
        train = {"images_per_s": float(outcome.best_metrics.get("train_images_per_s", float("nan"))),
                 "seconds": time.perf_counter() - start, "epochs": outcome.epochs_run,
                 "use_gpu": outcome.cfg.train.use_gpu, "raw_torch_images_per_s": raw_train}
        print(f"[ray train] {train['images_per_s']:.0f} img/s in its best epoch (raw torch step "
              f"{raw_train:.0f}); {train['seconds']:.0f} s for {train['epochs']} epoch(s) with start-up", flush=True)
        originals = upscale(src, tmp / "archive", min(args.score_images, args.decode_images * 4),
                            tuple(args.original_size))
        paths = []  # the score jobs read --score-images files: hard links to the upscaled originals
        for i in range(args.score_images):
            link = tmp / "archive" / f"link{i:06d}.jpeg"
            os.link(originals[i % len(originals)], link)
            paths.append(str(link))
        manifest = tmp / "archive.csv"
        manifest.write_text("path\n" + "\n".join(paths) + "\n")
        base = ScoreConfig(batch_size=args.infer_batch, gpus_per_actor=1.0 if device.type == "cuda" else 0.0)
        score = {}
        for mode in ("cpu", "gpu"):
            summary = run_score(outcome.best_checkpoint, [str(manifest)], str(tmp / f"scored-{mode}"),
                                replace(base, decode=mode))
            assert summary.scored == len(paths), f"{summary.failed} files failed: {summary.failures[:3]}"
            score[mode] = summary.images_per_s
            score[f"{mode}_steady"] = summary.steady_images_per_s
            print(f"[ray score] decode={mode}: {summary.images_per_s:.0f} img/s end to end over {len(paths)} "
                  f"{args.original_size[0]}x{args.original_size[1]} JPEGs, {summary.steady_images_per_s:.0f} after "
                  f"the first rows ({summary.first_batch_s:.0f} s start-up); inference alone {infer:.0f}", flush=True)
        cpus = ray.cluster_resources().get("CPU", 0)
    finally:
        release_ray()
    from decode_parity import parity  # benchmarks/decode_parity.py

    par = parity(outcome.best_checkpoint, originals, str(device))
    print(f"[decode parity] {par['images']} images: pixels mean |d| {par['mean_abs_pixel_diff']:.3f}, max "
          f"{par['max_abs_pixel_diff']}; probabilities max |d| {par['max_abs_prob_diff']:.2e}, flips "
          f"{par['decision_flips']}; device path {par['device_path_images_per_s']:.0f} img/s", flush=True)
    return {"train": train, "score": {"images": len(paths), "decode_cpu_images_per_s": score["cpu"],
                                      "decode_gpu_images_per_s": score["gpu"],
                                      "decode_cpu_steady_images_per_s": score["cpu_steady"],
                                      "decode_gpu_steady_images_per_s": score["gpu_steady"],
                                      "inference_images_per_s": infer, "cpus": cpus}, "decode_parity": par}


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
        trained = trained_agreement(args, device, Path(tmp))
        print(f"[agree] trained ({trained['train_images']} images, {trained['epochs']} epochs, "
              f"{trained['train_seconds']:.0f} s), {trained['held_out_images']} held out: max |dp| "
              f"{trained['max_abs_diff']:.2e}, mean {trained['mean_abs_diff']:.2e}, AUC fp32 "
              f"{trained['auc_fp32']:.4f} bf16 {trained['auc_bf16']:.4f}, flips at 0.5: {trained['flips_at_0.5']}",
              flush=True)
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

        ray_result = None
        if not args.no_ray:
            raw = max((t["images_per_s"] for t in train if t["depth"] == 4), default=float("nan"))
            ray_result = ray_checks(args, device, Path(args.images) if args.images else SHARED, Path(tmp),
                                    eager_rate, raw)

    limit = "decoding (CPU)" if decode < eager_rate else "the GPU"
    result = {"info": info, "train": train,
              "inference": {"batch": args.infer_batch, "eager_images_per_s": eager_rate,
                            "compiled_images_per_s": compiled_rate, "compile_first_call_s": compile_s},
              "bf16_vs_fp32_max_abs_diff": max_diff,
              "fp32_probability_range": [float(p_fp32.min()), float(p_fp32.max())],
              "trained_agreement": trained,
              "decode": {"workers": workers, "images_per_s": decode, "original_size": args.original_size},
              "ray": ray_result, "limit": limit, "seconds": time.perf_counter() - t0}
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
    lines += [f"{'inference (ScoreActor), eager':<34}{inf['batch']:>6}{inf['eager_images_per_s']:>9.0f}",
              f"{'inference, torch.compile':<34}{inf['batch']:>6}{inf['compiled_images_per_s']:>9.0f}"
              f"   (first call {inf['compile_first_call_s']:.0f} s)",
              f"{'decode 2000x1600 -> model input':<34}{r['decode']['workers']:>6}{r['decode']['images_per_s']:>9.0f}"
              f"   (processes)",
              f"bf16 vs fp32 probabilities: max abs diff {r['bf16_vs_fp32_max_abs_diff']:.2e}"
              f" (random weights, p over {r['fp32_probability_range'][0]:.3f}..{r['fp32_probability_range'][1]:.3f})",
              f"bf16 vs fp32, trained model on {r['trained_agreement']['held_out_images']} held-out images: "
              f"max {r['trained_agreement']['max_abs_diff']:.2e}, mean {r['trained_agreement']['mean_abs_diff']:.2e}, "
              f"AUC {r['trained_agreement']['auc_fp32']:.4f} vs {r['trained_agreement']['auc_bf16']:.4f}, "
              f"{r['trained_agreement']['flips_at_0.5']} flips at 0.5",
              f"scoring limit: {r['limit']}; check took {r['seconds']:.0f} s"]
    if r.get("ray"):
        t, sc, par = r["ray"]["train"], r["ray"]["score"], r["ray"]["decode_parity"]
        lines[-1:-1] = [
            f"{'Ray Train, 1 worker, best epoch':<34}{'':>6}{t['images_per_s']:>9.0f}   "
            f"({t['images_per_s'] / t['raw_torch_images_per_s']:.2f}x the raw step; use_gpu={t['use_gpu']})",
            *(f"{'cxr-ray score, decode=' + m + ', steady':<34}{sc['cpus']:>6g}"
              f"{sc[f'decode_{m}_steady_images_per_s']:>9.0f}   ({sc[f'decode_{m}_images_per_s']:.0f} end to end; "
              f"{sc[f'decode_{m}_steady_images_per_s'] / sc['inference_images_per_s']:.2f}x inference alone; CPUs)"
              for m in ("cpu", "gpu")),
            f"GPU decode parity ({par['images']} images): pixels mean |d| {par['mean_abs_pixel_diff']:.3f}, "
            f"max {par['max_abs_pixel_diff']}; probabilities max |d| {par['max_abs_prob_diff']:.2e}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (tests, CPU)")
    p.add_argument("--images", help="folder of real images (default: ../shared/data/cxr-kaggle-224-dev)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--make-sample", metavar="DIR", help="copy the shared real train images to DIR and exit")
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
    p.add_argument("--agree-epochs", type=int, default=15, help="training epochs of the trained-model agreement")
    p.add_argument("--agree-batch", type=int, default=64)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray section (Ray Train, cxr-ray score)")
    p.add_argument("--ray-epochs", type=int, default=3, help="epochs of the Ray Train run")
    p.add_argument("--score-images", type=int, default=8000,
                   help="archive-sized JPEGs the score jobs read (hard links to --decode-images x 4 upscaled ones)")
    args = p.parse_args(argv)
    if args.make_sample:
        make_sample(Path(args.make_sample))
        return 0
    if args.tiny:  # same code paths, toy sizes
        args.train_batch, args.infer_batch, args.size = 2, 4, 64
        args.steps, args.warmup, args.decode_images, args.decode_repeat = 1, 1, 8, 1
        args.original_size, args.decode_workers = [300, 240], min(2, os.cpu_count() or 1)
        args.no_compile, args.agree_epochs, args.agree_batch = True, 1, 4
        args.ray_epochs, args.score_images = 1, 16
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 10):
        print(f"WARNING: torch {torch.__version__} is below cxr_ray's floor of 2.10 (weights_only=True can run "
              f"code there); the figures stand, the project will not install on it", flush=True)
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=lambda v: None if v != v else v))
    return 0 if all(math.isfinite(t["images_per_s"]) for t in result["train"]) else 1


if __name__ == "__main__":
    sys.exit(main())
