"""Batch scoring: ``cxr-ray score`` against a plain loop and the model-only ceiling; job memory.

    python benchmarks/score.py [--n 1000] [--model resnet50] [--batch-size 32]
    python benchmarks/score.py --device cuda            # on a GPU machine with Ray
    python benchmarks/score.py --memory                 # driver peak RSS, 100k vs 1M-row manifests

Throughput (same run, same model with random weights, same images, same batch size):

- plain loop: one process, ``PIL.Image.open(...).convert("L").resize(...)`` per file, batched
  model forward; what a user would write without cxr_ray;
- model-only ceiling: the same forward passes over tensors decoded beforehand, in fp32 and in
  the precision ``auto`` picks here (bf16 on a CPU with AMX / AVX-512 BF16), channels_last for
  ResNet-50 as the Predictor runs it;
- ``cxr-ray score``: :func:`cxr_ray.apps.score.job.run_score` on a local Ray started before the clock
  (actor start and model load are inside the timing), writing the Parquet output, with nothing
  hand-set: the previous release's defaults (one 1-CPU actor, fp32, torch), today's defaults in
  fp32 on the torch backend, today's defaults (the checkpoint records bf16 as a training run
  here would), and ``score.backend=onnxruntime`` (fp32; what ``backend=auto`` picks for fp32 jobs);
- after the jobs (so nothing of it runs beside them): the ONNX Runtime model-only rows, fp32 and
  int8 (static QDQ), with their logit agreement with torch fp32.

Targets (2-core machine): defaults >= 1.0x the plain loop and >= 0.85x the ceiling in the same
precision; with bf16, defaults >= 2.5x the fp32 path.

Memory: runs ``cxr-ray score`` as a subprocess on a 100,000-row and a 1,000,000-row manifest
(2,000 small synthetic images, the other rows paths to files that do not exist, which become
error rows quickly, as in an archive index that outlived its files) and samples, every 0.2 s,
the RSS of the driver process and the summed RSS of the whole process tree (driver, raylet,
GCS, workers). Target: the driver's 1M-row peak within 1.3x of its 100k-row peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_root  # noqa: E402

from cxr_ray.checkpoint import save_checkpoint  # noqa: E402
from cxr_ray.config import ExperimentConfig, ScoreConfig  # noqa: E402
from cxr_ray.data.listing import list_inputs  # noqa: E402
from cxr_ray.data.preprocessing import resolve_preprocessing  # noqa: E402
from cxr_ray.data.transforms import normalize  # noqa: E402
from cxr_ray.engine.precision import autocast, prefers_channels_last, resolve_precision  # noqa: E402
from cxr_ray.models.registry import build_model  # noqa: E402


def make_checkpoint(out: Path, model: str, size: int, val_precision: str = "fp32", width: int = 16
                    ) -> tuple[str, torch.nn.Module]:
    """A checkpoint of ``model`` with random weights (same compute as a trained one), whose
    threshold was chosen in ``val_precision`` (as a training run on this machine records);
    ``width``: the small CNN's ``model.width``."""
    cfg = ExperimentConfig().replace(**{"model.name": model, "model.weights": "none", "model.width": width,
                                        "data.image_size": size})
    torch.manual_seed(0)
    net = build_model(cfg.model).eval()
    return str(save_checkpoint(out / "ckpt", net, cfg, 0.5, {}, 0, val_precision=val_precision)), net


def plain_decode(path: str, size: int) -> np.ndarray:
    """The plain baseline's decode: PIL, grayscale, resize."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))


@torch.no_grad()
def forward(model: torch.nn.Module, batch: np.ndarray, device: torch.device, precision: str,
            channels_last: bool) -> np.ndarray:
    """One batch as the Predictor computes it: normalise, optional channels_last, autocast."""
    x = normalize(torch.from_numpy(batch[:, None]).to(device), resolve_preprocessing(ExperimentConfig()))  # as scored
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        return torch.sigmoid(model(x).float()).cpu().numpy()


def plain_loop(model, paths, size, bs, device, precision="fp32", channels_last=False) -> float:
    """Images/s of decode + forward in one process, batch by batch."""
    start = time.perf_counter()
    for i in range(0, len(paths), bs):
        forward(model, np.stack([plain_decode(p, size) for p in paths[i:i + bs]]), device, precision, channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def model_only(model, images, bs, device, precision, channels_last) -> float:
    """Images/s of the forward passes alone, over pre-decoded images (the ceiling)."""
    forward(model, images[:bs], device, precision, channels_last)  # warm-up (oneDNN kernel selection)
    start = time.perf_counter()
    for i in range(0, len(images), bs):
        forward(model, images[i:i + bs], device, precision, channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def throughput(args: argparse.Namespace) -> None:
    """Plain loop, model-only ceilings per precision, and ``run_score`` as a user runs it."""
    import ray

    from cxr_ray.apps.score.job import run_score

    device = torch.device(args.device)
    cores = torch.get_num_threads()
    fast = resolve_precision("auto", device)  # what a checkpoint trained here records (val_precision)
    cl = prefers_channels_last(device)
    listing = list_inputs([str(real_root() / "train"), str(real_root() / "val")])
    step = max(1, len(listing) // args.n)
    listing = listing.iloc[::step].head(args.n).reset_index(drop=True)
    paths = listing["path"].tolist()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [str(Path(tmp) / "sample.csv")]  # the sampled files, as a manifest
        listing[["path"]].to_csv(inputs[0], index=False)
        ckpt, model = make_checkpoint(Path(tmp), args.model, args.size, val_precision=fast)
        model = model.to(device)
        plain = plain_loop(model, paths[:args.batch_size], args.size, args.batch_size, device)  # warm-up
        plain = plain_loop(model, paths, args.size, args.batch_size, device)
        rows.append(("plain loop: PIL decode + forward, fp32", plain))
        images = np.stack([plain_decode(p, args.size) for p in paths])
        ceilings = {}
        for precision in dict.fromkeys(("fp32", fast)):
            m = model.to(memory_format=torch.channels_last) if cl else model
            ceilings[precision] = model_only(m, images, args.batch_size, device, precision, cl)
            rows.append((f"model only (ceiling), {precision}{' channels_last' if cl else ''}", ceilings[precision]))
        del model
        os.environ["CXR_RAY_CACHE"] = tmp  # the onnxruntime backend's export cache (workers inherit it)
        ray.init(num_cpus=args.cpus or None, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        runs = {"score, before this release's defaults (1 CPU actor, fp32, torch)":
                ScoreConfig(batch_size=args.batch_size, cpus_per_actor=1.0, decode_cpus=1.0, amp="fp32",
                            backend="torch"),
                "score, defaults with score.amp=fp32 score.backend=torch":
                ScoreConfig(batch_size=args.batch_size, amp="fp32", backend="torch"),
                f"score, defaults (amp=auto: {fast})": ScoreConfig(batch_size=args.batch_size)}
        if device.type == "cuda":
            gpu = ScoreConfig(batch_size=args.batch_size, gpus_per_actor=1.0)
            runs = {f"score, 1 GPU actor (amp=auto: {fast})": gpu}
        else:
            runs["score, defaults with score.backend=onnxruntime (fp32)"] = ScoreConfig(
                batch_size=args.batch_size, backend="onnxruntime")
        rates = {}
        for i, (name, score) in enumerate(runs.items()):
            summary = run_score(ckpt, inputs, str(Path(tmp) / f"out{i}"), score)
            assert summary.scored == len(paths), summary
            rates[name] = summary.images_per_s
            rows.append((name, summary.images_per_s))
        ray.shutdown()
        onnx: list[tuple[str, float, str]] = []  # after the jobs: nothing of ONNX Runtime's runs beside them
        if device.type == "cpu":
            onnx = onnx_rows(ckpt, images, args.batch_size, cores, Path(tmp), ceilings["fp32"])
            rows[3:3] = [(name, rate) for name, rate, _ in onnx]
            ceilings.update({name: rate for name, rate, _ in onnx})
    print(f"\nscoring {len(paths)} real images ({args.model}, {args.size} px, batch {args.batch_size}, "
          f"device {device}, {cores} threads; bf16 fast here: {fast == 'bf16'})")
    print("| path | images/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} |")
    default = list(rates.values())[2 if device.type == "cpu" else -1]
    print(f"defaults / plain loop = {default / plain:.2f}x  (target >= 1.0)")
    print(f"defaults / ceiling in the same precision ({fast}) = {default / ceilings[fast]:.2f}x  (target >= 0.85)")
    if device.type == "cpu":
        before, fp32, _, ort = list(rates.values())
        print(f"defaults / before this release = {default / before:.2f}x; defaults / defaults in fp32 = "
              f"{default / fp32:.2f}x  (target >= 2.5x with bf16)")
        print(f"onnxruntime backend / torch backend (defaults, {fast}) = {ort / default:.2f}x; "
              f"/ torch backend in fp32 = {ort / fp32:.2f}x; / onnxruntime ceiling = "
              f"{ort / ceilings[ONNX_FP32]:.2f}x")
        for name, _, agreement in onnx:
            print(f"{name}: {agreement}")


ONNX_FP32 = "model only (ceiling), onnxruntime fp32"


def onnx_rows(ckpt: str, images: np.ndarray, bs: int, threads: int, tmp: Path, torch_fp32: float
              ) -> list[tuple[str, float, str]]:
    """Model-only images/s of the checkpoint's ONNX export in ONNX Runtime: fp32, and int8
    (static QDQ quantization of the convolutions and the head, per channel, calibrated on 64 of
    the images; the normalisation stays fp32), each with its max |logit difference| from torch
    fp32 beside the logits' spread. Random weights: this shows parity or its absence, not the
    release criterion (a trained model's decisions: >= 99.5% identical, max |dp| <= 0.02)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from cxr_ray.apps.export import export_checkpoint
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.inference.onnx import OnnxModel

    loaded = load_checkpoint(ckpt)
    export_checkpoint(loaded, "onnx", str(tmp / "onnx"))
    x = images[:, None].astype(np.float32) / 255.0

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(x[i:i + 8] for i in range(0, min(64, len(x)), 8))

        def get_next(self):
            return {"image": b} if (b := next(self.batches, None)) is not None else None

    quantize_static(str(tmp / "onnx" / "model.onnx"), str(tmp / "int8.onnx"), Calibration(),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Gemm", "MatMul"])
    with torch.no_grad():
        ref = loaded.model(normalize(torch.from_numpy(images[:, None]), loaded.preprocessing)).squeeze(1).numpy()
    rows = []
    for name, path in ((ONNX_FP32, tmp / "onnx" / "model.onnx"),
                       ("model only, onnxruntime int8 (static QDQ)", tmp / "int8.onnx")):
        model = OnnxModel(path, threads)
        model.logits(x[:bs])  # warm-up
        start = time.perf_counter()
        logits = np.concatenate([model.logits(x[i:i + bs]) for i in range(0, len(x), bs)])
        rate = len(x) / (time.perf_counter() - start)
        agreement = (f"max |logit - logit_torch_fp32| {np.abs(logits - ref).max():.2e} (logit std "
                     f"{ref.std():.2e}, random weights); {rate / torch_fp32:.2f}x torch fp32 model-only")
        rows.append((name, rate, agreement))
    return rows


def tree_rss(pid: int) -> int:
    """Summed RSS of a process and all its descendants (bytes)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def synthetic_folder(root: Path, n: int, size: int = 64) -> Path:
    """``n`` small synthetic chest images (JPEG) in one folder."""
    from cxr_ray.data.synthetic import chest_image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    base = [chest_image(size, bool(k % 2), rng) for k in range(64)]
    for i in range(n):
        Image.fromarray(np.roll(base[i % 64], i % size, axis=1)).save(root / f"img{i:06d}.jpeg", quality=90)
    return root


def peak_rss(cmd: list[str]) -> tuple[int, int, float, str]:
    """Run ``cmd``; return (driver peak RSS, process-tree peak RSS, seconds, stdout)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    driver = tree = 0
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            driver = max(driver, psutil.Process(proc.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        tree = max(tree, tree_rss(proc.pid))
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}")
    return driver, tree, time.perf_counter() - start, out


def archive_manifest(path: Path, images: Path, rows: int) -> Path:
    """A manifest of ``rows`` paths: every image under ``images``, then missing files."""
    import pandas as pd

    real = sorted(str(p) for p in images.iterdir())
    missing = [f"/nonexistent/cxr-archive/{i // 1000:04d}/img{i:07d}.jpeg" for i in range(rows - len(real))]
    pd.DataFrame({"path": real + missing}).to_csv(path, index=False)
    return path


def memory(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, _ = make_checkpoint(Path(tmp), "simple_cnn", 64)
        images = synthetic_folder(Path(tmp) / "imgs", 2_000)
        for n in (100_000, 1_000_000):
            manifest = archive_manifest(Path(tmp) / f"archive{n}.csv", images, n)
            cmd = [sys.executable, "-m", "cxr_ray.cli", "score", "--checkpoint", ckpt, "--input", str(manifest),
                   "--output", str(Path(tmp) / f"out{n}"), "--set", "score.decode_cpus=0.5",
                   "--set", "score.rows_per_file=50000"]
            driver, tree, seconds, out = peak_rss(cmd)
            assert f"this run scored 2000, failed {n - 2000};" in out, out[-1000:]
            rows.append((n, driver, tree, seconds))
            print(f"{n:>9} rows: driver peak {driver / 2**20:.0f} MiB, process tree peak {tree / 2**20:.0f} MiB, "
                  f"{seconds:.0f} s", flush=True)
    print(f"\n{'rows':>9}{'driver peak (MiB)':>19}{'job peak (MiB)':>16}{'seconds':>9}")
    for n, driver, tree, seconds in rows:
        print(f"{n:>9}{driver / 2**20:>19.0f}{tree / 2**20:>16.0f}{seconds:>9.0f}")
    print(f"driver peak 1M / 100k = {rows[1][1] / rows[0][1]:.2f}x  (target <= 1.3)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="real images to score (default 1000)")
    p.add_argument("--model", default="resnet50", choices=["resnet50", "simple_cnn"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cpus", type=int, default=0, help="CPUs for local Ray (default: all)")
    p.add_argument("--memory", action="store_true", help="run the memory benchmark instead")
    args = p.parse_args()
    memory(args) if args.memory else throughput(args)


if __name__ == "__main__":
    main()
