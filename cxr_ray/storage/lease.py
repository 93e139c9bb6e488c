"""Leases: one job at a time on a scoring output or a cache being built, fenced.

A lease is a small JSON file (``run_id``, ``what``, ``host``, ``pid``, ``acquired``,
``heartbeat``) next to or inside what it protects. ``run_id`` is the holder's random token;
``acquired`` and ``heartbeat`` are the holder's wall clock, for people to read only.

- **Create**: exclusively on local disks and shared POSIX mounts: the record is written to a
  new temp file (``O_EXCL``), which is then hard-linked as the lease -- the link fails when a
  lease exists, like ``O_EXCL``, and a reader never sees half a record (where hard links are
  unsupported, the lease itself is created with ``O_EXCL``). Object stores (``s3://``,
  ``gs://``) have no exclusive create through pyarrow: the lease is written if absent, then,
  after ``SETTLE_S``, read back; the job goes on only if it reads its own ``run_id``.
- **Heartbeat**: a daemon thread rewrites the lease every ``HEARTBEAT_S`` seconds, but only
  while it still holds it: it writes its record to a new temp file (``O_EXCL``: never another
  writer's), reads the lease, and renames the temp file over it only if the lease still
  carries its own ``run_id``. When another job has taken the lease over (or it is gone), the
  thread stops writing and ends; the job fails with :class:`LeaseLost` (naming the new holder)
  at its next :meth:`Lease.check` -- callers check before they commit anything -- or when the
  lease is released. Release removes the lease only while it is still the holder's.
- **Stale leases** are taken over, with a warning. Staleness is judged on one clock, the
  store's: a lease is stale when its file's modification time is more than ``STALE_AFTER_S``
  older than that of a temp file the taker has just written beside it (no two hosts' wall
  clocks are compared; the ``heartbeat`` field is not used), or when its holder is a process
  gone from this host. The taker renames that temp file, holding its own record, over the
  stale lease (object stores: writes its record over it), waits ``SETTLE_S`` and reads the
  lease back: of takers racing, the one whose record is there goes on, the others are
  refused with :class:`LeaseHeld`.

What fencing by files cannot exclude (no compare-and-swap on a file): a holder frozen for
more than ``STALE_AFTER_S`` between its check and its rename, or a taker stalled for more than
``SETTLE_S`` between its check and its rename (or write), can overwrite a newer record once;
the job whose record was overwritten then fails with :class:`LeaseLost` at its next
heartbeat or check, so at most one of them goes on after that.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from cxr_ray.storage import uri as store

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # how often the holder refreshes its lease (read at each use: tests patch it)
STALE_AFTER_S = 120.0  # a lease not rewritten for this long (store's clock) may be taken over
MAX_LEASE_BYTES = 1 << 16  # a lease record is ~200 bytes; more is not one
SETTLE_S = 1.0  # after writing over a lease without an exclusive create, wait this long, then read it back


def _when(t: float | None) -> str:
    """A timestamp for messages: ``2024-05-01 12:00:00 UTC`` (``?`` when unknown)."""
    if t is None:
        return "?"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(record: dict[str, Any] | None, extra: str = "") -> str:
    """``score run abc123 (host h, pid 42<extra>)`` for a lease record; an unreadable one says so."""
    if record is None:
        return f"an unreadable lease ({extra.lstrip(', ') or 'no record'})"
    return (f"{record.get('what', 'a job')} run {record.get('run_id')} (host {record.get('host')}, "
            f"pid {record.get('pid')}{extra})")


class LeaseHeld(RuntimeError):
    """Another live job holds the lease; ``holder`` is its lease record ({} when unreadable)."""

    def __init__(self, uri: str, holder: dict[str, Any] | None, age_s: float | None = None):
        """``age_s``: seconds since the lease file was last written (store's clock), when known."""
        extra = f", last heartbeat {age_s:.0f} s ago" if age_s is not None else ""
        super().__init__(f"{_describe(holder, extra)} holds {uri}")
        self.uri, self.holder, self.age_s = uri, holder or {}, age_s


class LeaseLost(RuntimeError):
    """The lease this job held was taken over by another job (or removed): the job must stop.

    ``holder`` is the record now in the lease (None when the lease is gone or unreadable).
    """

    def __init__(self, uri: str, run_id: str, what: str, holder: dict[str, Any] | None, found: bool = True):
        """``found``: False when the lease file is gone altogether."""
        if holder is not None:
            how = (f"was taken over by {_describe(holder)} at {_when(holder.get('acquired'))} "
                   f"(its clock)")
        elif found:
            how = "was overwritten with an unreadable record"
        else:
            how = "was removed (by another job or by hand)"
        super().__init__(f"lease {uri} of {what} run {run_id} {how}; this job stops so that only one "
                         f"job writes there")
        self.uri, self.run_id, self.holder = uri, run_id, holder


@dataclass(frozen=True)
class LeaseFile:
    """A lease file as read: its record (None when unreadable) and its mtime on the store."""

    record: dict[str, Any] | None
    mtime: float

    @property
    def run_id(self) -> str | None:
        """The holder's token (None when unreadable)."""
        return None if self.record is None else self.record.get("run_id")


def _pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host (maybe another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True


def is_stale(lease: LeaseFile, now: float) -> bool:
    """True when the lease was not rewritten for ``STALE_AFTER_S`` (``now`` and the lease's mtime
    on the same clock, the store's), or its holder is a process gone from this host."""
    if now - lease.mtime > STALE_AFTER_S:
        return True
    record = lease.record or {}
    if record.get("host") != socket.gethostname():
        return False
    try:
        pid = int(record.get("pid", -1))
    except (TypeError, ValueError):
        return False
    return pid > 0 and not _pid_alive(pid)


def _decode(data: bytes) -> dict[str, Any] | None:
    """A lease record from the file's bytes; None when it is not one."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    return record if isinstance(record, dict) else None


def read_lease_file(uri: str) -> LeaseFile | None:
    """The lease at ``uri`` with its mtime, or None when there is none; OSError when unreachable.

    Locally the bytes and the mtime come from one open file (one inode), so they match even
    while the lease is being replaced.
    """
    if not store.is_uri(uri):
        try:  # non-blocking: a FIFO placed as the lease must not hang the heartbeat (it holds the lock)
            with os.fdopen(os.open(store.absolute(uri), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_LEASE_BYTES) if stat.S_ISREG(st.st_mode) else b""
        except FileNotFoundError:
            return None
        return LeaseFile(_decode(data), st.st_mtime_ns / 1e9)
    fs, p = store.resolve(uri)
    try:
        data = store.read_bytes(uri)
    except OSError:
        if fs.get_file_info(p).type == pafs.FileType.NotFound:
            return None
        raise
    info = fs.get_file_info(p)  # after the read: a newer mtime than the bytes errs towards "live"
    if info.type == pafs.FileType.NotFound:
        return None
    record = _decode(data)
    if info.mtime_ns is None:  # a store that reports no mtime: the holder's clock, else "just now"
        return LeaseFile(record, float((record or {}).get("heartbeat", time.time())))
    return LeaseFile(record, info.mtime_ns / 1e9)


def read_lease(uri: str) -> dict[str, Any] | None:
    """The lease record at ``uri``, or None when there is none (or it is unreadable)."""
    try:
        lease = read_lease_file(uri)
    except OSError:
        return None
    return None if lease is None else lease.record


def held_by(uri: str) -> LeaseHeld | None:
    """A :class:`LeaseHeld` naming the live job that holds the lease at ``uri``; None when it is
    free, stale or unreachable. Judged by this host's clock against the lease's mtime, so it is
    advisory (an early, cheap refusal); :func:`acquire` decides on the store's clock."""
    try:
        lease = read_lease_file(uri)
    except OSError:
        return None
    now = time.time()
    if lease is None or is_stale(lease, now):
        return None
    return LeaseHeld(uri, lease.record, now - lease.mtime)


def _mtime(uri: str) -> float:
    """Modification time of the file at ``uri`` on its store (the store's clock)."""
    if not store.is_uri(uri):
        return os.stat(store.absolute(uri)).st_mtime_ns / 1e9
    fs, p = store.resolve(uri)
    mtime_ns = fs.get_file_info(p).mtime_ns
    return time.time() if mtime_ns is None else mtime_ns / 1e9  # no mtime reported: this host's clock


def _write_temp(uri: str, run_id: str, data: bytes) -> str:
    """Write ``data`` to a new temp file beside the lease ``uri``; its path.

    Locally the temp file is created with ``O_EXCL`` under a name of its own (the holder's
    token plus a random part), so it never clobbers another writer's temp file.
    """
    tmp = f"{uri}.{run_id}-{uuid.uuid4().hex[:8]}.tmp"
    if store.is_uri(tmp):
        store.write_bytes(tmp, data)
        return tmp
    tmp = store.absolute(tmp)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _put(tmp: str, uri: str) -> None:
    """Put the temp file ``tmp`` in place as the lease ``uri`` (locally: an atomic rename)."""
    if store.is_uri(uri):
        store.write_bytes(uri, store.read_bytes(tmp))  # an object appears whole once its upload ends
        _remove(tmp)
    else:
        os.replace(tmp, store.absolute(uri))


def _remove(uri: str) -> None:
    """Delete the file at ``uri``; gone already is fine."""
    try:
        if store.is_uri(uri):
            fs, p = store.resolve(uri)
            fs.delete_file(p)
        else:
            os.remove(store.absolute(uri))
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", uri, e)


@dataclass
class Lease:
    """A held lease; its heartbeat thread refreshes it (only while it is still ours) until
    :meth:`release`. :meth:`check` raises :class:`LeaseLost` once it is no longer ours."""

    uri: str
    what: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    acquired: float = field(default_factory=time.time)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _lost: LeaseLost | None = field(default=None, repr=False)
    _confirmed: float = field(default_factory=time.monotonic, repr=False)  # last time seen ours
    _tried: float = field(default=float("-inf"), repr=False)  # last time check() tried to confirm it
    _thread: threading.Thread | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        """This holder's lease record, heartbeat now."""
        return {"run_id": self.run_id, "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "acquired": self.acquired, "heartbeat": time.time()}

    def _lose(self, lease: LeaseFile | None) -> LeaseLost:
        """Mark the lease lost to what is now at ``uri`` (None: nothing) and stop the heartbeat."""
        if self._lost is None:
            self._lost = LeaseLost(self.uri, self.run_id, self.what, lease and lease.record, lease is not None)
            self._stop.set()
            log.error("%s", self._lost)
        return self._lost

    def _refresh(self) -> None:
        """Rewrite the lease if it is still ours, else mark it lost and raise :class:`LeaseLost`.

        OSError (store unreachable): nothing is decided; the next beat or check retries.
        """
        with self._lock:
            if self._lost is not None:
                raise self._lost.with_traceback(None)
            if self._stop.is_set():
                return  # released: never write after release
            data = json.dumps(self.record()).encode()
            # Locally the temp file is written first, so that the rename follows the check at once.
            tmp = None if store.is_uri(self.uri) else _write_temp(self.uri, self.run_id, data)
            try:
                current = read_lease_file(self.uri)
                if current is None or current.run_id != self.run_id:
                    raise self._lose(current)
                if tmp is not None:
                    _put(tmp, self.uri)
                    tmp = None
                else:
                    store.write_bytes(self.uri, data)
                self._confirmed = time.monotonic()
            finally:
                if tmp is not None:
                    _remove(tmp)

    def _beat(self) -> None:
        """The heartbeat thread: refresh every ``HEARTBEAT_S`` s; end once released or lost."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._refresh()
            except LeaseLost:
                return
            except OSError as e:  # the next beat retries; a lease left stale is taken over
                log.warning("lease %s: heartbeat failed: %s", self.uri, e)

    def _start(self) -> None:
        """Start the heartbeat thread."""
        self._confirmed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="cxr-ray-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is no longer ours. Call it before committing.

        Cheap: it reads the lease (and rewrites it, as a heartbeat would) only when the last
        confirmation is ``HEARTBEAT_S`` old -- e.g. after this process was frozen -- so that a
        job never commits on a lease it has not seen as its own for longer than that.
        """
        if self._lost is None and time.monotonic() - max(self._confirmed, self._tried) >= HEARTBEAT_S:
            self._tried = time.monotonic()  # at most one try a heartbeat interval
            try:
                self._refresh()
            except OSError as e:  # undecided: the heartbeat retries
                log.warning("lease %s: cannot confirm it: %s", self.uri, e)
        if self._lost is not None:
            raise self._lost.with_traceback(None)

    @property
    def lost(self) -> LeaseLost | None:
        """The :class:`LeaseLost` error once the lease was found lost, else None."""
        return self._lost

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still ours; a lease that another
        job holds now is left alone (and :attr:`lost` set). Never raises."""
        self._stop.set()
        with self._lock:  # waits for a heartbeat in flight; none writes after this
            if self._lost is not None:
                return
            try:
                current = read_lease_file(self.uri)
            except OSError as e:
                log.warning("lease %s: cannot release it (left to go stale): %s", self.uri, e)
                return
            if current is None or current.run_id != self.run_id:
                self._lose(current)
                return
            _remove(self.uri)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Release; when the block ended normally but the lease was lost meanwhile, raise
        :class:`LeaseLost` (the job's work may have been interleaved with another job's)."""
        self.release()
        if exc_type is None and self._lost is not None:
            raise self._lost.with_traceback(None)


def _place(src: str, path: str) -> bool:
    """Put the complete local file ``src`` at ``path`` exclusively -- a hard link, which fails
    when ``path`` exists, so a reader never sees a half-written lease; False when a file is
    there already. Where hard links are not supported: an ``O_EXCL`` create of a copy."""
    try:
        os.link(src, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    with open(src, "rb") as f:
        data = f.read()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _create_local(path: str, lease: Lease) -> bool:
    """Create the local lease ``path`` holding ``lease``'s record, exclusively; False when a
    lease is there already."""
    tmp = _write_temp(path, lease.run_id, json.dumps(lease.record()).encode())
    try:
        return _place(tmp, path)
    finally:
        _remove(tmp)


def _settled(uri: str, lease: Lease) -> bool:
    """Wait ``SETTLE_S``, then True when the lease at ``uri`` holds ``lease``'s record: a job
    writing over it at the same time shows there by then."""
    time.sleep(SETTLE_S)
    found = read_lease_file(uri)
    return found is not None and found.run_id == lease.run_id


def _create(uri: str, lease: Lease) -> bool:
    """Create the lease if none exists; False when another one is there (or won the race)."""
    if not store.is_uri(uri):
        return _create_local(store.absolute(uri), lease)
    if store.exists(uri):
        return False
    store.write_bytes(uri, json.dumps(lease.record()).encode())
    return _settled(uri, lease)  # another job writing at the same instant: the last write wins


def _take_over(uri: str, lease: Lease) -> bool:
    """Take the lease at ``uri`` over if it is stale: True when it is ours now, False when it
    changed meanwhile (try again); :class:`LeaseHeld` when a live job holds it.

    The taker writes its record to a new temp file first (its mtime is the store's "now"),
    judges the lease, renames the temp file over it at once (object stores: writes it), then
    waits ``SETTLE_S`` and reads it back: of takers racing, the one whose record is there goes on.
    """
    tmp = _write_temp(uri, lease.run_id, json.dumps(lease.record()).encode())
    try:
        now = _mtime(tmp)  # the store's clock, the one the lease's mtime is on
        current = read_lease_file(uri)
        if current is None:
            return False  # removed meanwhile: create it
        if not is_stale(current, now):
            raise LeaseHeld(uri, current.record, now - current.mtime)
        _put(tmp, uri)
        tmp = None
    finally:
        if tmp is not None:
            _remove(tmp)
    if not _settled(uri, lease):
        return False
    log.warning("took over the stale lease %s of %s (last written %.0f s before)",
                uri, _describe(current.record), now - current.mtime)
    return True


def acquire(uri: str, what: str) -> Lease:
    """Take the lease at ``uri`` for a job described by ``what`` ("score", "prepare" ...).

    Raises :class:`LeaseHeld` naming the other job when a live one holds it; takes over (and
    logs) a stale one.
    """
    lease = Lease(uri, what)
    for _ in range(3):  # the lease changed under us (removed, or taken by another taker): look again
        if _create(uri, lease) or _take_over(uri, lease):
            lease._start()
            return lease
    current = read_lease_file(uri)
    raise LeaseHeld(uri, current.record if current else None,
                    time.time() - current.mtime if current else None)
