"""Starting or joining Ray, and cluster checks: the one place the entry points call ``ray.init``."""

from __future__ import annotations

import _thread
import contextlib
import logging
import logging.handlers
import math
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from cxr_ray.errors import ClusterError
from cxr_ray.storage import uri as store
from cxr_ray.storage.uri import ENDPOINT_ENV

log = logging.getLogger(__name__)
T = TypeVar("T")


def init_ray(address: str | None = None) -> None:
    """Join the cluster the user meant, or start a Ray private to this command.

    Ray's own discovery, in order: ``address`` (``--address``), ``$RAY_ADDRESS`` (set inside a
    Ray Job), the cluster last started on this node with ``ray start`` (a node of ``ray up``,
    where ``ray submit`` runs the script); else a new local Ray that ends with this command.
    Never ``address="auto"``: that joins *any* Ray on the machine, including another
    cxr-ray command's private one, which has no CPUs to spare and shuts down under us.
    Does nothing when Ray is already initialised in this process (a caller's own Ray session,
    which :func:`release_ray` then leaves running).
    """
    import ray

    global _CONNECTED_HERE
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Ray runs its workers at niceness 15 by default, so on a laptop every wake-up of Ray's own
    # daemons preempts the training threads (measured: Ray Train at ~0.77x a plain loop instead
    # of ~0.9x on 2 cores). Read only by a Ray that this process starts; a joined cluster keeps
    # its own setting.
    os.environ.setdefault("RAY_worker_niceness", "0")
    held = hold_ray_console_logs()
    # Workers' and actors' own output (Ray Data's deprecation warnings, Ray Train's resource
    # requests, the raylet's notices) stays in the session's log files; errors still reach the
    # driver as exceptions, and cxr_ray's progress comes through its own queue.
    kwargs = {"log_to_driver": False, "runtime_env": worker_env()}
    try:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError) as e:
            if address:
                raise
            # ``ray start`` left a record (/tmp/ray/ray_current_cluster) of a cluster that is gone
            # (killed without ``ray stop``) or refuses us: the user named no cluster, so run locally.
            log.warning("the Ray cluster recorded on this machine by `ray start` cannot be joined (%s); "
                        "starting a local Ray for this command (`ray stop` clears a stale record)",
                        str(e).splitlines()[0][:200])
            ray.shutdown()
            ray.init(address="local", **kwargs)
    finally:  # also when Ray did not start: what Ray said is kept, and nothing stays buffered
        logs = ray_log_dir()
        write_ray_logs_to(logs, held)
    _CONNECTED_HERE = ray.get_runtime_context().gcs_address
    log.info("Ray at %s; Ray's own logs: %s", ray.get_runtime_context().gcs_address, logs)
    ray.data.DataContext.get_current().enable_progress_bars = True


_CONNECTED_HERE = ""  # the GCS address of the Ray that init_ray started or joined, if it did


def release_ray() -> None:
    """Stop (a local Ray) or leave (a joined cluster) the Ray that :func:`init_ray` connected,
    and close its driver log; a Ray session the caller opened itself stays as it is."""
    import ray

    global _CONNECTED_HERE
    if _CONNECTED_HERE and ray.is_initialized() and ray.get_runtime_context().gcs_address == _CONNECTED_HERE:
        ray.shutdown()
        for logger in _ray_loggers():
            _drop_driver_log(logger)
    _CONNECTED_HERE = ""


def _drop_driver_log(logger: logging.Logger) -> None:
    """Remove and close the ``cxr_ray-driver-PID.log`` handler an earlier start put on ``logger``."""
    for handler in [h for h in logger.handlers if getattr(h, "cxr_ray_driver_log", False)]:
        logger.removeHandler(handler)
        handler.close()


def hold_ray_console_logs() -> logging.handlers.MemoryHandler:
    """Take Ray's own driver-side log lines (start-up notices, token messages, Ray Data's
    execution lines, "Progress bars disabled") off the terminal: their console handlers keep
    errors only, and every record goes to the returned buffer until :func:`write_ray_logs_to`
    moves them to a file in Ray's log folder."""
    import ray.data  # noqa: F401  (configures the ray.data logger's handlers)

    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    buffer.setLevel(logging.INFO)  # (Ray Data's DEBUG lines are in its own ray-data.log)
    for logger in _ray_loggers():
        _drop_driver_log(logger)  # an earlier start's file in this process
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
        logger.addHandler(buffer)
    return buffer


def write_ray_logs_to(logs: str, buffer: logging.handlers.MemoryHandler) -> None:
    """Write what ``buffer`` held, and Ray's driver-side log lines from now on, to
    ``<logs>/cxr_ray-driver-<pid>.log``."""
    handler = logging.FileHandler(os.path.join(logs, f"cxr_ray-driver-{os.getpid()}.log"), encoding="utf-8")
    fmt = "%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.setLevel(logging.INFO)
    handler.cxr_ray_driver_log = True
    for logger in _ray_loggers():  # the file first, then the buffer off: no record falls between
        logger.addHandler(handler)
        logger.removeHandler(buffer)
    buffer.setTarget(handler)
    buffer.close()  # flushes what it held to the file


def _ray_loggers() -> list[logging.Logger]:
    """``ray`` and those of its child loggers that Ray gave handlers of their own (they do not
    propagate to ``ray``)."""
    names = ("ray", "ray.data", "ray.train", "ray.tune")
    return [logging.getLogger(n) for n in names if n == "ray" or logging.getLogger(n).handlers]


def ray_log_dir() -> str:
    """Ray's log folder for this driver: the session's ``logs`` folder where it is on this
    machine (a local Ray, or a node of the cluster), else a folder under the temp directory."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None
    logs = node.get_logs_dir_path() if node is not None else ""
    if not logs or not os.path.isdir(logs) or not os.access(logs, os.W_OK):  # (another user's cluster)
        logs = os.path.join(tempfile.gettempdir(), "cxr_ray", "logs")
        os.makedirs(logs, exist_ok=True)
    return logs


def worker_env() -> dict | None:
    """The job's runtime env: the S3 endpoint of this process (``AWS_ENDPOINT_URL``, set by the
    user or by ``storage.endpoint_url``) for every Ray worker, so Ray Train's checkpoint uploads,
    Ray Data's reads and the scoring actors reach the same store on every node. Credentials are
    not copied: each node uses its own environment or instance role."""

    endpoint = os.environ.get(ENDPOINT_ENV)
    return {"env_vars": {ENDPOINT_ENV: endpoint}} if endpoint else None


def cpu_share(reserved: float, shares: int) -> float:
    """CPUs for each of ``shares`` equal consumers of the cluster after ``reserved`` CPUs: never
    more than the largest node has, in quarter CPUs (a tidy number in config.yaml), at least 0.25."""
    import ray

    nodes = [float(n["Resources"].get("CPU", 0)) for n in alive_nodes()]
    free = float(ray.cluster_resources().get("CPU", 0.0)) - reserved
    cpus = min(max(nodes, default=1.0), free / max(1, shares))
    return max(0.25, math.floor(cpus * 4) / 4)


def cluster_cpus() -> float:
    """CPUs in the running Ray cluster (its nodes that are up)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    """GPUs in the running Ray cluster (its nodes that are up; an autoscaler's future ones are not)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def alive_nodes() -> list[dict]:
    """The cluster's alive nodes (``ray.nodes()`` entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def nodes_missing(path: str) -> list[str]:
    """Ids of alive nodes on which the local file ``path`` (present here) does not exist.

    One tiny zero-CPU task pinned to every node checks it, so a shared mount (NFS,
    Lustre ...) passes and a node-local disk fails on every node but this one.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(p: str) -> bool:
        return os.path.isfile(p)

    nodes = [n["NodeID"] for n in alive_nodes()]
    seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                    .remote(path) for node in nodes])
    return [node for node, ok in zip(nodes, seen) if not ok]


def check_shared_paths(paths: dict[str, str]) -> None:
    """On a multi-node cluster, fail when a local path is not the same on every node.

    ``paths`` maps the setting's name (for the message) to a local path or URI: an existing
    file is probed as is, a folder (created if needed) through a marker file written into
    it. URIs (``s3://``, ``gs://`` ...) are shared by construction; one node needs nothing.
    Call it before work that would write on one node and read on another.
    """

    local = {k: v for k, v in paths.items() if v and not store.is_uri(v)}
    if not local or len(alive_nodes()) <= 1:
        return
    for key, path in local.items():
        marker = None
        if not os.path.isfile(path):
            os.makedirs(path, exist_ok=True)
            marker = os.path.join(os.path.abspath(path), f".cxr_ray_shared_check_{uuid.uuid4().hex}")
            with open(marker, "w") as f:
                f.write("cxr_ray")
        try:
            missing = nodes_missing(marker or os.path.abspath(path))
        finally:
            if marker:
                os.remove(marker)
        if missing:
            raise ClusterError(
                f"{key}={path!r} is node-local, but this Ray cluster has {len(alive_nodes())} nodes and "
                f"{len(missing)} of them ({', '.join(m[:12] for m in missing)}) do not see it, so what "
                f"one node writes or reads there would be missing on another. Use a URI every node can "
                f"reach (s3://bucket/..., gs://bucket/...) or a shared mount present on every node.")


# data.stall_timeout_s's default: a Ray Data stage that yields nothing for this long is stuck
DEFAULT_STALL_S = 600.0


class StageStalled(RuntimeError):
    """A Ray Data stage made no progress for its stall timeout; says what it waited for."""


def resources_report() -> str:
    """One line: the cluster's CPUs/GPUs in all and free, and the placement groups holding them."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"{k} {free.get(k, 0.0):g} of {total[k]:g} free" for k in ("CPU", "GPU") if total.get(k)]
    held = []
    for pg_id, info in ray.util.placement_group_table().items():
        if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            cpus = sum(float(b.get("CPU", 0)) for b in info.get("bundles", {}).values())
            held.append(f"{info.get('name') or pg_id[:12]} ({info['state'].lower()}, {cpus:g} CPU)")
    who = f"; placement groups holding them: {', '.join(held)}" if held else "; no placement group holds any"
    return ", ".join(parts) + who


class Progress:
    """What a :func:`watchdog` watches: ``tick()`` on each unit of progress; while ``paused``
    (the consumer works on an item it has), time does not count."""

    def __init__(self) -> None:
        self.last, self.paused = time.monotonic(), False

    def tick(self) -> None:
        self.last = time.monotonic()

    def idle_s(self) -> float:
        if self.paused:
            self.tick()
        return time.monotonic() - self.last


@contextlib.contextmanager
def watchdog(stage: str, stall_s: float = DEFAULT_STALL_S, probe: Callable[[], Any] | None = None
             ) -> Iterator[Progress]:
    """Fail a Ray Data stage that makes no progress for ``stall_s`` seconds, instead of hanging.

    Yields a :class:`Progress` to tick on each unit of progress (a batch received). ``probe``,
    polled every few seconds, is progress too whenever its value changes (e.g. the files a
    write has made). On a stall the driver's main thread is interrupted inside the ``with``
    body and :class:`StageStalled` raised, saying what the stage waited for
    (:func:`resources_report`). Off outside the main thread or with ``stall_s <= 0``.
    """
    progress, fired = Progress(), []
    if stall_s <= 0 or threading.current_thread() is not threading.main_thread():
        yield progress
        return
    stop = threading.Event()
    # interrupt_main raises KeyboardInterrupt only under Python's own SIGINT handler: a job started
    # in the background (`cmd &`) inherits SIGINT ignored, and the watchdog would do nothing there
    sigint = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        seen = _probe(probe)
        while not stop.wait(min(5.0, stall_s / 4)):
            now = _probe(probe)
            if now != seen:
                seen = now
                progress.tick()
            if progress.idle_s() > stall_s:
                try:
                    why = resources_report()
                except Exception as e:  # the report must not hide the stall
                    why = f"(resources unknown: {e})"
                fired.append(f"[{stage}] no progress for {stall_s:g} s (data.stall_timeout_s): {why}")
                _thread.interrupt_main()
                return

    thread = threading.Thread(target=watch, name=f"watchdog-{stage}", daemon=True)
    thread.start()
    try:
        yield progress
    except KeyboardInterrupt:
        if fired:
            raise StageStalled(fired[0]) from None
        raise
    finally:
        stop.set()
        try:
            thread.join()
        except KeyboardInterrupt:  # the watchdog fired just as the stage ended: the stall stands
            if not fired:
                raise
        finally:
            signal.signal(signal.SIGINT, sigint if sigint is not None else signal.SIG_DFL)


def _probe(probe: Callable[[], Any] | None) -> Any:
    try:
        return probe() if probe else None
    except Exception:  # a listing that fails now may work next time; it is no progress either way
        return None


def watched(items: Iterable[T], stage: str, stall_s: float = DEFAULT_STALL_S) -> Iterator[T]:
    """``items`` (e.g. ``ds.iter_batches(...)``) under a :func:`watchdog`: each item is progress,
    and only the wait for the next one counts (not the consumer's work on an item)."""
    with watchdog(stage, stall_s) as progress:
        it = iter(items)
        while True:
            progress.tick()
            try:
                item = next(it)
            except StopIteration:
                return
            progress.paused = True
            try:
                yield item
            finally:
                progress.paused = False


def this_jobs_placement_groups() -> set[str]:
    """Ids of the placement groups this Ray job (driver and every actor it started) created
    that still hold or wait for resources; empty when Ray's state API cannot say."""
    import ray
    from ray.util.state import list_placement_groups

    job = ray.get_runtime_context().get_job_id()
    for attempt in range(5):  # the state API answers once the dashboard is up (seconds after ray.init)
        try:
            mine = list_placement_groups(filters=[("creator_job_id", "=", job)], limit=10_000, detail=False,
                                         raise_on_missing_output=False)
            break
        except Exception as e:  # no dashboard (ray minimal): nothing is released, say so
            if attempt == 4:
                log.warning("cannot list this job's placement groups (%s); none released",
                            str(e).splitlines()[0][:200])
                return set()
            time.sleep(2)
    return {str(p.placement_group_id) for p in mine if str(p.state) in ("CREATED", "PENDING", "RESCHEDULING")}


def release_placement_groups(keep: set[str], stage: str) -> list[str]:
    """Remove this job's placement groups other than ``keep`` (those it held before ``stage``):
    a stage that ended must not leave resources reserved for the next one. Returns the ids removed.
    (Ray Tune can end a trial while its Ray Train worker group's placement group is still being
    created; that group lives until the job ends unless removed.)"""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    removed = []
    for pg_id in sorted(this_jobs_placement_groups() - keep):
        try:
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
        except Exception as e:  # gone meanwhile: must not replace the stage's own result or error
            log.warning("[%s] cannot release placement group %s: %s", stage, pg_id[:12], e)
            continue
        removed.append(pg_id)
    if removed:
        log.warning("[%s] released %d placement group(s) its trials left reserved: %s", stage, len(removed),
                    ", ".join(r[:12] for r in removed))
    return removed
