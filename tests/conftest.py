"""Shared fixtures: a real local Ray (2 CPUs), synthetic datasets, the shared real images, a small
checkpoint. Helper functions live in ``helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import REAL_ROOT, record_foreign_ray


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (~200 images, 64 px) in the Kermany layout."""
    from cxr_ray.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n=200, size=64, seed=0)


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The shared real chest X-rays; tests using it skip cleanly where it is absent."""
    root = Path(os.environ.get("CXR_RAY_REAL_DATA", REAL_ROOT))
    if not (root / "train").is_dir():
        pytest.skip(f"shared real images not found at {root}")
    return root


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster with 2 CPUs, started once per test module."""
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """A small CNN checkpoint whose cache size differs from its input size (two resize steps)."""
    import torch

    from cxr_ray.checkpoint import save_checkpoint
    from cxr_ray.config import ExperimentConfig
    from cxr_ray.models.registry import build_model

    cfg = ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.weights": "none",
                                        "model.width": 8, "data.image_size": 48, "data.cache_size": 80})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # spread the logits so probabilities differ visibly between images
        model.head[-1].weight.mul_(500.0)
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", model, cfg, 0.5, {}, 0))


def pytest_sessionstart(session) -> None:
    """Note any Ray already running here: tests that stop every local Ray skip while it runs."""
    record_foreign_ray()
