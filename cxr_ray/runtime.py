"""Starting or joining Ray: the one place the entry points call ``ray.init``."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start local Ray.

    ``address="auto"`` joins the cluster running on this node (as ``ray submit`` does).
    Does nothing when Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard serves the state API that Ray Train uses to clean up after stopped trials.
        ray.init(num_cpus=num_cpus, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
