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
