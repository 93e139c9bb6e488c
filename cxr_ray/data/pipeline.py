"""Ray Data pipelines from the prepared cache to model-input batches.

Each split is a Ray Dataset with columns ``image`` (uint8 ``(1, N, N)``), ``label``
(float32) and ``key`` (int64; stable per-image id), plus ``path`` and ``patient`` when asked
for. Images stay uint8 through Ray's object store (4x smaller than float); augmentation and
normalisation happen batched in :class:`cxr_ray.data.transforms.Collate` on the consuming
worker (in Ray Data's prefetch threads on GPU, in the training thread on CPU).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from cxr_ray.data.cache import PreparedCache
from cxr_ray.data.catalog import SPLITS
from cxr_ray.data.images import pixels_to_array, to_model_size
from cxr_ray.data.preprocessing import Preprocessing
from cxr_ray.data.transforms import Collate
from cxr_ray.errors import DataError

try:  # Ray >= 2.47 wants collate functions to declare their input format
    from ray.data.collate_fn import NumpyBatchCollateFn as _NumpyCollateBase
except ImportError:  # pragma: no cover - older Ray
    _NumpyCollateBase = object


class TorchCollate(Collate, _NumpyCollateBase):
    """:class:`~cxr_ray.data.transforms.Collate` as a Ray Data ``collate_fn`` for numpy batches."""


def to_model_batch(batch: dict[str, Any], cache_size: int, image_size: int,
                   with_paths: bool = False) -> dict[str, np.ndarray]:
    """Ray Data UDF: cache rows -> ``{"image", "label", "key"[, "path", "patient"]}`` (see module doc)."""
    images = to_model_size(pixels_to_array(batch["pixels"], cache_size), image_size)
    out = {
        "image": images,
        "label": np.asarray(batch["label"], dtype=np.float32),
        "key": np.asarray(batch["key"], dtype=np.int64),
    }
    if with_paths:
        out["path"] = np.asarray(batch["path"], dtype=object)
        out["patient"] = np.asarray(batch["patient"], dtype=object)
    return out


def check_cache_size(cache: PreparedCache, contract: Preprocessing, whose: str) -> None:
    """:class:`DataError` when ``cache`` was not decoded at the cache size ``contract`` (``whose``
    preprocessing) decodes at: its images would differ from the ones the model sees elsewhere."""
    if cache.size != contract.cache_size:
        raise DataError(f"cache {cache.uri} holds {cache.size} px images; {whose} decodes at "
                        f"{contract.cache_size} px ({contract.describe()})")


def split_dataset(cache: PreparedCache, split: str, image_size: int, with_paths: bool = False,
                  batch_size: int = 256):
    """Ray Dataset of one split's decodable images, ready for ``iter_torch_batches``."""
    import ray

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if sum(cache.split_counts(split)) == 0:
        raise DataError(f"cache {cache.uri!r} has no {split!r} images")
    from ray.data.expressions import col

    columns = ["pixels", "label", "key", "split", "error"] + (["path", "patient"] if with_paths else [])
    ds = ray.data.read_parquet(cache.data_uri).select_columns(columns)
    ds = ds.filter(expr=(col("split") == split) & col("error").is_null())  # pushed into the read
    return ds.map_batches(
        to_model_batch,
        fn_kwargs={"cache_size": cache.size, "image_size": image_size, "with_paths": with_paths},
        batch_size=batch_size, batch_format="numpy")


def split_datasets(cache: PreparedCache, image_size: int, splits: tuple[str, ...] = ("train", "val"),
                   materialize_gb: float = 0.0, shuffle_seed: int | None = None) -> dict[str, Any]:
    """``{split: Dataset}`` for the requested splits (e.g. the ``datasets`` of a TorchTrainer).

    A split whose model-size pixels fit in ``materialize_gb`` is materialised once in Ray's
    object store: later epochs stream its blocks instead of re-reading Parquet (augmentation
    happens after, per batch, so every epoch still sees new random transforms). With
    ``shuffle_seed`` the ``train`` split's blocks come in a new seeded order every epoch
    (see :func:`epoch_batches` for the rest of the shuffle). Other splits keep ``path`` and
    ``patient`` (for patient-level CIs and threshold rules).
    """
    out = {}
    for s in splits:
        ds = split_dataset(cache, s, image_size, with_paths=s != "train")  # evaluation keeps patients
        if sum(cache.split_counts(s)) * image_size**2 <= materialize_gb * 1e9:
            ds = ds.materialize()
        if s == "train" and shuffle_seed is not None:
            ds = ds.randomize_block_order(seed=_per_epoch_seed(shuffle_seed))
        out[s] = ds
    return out


def _per_epoch_seed(seed: int) -> Any:
    """A Ray Data seed that gives each execution (epoch) its own, reproducible order."""
    try:
        from ray.data import RandomSeedConfig  # Ray >= 2.5x: seed + execution index
    except ImportError:  # pragma: no cover - older Ray: a fixed seed repeats the order; use none
        return None
    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


# Rows held by the training iterator's local shuffle buffer. The cache is written in a seeded
# random order and block order changes per epoch; this buffer then mixes ~SHUFFLE_BUFFER rows
# across blocks. Measured in benchmarks/RESULTS.md ("Shuffling").
SHUFFLE_BUFFER = 1024


def epoch_batches(data: Any, batch_size: int, collate: Any, shuffle_seed: int | None = None,
                  epoch: int = 0, prefetch_batches: int = 2):
    """One epoch of ``(x, y)`` batches from a Ray Dataset or a Train shard (``DataIterator``).

    With ``shuffle_seed`` (training) rows pass a local shuffle buffer seeded by
    ``(shuffle_seed, epoch)``, so batches mix classes and differ between epochs; evaluation
    passes None and reads every row once, in order.
    """
    shuffle = shuffle_seed is not None
    return data.iter_torch_batches(
        batch_size=batch_size, collate_fn=collate, prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=max(SHUFFLE_BUFFER, 2 * batch_size) if shuffle else None,
        local_shuffle_seed=(shuffle_seed * 1_000_003 + epoch) % 2**32 if shuffle else None)


def collated_keeping(batches: Iterable[Mapping[str, Any]], collate: Any, columns: tuple[str, ...],
                     kept: dict[str, list]) -> Iterator[Any]:
    """``collate(batch)`` for each numpy batch, appending its ``columns`` (e.g. ``path``,
    ``patient``) to ``kept[column]`` in the same order: predictions stay aligned with them."""
    for batch in batches:
        for c in columns:
            kept.setdefault(c, []).extend(np.asarray(batch[c]).tolist())
        yield collate(batch)
