"""Starting or joining Ray, and cluster checks: the one place the entry points call ``ray.init``."""

from __future__ import annotations

import logging
import math
import os
import uuid

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The Ray cluster cannot run the job as configured (e.g. node-local storage on many nodes)."""


def init_ray(address: str | None = None) -> None:
    """Join the cluster the user meant, or start a Ray private to this command.

    Ray's own discovery, in order: ``address`` (``--address``), ``$RAY_ADDRESS`` (set inside a
    Ray Job), the cluster last started on this node with ``ray start`` (a node of ``ray up``,
    where ``ray submit`` runs the script); else a new local Ray that ends with this command.
    Never ``address="auto"``: that joins *any* Ray on the machine, including another
    cxr-ray command's private one, which has no CPUs to spare and shuts down under us.
    Does nothing when Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Ray runs its workers at niceness 15 by default, so on a laptop every wake-up of Ray's own
    # daemons preempts the training threads (measured: Ray Train at ~0.77x a plain loop instead
    # of ~0.9x on 2 cores). Read only by a Ray that this process starts; a joined cluster keeps
    # its own setting.
    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs = {"log_to_driver": True, "runtime_env": worker_env()}
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
    log.info("Ray at %s", ray.get_runtime_context().gcs_address)
    ray.data.DataContext.get_current().enable_progress_bars = True


def worker_env() -> dict | None:
    """The job's runtime env: the S3 endpoint of this process (``AWS_ENDPOINT_URL``, set by the
    user or by ``storage.endpoint_url``) for every Ray worker, so Ray Train's checkpoint uploads,
    Ray Data's reads and the scoring actors reach the same store on every node. Credentials are
    not copied: each node uses its own environment or instance role."""
    from cxr_ray.data.io import ENDPOINT_ENV

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
    from cxr_ray.data import io

    local = {k: v for k, v in paths.items() if v and not io.is_uri(v)}
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
