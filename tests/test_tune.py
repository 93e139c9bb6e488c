"""Ray Tune over Ray Train on synthetic data: search, ASHA, trials.csv, best/, resume, bad input."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import ray_stop
from conftest import run_cli as cxr_ray

from cxr_ray.config import ConfigError, ExperimentConfig
from cxr_ray.tune import validate_search_space

TUNE_ARGS = ["--size", "32", "--set", "model.name=simple_cnn", "--set", "model.width=8",
             "--set", "train.num_workers=1", "--set", "train.cpus_per_worker=0.45",
             "--set", "train.batch_size=32", "--set", "train.epochs=3", "--set", "train.warmup_epochs=0",
             "--set", "tune.reduction_factor=2",
             "--set", "tune.search_space={model.dropout: {type: uniform, low: 0.0, high: 0.5}, "
                      "train.lr: {type: loguniform, low: 0.0003, high: 0.01}}"]


def _space(**space):
    return ExperimentConfig().replace(**{"tune.search_space": space})


@pytest.mark.parametrize("space, message", [
    ({"model.dropot": {"type": "uniform", "low": 0, "high": 0.5}}, "unknown parameter"),
    ({"model.dropout": {"type": "uniform", "low": 0.5, "high": 0.1}}, "impossible range"),
    ({"model.dropout": {"type": "uniform", "low": 0.0, "high": 1.5}}, "value 1.5 is impossible"),
    ({"model.unfreeze_depth": {"type": "choice", "values": [1, 7]}}, "value 7 is impossible"),
    ({"train.lr": {"type": "loguniform", "low": 0, "high": 0.1}}, "loguniform needs low > 0"),
    ({"train.lr": {"type": "gaussian"}}, "expected a mapping with type"),
    ({"data.image_size": {"type": "choice", "values": [64, 128]}}, "data settings cannot be searched"),
    ({"data.val_fraction": {"type": "uniform", "low": 0.1, "high": 0.2}}, "one cache prepared"),
    ({"train.epochs": {"type": "choice", "values": [3, 6]}}, "ASHA decides how many epochs"),
])
def test_bad_search_space_is_refused_before_any_trial(space, message):
    with pytest.raises(ConfigError, match=message):
        validate_search_space(_space(**space))


def test_unreported_metric_is_refused():
    with pytest.raises(ConfigError, match="no trial reports 'val_recall'"):
        validate_search_space(ExperimentConfig().replace(**{"tune.metric": "val_recall"}))


def test_default_space_is_valid():
    validate_search_space(ExperimentConfig())


@pytest.mark.slow
def test_tune_search_runs_trials_and_exports_best(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    r = cxr_ray("tune", "--data", str(synthetic_root), "--cache", str(tmp_path / "cache"), *TUNE_ARGS,
                "--set", "tune.num_samples=3", "--set", "tune.name=exp", "--set", f"train.storage_path={runs}")
    assert r.returncode == 0, r.stderr[-4000:]
    exp = runs / "exp"
    trials = pd.read_csv(exp / "trials.csv")
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert trials[["model.dropout", "train.lr"]].drop_duplicates().shape[0] == 3  # distinct parameters
    assert set(trials["stop_reason"]) <= {"completed", "asha", "early_stopping"}
    assert (trials["epochs_run"] >= 1).all() and (trials["epochs_run"] <= 3).all()
    best_row = trials.loc[trials["best_selection_score"].idxmax()]
    assert trials.iloc[0]["trial_id"] == best_row["trial_id"]  # ranked best first
    # trials.csv matches Tune's own per-trial results
    for row in trials.itertuples():
        progress = next(exp.glob(f"*{row.trial_id}*/progress.csv"))
        tune_df = pd.read_csv(progress)
        assert len(tune_df) == row.epochs_run
        assert tune_df["selection_score"].max() == pytest.approx(row.best_selection_score)
    assert (exp / "best" / "model.pt").is_file() and (exp / "best" / "config.yaml").is_file()
    from cxr_ray.checkpoint import load_checkpoint

    best = load_checkpoint(exp / "best")
    assert best.meta["metrics"]["selection_score"] == pytest.approx(best_row["best_selection_score"])
    assert (exp / "best_test_report" / "metrics.json").is_file()
    assert r.stdout.strip().splitlines()[-1] == str(exp / "best")


@pytest.mark.slow
def test_resume_after_killed_driver_keeps_finished_trials(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    args = ["tune", "--data", str(synthetic_root), "--cache", str(tmp_path / "cache"), *TUNE_ARGS,
            "--set", "tune.num_samples=3", "--set", "tune.max_concurrent_trials=1", "--set", "tune.name=res",
            "--set", f"train.storage_path={runs}"]
    ray_stop()  # no half-stopped local Ray from an earlier test may be joined or collide on ports
    log = open(tmp_path / "first_run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_ray.cli", *args], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        # Interrupt once the first trial has finished and the second one has started.
        while time.time() < deadline:
            done = [p for p in (runs / "res").glob("*/result.json") if p.read_text().count("\n") >= 1]
            if len(list((runs / "res").glob("train_driver_fn*"))) >= 2 and done:
                break
            assert proc.poll() is None, ("tune ended before it could be interrupted:\n"
                                         + (tmp_path / "first_run.log").read_text()[-4000:])
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    ray_stop()
    assert not (runs / "res" / "trials.csv").exists()
    r = cxr_ray("tune", "--resume", str(runs / "res"))
    assert r.returncode == 0, r.stderr[-4000:]
    print(r.stdout[-3000:])  # the ranked table, shown by pytest when an assertion below fails
    trials = pd.read_csv(runs / "res" / "trials.csv")
    assert len(trials) == 3 and trials["trial_id"].is_unique  # none duplicated, none lost
    assert (trials["epochs_run"] >= 1).all()
    assert (runs / "res" / "best" / "model.pt").is_file()
