"""Inputs hospitals export: huge headers, pipes, broken and cyclic symlinks, non-UTF-8 names.

Each becomes one error row naming the file, never a failed or hung job, and the listing
has exactly the rows ``find -not -type d`` shows.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import run_cli, start_cli, write_image
from PIL import Image

from cxr_ray.config import ExperimentConfig
from cxr_ray.data import decode
from cxr_ray.data.cache import fingerprint
from cxr_ray.data.catalog import assign_splits, load_catalog
from cxr_ray.data.decode import ImageDecodeError, decode_path, read_file
from cxr_ray.data.listing import list_inputs
from cxr_ray.data.synthetic import make_synthetic_dataset


def bomb_jpeg(width: int = 65000, height: int = 65000) -> bytes:
    """A valid 16x16 JPEG whose header (SOF0) claims ``width`` x ``height`` pixels (~600 bytes)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def hostile_folder(root: Path) -> dict[str, str]:
    """Good images plus one of every hostile entry; returns {name: expected error fragment}."""
    for i in range(3):
        write_image(root / "NORMAL" / f"good{i}.jpeg", size=48, value=60 + i)
    (root / "NORMAL" / "bomb.jpeg").write_bytes(bomb_jpeg())
    os.mkfifo(root / "NORMAL" / "pipe.jpeg")
    os.symlink(root / "NORMAL" / "gone.jpeg", root / "NORMAL" / "dangling.jpeg")
    os.symlink(root / "NORMAL" / "good0.jpeg", root / "NORMAL" / "alias.jpeg")  # a file link: read through
    os.symlink("..", root / "NORMAL" / "cycle")  # a folder link back up: never followed
    with open(os.path.join(os.fsencode(root / "NORMAL"), b"caf\xe9.jpeg"), "wb") as f:  # Latin-1 name
        f.write((root / "NORMAL" / "good1.jpeg").read_bytes())
    return {"bomb.jpeg": "data.max_pixels", "pipe.jpeg": "not a regular file: a named pipe",
            "dangling.jpeg": "broken symlink", "cycle": "symlink to a folder",
            "caf\\xe9.jpeg": "not valid UTF-8"}


def find_count(root: Path) -> int:
    """What a user counts: ``find ROOT -not -type d``, hidden entries left out."""
    out = subprocess.run(["find", str(root), "-not", "-type", "d", "-not", "-path", "*/.*"],
                         capture_output=True, check=True).stdout
    return len(out.splitlines())


def test_decode_refuses_a_huge_header_before_decoding():
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"claims (65000x65000 = )?4225 MP, over data.max_pixels=100000000"):
        decode.decode_image(bomb_jpeg(), 64, "bomb.jpeg")
    assert time.perf_counter() - start < 2  # from the header: nothing was decompressed
    with pytest.raises(ImageDecodeError, match="over data.max_pixels=1000"):
        decode.decode_image(bomb_jpeg(40, 40), 16, "small.jpeg", max_pixels=1000)
    assert decode.decode_image(bomb_jpeg(16, 16), 16, "ok.jpeg", max_pixels=1000)[0].shape == (16, 16)


def test_any_exception_on_one_file_is_an_error_row(tmp_path, monkeypatch):
    path = write_image(tmp_path / "x.png", size=32)

    def broken_decoder(*args, **kw):
        raise RuntimeError("a decoder bug")

    monkeypatch.setattr(decode, "decode_image", broken_decoder)
    d = decode_path(str(path), 16)
    assert d.error == "unexpected RuntimeError while decoding: a decoder bug"
    assert d.pixels.shape == (16, 16) and d.width == 0 and d.sha1  # the bytes were read


def test_pipes_and_stalled_reads_end_as_errors_not_hangs(tmp_path):
    fifo = tmp_path / "pipe.jpeg"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="not a regular file: a named pipe"):
        read_file(str(fifo), timeout_s=30)
    assert time.perf_counter() - start < 1  # refused from stat, never opened
    with pytest.raises(ImageDecodeError, match=r"did not finish within data.read_timeout_s=0.5 s"):
        decode._call_with_timeout(lambda: fifo.read_bytes(), 0.5, str(fifo))  # a read that blocks
    with open(fifo, "wb"):  # let the abandoned reader thread finish
        pass
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    assert "broken symlink" in decode_path(str(tmp_path / "dangling.png"), 16).error


def test_only_reads_that_can_stall_run_under_the_watchdog(tmp_path, monkeypatch):
    mounts = (("/mnt/nfs", "nfs4"), ("/mnt/gcs", "fuse.gcsfuse"), ("/", "ext4"))
    monkeypatch.setattr(decode, "_mounts", lambda: mounts)
    assert decode._may_stall("/mnt/nfs/x.jpeg") and decode._may_stall("/mnt/gcs/a/b.png")
    assert not decode._may_stall(str(tmp_path / "x.jpeg")) and not decode._may_stall("/mnt/nfsother/x")
    monkeypatch.setattr(decode, "_mounts", lambda: ())  # mounts unknown: always watched
    assert decode._may_stall(str(tmp_path / "x.jpeg"))
    path = write_image(tmp_path / "x.png", size=32)
    for _ in range(3):  # the reused reader thread returns each file's own bytes
        assert read_file(str(path), timeout_s=5) == path.read_bytes()


def test_listing_matches_find_and_never_loops(tmp_path):
    root = tmp_path / "export"
    expected = hostile_folder(root)
    df = list_inputs([str(root)])
    assert len(df) == find_count(root) == 9
    assert df["path"].is_unique
    errors = {p.rsplit("/", 1)[1]: e for p, e in zip(df["path"], df["error"]) if e}
    assert set(errors) == {"cycle", "caf\\xe9.jpeg"}  # the rest fail when read, with their reasons
    for name, fragment in expected.items():
        if name in errors:
            assert fragment in errors[name]
    globbed = list_inputs([str(root / "**" / "*.jpeg")])  # ** does not walk into the cycle either
    assert len(globbed) == 8 and globbed["path"].is_unique


def test_manifest_fingerprint_sees_a_reexported_image(tmp_path):
    for i, cls in enumerate(["NORMAL", "PNEUMONIA"] * 4):
        write_image(tmp_path / f"img{i}.png", size=32, value=40 + 20 * i)
    rows = [{"path": f"img{i}.png", "label": cls, "split": "train" if i < 4 else "val"}
            for i, cls in enumerate(["NORMAL", "PNEUMONIA"] * 4)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = ExperimentConfig().replace(**{"data.root": str(tmp_path / "m.csv"), "data.val_split": "official"})
    before = fingerprint(assign_splits(load_catalog(cfg.data.root), cfg.data), cfg, 32)
    write_image(tmp_path / "img0.png", size=40, value=200)  # re-exported at the same path
    after = fingerprint(assign_splits(load_catalog(cfg.data.root), cfg.data), cfg, 32)
    assert before != after


def test_a_ray_worker_failure_is_one_line_with_the_log(tmp_path, monkeypatch):
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    from cxr_ray.cli import describe_failure, root_cause, write_failure_log

    boom = ValueError("need both classes in train, got NORMAL=0, PNEUMONIA=12\nsecond line")
    train = WorkerGroupError("rank 0 failed", {1: RuntimeError("later rank"), 0: boom})
    assert root_cause(train) is boom
    assert describe_failure(train) == ("ValueError: need both classes in train, got NORMAL=0, PNEUMONIA=12 "
                                       "(in a Ray worker)")
    assert root_cause(ControllerError(boom)) is boom
    data = RayTaskError("read_and_decode", "Traceback (most recent call last): ...", boom)
    assert describe_failure(data).startswith("ValueError: need both classes")
    assert describe_failure(KeyError("x")) == "KeyError: 'x'"
    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path))
    log = write_failure_log("train", train)
    assert log.startswith(str(tmp_path / "logs")) and "WorkerGroupError" in open(log).read()


@pytest.mark.slow
def test_score_gives_every_hostile_entry_one_row(checkpoint, tmp_path):
    root = tmp_path / "export"
    expected = hostile_folder(root)
    out = tmp_path / "out"
    r = run_cli("score", "--checkpoint", checkpoint, "--input", root, "--output", out,
                "--set", "score.decode_cpus=0.5", "--set", "score.cpus_per_actor=1", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == find_count(root) and df["path"].is_unique  # nothing vanished or repeated
    errors = {p.rsplit("/", 1)[1]: e for p, e in zip(df["path"], df["error"]) if pd.notna(e)}
    assert set(errors) == set(expected)
    for name, fragment in expected.items():
        assert fragment in errors[name], (name, errors[name])
    scored = df[df["error"].isna()]
    assert len(scored) == 4 and scored["prob_pneumonia"].notna().all()  # 3 good + the file symlink
    assert "this run scored 4, failed 5" in r.stdout


@pytest.mark.slow
def test_two_jobs_at_once(checkpoint, tmp_path):
    """Two local commands each run on their own Ray; a second job on a busy output is refused."""
    root = make_synthetic_dataset(tmp_path / "syn", n=200, size=64, seed=3)
    n = len(list_inputs([str(root)]))
    slow = ["--set", "score.batch_size=4", "--set", "score.decode_batch_size=4", "--set", "score.decode_cpus=0.5",
            "--set", "score.cpus_per_actor=1", "--set", "score.rows_per_file=50"]
    first = start_cli("score", "--checkpoint", checkpoint, "--input", root, "--output", tmp_path / "a", *slow)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "a" / "_lease.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()[-3000:]
        same = run_cli("score", "--checkpoint", checkpoint, "--input", root, "--output", tmp_path / "a", "--resume",
                       timeout=120)
        assert same.returncode == 2 and "is in use: score run" in same.stderr, same.stderr[-2000:]
        other = run_cli("score", "--checkpoint", checkpoint, "--input", root, "--output", tmp_path / "b", *slow,
                        timeout=600)  # its own Ray: before, it joined the first one's
        assert other.returncode == 0, other.stderr[-3000:]
        first_log = first.communicate(timeout=600)[1]  # reads the pipes: a full pipe would block it
        assert first.returncode == 0, first_log[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
    for out in ("a", "b"):
        df = pd.read_parquet(tmp_path / out)
        assert len(df) == n and df["path"].is_unique
    assert not (tmp_path / "a" / "_lease.json").exists()  # released at the end


@pytest.mark.slow
def test_second_prepare_waits_for_a_build_and_never_sees_it_half_done(tmp_path):
    """The first build is frozen (SIGSTOP) mid-way, holding its lease: the second job waits and
    nothing half-built is visible under the cache's name; then one build, one reuse."""
    root = make_synthetic_dataset(tmp_path / "syn", n=300, size=64, seed=4)
    cache = tmp_path / "cache"
    args = ["prepare", "--data", root, "--set", f"data.cache_dir={cache}"]
    first = start_cli(*args)
    second, log = None, tmp_path / "second.log"
    try:
        deadline = time.time() + 120
        while not list(cache.glob("*.lease")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # a slow build, frozen while it holds the lease
        with open(log, "w") as f:
            second = start_cli(*args, stderr=f)
            while "waiting: prepare run" not in log.read_text() and second.poll() is None and time.time() < deadline:
                time.sleep(0.2)
        assert "waiting: prepare run" in log.read_text(), log.read_text()[-3000:]
        assert all(".tmp-" in p.name for p in cache.iterdir() if p.is_dir())  # nothing half-built published
        os.kill(first.pid, signal.SIGCONT)
        first_log = first.communicate(timeout=600)[1]  # reads the pipes: a full pipe would block it
        assert first.returncode == 0, first_log[-3000:]
        assert second.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for job in (first, second):
            if job is not None and job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert "[prepare] decoding 300 images" in first_log
    assert "reusing cache" in log.read_text() and "[prepare] decoding" not in log.read_text()
    caches = [p for p in cache.iterdir() if p.is_dir()]
    assert len(caches) == 1 and (caches[0] / "meta.json").is_file()  # no temp folder left behind
    assert not list(cache.glob("*.lease"))
    assert len(pd.read_parquet(caches[0] / "data", columns=["path"])) == 300
