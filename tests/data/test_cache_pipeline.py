"""The decode-once cache and the Ray Data pipelines, on a real local Ray."""

import os
import shutil

import numpy as np
import pytest
import torch
from helpers import write_image

from cxr_ray.config import ExperimentConfig
from cxr_ray.data.cache import prepare_cache
from cxr_ray.data.pipeline import TorchCollate, epoch_batches, split_dataset
from cxr_ray.data.preprocessing import Preprocessing
from cxr_ray.errors import DataError


def _cfg(root, cache_dir, **over):
    base = {"data.root": str(root), "data.cache_dir": cache_dir, "data.image_size": 48}
    return ExperimentConfig().replace(**{**base, **over})


@pytest.fixture
def dataset(tmp_path, synthetic_root):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.mark.slow
def test_cache_reuse_and_invalidation(ray_local, dataset, cache_dir):
    first = prepare_cache(_cfg(dataset, cache_dir))
    assert first.meta["n_bad"] == 0 and first.size == 48
    assert sum(first.split_counts("train")) + sum(first.split_counts("val")) + sum(
        first.split_counts("test")) == first.meta["n_images"]
    mtime = os.path.getmtime(os.path.join(first.uri, "meta.json"))
    again = prepare_cache(_cfg(dataset, cache_dir))
    assert again.uri == first.uri and os.path.getmtime(os.path.join(again.uri, "meta.json")) == mtime
    resized = prepare_cache(_cfg(dataset, cache_dir, **{"data.image_size": 32}))
    assert resized.uri != first.uri and resized.size == 32
    victim = next((dataset / "train" / "NORMAL").iterdir())
    victim.unlink()
    changed = prepare_cache(_cfg(dataset, cache_dir))
    assert changed.uri != first.uri and changed.meta["n_images"] == first.meta["n_images"] - 1


@pytest.mark.slow
def test_interrupted_build_is_rebuilt(ray_local, dataset, cache_dir):
    cache = prepare_cache(_cfg(dataset, cache_dir))
    os.remove(os.path.join(cache.uri, "meta.json"))  # as if the job died before committing
    rebuilt = prepare_cache(_cfg(dataset, cache_dir))
    assert rebuilt.uri == cache.uri and rebuilt.meta["n_images"] == cache.meta["n_images"]


@pytest.mark.slow
def test_bad_files_listed_and_skipped(ray_local, dataset, cache_dir):
    bad = {
        dataset / "train" / "PNEUMONIA" / "person9001_virus_1.jpeg": b"",
        dataset / "train" / "NORMAL" / "IM-9001-0001.jpeg": b"not an image",
    }
    good = next((dataset / "train" / "NORMAL").glob("*.jpeg")).read_bytes()
    bad[dataset / "train" / "NORMAL" / "IM-9002-0001.jpeg"] = good[: len(good) // 4]
    for path, data in bad.items():
        path.write_bytes(data)
    with pytest.raises(DataError, match=r"3 of \d+ images could not be decoded") as e:
        prepare_cache(_cfg(dataset, cache_dir))
    assert "IM-9001-0001.jpeg" in str(e.value)
    cache = prepare_cache(_cfg(dataset, cache_dir, **{"data.max_bad_fraction": 0.05}))
    assert {b["path"] for b in cache.meta["bad_files"]} == {str(p) for p in bad}
    assert all(b["error"] for b in cache.meta["bad_files"])
    keys = [batch["key"] for batch in split_dataset(cache, "train", 48).iter_batches(batch_format="numpy")]
    n_train = sum(cache.split_counts("train"))
    assert sum(len(k) for k in keys) == n_train  # the bad files never reach training


@pytest.mark.slow
def test_pipeline_yields_labelled_model_batches(ray_local, dataset, cache_dir):
    cache = prepare_cache(_cfg(dataset, cache_dir))
    ds = split_dataset(cache, "val", 32, with_paths=True)  # cache 48 px -> model 32 px
    rows = ds.take_all()
    assert len(rows) == sum(cache.split_counts("val"))
    for row in rows:
        assert row["image"].shape == (1, 32, 32) and row["image"].dtype == np.uint8
        assert row["label"] == (1.0 if "/PNEUMONIA/" in row["path"] else 0.0)
    xs, ys = [], []
    collate = TorchCollate(Preprocessing(32, 32, "per_image"), "cpu")
    for x, y in ds.iter_torch_batches(batch_size=16, collate_fn=collate):
        xs.append(x)
        ys.append(y)
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 32, 32)
    assert -3 < float(x.mean()) < 3 and torch.cat(ys).sum() == sum(r["label"] for r in rows)


def test_unknown_split_rejected(ray_local, dataset, cache_dir):
    cache = prepare_cache(_cfg(dataset, cache_dir))
    with pytest.raises(DataError, match="unknown split"):
        split_dataset(cache, "holdout", 32)


@pytest.fixture(scope="module")
def skewed_root(tmp_path_factory):
    """166 NORMAL and 474 PNEUMONIA training images (26/74, as in the real train split), one per patient."""
    root = tmp_path_factory.mktemp("skewed")
    for i in range(166):
        write_image(root / "train" / "NORMAL" / f"IM-{i:04d}-0001.png", 16, 40 + i % 50)
    for i in range(474):
        write_image(root / "train" / "PNEUMONIA" / f"person{i}_virus_{i}.png", 16, 120 + i % 50)
    for i in range(4):
        write_image(root / "val" / "NORMAL" / f"IM-{900 + i}-0001.png", 16, 60)
        write_image(root / "val" / "PNEUMONIA" / f"person{900 + i}_virus_1.png", 16, 150)
    return root


def _epochs_of_labels(cfg, cache, epochs=2):
    """Label sequences of each epoch's training batches, read exactly as a training worker reads them."""
    from cxr_ray.training.train import training_inputs

    train = training_inputs(cfg, cache).datasets["train"]
    return [[batch[1].tolist() for batch in epoch_batches(train, 32, lambda b: (b["key"], b["label"]),
                                                          shuffle_seed=cfg.train.seed, epoch=e)]
            for e in range(epochs)]


@pytest.mark.slow
def test_training_batches_mix_classes_and_reshuffle_every_epoch(ray_local, skewed_root, cache_dir):
    cfg = _cfg(skewed_root, cache_dir, **{"data.image_size": 16, "data.val_split": "official"})
    cache = prepare_cache(cfg)
    epochs = _epochs_of_labels(cfg, cache)
    for batches in epochs:
        assert sum(len(b) for b in batches) == 640
        mixed = np.mean([0 < sum(b) < len(b) for b in batches])
        assert mixed >= 0.8, f"only {mixed:.0%} of batches hold both classes"
        labels = np.concatenate(batches)
        first, second = labels[:320].mean(), labels[320:].mean()
        assert abs(first - second) < 0.10, (first, second)
    assert epochs[0] != epochs[1]  # a new order every epoch
    assert _epochs_of_labels(cfg, cache) == epochs  # reproducible under train.seed
    assert _epochs_of_labels(cfg.replace(**{"train.seed": 1}), cache) != epochs
