"""The decode-once cache: every image decoded once, in parallel on Ray Data, into Parquet.

A prepared cache is a folder (local or URI)::

    <cache_dir>/<dataset>-<size>px-<fingerprint>/
        data/*.parquet   one row per image (schema: CACHE_SCHEMA_DOC)
        meta.json        written last: counts, bad files, duplicates, settings

``meta.json`` is the commit marker: a folder without it is an interrupted build and is
rebuilt. A local cache is built in a temporary sibling folder and renamed into place whole;
``<name>.lease`` beside it names the job building it (see ``cxr_ray.storage.lease``).
The fingerprint covers the file list (path, size, mtime; manifests' files too), labels,
splits, the split/patient algorithm and the decode settings, so a changed dataset or size
gets a new cache and an unchanged one is reused: training epochs and tuning trials never
decode a JPEG again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxr_ray.cluster import check_shared_paths, watchdog
from cxr_ray.config import ExperimentConfig
from cxr_ray.data.catalog import CLASSES, SPLIT_ALGORITHM, assign_splits, load_catalog, split_leaks
from cxr_ray.data.decode import decode_path
from cxr_ray.data.preprocessing import Preprocessing, resolve_preprocessing
from cxr_ray.errors import DataError
from cxr_ray.storage import uri as store
from cxr_ray.storage.lease import Lease, LeaseHeld, LeaseLost, acquire

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the decode output, schema or row order changes
CACHE_SCHEMA_DOC = """\
path str | label int64 (0 NORMAL, 1 PNEUMONIA) | patient str | split str | source_split str |
key int64 (crc32 of path) | width int64, height int64 (original size) | sha1 str (file bytes) |
pixels binary (size*size uint8, row-major; empty when error) | error str (null when decoded)"""
META_COLUMNS = ["path", "label", "patient", "split", "width", "height", "sha1", "error"]
# One explicit schema for every part: a part in which every image decoded would otherwise get a
# null-typed ``error`` column, and reading the parts together then fails (string vs null).
CACHE_SCHEMA = pa.schema([
    ("path", pa.string()), ("label", pa.int64()), ("patient", pa.string()), ("split", pa.string()),
    ("source_split", pa.string()), ("key", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
    ("sha1", pa.string()), ("pixels", pa.binary()), ("error", pa.string()),
])


@dataclass(frozen=True)
class PreparedCache:
    """A finished cache: where it is and what its ``meta.json`` says."""

    uri: str
    meta: dict[str, Any]

    @property
    def data_uri(self) -> str:
        """Folder of the Parquet files."""
        return store.join(self.uri, "data")

    @property
    def size(self) -> int:
        """Side of the cached square images."""
        return int(self.meta["size"])

    def split_counts(self, split: str) -> tuple[int, int]:
        """(normal, pneumonia) decodable images in ``split``."""
        c = self.meta["counts"].get(split, {})
        return int(c.get(CLASSES[0], 0)), int(c.get(CLASSES[1], 0))


def fingerprint(catalog: pd.DataFrame, cfg: ExperimentConfig, size: int) -> str:
    """Hash of the inputs and settings that determine the content of the cache at side ``size``."""
    h = hashlib.sha256()
    settings = {"format": CACHE_FORMAT, "size": size,
                "val_split": cfg.data.val_split, "val_fraction": cfg.data.val_fraction,
                "seed": cfg.data.seed, "split_algorithm": SPLIT_ALGORITHM}
    h.update(json.dumps(settings, sort_keys=True).encode())
    cols = ["path", "label", "patient", "source_split", "split", "size_bytes", "mtime_ns"]
    h.update(pd.util.hash_pandas_object(catalog[cols], index=False).values.tobytes())
    return h.hexdigest()[:16]


def cache_uri(catalog_root: str, cfg: ExperimentConfig, fp: str, size: int) -> str:
    """Cache folder for a dataset root, size and fingerprint."""
    name = (catalog_root.rstrip("/").rsplit("/", 1)[-1] or "dataset").replace(".", "_")
    return store.join(cfg.data.resolved_cache_dir, f"{name}-{size}px-{fp}")


def decode_batch(batch: pd.DataFrame, size: int, max_pixels: int, timeout_s: float, max_file_mb: float
                 ) -> pa.Table:
    """Ray Data UDF: catalog rows -> cache rows (``CACHE_SCHEMA``; see ``CACHE_SCHEMA_DOC``).

    A file that the listing refused (its ``error``), or that cannot be read or decoded for
    any reason, gets ``error`` set and empty ``pixels`` (``decode.decode_path``); nothing is
    dropped, so every input is accounted for.
    """
    listed = batch["error"] if "error" in batch else pd.Series("", index=batch.index)
    decoded = [decode_path(p, size, max_pixels, timeout_s, err, max_file_mb) for p, err in zip(batch["path"], listed)]
    result = batch[["path", "label", "patient", "split", "source_split"]].reset_index(drop=True)
    result["key"] = [zlib.crc32(p.encode("utf-8", "surrogateescape")) for p in result["path"]]
    result["width"] = [d.width for d in decoded]
    result["height"] = [d.height for d in decoded]
    result["sha1"] = [d.sha1 for d in decoded]
    result["pixels"] = [b"" if d.error else d.pixels.tobytes() for d in decoded]
    result["error"] = pd.Series([d.error for d in decoded], dtype=object)
    return pa.Table.from_pandas(result, schema=CACHE_SCHEMA, preserve_index=False)


def _read_meta(uri: str) -> dict[str, Any] | None:
    path = store.join(uri, "meta.json")
    return json.loads(store.read_bytes(path)) if store.exists(path) else None


def _delete(uri: str) -> None:
    fs, p = store.resolve(uri)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def summarize_cache(uri: str, size: int, fp: str, root: str) -> dict[str, Any]:
    """Read the cache's metadata columns (not pixels) and build ``meta.json``'s content."""
    fs, p = store.resolve(store.join(uri, "data"))
    df = pq.read_table(p, columns=META_COLUMNS, filesystem=fs).to_pandas()
    bad = df[df["error"].notna()]
    good = df[df["error"].isna()]
    counts = {s: {CLASSES[int(k)]: int(v) for k, v in g["label"].value_counts().items()}
              for s, g in good.groupby("split")}
    dup_groups = good[good.duplicated("sha1", keep=False)].groupby("sha1")
    duplicates = [{"paths": sorted(g["path"]), "splits": sorted(set(g["split"]))} for _, g in dup_groups]
    return {
        "format": CACHE_FORMAT, "fingerprint": fp, "root": root, "size": size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_images": int(len(df)), "n_bad": int(len(bad)), "counts": counts,
        "patients": {s: int(g["patient"].nunique()) for s, g in good.groupby("split")},
        "bad_files": [{"path": r.path, "error": r.error} for r in bad.itertuples()],
        "duplicates": duplicates,
        "cross_split_duplicates": [d for d in duplicates if len(d["splits"]) > 1],
        "split_leaks": split_leaks(good),
        "original_size": {
            k: {"min": int(good[k].min()), "median": float(good[k].median()), "max": int(good[k].max())}
            for k in ("width", "height")} if len(good) else {},
    }


def prepare_cache(cfg: ExperimentConfig, catalog: pd.DataFrame | None = None,
                  preprocessing: Preprocessing | None = None, training: bool = True) -> PreparedCache:
    """Build (or reuse) the decode-once cache for ``cfg.data.root`` at the cache size of the
    ``preprocessing`` contract (default: resolved from ``cfg``; a checkpoint passes its own);
    starts Ray if needed. ``training=False``: a dataset without training images is fine
    (evaluation and calibration on a labelled sample, see ``catalog.assign_splits``).

    Raises :class:`DataError` before any decoding for a malformed dataset, and after it
    when more than ``data.max_bad_fraction`` of the images cannot be decoded (the bad files
    and reasons are listed; the half-built cache is removed). One job builds a given cache
    at a time (a lease beside it); another job that needs it meanwhile waits, then reuses it.
    """
    root = cfg.data.root
    if catalog is None:
        catalog = assign_splits(load_catalog(root), cfg.data, training=training)
    size = (preprocessing or resolve_preprocessing(cfg)).cache_size
    fp = fingerprint(catalog, cfg, size)
    uri = cache_uri(root, cfg, fp, size)
    meta = _read_meta(uri)
    if meta is None:
        with _build_lease(uri) as lease:
            meta = _read_meta(uri)  # built by the job we waited for
            if meta is None:
                meta = _build(cfg, catalog, uri, fp, lease, size)
                return PreparedCache(uri, meta)
    log.info("[prepare] reusing cache %s (%d images)", uri, meta["n_images"])
    return PreparedCache(uri, meta)


def _build_lease(uri: str, poll_s: float = 2.0) -> Lease:
    """The build lease of cache ``uri``; while another live job holds it, wait (its cache may
    be ready when it ends)."""
    announced = False
    while True:
        try:
            return acquire(uri.rstrip("/") + ".lease", "prepare")
        except LeaseHeld as e:
            if not announced:
                log.info("[prepare] waiting: %s (building this cache)", e)
                announced = True
            time.sleep(poll_s)


def _build(cfg: ExperimentConfig, catalog: pd.DataFrame, uri: str, fp: str, lease: Lease, size: int
           ) -> dict[str, Any]:
    """Decode every image at side ``size`` into the cache at ``uri`` (the caller holds ``lease``); its meta.

    Local caches are built in ``<uri>.tmp-<run>`` and renamed into place once meta.json is
    written, so no reader ever sees a half-built folder; on object stores (no folder rename)
    the parts are written in place and meta.json, written last, is the commit marker.
    """
    import ray


    # Decode tasks on any node read the images and write the cache: both must be shared.
    check_shared_paths({"data.root": catalog["path"].iat[0], "data.cache_dir": cfg.data.resolved_cache_dir})
    local = not store.is_uri(uri)
    if local:
        uri = store.resolve(uri)[1]  # absolute, ~ expanded: os.rename below sees what pyarrow wrote
        for old in glob.glob(glob.escape(uri) + ".tmp-*"):  # interrupted builds (we hold the lease)
            shutil.rmtree(old, ignore_errors=True)
    build = f"{uri}.tmp-{lease.run_id}" if local else uri
    _delete(uri)  # an interrupted build leaves data without meta.json
    log.info("[prepare] decoding %d images at %dpx into %s", len(catalog), size, uri)
    # Rows are written in a seeded random order, so every block (and so every training batch
    # read from it) mixes the classes; a path-sorted cache would hold one class per block.
    catalog = catalog.sample(frac=1.0, random_state=cfg.data.seed, ignore_index=True)
    n_blocks = max(1, min(len(catalog) // 64, 512))
    bounds = np.linspace(0, len(catalog), n_blocks + 1).astype(int)
    parts = [catalog.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    ds = ray.data.from_pandas(parts).map_batches(
        decode_batch, batch_format="pandas", batch_size=64,
        fn_kwargs={"size": size, "max_pixels": cfg.data.max_pixels, "timeout_s": cfg.data.read_timeout_s,
                   "max_file_mb": cfg.data.max_file_mb})
    try:
        # progress: the part files the write has made so far
        with watchdog("prepare", cfg.data.stall_timeout_s, probe=lambda: store.count_files(store.join(build, "data"))):
            ds.write_parquet(store.join(build, "data"))
        meta = summarize_cache(build, size, fp, cfg.data.root)
        if meta["n_bad"] > cfg.data.max_bad_fraction * meta["n_images"]:
            listing = "\n".join(f"  {b['path']}: {b['error']}" for b in meta["bad_files"][:50])
            raise DataError(
                f"{meta['n_bad']} of {meta['n_images']} images could not be decoded, more than "
                f"data.max_bad_fraction={cfg.data.max_bad_fraction}:\n{listing}")
        lease.check()  # commit (meta.json, then the rename) only while the lease is still ours
        store.write_bytes(store.join(build, "meta.json"), json.dumps(meta, indent=1).encode())
        if local:
            os.rename(build, uri)  # atomic: the cache appears whole, meta.json included
    except BaseException as e:
        if local or not isinstance(e, LeaseLost):  # in place: the folder is the new holder's now
            _delete(build)
        raise
    return meta


def open_cache(uri: str) -> PreparedCache:
    """Open a finished cache folder; :class:`DataError` when it is missing or unfinished."""
    meta = _read_meta(uri)
    if meta is None:
        raise DataError(f"{uri!r} is not a finished cxr_ray cache (no meta.json); run cxr-ray prepare")
    return PreparedCache(uri, meta)


def format_dataset_report(meta: dict[str, Any]) -> str:
    """Human-readable dataset report from a cache's ``meta.json``."""
    lines = [f"dataset {meta['root']}  (cache {meta['size']}px, fingerprint {meta['fingerprint']})",
             f"{'split':<8}{'NORMAL':>8}{'PNEUMONIA':>11}{'patients':>10}"]
    for split, counts in meta["counts"].items():
        lines.append(f"{split:<8}{counts.get('NORMAL', 0):>8}{counts.get('PNEUMONIA', 0):>11}"
                     f"{meta['patients'].get(split, 0):>10}")
    for dim, s in meta.get("original_size", {}).items():
        lines.append(f"original {dim}: min {s['min']}, median {s['median']:.0f}, max {s['max']}")
    problems = [f"unreadable: {b['path']}: {b['error']}" for b in meta["bad_files"]]
    problems += [f"byte-identical files across splits {d['splits']}: {d['paths']}"
                 for d in meta["cross_split_duplicates"]]
    problems += [f"patient leak: {leak}" for leak in meta["split_leaks"]]
    within = len(meta["duplicates"]) - len(meta["cross_split_duplicates"])
    if within:
        problems.append(f"{within} group(s) of byte-identical files within one split (kept)")
    lines.append(f"problems: {len(problems) or 'none'}")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
