"""Shared fixtures: a real local Ray (2 CPUs), synthetic datasets, the shared real images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr-kaggle-224-dev"


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
