"""Batch scoring: image folders, globs or manifests -> a Parquet dataset of predictions.

The pipeline is a streaming Ray Dataset::

    file list (driver) --read+decode tasks--> uint8 (1, N, N) --Predictor actors--> rows
                       --driver--> OUT/part-<run>-<seq>.parquet (atomic, rows_per_file each)

Decoding and resizing are the training pipeline's own functions (``decode_image`` at the
checkpoint's cache size, then ``to_model_size`` and ``normalize``), so scores equal
``cxr-ray evaluate``'s. Every listed file yields exactly one row; a file that cannot be read
or decoded gets ``error`` set and null scores. Part files are written to ``OUT/_tmp`` and
moved into place when complete, so readers never see a partial file, and ``--resume``
skips every path already in a committed part. Files whose names start with ``_`` or ``.``
(the job record, metrics, temp files) are ignored by pandas, pyarrow, Spark and DuckDB
globs of ``*.parquet``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxr_ray.checkpoint import LoadedCheckpoint, load_checkpoint
from cxr_ray.config import ScoreConfig
from cxr_ray.data import io
from cxr_ray.data.catalog import CLASSES, DataError, patient_id
from cxr_ray.data.decode import ImageDecodeError, decode_file
from cxr_ray.data.listing import UNKNOWN_LABEL
from cxr_ray.runtime import check_shared_paths

log = logging.getLogger(__name__)

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
JOB_FILE, METRICS_FILE, TMP_DIR = "_score_job.json", "_metrics.json", "_tmp"
BLOCK_FILES = 128  # files per input block: the unit of read+decode parallelism
MAX_LOGGED_FAILURES = 100


class ScoreError(DataError):
    """The scoring job cannot start (output folder, resources, checkpoint mismatch)."""


def output_schema(with_labels: bool) -> pa.Schema:
    """Schema of the output Parquet files."""
    return OUTPUT_SCHEMA.append(LABEL_FIELD) if with_labels else OUTPUT_SCHEMA


# --- Ray Data stages (run in Ray workers) -------------------------------------------------------

def read_and_decode(batch: dict[str, np.ndarray], cache_size: int, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: ``path``/``label`` rows -> model-size uint8 images (training's preprocessing).

    A file that cannot be read or decoded keeps its row: a black image, zero size and the
    reason in ``error`` ("" when decoded).
    """
    from cxr_ray.data.transforms import to_model_size

    paths = batch["path"]
    pixels = np.zeros((len(paths), cache_size, cache_size), np.uint8)
    width, height = np.zeros(len(paths), np.int32), np.zeros(len(paths), np.int32)
    errors = []
    for i, path in enumerate(paths):
        try:
            pixels[i], width[i], height[i] = decode_file(path, cache_size)
            errors.append("")
        except ImageDecodeError as e:  # unreadable files too: decode_file names them
            errors.append(e.reason)
    return {"path": paths, "label": np.asarray(batch["label"], np.int8),
            "image": to_model_size(pixels, image_size), "width": width, "height": height,
            "error": np.asarray(errors, dtype=object)}


def score_device(score: ScoreConfig):
    """CUDA when the actor asks for GPUs (and one is visible), else CPU."""
    import torch

    if score.gpus_per_actor > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("score.gpus_per_actor > 0 but this actor sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


class Predictor:
    """Ray Data callable class: loads the checkpoint once per actor, scores decoded batches.

    On CUDA with ``score.amp`` it runs bf16 autocast on a channels_last model; on CPU it
    runs fp32 with ``score.torch_threads`` (default: the actor's CPUs) intra-op threads.
    """

    def __init__(self, checkpoint: str, score: dict[str, Any]):
        import torch

        from cxr_ray.data.transforms import Collate

        self.score = ScoreConfig(**score)
        self.device = score_device(self.score)
        if self.device.type == "cpu":
            torch.set_num_threads(self.score.torch_threads or math.ceil(self.score.cpus_per_actor))
        ckpt = load_checkpoint(checkpoint)
        self.amp = self.score.amp and self.device.type == "cuda"
        model = ckpt.model.to(self.device)
        if self.amp:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if self.score.compile else model
        self.threshold, self.model_id = np.float32(ckpt.threshold), ckpt.model_id
        self.collate = Collate(self.device, channels_last=self.amp, normalize=ckpt.cfg.data.normalize)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """PNEUMONIA probabilities of uint8 ``(B, 1, N, N)`` images: evaluation's own
        ``Collate`` (normalise, channels_last on GPU) and the engine's ``predict``."""
        from cxr_ray.engine import predict

        batch = self.collate({"image": images, "label": np.zeros(len(images), np.float32)})
        probs, _, _ = predict(self.model, [batch], self.device, amp=self.amp)
        return probs.astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        probs = np.full(len(ok), np.nan, np.float32)
        if ok.any():
            probs[ok] = self.probabilities(batch["image"][ok])
        n = len(ok)
        return {"path": batch["path"], "prob_pneumonia": probs,
                "threshold": np.full(n, self.threshold, np.float32),
                "model": np.full(n, self.model_id, dtype=object),
                "width": batch["width"], "height": batch["height"], "error": batch["error"],
                "label": batch["label"],
                "scored_at": np.full(n, np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "us"))}


# --- Output folder (driver) ---------------------------------------------------------------------

def to_output_table(batch: dict[str, np.ndarray], with_labels: bool) -> pa.Table:
    """A predictor batch as an output table: nulls for errors, class names, UTC timestamps."""
    ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
    probs = np.asarray(batch["prob_pneumonia"], np.float32)
    threshold = np.asarray(batch["threshold"], np.float32)
    prediction = np.where(probs >= threshold, CLASSES[1], CLASSES[0]).astype(object)
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
        self.fs, self.path = io.resolve(uri)

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

    def done_paths(self) -> set[str]:
        """Every path already in a committed part (skipped by ``--resume``)."""
        return set(self.read(["path"]).column("path").to_pylist())

    def read_job(self) -> dict[str, Any] | None:
        p = io.join(self.uri, JOB_FILE)
        return json.loads(io.read_bytes(p)) if io.exists(p) else None

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        io.write_bytes(io.join(self.uri, name), json.dumps(content, indent=1, default=str).encode())

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


# --- The job (driver) ---------------------------------------------------------------------------

@dataclass
class ScoreSummary:
    """What one ``score`` run did; the totals cover the whole output folder."""

    output: str
    files_seen: int
    already_done: int
    scored: int
    failed: int
    seconds: float
    total_rows: int
    failures: list[tuple[str, str]]  # the first MAX_LOGGED_FAILURES (path, reason) of this run
    metrics: dict[str, Any] | None = None

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [f"[score] files seen {self.files_seen} (already in the output: {self.already_done}); "
                 f"this run scored {self.scored}, failed {self.failed}; "
                 f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s"]
        lines.append(f"[score] output {self.output}: {self.total_rows} rows")
        return "\n".join(lines)


def check_output(out: OutputFolder, model_id: str, with_labels: bool, resume: bool) -> None:
    """Refuse to mix runs, models or schemas in one output folder.

    Cheap (listings and the small job record only), so the CLI calls it before Ray starts.
    """
    if out.fs.get_file_info(out.path).type == pafs.FileType.File:
        raise ScoreError(f"--output {out.uri!r} is a file; expected a folder (new or from an earlier score job)")
    parts = out.parts()
    if parts and not resume:
        raise ScoreError(f"output folder {out.uri!r} already holds {len(parts)} result file(s); "
                         f"pass --resume to finish that job, or choose a new --output")
    job = out.read_job()
    if resume and job is not None:
        if job.get("model") != model_id:
            raise ScoreError(f"--resume: {out.uri!r} was scored by model {job.get('model')!r}, "
                             f"not {model_id!r}; use a new --output for another checkpoint")
        if bool(job.get("with_labels")) != with_labels:
            raise ScoreError(f"--resume: {out.uri!r} was started "
                             f"{'with' if job.get('with_labels') else 'without'} --with-labels; "
                             f"resume it the same way")


def check_resources(score: ScoreConfig) -> None:
    """Refuse a pool the cluster can never place (it would hang rather than fail)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    need_cpu = score.num_actors * score.cpus_per_actor + score.decode_cpus
    if need_cpu > cpus + 1e-9:
        raise ScoreError(f"score: {score.num_actors} actor(s) x score.cpus_per_actor="
                         f"{score.cpus_per_actor} + score.decode_cpus={score.decode_cpus} need "
                         f"{need_cpu:g} CPUs; the cluster has {cpus:g}")
    if score.num_actors * score.gpus_per_actor > gpus + 1e-9:
        raise ScoreError(f"score: {score.num_actors} actor(s) x score.gpus_per_actor="
                         f"{score.gpus_per_actor} need {score.num_actors * score.gpus_per_actor:g} "
                         f"GPUs; the cluster has {gpus:g}")


def build_dataset(todo: pd.DataFrame, checkpoint: str, model_cfg: Any, score: ScoreConfig):
    """The streaming Ray Dataset of scored rows for the files in ``todo``."""
    import ray

    blocks = [todo.iloc[i:i + BLOCK_FILES].reset_index(drop=True) for i in range(0, len(todo), BLOCK_FILES)]
    pool = (ray.data.ActorPoolStrategy(min_size=score.num_actors, max_size=score.max_actors)
            if score.max_actors > score.num_actors else ray.data.ActorPoolStrategy(size=score.num_actors))
    ds = ray.data.from_pandas(blocks)
    ds = ds.map_batches(read_and_decode, batch_size=score.decode_batch_size, batch_format="numpy",
                        num_cpus=score.decode_cpus,
                        fn_kwargs={"cache_size": model_cfg.data.resolved_cache_size,
                                   "image_size": model_cfg.data.image_size})
    return ds.map_batches(Predictor, batch_size=score.batch_size, batch_format="numpy", compute=pool,
                          num_cpus=score.cpus_per_actor, num_gpus=score.gpus_per_actor or None,
                          # Reserving memory per actor also keeps Ray Data from fusing decoding into
                          # the actors (it fuses only stages with equal resource requests), where it
                          # would run in series with the model instead of overlapping it.
                          memory=int(score.memory_per_actor_gb * 2**30) or None,
                          fn_constructor_kwargs={"checkpoint": checkpoint,
                                                 "score": dataclasses.asdict(score)})


def _stream(ds, writer: PartWriter, with_labels: bool, failures: list[tuple[str, str]]
            ) -> Iterator[tuple[int, int]]:
    """Write every batch the pipeline yields; yields (scored, failed) per batch."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        table = to_output_table(batch, with_labels)
        writer.add(table)
        errors = table.column("error").to_pylist()
        bad = [(p, e) for p, e in zip(table.column("path").to_pylist(), errors) if e is not None]
        for path, err in bad:  # every failure is in the output; the first ones are also logged
            if len(failures) < MAX_LOGGED_FAILURES:
                log.warning("cannot score %s: %s", path, err)
                failures.append((path, err))
        yield table.num_rows - len(bad), len(bad)


def run_score(checkpoint: str | LoadedCheckpoint, inputs: list[str], output: str, score: ScoreConfig,
              listing: pd.DataFrame, resume: bool = False, with_labels: bool = False) -> ScoreSummary:
    """Score every file of ``listing`` not yet in ``output``; Ray must be initialised.

    ``checkpoint``: a folder/URI, or one the caller already loaded (actors load it from its
    path). ``listing`` comes from :func:`cxr_ray.data.listing.list_inputs` (done before Ray
    starts). On Ctrl-C the rows already scored are committed before the interrupt propagates.
    """
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    checkpoint = ckpt.path
    out = OutputFolder(output)
    check_output(out, ckpt.model_id, with_labels, resume)
    out.clear_tmp()  # temp files of an interrupted run: never committed, never read
    done = out.done_paths() if resume else set()
    todo = listing[~listing["path"].isin(done)].reset_index(drop=True)
    check_resources(score)
    check_shared_paths({"--input": todo["path"].iat[0]} if len(todo) else {})  # read on every node
    job = out.read_job() or {"started_at": datetime.now(timezone.utc).isoformat(), "runs": []}
    job.update(checkpoint=str(checkpoint), model=ckpt.model_id, threshold=ckpt.threshold,
               with_labels=with_labels, inputs=list(inputs), score=dataclasses.asdict(score))
    out.write_json(JOB_FILE, job)
    writer = PartWriter(out, output_schema(with_labels), score.rows_per_file)
    scored = failed = 0
    failures: list[tuple[str, str]] = []
    start = time.perf_counter()
    try:
        if len(todo):
            last_log = start
            for s, f in _stream(build_dataset(todo, checkpoint, ckpt.cfg, score), writer, with_labels, failures):
                scored, failed = scored + s, failed + f
                if time.perf_counter() - last_log > 30:
                    last_log = time.perf_counter()
                    log.info("scored %d/%d files (%.1f images/s)", scored + failed, len(todo),
                             (scored + failed) / (last_log - start))
    finally:
        writer.close()  # complete rows only: also on Ctrl-C, so --resume redoes less
        out.clear_tmp()
        seconds = time.perf_counter() - start
        job["runs"].append({"run_id": writer.run_id, "files": int(len(todo)), "scored": scored,
                            "failed": failed, "seconds": round(seconds, 2),
                            "finished": scored + failed == len(todo),
                            "ended_at": datetime.now(timezone.utc).isoformat()})
        out.write_json(JOB_FILE, job)
    summary = ScoreSummary(output, len(listing), len(listing) - len(todo), scored, failed, seconds,
                           len(done) + writer.rows_written, failures)
    if with_labels:
        summary.metrics = labelled_metrics(out, ckpt.threshold)
        if summary.metrics is not None:
            out.write_json(METRICS_FILE, summary.metrics)
    return summary


def labelled_metrics(out: OutputFolder, threshold: float) -> dict[str, Any] | None:
    """Metrics with 95% CIs over the output's scored rows that have a label (None if too few)."""
    from cxr_ray.evaluate import metrics_report

    df = out.read(["path", "label", "prob_pneumonia", "error"]).to_pandas()
    df = df[df["error"].isna() & df["label"].notna()]
    if df.empty or df["label"].nunique() < 2:
        log.warning("--with-labels: need scored images of both classes for metrics; found %s",
                    df["label"].value_counts().to_dict())
        return None
    preds = pd.DataFrame({"label": (df["label"] == CLASSES[1]).astype(np.int64),
                          "probability": df["prob_pneumonia"].astype(np.float64),
                          "patient": df["path"].map(patient_id)})
    return metrics_report(preds, threshold)
