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
from helpers import assert_no_ray_noise
from helpers import run_cli as cxr_ray

pytestmark = pytest.mark.slow

TRAIN_ARGS = ["--size", "48", "--set", "model.name=simple_cnn", "--set", "model.width=8",
              "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=0.5",
              "--set", "train.batch_size=16", "--set", "train.lr=0.003"]


def test_train_two_workers_then_evaluate(synthetic_root, tmp_path):
    run = cxr_ray("train", "--data", str(synthetic_root), "--cache", str(tmp_path / "cache"), *TRAIN_ARGS,
                  "--set", "train.epochs=3", "--set", f"train.storage_path={tmp_path / 'runs'}",
                  "--set", "train.name=e2e")
    assert run.returncode == 0, run.stderr[-3000:]
    # What a user sees: on stderr the leak check, a line per epoch, the summary; on stdout only the
    # checkpoint (<run>/best), so CKPT=$(cxr-ray train ...) captures exactly its path.
    assert "[data] patients shared between train and val: 0" in run.stderr
    assert_no_ray_noise(run.stdout, run.stderr)  # Ray's own lines are in its log folder
    assert re.findall(r"\[train\] epoch (\d)/3: train_loss [\d.]+  val_loss [\d.]+  val roc_auc [\d.]+  "
                      r"pauc [\d.]+  [\d.]+ img/s  elapsed \S+  ETA \S+", run.stderr) == ["1", "2", "3"]
    assert run.stdout.strip() == str(tmp_path / "runs" / "e2e" / "best")
    ckpt = Path(run.stdout.strip())
    assert ckpt.is_dir() and (ckpt / "model.pt").is_file()
    assert (tmp_path / "runs" / "e2e" / "config.yaml").is_file()
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert 0.0 <= meta["threshold"] <= 1.0 + 1e-6 and "recall_at_specificity" in meta["metrics"]
    from cxr_ray.engine.precision import cpu_runs_bf16_fast  # train.amp=auto: bf16 where this CPU runs it fast

    assert meta["val_precision"] == ("bf16" if cpu_runs_bf16_fast() else "fp32")
    assert meta["threshold_rule"] == "recall_target" and meta["metrics"]["recall"] >= 0.95  # the default rule
    assert meta["metrics"]["specificity_lower_bound"] <= meta["metrics"]["specificity"]
    # metric.tta (default hflip): the mirrored views got their own temperature and threshold on
    # the same validation split, after training, before the checkpoint's path was printed
    hflip = meta["tta"]["hflip"]
    assert hflip["n"] == meta["metrics"]["n"] and hflip["temperature"] > 0 and hflip["val_precision"] == meta[
        "val_precision"]
    assert re.search(r"\[train\] TTA hflip +val roc_auc [\d.]+, pAUC", run.stderr), run.stderr[-2000:]
    source = re.search(r"the best epoch's checkpoint (\S+) is copied to", run.stderr).group(1)
    assert json.loads((Path(source) / "checkpoint.json").read_text())["digest"] == meta["digest"]  # the same model

    # Validation saw the whole val split exactly once on 2 workers, and its figures are evaluate's.
    val = tmp_path / "eval_val"
    ev = cxr_ray("evaluate", "--checkpoint", str(ckpt), "--split", "val", "--out", str(val))
    assert ev.returncode == 0, ev.stderr[-3000:]
    val_metrics = json.loads((val / "metrics.json").read_text())
    val_preds = pd.read_parquet(val / "predictions.parquet")
    assert meta["metrics"]["n"] == val_metrics["n"] == len(val_preds) == val_preds["path"].nunique()
    for key in ("roc_auc", "pr_auc", "accuracy", "recall", "specificity", "precision", "f1", "threshold"):
        assert meta["metrics"][key] == pytest.approx(val_metrics[key], abs=1e-6), key
    assert meta["metrics"]["confusion_matrix"] == val_metrics["confusion_matrix"]
    # the checkpoint keeps a summary of this validation pass; the same images show no drift
    assert meta["drift_reference"]["n"] == meta["metrics"]["n"] and "drift_reference" not in meta["metrics"]
    assert val_metrics["drift"] is not None and not val_metrics["drift"]["warn"], val_metrics["drift"]
    # The workers trained under the contract the driver resolved; it is stored and evaluate used it.
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data.preprocessing import resolve_preprocessing

    contract = resolve_preprocessing(load_checkpoint(ckpt).cfg).to_dict()
    assert meta["preprocessing"] == val_metrics["preprocessing"] == contract and contract["normalize"] == "per_image"
    # The calibration (Platt: temperature and bias) was fitted on these validation logits: evaluate
    # applies it, and on the split it was fitted on it cannot do worse than none (it minimises the NLL there).
    from cxr_ray.analysis.calibration import nll

    cal = val_metrics["calibration"]
    assert cal["temperature"] == meta["temperature"] > 0 and cal["logit_bias"] == meta["logit_bias"]
    assert cal["ece_after"] == pytest.approx(meta["metrics"]["val_ece"], abs=1e-6), (cal, meta["metrics"])
    y, z = val_preds["label"].to_numpy(), val_preds["logit"].to_numpy()
    assert nll(z, y, meta["temperature"], meta["logit_bias"]) <= nll(z, y, 1.0) + 1e-9
    out = tmp_path / "eval"
    ev = cxr_ray("evaluate", "--checkpoint", str(ckpt), "--split", "test", "--out", str(out),
                 "--prevalence", "0.05,0.2", "--explain", "2")
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["operating_points"]["rows"]  # chosen on validation, applied to test
    assert len(rows) == 6 and rows[0]["threshold"] == pytest.approx(meta["threshold"])
    assert rows[0]["recall"] == pytest.approx(metrics["recall"]) and rows[0]["specificity"] == pytest.approx(
        metrics["specificity"])
    assert [v["prevalence"] for v in rows[0]["predictive_values"]][1:] == [0.05, 0.2]
    assert "operating points chosen on the validation split" in ev.stdout
    page = (out / "explain" / "index.html").read_text()  # --explain 2: up to 2 TP, FP and FN overlays
    assert "most confident true positives" in page and 1 <= len(list((out / "explain").glob("*.png"))) <= 6
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "threshold"):
        assert isinstance(metrics[key], float), key
    assert metrics["threshold"] == pytest.approx(meta["threshold"])  # never re-tuned on test
    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds.columns) == ["path", "patient", "label", "logit", "probability", "prediction"]
    assert len(preds) == metrics["n"] and preds["path"].str.contains("/test/").all()
    plots = {"confusion_matrix.png", "roc_curve.png", "pr_curve.png", "reliability.png"}
    assert plots <= {p.name for p in out.iterdir()}
    assert "roc_auc" in ev.stdout and "95% CI" in ev.stdout and "calibration: temperature" in ev.stdout
    assert not metrics["drift"]["warn"] and "drift:" in ev.stdout  # held-out images of the same distribution
    from cxr_ray.analysis.drift import ACQUISITION_STATS  # measured on the model-input images, here and in training

    assert set(meta["drift_reference"]["acquisition"]) == set(metrics["drift"]["acquisition"]) == set(ACQUISITION_STATS)
    # the validation images, measured again by evaluate, are the reference's own: every median is
    # the reference's to its 6-digit rounding (the stored quantiles include the median; None: zero IQR)
    shifts = {k: a["median_shift_iqr"] for k, a in val_metrics["drift"]["acquisition"].items()}
    assert all(x is None or abs(x) < 1e-3 for x in shifts.values()), shifts


def _worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_worker_resumes_from_checkpoint(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    epochs = 8  # long enough that the kill below lands mid-run even on a fast machine
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_ray.cli", "train", "--data", str(synthetic_root), "--cache",
         str(tmp_path / "cache"), *TRAIN_ARGS, "--size", "96", "--set", f"train.epochs={epochs}",
         "--set", "metric.tta=", "--set", "train.max_failures=1", "--set", "train.patience=100",
         "--set", "train.keep_checkpoints=10",
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
    resumed = re.search(rf"resumed from checkpoint after epoch (\d+)/{epochs}", output)
    assert resumed, output[-3000:]
    assert f"[train] {epochs} epoch(s)" in output
    after = [int(e) for e in re.findall(rf"\[train\] epoch (\d+)/{epochs}: train_loss",
                                        output.split(resumed.group(0))[1])]
    assert after == list(range(int(resumed.group(1)) + 1, epochs + 1))  # continues, not from scratch
    epochs_seen = {json.loads((c / "checkpoint.json").read_text())["epoch"]
                   for c in (runs / "ft").glob("checkpoint_*") if (c / "checkpoint.json").exists()}
    assert epochs_seen == set(range(epochs))


def test_run_names_are_not_reused_and_resume_keeps_the_config(synthetic_root, tmp_path):
    args = ["--data", str(synthetic_root), "--cache", str(tmp_path / "cache"), "--size", "32",
            "--set", "model.name=simple_cnn", "--set", "model.width=8", "--set", "train.epochs=2",
            "--set", "metric.tta=", "--set", f"train.storage_path={tmp_path / 'runs'}", "--set", "train.name=r1"]
    first = cxr_ray("train", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    config_before = (tmp_path / "runs" / "r1" / "config.yaml").read_text()
    again = cxr_ray("train", *args, "--set", "train.lr=0.01")
    assert again.returncode == 2 and "run folder" in again.stderr and "already exists" in again.stderr
    assert "cxr-ray train --resume" in again.stderr
    assert (tmp_path / "runs" / "r1" / "config.yaml").read_text() == config_before  # untouched
    run_dir = str(tmp_path / "runs" / "r1")
    changed = cxr_ray("train", "--resume", run_dir, "--set", "train.lr=0.01", "--set", "model.dropout=0.1")
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "train.lr: 0.0003 -> 0.01" in changed.stderr and "model.dropout: 0.3 -> 0.1" in changed.stderr
    resumed = cxr_ray("train", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[train] resumed from checkpoint after epoch 2/2; 0 epoch(s) to go" in resumed.stderr
    assert resumed.stdout.strip() == str(Path(run_dir) / "best")  # replaced by the resumed run's best
