"""Scoring's output folder (driver side): schema, atomic part files, the job record, the lease.

``OUT/part-<run>-<seq>.parquet`` are written under ``OUT/_tmp`` and moved into place when
complete; ``_score_job.json``, ``_metrics.json`` and ``_lease.json`` start with ``_``, so
globs of ``*.parquet`` in pandas, pyarrow, Spark and DuckDB ignore them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxr_ray.analysis.metrics import decision_threshold, predicted_classes
from cxr_ray.data.catalog import CLASSES
from cxr_ray.data.listing import UNKNOWN_LABEL, PathSet
from cxr_ray.errors import ScoreError
from cxr_ray.storage import uri as store
from cxr_ray.storage.lease import held_by

OUTPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("prob_pneumonia", pa.float32()),  # null when error
    ("prediction", pa.string()),  # NORMAL / PNEUMONIA at the checkpoint's threshold; null when error
    ("threshold", pa.float32()),
    ("model", pa.string()),  # id of the checkpoint that scored the row
    ("width", pa.int32()),  # original size; null when unreadable
    ("height", pa.int32()),
    ("error", pa.string()),  # null when scored
    ("scored_at", pa.timestamp("us", tz="UTC")),
])
LABEL_FIELD = pa.field("label", pa.string())  # with --with-labels: NORMAL / PNEUMONIA / null
JOB_FILE, METRICS_FILE, TMP_DIR, LEASE_FILE = "_score_job.json", "_metrics.json", "_tmp", "_lease.json"


def output_schema(with_labels: bool) -> pa.Schema:
    """Schema of the output Parquet files."""
    return OUTPUT_SCHEMA.append(LABEL_FIELD) if with_labels else OUTPUT_SCHEMA


def to_output_table(batch: dict[str, np.ndarray], with_labels: bool) -> pa.Table:
    """A predictor batch as an output table: nulls for errors, class names, UTC timestamps."""
    ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
    probs = np.asarray(batch["prob_pneumonia"], np.float32)
    threshold = np.asarray(decision_threshold(batch["threshold"]), np.float32)
    prediction = predicted_classes(probs, threshold)
    prediction[~ok] = None
    width, height = np.asarray(batch["width"], np.int32), np.asarray(batch["height"], np.int32)
    columns = {
        "path": pa.array(np.asarray(batch["path"], dtype=object), pa.string()),
        "prob_pneumonia": pa.array(probs, pa.float32(), mask=~ok),
        "prediction": pa.array(prediction, pa.string()),
        "threshold": pa.array(threshold, pa.float32()),
        "model": pa.array(np.asarray(batch["model"], dtype=object), pa.string()),
        "width": pa.array(width, pa.int32(), mask=width == 0),
        "height": pa.array(height, pa.int32(), mask=height == 0),
        "error": pa.array([None if e == "" else str(e) for e in batch["error"]], pa.string()),
        "scored_at": pa.array(np.asarray(batch["scored_at"], "datetime64[us]")).cast(
            pa.timestamp("us", tz="UTC")),
    }
    if with_labels:
        labels = np.asarray(batch["label"], np.int8)
        columns["label"] = pa.array([CLASSES[v] if v != UNKNOWN_LABEL else None for v in labels], pa.string())
    return pa.table(columns, schema=output_schema(with_labels))


class OutputFolder:
    """``OUT/``: committed ``part-*.parquet`` files, the job record and temp files.

    Each part is written under ``OUT/_tmp`` and moved into ``OUT`` once complete, so a crash
    leaves either a whole part or none (object stores create an object only when its upload
    completes, so the move is all-or-nothing there too).
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = store.resolve(uri)

    def parts(self) -> list[str]:
        """Paths (inside the filesystem) of the committed part files."""
        if self.fs.get_file_info(self.path).type != pafs.FileType.Directory:
            return []
        return sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(self.path))
                      if i.type == pafs.FileType.File and i.base_name.startswith("part-")
                      and i.base_name.endswith(".parquet"))

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The committed rows (``columns`` only, when given)."""
        parts = self.parts()
        if not parts:
            return output_schema(True).empty_table().select(columns or OUTPUT_SCHEMA.names)
        dataset = pads.dataset(parts, filesystem=self.fs, format="parquet")
        return dataset.to_table(columns=columns)

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The committed rows, ``columns`` only, one record batch at a time."""
        parts = self.parts()
        if parts:
            yield from pads.dataset(parts, filesystem=self.fs, format="parquet").to_batches(columns=columns)

    def done_paths(self) -> PathSet:
        """Every path already in a committed part (skipped by ``--resume``), as hashes."""
        done = PathSet()
        for batch in self.batches(["path"]):
            done.add(batch.column("path").to_pandas())
        return done

    def read_job(self) -> dict[str, Any] | None:
        p = store.join(self.uri, JOB_FILE)
        return json.loads(store.read_bytes(p)) if store.exists(p) else None

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        store.write_bytes(store.join(self.uri, name), json.dumps(content, indent=1, default=str).encode())

    def clear_tmp(self) -> None:
        """Drop temp files an interrupted run left behind (never committed, never read)."""
        tmp = f"{self.path}/{TMP_DIR}"
        if self.fs.get_file_info(tmp).type == pafs.FileType.Directory:
            self.fs.delete_dir(tmp)

    def commit(self, table: pa.Table, name: str) -> None:
        """Write ``table`` as ``OUT/name`` atomically (temp file, then move)."""
        tmp = f"{self.path}/{TMP_DIR}/{name}"
        self.fs.create_dir(f"{self.path}/{TMP_DIR}", recursive=True)
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
        self.fs.move(tmp, f"{self.path}/{name}")


@dataclass
class PartWriter:
    """Buffers output rows and commits a part file every ``rows_per_file`` rows."""

    out: OutputFolder
    schema: pa.Schema
    rows_per_file: int
    run_id: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
                        + "-" + uuid.uuid4().hex[:6])
    parts_written: int = 0
    rows_written: int = 0
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered: int = 0

    def add(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def close(self) -> None:
        """Commit whatever is buffered (complete rows only)."""
        if self._buffered:
            self._flush(self._buffered)

    def _flush(self, n: int) -> None:
        rows = pa.concat_tables(self._buffer).combine_chunks()
        part, rest = rows.slice(0, n), rows.slice(n)
        self.out.commit(part, f"part-{self.run_id}-{self.parts_written:05d}.parquet")
        self.parts_written += 1
        self.rows_written += n
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows


def check_output(out: OutputFolder, model_id: str, with_labels: bool, resume: bool) -> None:
    """Refuse to mix runs, models or schemas in one output folder.

    Cheap (listings and the small job record only), so the CLI calls it before Ray starts.
    """
    if out.fs.get_file_info(out.path).type == pafs.FileType.File:
        raise ScoreError(f"--out {out.uri!r} is a file; expected a folder (new or from an earlier score job)")
    held = held_by(store.join(out.uri, LEASE_FILE))
    if held is not None:
        raise ScoreError(f"--out {out.uri!r} is in use: {held}. Wait for that job "
                         f"to finish (then --resume), or choose another --out")
    parts = out.parts()
    if parts and not resume:
        raise ScoreError(f"output folder {out.uri!r} already holds {len(parts)} result file(s); "
                         f"pass --resume to finish that job, or choose a new --out")
    job = out.read_job()
    if resume and job is not None:
        if job.get("model") != model_id:
            raise ScoreError(f"--resume: {out.uri!r} was scored by model {job.get('model')!r}, "
                             f"not {model_id!r}; use a new --out for another checkpoint")
        if bool(job.get("with_labels")) != with_labels:
            raise ScoreError(f"--resume: {out.uri!r} was started "
                             f"{'with' if job.get('with_labels') else 'without'} --with-labels; "
                             f"resume it the same way")
