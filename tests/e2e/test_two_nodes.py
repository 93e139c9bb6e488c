"""A real two-node Ray cluster on this host: a search with ``configs/tune_cpu.yaml`` submitted
through Ray Jobs, then scoring.

Node 1 is ``ray start --head`` on 127.0.0.1; node 2 joins with ``ray start --address`` with its
own CPUs, its own temp dir and a custom resource ``cxr_worker``. The search (the shipped CPU
config, on tiny data and with one epoch) is submitted
with ``ray job submit --working-dir .`` (the project shipped through the runtime env), and a
folder is then scored by a driver that joins with ``--address``. The cluster is always stopped;
the test skips when a Ray it did not start runs on this host (it would stop that one too).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

from helpers import ROOT, require_no_foreign_ray  # noqa: E402

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _alive_nodes(env: dict, dashboard: str) -> list[dict]:
    r = _run([*RAY, "list", "nodes", "--address", dashboard, "--format", "json", "--detail"], env)
    return [n for n in json.loads(r.stdout or "[]") if n.get("state") == "ALIVE"] if r.returncode == 0 else []


@pytest.fixture
def cluster(tmp_path):
    """Two Ray nodes on 127.0.0.1; yields (env, gcs address, dashboard URL); always stopped."""
    # Token authentication on, as Ray recommends: every node and client gets the same token.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    require_no_foreign_ray()  # `ray stop --force` stops every Ray on this host: only this session's may run
    _run([*RAY, "stop", "--force"], env)  # nothing left over from an earlier test
    port, dash, agent = _free_port(), _free_port(), _free_port()
    gcs, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    worker_tmp = tempfile.mkdtemp(prefix="cxrw")  # short: Ray's socket paths live under it
    try:
        head = _run([*RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                     "--num-cpus", "1", "--resources", '{"cxr_head": 1}', "--dashboard-port", str(dash)], env)
        assert head.returncode == 0, head.stderr[-3000:]
        worker = _run([*RAY, "start", "--address", gcs, "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                       "--resources", '{"cxr_worker": 1}', "--dashboard-agent-listen-port", str(agent),
                       "--temp-dir", worker_tmp], env)  # own temp dir: its runtime-env files are its own
        assert worker.returncode == 0, worker.stderr[-3000:]
        deadline = time.time() + 60
        while len(_alive_nodes(env, dashboard)) < 2 and time.time() < deadline:
            time.sleep(1)
        assert len(_alive_nodes(env, dashboard)) == 2
        yield env, gcs, dashboard
    finally:
        _run([*RAY, "stop", "--force"], env)
        shutil.rmtree(worker_tmp, ignore_errors=True)


def test_demo_tune_via_ray_jobs_then_scoring_on_two_nodes(cluster, tmp_path):
    env, gcs, dashboard = cluster
    shared = tmp_path / "shared"  # one folder both nodes see (same host): the shared storage
    from cxr_ray.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(shared / "data", n=120, size=40, seed=0)  # tiny: the cluster is the subject
    runtime_env = {"excludes": [".git", "runs", "*.egg-info", "**/__pycache__"]}
    job = _run([*RAY, "job", "submit", "--address", dashboard, "--working-dir", ".",
                "--runtime-env-json", json.dumps(runtime_env), "--",
                sys.executable, "experiments/tune.py", "--config", "configs/tune_cpu.yaml", "--data", str(data),
                "--ensemble-top-k", "0",
                "--set", "metric.tta=", "--set", "data.image_size=32",
                # as cluster.yaml lays out a cluster: Ray Data's CPU work on the head (1 CPU), the
                # trials' workers on the worker node (a 1.5-CPU worker fits nowhere else)
                "--set", "train.cpus_per_worker=1.5",
                "--set", "tune.num_samples=2", "--set", "train.epochs=1", "--set", "tune.name=cluster_demo",
                "--set", f"train.storage_path={shared / 'runs'}", "--set", f"data.cache_dir={shared / 'cache'}"],
               env, timeout=900, cwd=ROOT)
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-5000:]

    exp = shared / "runs" / "cluster_demo"
    trials = pd.read_csv(exp / "trials.csv")
    assert len(trials) == 2 and (trials["stop_reason"] != "failed").all(), trials
    assert (exp / "best" / "model.pt").is_file() and (exp / "best_test_report" / "metrics.json").is_file()

    # Every Train worker ran on the worker node, away from the driver and the head's Ray Data
    # work: Ray's state API records the node of every Train worker.
    nodes = {n["node_id"]: n for n in _alive_nodes(env, dashboard)}
    worker_node = {i for i, n in nodes.items() if "cxr_worker" in n["resources_total"]}
    workers = json.loads(_run([*RAY, "list", "actors", "--address", dashboard, "--format", "json",
                               "--filter", "class_name=RayTrainWorker", "--limit", "1000", "--detail"],
                              env).stdout)
    used = {a["node_id"] for a in workers}
    assert len(workers) >= 2 and len(worker_node) == 1 and used == worker_node, (used, nodes)

    # Score a folder on the same cluster, from a driver that joins it with --address.
    folder = data / "test"
    out = shared / "scores"
    score = _run([sys.executable, "-m", "cxr_ray.cli", "score", "--address", gcs, "--checkpoint", str(exp / "best"),
                  "--input", str(folder), "--output", str(out), "--with-labels",
                  "--set", "score.decode_cpus=0.5", "--set", "score.num_actors=2",
                  "--set", "score.cpus_per_actor=0.5"], env, timeout=300)
    assert score.returncode == 0, score.stderr[-3000:]
    df = pd.read_parquet(out)
    n_files = sum(1 for p in folder.rglob("*") if p.is_file())
    assert len(df) == n_files and df["path"].is_unique and df["error"].isna().all()
    assert df["prob_pneumonia"].between(0, 1).all() and set(df["label"]) == {"NORMAL", "PNEUMONIA"}
    assert "roc_auc" in score.stdout and score.stdout.strip().splitlines()[-1] == str(out)
