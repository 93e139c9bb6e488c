"""On the shared real chest X-rays (skipped where absent): counts, labels, and that it learns."""

import pytest

from cxr_ray.config import ExperimentConfig
from cxr_ray.data.cache import prepare_cache
from cxr_ray.data.catalog import load_catalog
from cxr_ray.data.pipeline import TorchCollate, split_dataset

pytestmark = pytest.mark.real_data


def test_counts_match_the_dataset_readme(real_root):
    df = load_catalog(str(real_root))
    counts = df.groupby(["source_split", "label"]).size().to_dict()
    assert counts == {("train", 0): 326, ("train", 1): 975, ("val", 0): 8, ("val", 1): 8}


def _cfg(real_root, tmp_path, **over):
    return ExperimentConfig().replace(**{"data.root": str(real_root), "data.cache_dir": str(tmp_path / "c"),
                                         "data.image_size": 128, **over})


def test_pipeline_yields_correctly_labelled_tensors(ray_local, real_root, tmp_path):
    cache = prepare_cache(_cfg(real_root, tmp_path))
    assert cache.meta["n_bad"] == 0 and cache.meta["split_leaks"] == []
    assert cache.meta["cross_split_duplicates"] == []
    ds = split_dataset(cache, "val", 128, with_paths=True)
    n = 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        x, y = TorchCollate("cpu")(batch)
        assert x.shape[1:] == (1, 128, 128)
        expected = [1.0 if "/PNEUMONIA/" in p else 0.0 for p in batch["path"]]
        assert y.tolist() == expected
        n += len(y)
    assert n == sum(cache.split_counts("val")) > 100  # carved, patient-grouped validation split


@pytest.mark.slow
def test_scratch_cnn_learns_real_pneumonia(ray_local, real_root, tmp_path):
    from cxr_ray.train import run_training

    cfg = _cfg(real_root, tmp_path, **{
        "model.name": "simple_cnn", "model.width": 16, "train.epochs": 3, "train.lr": 0.003,
        "train.num_workers": 1, "train.batch_size": 32, "train.storage_path": str(tmp_path / "runs"),
        "augment.rotation_deg": 5.0})
    result = run_training(cfg, prepare_cache(cfg))
    assert result.error is None
    best = max(m["roc_auc"] for _, m in result.best_checkpoints)
    assert best >= 0.90, result.best_checkpoints
