"""Leases: one job at a time on a scoring output or a cache being built.

A lease is a small JSON file (``run_id``, ``host``, ``pid``, ``what``, ``heartbeat``) next to
or inside what it protects. It is created exclusively (``O_EXCL`` on local disks), refreshed
by a daemon thread every ``HEARTBEAT_S`` seconds, and removed when the job ends. A lease
whose heartbeat is older than ``STALE_AFTER_S``, or whose process is gone from this host, is
stale: the next job takes it over and says so. On object stores (``s3://``, ``gs://``) there
is no exclusive create through pyarrow: the lease is written, then read back, and the job
goes on only if it reads its own ``run_id`` (two jobs starting in the same instant can still
both pass there; on a shared POSIX mount the exclusive create holds).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cxr_ray.data import io

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class LeaseHeld(RuntimeError):
    """Another live job holds the lease; ``holder`` is its lease record."""

    def __init__(self, uri: str, holder: dict[str, Any]):
        age = time.time() - float(holder.get("heartbeat", 0))
        super().__init__(f"{holder.get('what', 'a job')} run {holder.get('run_id')} (host "
                         f"{holder.get('host')}, pid {holder.get('pid')}, last heartbeat {age:.0f} s ago) "
                         f"holds {uri}")
        self.uri, self.holder = uri, holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """True when the holder stopped heartbeating, or is a dead process on this host."""
    now = time.time() if now is None else now
    if now - float(holder.get("heartbeat", 0)) > STALE_AFTER_S:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


def read_lease(uri: str) -> dict[str, Any] | None:
    """The lease record at ``uri``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(io.read_bytes(uri))
    except (OSError, ValueError):
        return None


@dataclass
class Lease:
    """A held lease; refresh runs in a daemon thread until :meth:`release`."""

    uri: str
    what: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    _stop: threading.Event = field(default_factory=threading.Event)

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": time.time()}

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _write(self.uri, self.record())
            except OSError as e:  # the next beat retries; a lease left stale is taken over
                log.warning("lease %s: heartbeat failed: %s", self.uri, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file (if it is still ours)."""
        self._stop.set()
        holder = read_lease(self.uri)
        if holder is not None and holder.get("run_id") == self.run_id:
            fs, p = io.resolve(self.uri)
            try:
                fs.delete_file(p)
            except OSError:
                pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write(uri: str, record: dict[str, Any]) -> None:
    """Overwrite the lease (local: temp file + rename, so a reader never sees half a record)."""
    data = json.dumps(record).encode()
    if io.is_uri(uri):
        io.write_bytes(uri, data)
        return
    tmp = f"{uri}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, uri)


def _create(uri: str, record: dict[str, Any]) -> bool:
    """Create the lease if none exists; False when another one is there."""
    if io.is_uri(uri):
        if io.exists(uri):
            return False
        io.write_bytes(uri, json.dumps(record).encode())
        return (read_lease(uri) or {}).get("run_id") == record["run_id"]
    path = os.path.abspath(os.path.expanduser(uri))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(record).encode())
    return True


def acquire(uri: str, what: str) -> Lease:
    """Take the lease at ``uri`` for a job described by ``what`` ("score", "prepare" ...).

    Raises :class:`LeaseHeld` naming the other job when a live one holds it; takes over (and
    logs) a stale one.
    """
    lease = Lease(uri, what)
    for _ in range(3):  # a stale lease removed by two jobs at once: one of them creates it
        if _create(uri, lease.record()):
            threading.Thread(target=lease._beat, name="cxr-ray-lease", daemon=True).start()
            return lease
        holder = read_lease(uri)
        if holder is None:
            time.sleep(0.2)  # being replaced right now, or unreadable for a moment
            continue
        if not is_stale(holder):
            raise LeaseHeld(uri, holder)
        log.warning("taking over the stale lease %s of %s run %s (host %s, pid %s, last heartbeat %.0f s ago)",
                    uri, holder.get("what"), holder.get("run_id"), holder.get("host"), holder.get("pid"),
                    time.time() - float(holder.get("heartbeat", 0)))
        if (read_lease(uri) or {}).get("run_id") == holder.get("run_id"):  # not taken over meanwhile
            fs, p = io.resolve(uri)
            try:
                fs.delete_file(p)
            except OSError:
                pass
    holder = read_lease(uri) or {}
    raise LeaseHeld(uri, holder)
