"""Object storage end to end: URI handling (s3://, gs://, no server), then prepare, train,
evaluate, tune and score on a real S3-compatible server (moto's server mode on 127.0.0.1,
started here) with URIs only, including a killed tune driver and a killed scoring job resumed.

Every ``cxr-ray`` command runs as a user's would, in a fresh process with its own local Ray;
pyarrow's S3 client and every Ray worker talk HTTP to the server (nothing is patched). The
server's endpoint reaches them through ``AWS_ENDPOINT_URL`` or, for scoring, through
``--set storage.endpoint_url`` alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from io import BytesIO

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml
from helpers import moto_server, ray_stop, require_no_foreign_ray, run_cli, start_cli

from cxr_ray.config import ExperimentConfig
from cxr_ray.errors import ConfigError
from cxr_ray.storage import uri as store

BUCKET = "cxr"
SMALL = ["--size", "32", "--set", "model.name=simple_cnn", "--set", "model.width=8",
         "--set", "model.weights=none", "--set", "train.num_workers=1", "--set", "train.batch_size=32",
         "--set", "train.warmup_epochs=0"]


# --- URI handling, no server -------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_uri_paths_keep_their_scheme(scheme):
    base = f"{scheme}://bucket/runs/exp/"
    assert store.parent(base) == f"{scheme}://bucket/runs" and store.name(base) == "exp"
    assert store.parent(store.parent(base)) == f"{scheme}://bucket"
    assert store.join(f"{scheme}://bucket/runs/", "/exp", "best") == f"{scheme}://bucket/runs/exp/best"
    with pytest.raises(store.StorageError, match="a bucket has no parent"):
        store.parent(f"{scheme}://bucket")
    # what Ray hands over (a filesystem and the path inside it), back as a URI
    fs = pafs.GcsFileSystem(anonymous=True) if scheme == "gs" else pafs.S3FileSystem(anonymous=True, region="x")
    assert store.uri(fs, "bucket/runs/exp/checkpoint_1") == base + "checkpoint_1"


def test_local_paths_and_filesystems(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store.parent("runs/exp") == str(tmp_path / "runs") and store.name("runs/exp/") == "exp"
    assert store.uri(pafs.LocalFileSystem(), "/data/x") == "/data/x"


def test_trials_keep_uris_of_checkpoints_reported_without_a_scheme():
    """Rows written before ``checkpoint_uri`` existed get it from the experiment's filesystem."""
    from cxr_ray.training.tune import checkpoint_uris

    df = pd.DataFrame({"checkpoint_path": ["b/runs/e/t1/checkpoint_0", None, "b/runs/e/t1/checkpoint_2"],
                       "checkpoint_uri": [None, None, "s3://b/runs/e/t1/checkpoint_2"]})
    got = checkpoint_uris(df, pafs.S3FileSystem(anonymous=True, region="us-east-1")).tolist()
    assert got == ["s3://b/runs/e/t1/checkpoint_0", None, "s3://b/runs/e/t1/checkpoint_2"]


@pytest.mark.parametrize("key, value, message", [
    ("train.storage_path", "s3:/bucket/runs", "one slash"),  # what pathlib makes of s3://bucket/runs
    ("data.cache_dir", "s3://bucket/c?endpoint_override=http://x", "storage.endpoint_url"),
    ("storage.endpoint_url", "minio:9000", "http:// / https:// URL"),
])
def test_bad_locations_are_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig().replace(**{key: value})


# --- a real S3-compatible server -----------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(tmp_path_factory, synthetic_root):
    """A moto S3 server with bucket ``cxr`` holding the synthetic dataset at ``s3://cxr/data``;
    this process and the CLI's reach it through the usual AWS environment variables."""
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                     "AWS_ENDPOINT_URL": endpoint, "CXR_RAY_CACHE": str(tmp_path_factory.mktemp("home"))}.items():
            mp.setenv(k, v)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        store.copy_tree(str(synthetic_root), f"s3://{BUCKET}/data")
        require_no_foreign_ray()  # its tests kill drivers and then stop every local Ray they leave
        ray_stop()  # (what earlier tests of this session left)
        yield endpoint


def _objects(uri: str) -> list[str]:
    """Keys (as URIs) of the files below ``uri``."""
    fs, p = store.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return [store.uri(fs, i.path) for i in infos if i.type == pafs.FileType.File]


@pytest.mark.slow
def test_prepare_train_evaluate_with_uris_only(s3):
    data, cache = f"s3://{BUCKET}/data", f"s3://{BUCKET}/cache"
    r = run_cli("prepare", "--data", data, "--cache", cache, "--size", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    cache_uri = r.stdout.strip().splitlines()[-1]
    assert cache_uri.startswith(f"{cache}/") and store.exists(store.join(cache_uri, "meta.json"))

    r = run_cli("train", "--data", data, "--cache", cache, *SMALL, "--set", "train.epochs=2",
                "--set", f"train.storage_path=s3://{BUCKET}/runs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"reusing cache {cache_uri}" in r.stderr  # the second run reads the first one's cache
    ckpt = r.stdout.strip()  # the only line on stdout: <run>/best
    assert ckpt.startswith(f"s3://{BUCKET}/runs/train-") and store.exists(store.join(ckpt, "checkpoint.json"))
    run_dir = store.parent(ckpt)
    assert store.name(ckpt) == "best" and f"[train] run folder: {run_dir}" in r.stderr

    report = f"s3://{BUCKET}/reports/x"
    r = run_cli("evaluate", "--checkpoint", ckpt, "--out", report)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == report
    assert {"metrics.json", "predictions.parquet"} <= {store.name(u) for u in _objects(report)}

    # --resume of a run folder given as a URI: the run's own config, stored where it was
    from cxr_ray.cli import build_parser, train_config_from_args

    cfg = train_config_from_args(build_parser().parse_args(["train", "--resume", run_dir + "/"]))
    assert (cfg.train.storage_path, cfg.train.name) == (f"s3://{BUCKET}/runs", store.name(run_dir))


@pytest.mark.slow
def test_tune_on_s3_resumes_after_the_driver_is_killed(s3, tmp_path):
    """A search whose driver is killed mid-search, continued with ``--resume s3://...``; then
    trials.csv, best/ and the test report, checked against Tune's own per-trial results."""
    exp = f"s3://{BUCKET}/runs/search"
    args = ["tune", "--data", f"s3://{BUCKET}/data", "--cache", f"s3://{BUCKET}/cache", *SMALL,
            "--set", "train.cpus_per_worker=0.45", "--set", "train.epochs=2", "--set", "tune.num_samples=2",
            "--set", "metric.tta=",  # (TTA on an s3:// checkpoint: the train test above)
            "--set", "tune.max_concurrent_trials=1", "--set", "tune.reduction_factor=2",
            "--set", "tune.name=search", "--set", f"train.storage_path=s3://{BUCKET}/runs",
            # a joint choice of model settings (how backbones are searched), expanded in each trial
            "--set", "tune.search_space={model: {type: choice, values: [{dropout: 0.1}, {dropout: 0.4, width: 12}]}, "
                     "train.lr: {type: loguniform, low: 0.0003, high: 0.01}}"]
    ray_stop()
    log = open(tmp_path / "first_run.log", "w")
    proc = start_cli(*args, stdout=log, stderr=subprocess.STDOUT)
    try:  # kill once the first trial has checkpoints and the second has started
        deadline = time.time() + 400
        while time.time() < deadline:
            keys = _objects(exp)
            runs = {k.split("/train_runs/")[1].split("/")[0] for k in keys if "/train_runs/" in k}
            if len(runs) >= 2 and any("experiment_state" in k for k in keys):
                break
            assert proc.poll() is None, "tune ended early:\n" + (tmp_path / "first_run.log").read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    ray_stop()
    assert not store.exists(store.join(exp, "trials.csv"))

    r = run_cli("tune", "--resume", exp + "/")
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == f"{exp}/best"
    trials = pd.read_csv(BytesIO(store.read_bytes(store.join(exp, "trials.csv"))))
    assert len(trials) == 2 and trials["trial_id"].is_unique  # none duplicated, none lost
    assert trials[["model", "train.lr"]].drop_duplicates().shape[0] == 2  # distinct parameters
    assert set(trials["model"]) <= {"dropout=0.1", "dropout=0.4, width=12"}
    for row in trials.itertuples():  # each trial trained the model settings it was given
        saved = yaml.safe_load(store.read_bytes(store.join(row.checkpoint_path, "config.yaml")))["model"]
        assert (saved["dropout"], saved["width"]) == ((0.1, 8) if row.model == "dropout=0.1" else (0.4, 12))
    assert set(trials["stop_reason"]) <= {"completed", "asha", "early_stopping"}
    assert trials["epochs_run"].between(1, 2).all()
    assert trials["checkpoint_path"].str.startswith(f"{exp}/train_runs/").all()  # URIs, scheme kept
    assert trials["best_selection_score"].is_monotonic_decreasing  # ranked best first
    keys = _objects(exp)
    for row in trials.itertuples():  # trials.csv matches Tune's own per-trial results
        progress = next(k for k in keys if row.trial_id in k and k.endswith("/progress.csv"))
        tune_df = pd.read_csv(BytesIO(store.read_bytes(progress)))
        assert len(tune_df) == row.epochs_run
        assert tune_df["selection_score"].max() == pytest.approx(row.best_selection_score)
    from cxr_ray.checkpoint import load_checkpoint

    best = load_checkpoint(f"{exp}/best")  # fetched from the bucket
    assert best.meta["metrics"]["selection_score"] == pytest.approx(trials["best_selection_score"].iloc[0])
    assert store.exists(f"{exp}/best_test_report/metrics.json")


@pytest.mark.slow
def test_score_on_s3_killed_then_resumed_scores_every_object_once(s3, checkpoint, tmp_path):
    """The endpoint comes from ``--set storage.endpoint_url`` only (no AWS_ENDPOINT_URL)."""
    import duckdb
    import pyarrow.dataset as pds

    model = f"s3://{BUCKET}/models/ckpt"
    store.copy_tree(checkpoint, model)
    inputs = sorted(u for u in _objects(f"s3://{BUCKET}/data/train") if u.endswith(".jpeg"))
    out = f"s3://{BUCKET}/scores"
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    args = ["score", "--checkpoint", model, "--input", f"s3://{BUCKET}/data/train", "--output", out,
            "--set", f"storage.endpoint_url={s3}", "--set", "score.rows_per_file=8",
            "--set", "score.batch_size=4", "--set", "score.decode_batch_size=4", "--set", "score.decode_cpus=0.5"]
    proc = start_cli(*args, env=env)
    try:
        deadline = time.time() + 240
        while sum("/part-" in k for k in _objects(out)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the job finished before it was killed: " + proc.communicate()[1][-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    first = pds.dataset(out, format="parquet", exclude_invalid_files=True).to_table().to_pandas()
    assert 0 < len(first) < len(inputs) and first["path"].is_unique

    r = run_cli(*args, "--resume", env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == out
    scores = pds.dataset(out, format="parquet", exclude_invalid_files=True).to_table()
    final = scores.to_pandas()
    assert sorted(final["path"]) == inputs and final["error"].isna().all()  # every object exactly once
    assert duckdb.sql("SELECT count(*), count(DISTINCT path) FROM scores").fetchall()[0] == (len(inputs),) * 2
    kept = final.set_index("path").loc[first["path"], "scored_at"]
    assert (kept.to_numpy() == first["scored_at"].to_numpy()).all()  # committed rows untouched


def test_missing_bucket_is_named_before_any_work(s3, tmp_path):
    r = run_cli("prepare", "--data", f"s3://{BUCKET}/data", "--cache", "s3://no-such-bucket/cache")
    assert r.returncode == 2
    assert "data.cache_dir=s3://no-such-bucket/cache: bucket 'no-such-bucket' does not exist" in r.stderr
    r = run_cli("make-synthetic", f"s3://{BUCKET}/syn")
    assert r.returncode == 2 and "writes a local folder" in r.stderr


def test_no_access_is_named_before_any_work(s3, monkeypatch):
    """A store that refuses these credentials (moto with authentication on)."""
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(store.StorageError, match=r"train.storage_path=s3://cxr/runs: cannot reach bucket "
                                                  r"'cxr': .*ACCESS_DENIED.*credentials come from"):
            store.check_location(f"s3://{BUCKET}/runs", "train.storage_path")
