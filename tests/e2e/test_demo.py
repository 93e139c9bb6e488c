"""The README's main-job command, exactly as a user runs it (in a temporary cache and run folder),
while another process keeps a CPU half busy (as another job on the same machine would): the
demo must finish, every stage getting the CPUs the one before released."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import ROOT, assert_no_ray_noise  # noqa: E402

# half of one core busy, in 50 ms slices, until killed
LOAD = ("import time\nwhile True:\n    t = time.perf_counter()\n"
        "    while time.perf_counter() - t < 0.05: pass\n    time.sleep(0.05)")


@pytest.mark.slow
def test_tune_demo(tmp_path):
    load = subprocess.Popen([sys.executable, "-c", LOAD])
    try:
        r = subprocess.run([sys.executable, str(ROOT / "experiments" / "tune.py"), "--demo",
                            "--cache", str(tmp_path / "cache"), "--set", f"train.storage_path={tmp_path / 'runs'}"],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    finally:
        load.kill()
    assert r.returncode == 0, r.stderr[-4000:]
    assert_no_ray_noise(r.stdout, r.stderr)  # Ray's and Tune's own lines are in Ray's log folder
    assert r.stderr.count("[tune] trial ") >= 4 * 2 and "epoch 1/4: val roc_auc" in r.stderr  # start, epochs
    best = Path(r.stdout.strip().splitlines()[-1])
    assert best.name == "best" and (best / "model.pt").is_file()
    trials = pd.read_csv(best.parent / "trials.csv")
    assert len(trials) == 4 and (trials["stop_reason"] != "failed").all()
    assert "asha" in set(trials["stop_reason"]) or trials["epochs_run"].max() == 4
    report = json.loads((best.parent / "best_test_report" / "metrics.json").read_text())
    assert report["n"] >= 200 and report["roc_auc"] >= 0.90, report  # the first impression learns
    assert (tmp_path / "cache" / "demo-synthetic-900" / "test").is_dir()
    # the demo also builds an ensemble of its 3 best trials and reports it on the test split
    ensemble = json.loads((best.parent / "ensemble-top3" / "checkpoint.json").read_text())
    assert ensemble["kind"] == "ensemble" and len(ensemble["members"]) == 3 and "hflip" in ensemble["tta"]
    assert (best.parent / "ensemble_test_report" / "metrics.json").is_file()
    assert "[tune] ensemble on the test split: roc_auc" in r.stdout
    assert "hflip" in json.loads((best / "checkpoint.json").read_text())["tta"]
