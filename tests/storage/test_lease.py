"""Fenced leases (``cxr_ray.storage.lease``) on real files, without Ray: the heartbeat rewrites a
lease only while it is still the holder's, a holder whose lease was taken over fails with
LeaseLost and leaves the new holder's file alone, staleness is judged from the file's mtime
(never from the ``heartbeat`` field), and of two jobs taking over a stale lease exactly one wins."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cxr_ray.storage import lease as lease_mod
from cxr_ray.storage.lease import LeaseHeld, LeaseLost, acquire, held_by, read_lease

BEAT = 0.05  # heartbeat interval in these tests (s)


@pytest.fixture(autouse=True)
def fast_leases(monkeypatch):
    """Heartbeats every BEAT s, a short settle time; staleness stays at 120 s (set by mtime)."""
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", BEAT)
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.02)


def foreign(run_id: str = "intruder", host: str = "elsewhere", pid: int = 4242, **extra) -> dict:
    """A lease record of another job (on another host, unless told)."""
    now = time.time()
    return {"run_id": run_id, "what": "score", "host": host, "pid": pid, "acquired": now, "heartbeat": now,
            **extra}


def put(path: Path, record: dict, age_s: float = 0.0) -> None:
    """Write ``record`` over the lease at ``path`` (temp + rename, as a job would), its mtime
    ``age_s`` seconds in the past."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.test")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))


def stale_age() -> float:
    return 2 * lease_mod.STALE_AFTER_S


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- holding, refusing, releasing ----------------------------------------------------------------

def test_acquire_refuse_release(tmp_path):
    path = tmp_path / "out" / "_lease.json"
    with acquire(str(path), "score") as held:
        record = json.loads(path.read_text())
        assert record["run_id"] == held.run_id and record["what"] == "score"
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        with pytest.raises(LeaseHeld, match=rf"score run {held.run_id} \(host .*\) holds "):
            acquire(str(path), "score")
        assert "score run " + held.run_id in str(held_by(str(path)))
        held.check()
    assert not path.exists()
    assert held_by(str(path)) is None
    assert sorted(p.name for p in tmp_path.joinpath("out").iterdir()) == []  # no temp file left


def test_heartbeat_refreshes_mtime_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "_lease.json"
    with acquire(str(path), "prepare") as held:
        old = time.time() - 60
        os.utime(path, (old, old))
        assert wait_until(lambda: path.stat().st_mtime > old + 30)  # rewritten by the heartbeat
        assert json.loads(path.read_text())["run_id"] == held.run_id
        time.sleep(5 * BEAT)
        assert [p.name for p in tmp_path.iterdir()] == ["_lease.json"]
        held.check()
    assert list(tmp_path.iterdir()) == []


# --- taken over: the holder stops writing, fails, and leaves the new record ----------------------

def test_taken_over_holder_stops_writing_and_fails(tmp_path, caplog):
    path = tmp_path / "_lease.json"
    held = acquire(str(path), "score")
    put(path, foreign(acquired=1_700_000_000.0))  # another job's record replaces ours
    new = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="cxr_ray.storage.lease"):
        assert wait_until(lambda: not held._thread.is_alive())  # the heartbeat found it and ended
    time.sleep(5 * BEAT)
    assert path.read_bytes() == new  # never written over
    with pytest.raises(LeaseLost, match=r"taken over by score run intruder \(host elsewhere, pid 4242\) "
                                        r"at 2023-11-14 22:13:20 UTC") as e:
        held.check()
    assert e.value.holder["run_id"] == "intruder" and isinstance(e.value, RuntimeError)
    assert "taken over by score run intruder" in caplog.text
    held.release()
    assert path.read_bytes() == new  # release left the new holder's lease in place
    assert held.lost is not None
    assert [p.name for p in tmp_path.iterdir()] == ["_lease.json"]


def test_frozen_holder_taken_over_by_a_second_acquire(tmp_path):
    """The holder is frozen (its heartbeat blocked) until its lease is stale; a second job takes
    it over; thawed, the first finds out at its next beat and at check()/exit."""
    path = tmp_path / "cache.lease"
    first = acquire(str(path), "prepare")
    with first._lock:  # frozen: no heartbeat gets through
        t = time.time() - stale_age()
        os.utime(path, (t, t))
        second = acquire(str(path), "prepare")
        assert read_lease(str(path))["run_id"] == second.run_id
    assert wait_until(lambda: not first._thread.is_alive())
    time.sleep(5 * BEAT)
    assert read_lease(str(path))["run_id"] == second.run_id
    lost = rf"of prepare run {first.run_id} was taken over by prepare run {second.run_id}"
    with pytest.raises(LeaseLost, match=lost), first:  # leaving the block normally still fails the job
        pass
    assert read_lease(str(path))["run_id"] == second.run_id  # first's release did not delete it
    second.check()
    second.release()
    assert not path.exists()


def test_check_confirms_a_lease_not_seen_for_a_heartbeat(tmp_path, monkeypatch):
    """A holder whose heartbeat never ran since (frozen, slow) reads the lease in check() before
    it commits anything, instead of trusting a stale belief."""
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 3600.0)  # the thread will not beat in this test
    path = tmp_path / "_lease.json"
    held = acquire(str(path), "score")
    held.check()  # confirmed just now: no read
    put(path, foreign())
    held.check()  # still believed: confirmed less than HEARTBEAT_S ago
    held._confirmed -= 3600.0
    with pytest.raises(LeaseLost, match="intruder"):
        held.check()
    assert json.loads(path.read_text())["run_id"] == "intruder"
    held.release()
    assert json.loads(path.read_text())["run_id"] == "intruder"


def test_removed_lease_is_lost_not_recreated(tmp_path):
    path = tmp_path / "_lease.json"
    held = acquire(str(path), "score")
    path.unlink()
    assert wait_until(lambda: not held._thread.is_alive())
    assert not path.exists()
    with pytest.raises(LeaseLost, match="was removed"):
        held.check()
    held.release()
    assert not path.exists()


def test_released_lease_is_never_rewritten(tmp_path):
    path = tmp_path / "_lease.json"
    held = acquire(str(path), "score")
    held.release()
    assert not path.exists()
    time.sleep(5 * BEAT)
    assert not path.exists() and not held._thread.is_alive()
    held.check()  # released, not lost


# --- staleness: the file's mtime, one clock --------------------------------------------------------

@pytest.mark.parametrize("forged", [0.0, 1e12])  # 1970 or 33658 in the record: neither counts
def test_fresh_mtime_is_live_whatever_the_heartbeat_field_says(tmp_path, forged):
    path = tmp_path / "_lease.json"
    put(path, foreign(heartbeat=forged))
    with pytest.raises(LeaseHeld, match=r"score run intruder \(host elsewhere, pid 4242, last heartbeat -?0 s ago\)"):
        acquire(str(path), "score")
    assert held_by(str(path)) is not None
    assert json.loads(path.read_text())["run_id"] == "intruder"


@pytest.mark.parametrize("forged", [0.0, 1e12])
def test_old_mtime_is_stale_whatever_the_heartbeat_field_says(tmp_path, forged, caplog):
    path = tmp_path / "_lease.json"
    put(path, foreign(heartbeat=forged), age_s=stale_age())
    assert held_by(str(path)) is None
    with caplog.at_level(logging.WARNING, logger="cxr_ray.storage.lease"):
        held = acquire(str(path), "score")
    assert "took over the stale lease" in caplog.text and "score run intruder" in caplog.text
    assert json.loads(path.read_text())["run_id"] == held.run_id
    held.release()
    assert not path.exists()


def test_unreadable_lease_goes_stale_by_mtime(tmp_path):
    path = tmp_path / "_lease.json"
    path.write_text("{not json")
    with pytest.raises(LeaseHeld, match="unreadable lease"):
        acquire(str(path), "score")
    t = time.time() - stale_age()
    os.utime(path, (t, t))
    with acquire(str(path), "score") as held:
        assert read_lease(str(path))["run_id"] == held.run_id


def test_dead_process_on_this_host_is_stale(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "_lease.json"
    put(path, foreign(host=socket.gethostname(), pid=gone.pid))  # fresh mtime, dead holder
    with acquire(str(path), "score") as held:
        assert read_lease(str(path))["run_id"] == held.run_id
    put(path, foreign(host=socket.gethostname(), pid=os.getpid()))  # alive: held
    with pytest.raises(LeaseHeld):
        acquire(str(path), "score")


# --- take-over races -------------------------------------------------------------------------------

def race(path: Path, takers: int) -> tuple[list, list]:
    """``takers`` threads call acquire on ``path`` at once: (leases won, LeaseHeld errors)."""
    start = threading.Barrier(takers)
    won, refused, errors = [], [], []

    def take() -> None:
        start.wait()
        try:
            won.append(acquire(str(path), "prepare"))
        except LeaseHeld as e:
            refused.append(e)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return won, refused


@pytest.mark.parametrize("takers", [2, 4])
def test_concurrent_takers_of_a_stale_lease_exactly_one_wins(tmp_path, takers, monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.2)  # longer than a busy machine's stalls
    for round_ in range(6):
        path = tmp_path / f"round{round_}" / "_lease.json"
        path.parent.mkdir()
        put(path, foreign(), age_s=stale_age())
        won, refused = race(path, takers)
        assert len(won) == 1 and len(refused) == takers - 1, (round_, won, refused)
        assert all(e.holder.get("run_id") not in (None, "intruder") for e in refused)  # a taker's record
        time.sleep(3 * BEAT)  # heartbeats run: the winner still holds it
        assert read_lease(str(path))["run_id"] == won[0].run_id
        won[0].check()
        won[0].release()
        assert [p.name for p in path.parent.iterdir()] == []  # no temp file left by any taker


def test_create_where_hard_links_are_unsupported(tmp_path, monkeypatch):
    """The lease is hard-linked from its temp file (never seen half-written); a filesystem
    without hard links gets an O_EXCL create: still exclusive."""
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", dst)

    monkeypatch.setattr(lease_mod.os, "link", no_link)
    path = tmp_path / "_lease.json"
    with acquire(str(path), "score") as held:
        assert read_lease(str(path))["run_id"] == held.run_id
        with pytest.raises(LeaseHeld, match=held.run_id):
            acquire(str(path), "score")
    assert list(tmp_path.iterdir()) == []


def test_temp_files_are_created_exclusively(tmp_path, monkeypatch):
    """A temp file name already in use is never written over."""
    class Fixed:
        hex = "0" * 32

    monkeypatch.setattr(lease_mod.uuid, "uuid4", lambda: Fixed())
    uri = str(tmp_path / "_lease.json")
    first = lease_mod._write_temp(uri, "abc", b"first")
    with pytest.raises(FileExistsError):
        lease_mod._write_temp(uri, "abc", b"second")
    assert Path(first).read_bytes() == b"first"


# --- object stores (the non-O_EXCL path, through pyarrow on file:// URIs) ----------------------------

def test_uri_leases_are_fenced_too(tmp_path):
    path = tmp_path / "out" / "_lease.json"
    uri = f"file://{path}"
    held = acquire(uri, "score")
    assert json.loads(path.read_text())["run_id"] == held.run_id
    with pytest.raises(LeaseHeld, match=held.run_id):
        acquire(uri, "score")
    put(path, foreign())
    assert wait_until(lambda: not held._thread.is_alive())
    time.sleep(5 * BEAT)
    assert json.loads(path.read_text())["run_id"] == "intruder"
    with pytest.raises(LeaseLost, match="intruder"):
        held.check()
    held.release()
    assert json.loads(path.read_text())["run_id"] == "intruder"
    t = time.time() - stale_age()
    os.utime(path, (t, t))
    with acquire(uri, "score") as again:
        assert json.loads(path.read_text())["run_id"] == again.run_id
    assert sorted(p.name for p in path.parent.iterdir()) == []


# --- the scoring output's early refusal ------------------------------------------------------------

def test_check_output_refuses_a_live_lease_and_ignores_a_stale_one(tmp_path):
    from cxr_ray.apps.score.output import LEASE_FILE, OutputFolder, check_output
    from cxr_ray.errors import ScoreError

    out = tmp_path / "out"
    out.mkdir()
    put(out / LEASE_FILE, foreign(heartbeat=0.0))
    with pytest.raises(ScoreError, match="is in use: score run intruder"):
        check_output(OutputFolder(str(out)), "m", False, False)
    put(out / LEASE_FILE, foreign(heartbeat=1e12), age_s=stale_age())
    check_output(OutputFolder(str(out)), "m", False, False)
