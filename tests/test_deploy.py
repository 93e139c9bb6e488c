"""Cluster definitions pass Ray's own cluster-config validation (no cloud calls); the RayJob
manifest has what KubeRay requires; no file carries credentials."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
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
