"""Cluster definitions pass Ray's own cluster-config validation (no cloud calls); the RayJob
manifest has what KubeRay requires; no file carries credentials; the clusters are safe by default
(dashboard on localhost, token authentication, no core dumps)."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from helpers import ROOT  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config

LAUNCHER_CONFIGS = ["cluster.yaml", "deploy/gcp.yaml", "deploy/onprem.yaml"]
SECRET = re.compile(r"(aws_secret_access_key|aws_access_key_id|BEGIN [A-Z ]*PRIVATE KEY|"
                    r"private_key_id|AKIA[0-9A-Z]{16}|password\s*:)", re.IGNORECASE)


def _load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(rel):
    raw = _load(rel)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    prepared = prepare_config(raw)  # what `ray up` does before any cloud call
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert any("pip install" in c and "cxr-ray" in c for c in raw["setup_commands"])
    assert "." in raw["file_mounts"].values()  # this checkout, i.e. the same revision
    # found by deploy/loopback_check.sh: ~/cxr_ray beside the submitted script shadowed the package
    assert all(Path(target).name != "cxr_ray" for target in raw["file_mounts"])


@pytest.mark.parametrize("rel", ["cluster.yaml", "deploy/gcp.yaml"])
def test_cloud_configs_have_cpu_head_and_single_and_multi_gpu_workers(rel):
    types = _load(rel)["available_node_types"]
    assert {"head_cpu", "gpu_1x", "gpu_4x"} <= set(types)
    for name in ("gpu_1x", "gpu_4x"):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1


def test_onprem_config_uses_local_provider_with_ips():
    provider = _load("deploy/onprem.yaml")["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]


def test_rayjob_manifest_has_what_kuberay_requires():
    job = _load("deploy/kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert "experiments/tune.py" in spec["entrypoint"]
    assert (ROOT / "experiments" / "tune.py").is_file()
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize("rel", [*LAUNCHER_CONFIGS, "deploy/kuberay-rayjob.yaml", "deploy/Dockerfile"])
def test_no_credentials_in_deploy_files(rel):
    assert not SECRET.search((ROOT / rel).read_text())


CORE_UNLIMITED = re.compile(r"ulimit\s+-c\s+unlimited|--ulimit[ =]core=(-1|unlimited)", re.IGNORECASE)


def _start_commands(raw: dict) -> list[str]:
    return [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
            if "ray start" in c]


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_binds_dashboard_to_localhost(rel):
    raw = _load(rel)
    # not in a command, not in a commented-out option either
    assert not re.search(r"dashboard[-_]host\W*0\.0\.0\.0", (ROOT / rel).read_text())
    heads = [c for c in raw["head_start_ray_commands"] if "ray start --head" in c]
    assert len(heads) == 1 and "--dashboard-host=127.0.0.1" in heads[0]


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_enables_token_auth(rel):
    raw = _load(rel)
    starts = _start_commands(raw)
    assert len(starts) == 2
    for cmd in starts:  # set on the command itself: the worker start does not infer it from a token file
        assert re.search(r"(export )?RAY_AUTH_MODE=token;? .*ray start", cmd), cmd
    # ... and in ~/.bashrc for `ray submit`'s driver and other Ray commands on the nodes
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in raw["setup_commands"])
    # the same token on every node: the one `ray get-auth-token --generate` wrote on this machine
    mounts = raw["file_mounts"]
    assert mounts.get("/home/ray/.ray/auth_token", mounts.get("~/.ray/auth_token")) == "~/.ray/auth_token"


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_disables_core_dumps(rel):
    for cmd in _start_commands(_load(rel)):
        assert "ulimit -c 0" in cmd, cmd


@pytest.mark.parametrize("rel", [*LAUNCHER_CONFIGS, "deploy/kuberay-rayjob.yaml", "deploy/Dockerfile"])
def test_no_core_dumps_enabled(rel):
    assert not CORE_UNLIMITED.search((ROOT / rel).read_text())


def test_rayjob_dashboard_is_reached_only_by_port_forward():
    text = (ROOT / "deploy/kuberay-rayjob.yaml").read_text()
    assert "kubectl port-forward" in text
    assert "NEVER a LoadBalancer or NodePort" in text
    head = _load("deploy/kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # inside the pod, for the Service
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not re.search(r"\b(LoadBalancer|NodePort)\b", yaml.safe_dump(_load("deploy/kuberay-rayjob.yaml")))
