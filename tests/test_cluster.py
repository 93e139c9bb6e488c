"""Cluster checks on a real local Ray: the per-node file probe and the shared-storage rule."""

import pytest

from cxr_ray import cluster
from cxr_ray.cluster import check_shared_paths, nodes_missing
from cxr_ray.errors import ClusterError


def test_probe_runs_on_every_node(ray_local, tmp_path):
    (tmp_path / "f").write_text("x")
    node = ray_local.get_runtime_context().get_node_id()
    assert nodes_missing(str(tmp_path / "f")) == []
    assert nodes_missing(str(tmp_path / "absent")) == [node]


def test_node_local_storage_on_many_nodes_fails_before_work(ray_local, tmp_path, monkeypatch):
    check_shared_paths({"train.storage_path": str(tmp_path / "runs")})  # one node: any folder will do
    two = [{"NodeID": "a" * 56, "Alive": True}, {"NodeID": "b" * 56, "Alive": True}]
    monkeypatch.setattr(cluster, "alive_nodes", lambda: two)
    check_shared_paths({"train.storage_path": "s3://bucket/runs"})  # URIs are shared by construction
    # Pretend node b has its own disk: the probe (tested above) reports it.
    monkeypatch.setattr(cluster, "nodes_missing", lambda path: ["b" * 56])
    with pytest.raises(ClusterError, match=r"train.storage_path='.*runs' is node-local.*2 nodes.*s3://"):
        check_shared_paths({"train.storage_path": str(tmp_path / "runs")})
    assert not list((tmp_path / "runs").iterdir())  # the marker file is cleaned up


def test_a_ray_the_session_did_not_start_is_never_stopped(monkeypatch):
    """Tests that stop every local Ray (the two-node cluster, the S3 kill-and-resume runs) skip
    while a Ray that was running before the test session is still alive."""
    import os

    import helpers

    monkeypatch.setattr(helpers, "FOREIGN_RAY", {os.getpid(): "raylet"})  # alive: "a user's Ray"
    with pytest.raises(pytest.skip.Exception, match="did not start is running on this host"):
        helpers.require_no_foreign_ray()
    monkeypatch.setattr(helpers, "FOREIGN_RAY", {2**22 + 12345: "raylet"})  # gone: nothing to protect
    helpers.require_no_foreign_ray()


def test_ray_log_lines_go_to_the_driver_log_not_the_console(tmp_path, capsys):
    """Ray's driver-side records are held from before ray.init and written to one file; the
    console keeps errors only; a second start replaces the first file handler, never adds one."""
    import logging.handlers

    from cxr_ray.cluster import _ray_loggers, hold_ray_console_logs, write_ray_logs_to

    for run in ("first", "second"):
        held = hold_ray_console_logs()
        logging.getLogger("ray").warning("token notice %s", run)
        logging.getLogger("ray.data").info("Starting execution %s", run)
        (tmp_path / run).mkdir()
        write_ray_logs_to(str(tmp_path / run), held)
        logging.getLogger("ray.data").info("after the start %s", run)
        text = next((tmp_path / run).glob("cxr_ray-driver-*.log")).read_text()
        assert all(f"{m} {run}" in text for m in ("token notice", "Starting execution", "after the start")), text
    assert "token notice" not in capsys.readouterr().err
    for logger in _ray_loggers():
        drivers = [h for h in logger.handlers if getattr(h, "cxr_ray_driver_log", False)]
        assert len(drivers) == 1 and str(tmp_path / "second") in drivers[0].baseFilename
        assert not any(isinstance(h, logging.handlers.MemoryHandler) for h in logger.handlers)
        consoles = [h for h in logger.handlers if type(h).__name__ == "PlainRayHandler"]  # Ray's console one
        assert all(h.level == logging.ERROR for h in consoles), [(h, h.level) for h in logger.handlers]
        for h in drivers:  # leave the process's loggers as Ray had them, but for the levels
            logger.removeHandler(h)
            h.close()
