"""Trust figures on the shared real images: one model, TTA, a top-3 ensemble, calibration.

    python benchmarks/trust_figures.py [--epochs 8] [--trials 6] [--out /tmp/cxr-trust]

1. Copies ``../shared/data/cxr-kaggle-224-dev`` into ``OUT/data`` with a **held-out test split**:
   a seeded 25% of the patients of its train folder (every image of a patient on one side).
   Nothing below trains, selects, tunes, calibrates or chooses a threshold on it.
2. ``cxr-ray train`` of ``configs/scratch_cnn_cpu.yaml`` for ``--epochs`` (``metric.tta=hflip,crop5``:
   each TTA mode gets its own temperature and threshold on the validation split).
3. ``cxr-ray tune`` of the same config over dropout and learning rate (``--trials`` trials, ASHA),
   ``--ensemble-top-k 3``: the ensemble of the three best trials (by validation pAUC-based
   selection score), its calibration and threshold fitted on the same validation split.
4. ``cxr-ray evaluate`` of the model (plain, hflip, crop5), the best trial and the ensemble
   (plain, hflip) on the validation split (where every choice was made: optimistic) and on the
   held-out test split. A rerun with the same ``--out`` reuses the models and reports.

Prints a markdown table (ROC-AUC, recall, specificity, accuracy with 95% patient-bootstrap CIs;
ECE and Brier raw -> calibrated) and writes ``OUT/figures.json``. Run it alone (one Ray job at a
time on a 2-core machine); about 10-15 minutes there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_root  # noqa: E402

from cxr_ray.data.catalog import patient_id  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scratch_cnn_cpu.yaml"
SHOWN = ("roc_auc", "recall", "specificity", "accuracy")


def cli(*args: str) -> str:
    """Run ``cxr-ray ARGS``; its last stdout line (the result path). Output goes to the terminal."""
    print("$ cxr-ray " + " ".join(args), flush=True)
    r = subprocess.run([sys.executable, "-m", "cxr_ray.cli", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"cxr-ray {args[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    shown = ("[train]", "[tune] ens", "[tune] best", "[ensemble]")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(shown)]
    print("\n".join(lines[-12:]), flush=True)
    return r.stdout.strip().splitlines()[-1]


def held_out_copy(src: Path, dst: Path, share: float = 0.25, seed: int = 0) -> dict[str, int]:
    """``dst``: ``src``'s val folder as is, its train folder split by patient into train and test."""
    if (dst / ".complete").is_file():
        return json.loads((dst / ".complete").read_text())
    shutil.rmtree(dst, ignore_errors=True)
    files = sorted(p for p in (src / "train").rglob("*") if p.is_file())
    pats = sorted({patient_id(str(p)) for p in files})
    rng = np.random.default_rng(seed)
    test = set(rng.choice(pats, int(round(share * len(pats))), replace=False))
    counts = {"train": 0, "test": 0, "val": 0}
    for p in files:
        split = "test" if patient_id(str(p)) in test else "train"
        (dst / split / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / split / p.parent.name / p.name)
        counts[split] += 1
    shutil.copytree(src / "val", dst / "val")
    counts["val"] = sum(1 for p in (dst / "val").rglob("*") if p.is_file())
    (dst / ".complete").write_text(json.dumps(counts))
    return counts


def evaluate(ckpt: str, split: str, tta: str, out: Path) -> dict:
    report = out / f"{Path(ckpt).parent.name}-{Path(ckpt).name}-{split}-{tta}"
    if not (report / "metrics.json").is_file():
        cli("evaluate", "--checkpoint", ckpt, "--split", split, "--tta", tta, "--out", str(report))
    return json.loads((report / "metrics.json").read_text())


def cell(m: dict, key: str) -> str:
    lo, hi = m["ci"][key]
    return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--out", default="/tmp/cxr-trust")
    args = ap.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    data = out / "data"
    counts = held_out_copy(real_root(), data)
    print(f"data: {counts} (test = held-out patients of the dev train folder)", flush=True)
    common = ["--data", str(data), "--config", str(CONFIG), "--cache", str(out / "cache"),
              "--set", f"train.epochs={args.epochs}", "--set", "metric.tta=hflip,crop5",
              "--set", f"train.storage_path={out / 'runs'}"]
    runs = out / "runs.json"  # a rerun with the same --out reuses the trained models (and reports)
    if runs.is_file():
        single, best = json.loads(runs.read_text())
    else:
        single = cli("train", *common)
        space = json.dumps({"model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
                            "train.lr": {"type": "loguniform", "low": 1e-3, "high": 6e-3}})
        best = cli("tune", *common, "--set", f"tune.num_samples={args.trials}", "--set",
                   f"tune.search_space={space}", "--set", "train.cpus_per_worker=0.45", "--set", "tune.data_cpus=1.0",
                   "--ensemble-top-k", "3")
        runs.write_text(json.dumps([single, best]))
    ensemble = str(Path(best).parent / "ensemble-top3")
    rows = []
    for name, ckpt, modes in (("one model", single, ("none", "hflip", "crop5")),
                              ("best tune trial", best, ("none", "hflip")),
                              ("top-3 ensemble", ensemble, ("none", "hflip"))):
        for tta in modes:
            for split in ("val", "test"):
                m = evaluate(ckpt, split, tta, out / "reports")
                c = m["calibration"]
                rows.append({"model": name, "tta": tta, "split": split, "n": m["n"], "threshold": m["threshold"],
                             **{k: cell(m, k) for k in SHOWN},
                             "ece": f"{c['ece_before']:.3f} -> {c['ece_after']:.3f}",
                             "brier": f"{c['brier_before']:.4f} -> {c['brier_after']:.4f}",
                             "temperature": c["temperature"]})
    minutes = (time.perf_counter() - start) / 60
    print("\n| model | TTA | split | n | threshold | ROC-AUC | recall | specificity | accuracy | ECE raw -> cal. "
          "| Brier raw -> cal. |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tta']} | {r['split']} | {r['n']} | {r['threshold']:.3f} | {r['roc_auc']} | "
              f"{r['recall']} | {r['specificity']} | {r['accuracy']} | {r['ece']} | {r['brier']} |")
    print(f"\n{minutes:.1f} min; single: {single}; ensemble: {ensemble}")
    (out / "figures.json").write_text(json.dumps({"rows": rows, "data": counts, "minutes": minutes,
                                                  "single": single, "ensemble": ensemble}, indent=1))


if __name__ == "__main__":
    main()
