"""End to end through the real CLI: Ray Train with 2 CPU workers, evaluation, worker failure."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

TRAIN_ARGS = ["--size", "48", "--set", "model.name=simple_cnn", "--set", "model.width=8",
              "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=0.5",
              "--set", "train.batch_size=16", "--set", "train.lr=0.003"]


def cxr_ray(*args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "cxr_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_train_two_workers_then_evaluate(synthetic_root, tmp_path):
    run = cxr_ray("train", "--data", str(synthetic_root), "--cache", str(tmp_path / "cache"), *TRAIN_ARGS,
                  "--set", "train.epochs=3", "--set", f"train.storage_path={tmp_path / 'runs'}",
                  "--set", "train.name=e2e")
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = Path(run.stdout.strip().splitlines()[-1])
    assert ckpt.is_dir() and (ckpt / "model.pt").is_file()
    assert (tmp_path / "runs" / "e2e" / "config.yaml").is_file()
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert 0.0 <= meta["threshold"] <= 1.0 + 1e-6 and "recall_at_specificity" in meta["metrics"]
    out = tmp_path / "eval"
    ev = cxr_ray("evaluate", "--checkpoint", str(ckpt), "--split", "test", "--out", str(out))
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "threshold"):
        assert isinstance(metrics[key], float), key
    assert metrics["threshold"] == pytest.approx(meta["threshold"])  # never re-tuned on test
    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds.columns) == ["path", "label", "probability", "prediction"]
    assert len(preds) == metrics["n"] and preds["path"].str.contains("/test/").all()
    assert {"confusion_matrix.png", "roc_curve.png", "pr_curve.png"} <= {p.name for p in out.iterdir()}
    assert "roc_auc" in ev.stdout and "95% CI" in ev.stdout


def _worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_worker_resumes_from_checkpoint(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    epochs = 8  # long enough that the kill below lands mid-run even on a fast machine
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_ray.cli", "train", "--data", str(synthetic_root), "--cache",
         str(tmp_path / "cache"), *TRAIN_ARGS, "--size", "96", "--set", f"train.epochs={epochs}",
         "--set", "train.max_failures=1", "--set", "train.patience=100", "--set", "train.keep_checkpoints=10",
         "--set", f"train.storage_path={runs}", "--set", "train.name=ft"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        # Wait for the 2nd checkpoint: the 1st is then registered by all ranks (report is a barrier).
        while time.time() < deadline and len(list((runs / "ft").glob("checkpoint_*/model.pt"))) < 2:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        # Ray Train's controller collects reports on its health-check poll (every 2 s); give it
        # time to register the first checkpoint before the crash.
        time.sleep(5)
        pids = _worker_pids()
        assert pids, "no Ray Train worker process found"
        os.kill(pids[-1], signal.SIGKILL)
        assert proc.poll() is None, "training ended before the worker could be killed"
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    resumed = re.search(r"resumed from checkpoint after epoch (\d+)", output)
    assert resumed, output[-3000:]
    assert f"[train] {epochs} epoch(s)" in output
    after = [int(e) for e in re.findall(r"\[train\] epoch (\d+):", output.split(resumed.group(0))[1])]
    assert after == list(range(int(resumed.group(1)) + 1, epochs))  # continues, not from scratch
    epochs_seen = {json.loads((c / "checkpoint.json").read_text())["epoch"]
                   for c in (runs / "ft").glob("checkpoint_*") if (c / "checkpoint.json").exists()}
    assert epochs_seen == set(range(epochs))
