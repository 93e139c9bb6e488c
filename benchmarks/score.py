"""Batch scoring: ``cxr-ray score`` against a plain loop and the model-only ceiling; job memory.

    python benchmarks/score.py [--n 1000] [--model resnet50] [--batch-size 32]
    python benchmarks/score.py --device cuda            # on a GPU machine with Ray
    python benchmarks/score.py --memory                 # driver peak RSS, 100k vs 1M-row manifests

Throughput (same run, same model with random weights, same images, same batch size):

- plain loop: one process, ``PIL.Image.open(...).convert("L").resize(...)`` per file, batched
  model forward; what a user would write without cxr_ray;
- model-only ceiling: the same forward passes over tensors decoded beforehand;
- ``cxr-ray score``: :func:`cxr_ray.score.run_score` on a local Ray started before the clock
  (actor start and model load are inside the timing), writing the Parquet output.

Targets (2-core machine): score >= 1.0x the plain loop and >= 0.85x the ceiling.

Memory: runs ``cxr-ray score`` as a subprocess on a 100,000-row and a 1,000,000-row manifest
(2,000 small synthetic images, the other rows paths to files that do not exist, which become
error rows quickly, as in an archive index that outlived its files) and samples, every 0.2 s,
the RSS of the driver process and the summed RSS of the whole process tree (driver, raylet,
GCS, workers). Target: the driver's 1M-row peak within 1.3x of its 100k-row peak.
"""

from __future__ import annotations

import argparse
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
from cxr_ray.data.transforms import normalize  # noqa: E402
from cxr_ray.models import build_model  # noqa: E402


def make_checkpoint(out: Path, model: str, size: int) -> tuple[str, torch.nn.Module]:
    """A checkpoint of ``model`` with random weights (same compute as a trained one)."""
    cfg = ExperimentConfig().replace(**{"model.name": model, "model.weights": "none", "model.width": 16,
                                        "data.image_size": size})
    torch.manual_seed(0)
    net = build_model(cfg.model).eval()
    return str(save_checkpoint(out / "ckpt", net, cfg, 0.5, {}, 0)), net


def plain_decode(path: str, size: int) -> np.ndarray:
    """The plain baseline's decode: PIL, grayscale, resize."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))


@torch.no_grad()
def forward(model: torch.nn.Module, batch: np.ndarray, device: torch.device, amp: bool) -> np.ndarray:
    x = normalize(torch.from_numpy(batch[:, None]).to(device), ExperimentConfig().data.normalize)  # as scored
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.sigmoid(model(x).float()).cpu().numpy()
    return torch.sigmoid(model(x)).cpu().numpy()


def plain_loop(model, paths, size, bs, device, amp) -> float:
    """Images/s of decode + forward in one process, batch by batch."""
    start = time.perf_counter()
    for i in range(0, len(paths), bs):
        forward(model, np.stack([plain_decode(p, size) for p in paths[i:i + bs]]), device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def model_only(model, images, bs, device, amp) -> float:
    """Images/s of the forward passes alone, over pre-decoded images (the ceiling)."""
    start = time.perf_counter()
    for i in range(0, len(images), bs):
        forward(model, images[i:i + bs], device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def throughput(args: argparse.Namespace) -> None:
    import ray

    from cxr_ray.score import run_score

    device = torch.device(args.device)
    cores = torch.get_num_threads()
    listing = list_inputs([str(real_root() / "train"), str(real_root() / "val")])
    step = max(1, len(listing) // args.n)
    listing = listing.iloc[::step].head(args.n).reset_index(drop=True)
    paths = listing["path"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [str(Path(tmp) / "sample.csv")]  # the sampled files, as a manifest
        listing[["path"]].to_csv(inputs[0], index=False)
        ckpt, model = make_checkpoint(Path(tmp), args.model, args.size)
        amp = device.type == "cuda"
        model = model.to(device)
        if amp:
            model = model.to(memory_format=torch.channels_last)
        forward(model, np.stack([plain_decode(p, args.size) for p in paths[:args.batch_size]]), device, amp)
        plain = plain_loop(model, paths, args.size, args.batch_size, device, amp)
        images = np.stack([plain_decode(p, args.size) for p in paths])
        ceiling = model_only(model, images, args.batch_size, device, amp)
        del model, images
        ray.init(num_cpus=args.cpus or None, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        if device.type == "cuda":
            score = ScoreConfig(batch_size=args.batch_size, gpus_per_actor=1.0, cpus_per_actor=1.0,
                                decode_cpus=1.0)
        else:  # the actor computes on all cores; decoding tasks reserve the rest of the CPU budget
            score = ScoreConfig(batch_size=args.batch_size, cpus_per_actor=cores - 0.5, decode_cpus=0.5,
                                torch_threads=cores)
        summary = run_score(ckpt, inputs, str(Path(tmp) / "out"), score)
        ray.shutdown()
    assert summary.scored == len(paths), summary
    rate = summary.images_per_s
    print(f"\nscoring {len(paths)} real images ({args.model}, {args.size} px, batch {args.batch_size}, "
          f"device {device}, {cores} threads)")
    print(f"{'path':<34}{'images/s':>10}")
    print(f"{'plain loop (PIL + forward)':<34}{plain:>10.1f}")
    print(f"{'model only (ceiling)':<34}{ceiling:>10.1f}")
    print(f"{'cxr-ray score (Ray Data)':<34}{rate:>10.1f}")
    print(f"score / plain   = {rate / plain:.2f}x  (target >= 1.0)")
    print(f"score / ceiling = {rate / ceiling:.2f}x  (target >= 0.85)")


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
