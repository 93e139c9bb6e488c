"""Scoring's CPU split: where ``cxr-ray score`` puts the CPUs, against plain loops on the same cores.

    python benchmarks/score_split.py [--n 1317] [--copies 2] [--cpus 0] [--jobs decode-bound,decode-heavy,model-bound]

Three jobs, each scored three ways in the same run (same images, same model, random weights):

- **decode-bound**: the small CNN at width 4 and 64 px on the archive-sized images below: the
  model costs a fraction of a file's decode (what a GPU actor leaves to the CPUs);
- **decode-heavy**: the small CNN (width 16) at 128 px on the real images upscaled to 2000x1600
  grayscale JPEGs (archive-sized X-rays), each listed ``--copies`` times (hard links), so the
  job's fixed start (actor start, model load: ~15 s here) weighs less: decoding is about half
  the work (read + decode ~6 ms, the model ~7-11 ms an image on one core here);
- **model-bound**: ResNet-50 at 224 px on the shared 224 px images: the model is.

Rows of each job:

- plain loop: one process per core (``multiprocessing``, spawned), each with the model on one
  thread, run as the job runs it here (the ONNX export by ONNX Runtime when the onnx extra is
  installed, else torch fp32), decoding its chunks with PIL in draft mode (DCT scaling, what
  cxr_ray's decode does) and running the batched forward; timed from the pool's start (model
  loads included);
- ``cxr-ray score`` with the fixed split of the previous release (a 1.5-CPU actor, 0.5-CPU
  decode tasks on 2 cores), for comparison;
- ``cxr-ray score`` with defaults: the split measured per job.

Both jobs run :func:`cxr_ray.apps.score.job.run_score` on a local Ray started before the clock
(actor start and model load inside the timing), after one untimed 64-file job of the same
model (Ray's worker processes, the ONNX export cache), so neither pays the first start.

Targets (issue 28): decode-bound and decode-heavy defaults >= 0.7x the plain loop; model-bound
defaults keep the previous split's rate (>= 0.95x).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_root, upscaled_copy  # noqa: E402
from score import make_checkpoint  # noqa: E402  (benchmarks/score.py)

from cxr_ray.config import ScoreConfig  # noqa: E402
from cxr_ray.data.listing import list_inputs  # noqa: E402

_MODEL: dict = {}
PREVIOUS = "cxr-ray score, previous fixed split (1.5-CPU actor, 0.5-CPU decode tasks)"
DEFAULTS = "cxr-ray score, defaults (measured split)"
STEADY: dict[tuple[str, str], float] = {}  # (job, row): images/s after the first rows (the start-up)


def _load(ckpt: str, onnx: bool) -> None:
    """Pool initializer: the checkpoint's model on one thread (one process per core), run as the
    job runs it on this machine: its ONNX export by ONNX Runtime (fp32) when ``onnx``, else torch."""
    from cxr_ray.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    c = load_checkpoint(ckpt)
    if onnx:
        from cxr_ray.apps.export import cached_export
        from cxr_ray.inference.onnx import OnnxModel

        model = OnnxModel(cached_export(c, "onnx"), threads=1)
        _MODEL.update(run=lambda x: model.logits(x.astype(np.float32) / np.float32(255.0)))
    else:
        from cxr_ray.data.transforms import normalize

        net = c.model.eval()
        _MODEL.update(run=lambda x: net(normalize(torch.from_numpy(x), c.preprocessing)))


def _draft_decode(path: str, size: int) -> np.ndarray:
    """Plain PIL with draft mode: libjpeg's DCT scaling to >= size, then a bilinear resize."""
    with Image.open(path) as img:
        img.draft("L", (size, size))
        return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))


@torch.no_grad()
def _score_chunk(job: tuple[list[str], int]) -> int:
    paths, size = job
    _MODEL["run"](np.stack([_draft_decode(p, size) for p in paths])[:, None])
    return len(paths)


def plain_loop(ckpt: str, paths: list[str], size: int, workers: int, bs: int) -> float:
    """Images/s of decode + forward in ``workers`` processes, pool start and model loads included."""
    from cxr_ray.apps.score.job import onnxruntime_installed

    start = time.perf_counter()
    with mp.get_context("spawn").Pool(workers, initializer=_load, initargs=(ckpt, onnxruntime_installed())) as pool:
        n = sum(pool.map(_score_chunk, [(paths[i:i + bs], size) for i in range(0, len(paths), bs)], chunksize=1))
    return n / (time.perf_counter() - start)


def job(name: str, ckpt: str, paths: list[str], size: int, tmp: Path, cpus: int, bs: int) -> dict[str, float]:
    """The three rows of one job, printed as they come."""
    import logging

    from cxr_ray.apps.score.job import run_score

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the split the job chose
    manifest = tmp / f"{name}.csv"
    manifest.write_text("path\n" + "\n".join(paths) + "\n")
    rows = {"plain loop (PIL draft decode, 1 process per core)": plain_loop(ckpt, paths, size, cpus, bs)}
    print(f"  {list(rows)[0]}: {list(rows.values())[0]:.1f} img/s", flush=True)
    warm = tmp / f"{name}-warm.csv"  # an untimed job first: Ray's worker processes and the export cache
    warm.write_text("path\n" + "\n".join(paths[:64]) + "\n")
    run_score(ckpt, [str(warm)], str(tmp / f"{name}-warm"), ScoreConfig(batch_size=bs))
    runs = {PREVIOUS: ScoreConfig(batch_size=bs, cpus_per_actor=1.5, decode_cpus=0.5),
            DEFAULTS: ScoreConfig(batch_size=bs)}
    for i, (label, score) in enumerate(runs.items()):
        summary = run_score(ckpt, [str(manifest)], str(tmp / f"{name}-out{i}"), score)
        assert summary.scored == len(paths), summary
        rows[label] = summary.images_per_s
        STEADY[(name, label)] = summary.steady_images_per_s
        print(f"  {label}: {summary.images_per_s:.1f} img/s; first rows after {summary.first_batch_s:.1f} s, "
              f"then {summary.steady_images_per_s:.1f} img/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1317, help="real images upscaled for the decode-heavy job (1317: all)")
    ap.add_argument("--copies", type=int, default=2, help="times each is listed, as hard links (2)")
    ap.add_argument("--model-n", type=int, default=400, help="224 px images of the model-bound job (400)")
    ap.add_argument("--cpus", type=int, default=0, help="CPUs for local Ray and the plain loop (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--jobs", default="decode-bound,decode-heavy,model-bound", help="which jobs (comma-separated)")
    args = ap.parse_args()
    import ray

    cpus = args.cpus or os.cpu_count() or 1
    archive = upscaled_copy(real_root(), Path(tempfile.gettempdir()) / f"cxr_ray_archive_2000x1600_{args.n}",
                            limit=args.n)
    originals = sorted(archive.glob("*/*/*.jpeg"))
    listing = list_inputs([str(real_root() / "train"), str(real_root() / "val")])
    step = max(1, len(listing) // args.model_n)
    small = listing["path"].iloc[::step].head(args.model_n).tolist()
    results = {}
    with tempfile.TemporaryDirectory(dir=archive.parent) as d:  # hard links need the same filesystem
        tmp = Path(d)
        big = []
        for k in range(args.copies):
            for f in originals:
                link = tmp / f"copy{k}" / f.relative_to(archive)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(f, link)
                big.append(str(link))
        os.environ["CXR_RAY_CACHE"] = d
        ray.init(num_cpus=cpus, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for name, model, width, size, paths in (("decode-bound", "simple_cnn", 4, 64, big),
                                                    ("decode-heavy", "simple_cnn", 16, 128, big),
                                                    ("model-bound", "resnet50", 0, 224, small)):
                if name not in args.jobs.split(","):
                    continue
                print(f"{name}: {model}{f' width {width}' if width else ''} at {size} px, {len(paths)} images, "
                      f"{cpus} CPUs", flush=True)
                (tmp / name).mkdir()
                ckpt, _ = make_checkpoint(tmp / name, model, size, width=width or 32)
                results[name] = job(name, ckpt, paths, size, tmp, cpus, args.batch_size)
        finally:
            ray.shutdown()
    print("\n| job | path | images/s end to end | vs plain loop | after the first rows |\n|---|---|---|---|---|")
    for name, rows in results.items():
        plain = next(iter(rows.values()))
        for label, rate in rows.items():
            steady = STEADY.get((name, label))
            print(f"| {name} | {label} | {rate:.1f} | {rate / plain:.2f}x | {f'{steady:.0f}' if steady else '-'} |")
    for name, rows in results.items():
        plain = next(iter(rows.values()))
        print(f"{name}: defaults / plain loop = {rows[DEFAULTS] / plain:.2f}x"
              f"{' (target >= 0.7)' if name.startswith('decode') else ''}; defaults / previous split = "
              f"{rows[DEFAULTS] / rows[PREVIOUS]:.2f}x{' (target >= 0.95)' if name == 'model-bound' else ''}")


if __name__ == "__main__":
    main()
