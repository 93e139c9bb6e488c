"""The scoring job (driver): what to score, the streaming pipeline, writing, the summary."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from cxr_ray.analysis import drift
from cxr_ray.analysis.drift import acquisition_stats, compare
from cxr_ray.analysis.metrics import metrics_report
from cxr_ray.apps.score.output import (
    JOB_FILE,
    LEASE_FILE,
    METRICS_FILE,
    OutputFolder,
    PartWriter,
    check_output,
    output_schema,
    to_output_table,
)
from cxr_ray.apps.score.stages import ScoreActor, read_and_decode
from cxr_ray.checkpoint import LoadedCheckpoint, load_checkpoint
from cxr_ray.cluster import alive_nodes, check_shared_paths, cluster_cpus, cpu_share, watched
from cxr_ray.config import DataConfig, ScoreConfig
from cxr_ray.data.catalog import CLASSES, patient_id
from cxr_ray.data.listing import UNKNOWN_LABEL, PathSet, check_inputs, iter_inputs
from cxr_ray.data.preprocessing import Preprocessing
from cxr_ray.errors import ScoreError
from cxr_ray.inference.onnx import OnnxModel
from cxr_ray.inference.predictor import Predictor
from cxr_ray.storage import uri as store
from cxr_ray.storage.lease import Lease, LeaseHeld, acquire

log = logging.getLogger(__name__)

# Files per input block, the unit of read+decode parallelism: small blocks first, so that a
# small job spreads over every core, then large ones, so that an archive of millions of files
# is a few thousand blocks (Ray Data keeps metadata per block on the driver).
BLOCK_FILES, LARGE_BLOCK_FILES, SMALL_BLOCKS = 128, 2048, 64
MAX_LOGGED_FAILURES = 100


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
    drift: dict[str, Any] | None = None  # the scored images against the checkpoint's validation
    first_batch_s: float = 0.0  # start-up: seconds until the first rows came (actors started, model loaded)
    first_rows: int = 0  # rows of that first batch

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Files per second once the first rows came, the start-up (actors, model load) left out.
        Files decoded while the actors started count here too, so on a short job this is above
        the rate a long archive keeps; on a long one it approaches it."""
        after = self.seconds - self.first_batch_s
        rows = self.scored + self.failed - self.first_rows
        return rows / after if after > 0 and rows > 0 else float("nan")

    def format(self) -> str:
        steady = self.steady_images_per_s
        after = (f"; first rows after {self.first_batch_s:.1f} s (start-up), then {steady:.1f} images/s"
                 if steady == steady else "")
        lines = [f"[score] files seen {self.files_seen} (already in the output: {self.already_done}); "
                 f"this run scored {self.scored}, failed {self.failed}; "
                 f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s{after}"]
        lines.append(f"[score] output {self.output}: {self.total_rows} rows")
        return "\n".join(lines)


@dataclass(frozen=True)
class CpuSplit:
    """How a job's CPUs go to the read+decode tasks and the predictor actors, and why: the
    costs measured on the driver (:func:`measure_costs`), one core each."""

    cpus: float  # the cluster's CPUs
    decode_ms: float | None  # read + decode of one file (read + header check with score.decode=gpu)
    model_ms: float | None  # the model on one image on one CPU core; None: GPU actors (or not measured)
    cpus_per_actor: float
    decode_cpus: float  # per read+decode task

    def describe(self, score: ScoreConfig) -> str:
        """One log line: the split and the figures it came from."""
        actors = max(score.num_actors, score.max_actors)
        tasks = max(1, math.floor((self.cpus - actors * self.cpus_per_actor) / self.decode_cpus + 1e-9))
        why = []
        if self.decode_ms is not None:
            what = "read + header check" if score.decode == "gpu" else "read + decode"
            why.append(f"{what} {self.decode_ms:.1f} ms/file")
        if self.model_ms is not None:
            why.append(f"model {self.model_ms:.1f} ms/image ({score.backend} {score.amp})")
        elif score.gpus_per_actor > 0:
            why.append("model on GPU: 1 CPU per actor feeds it")
        measured = f" (on one core: {', '.join(why)})" if why else ""
        threads = "" if score.gpus_per_actor else f", {score.torch_threads or math.ceil(self.cpus_per_actor)} thread(s)"
        return (f"[score] {self.cpus:g} CPUs{measured}: {score.num_actors}"
                f"{f'-{score.max_actors}' if score.max_actors > score.num_actors else ''} predictor actor(s) x "
                f"{self.cpus_per_actor:g} CPU{threads}; read+decode tasks of {self.decode_cpus:g} CPU, up to "
                f"{tasks} at a time; decode on {score.decode.upper()}")


def quarter(cpus: float) -> float:
    """``cpus`` rounded down to a quarter CPU, at least 0.25."""
    return max(0.25, math.floor(cpus * 4 + 1e-9) / 4)


def decode_task_cpus(left: float) -> float:
    """CPUs per read+decode task when ``left`` CPUs are theirs: tasks of about one CPU (a decode
    task runs one core flat out; half-CPU tasks doubled the worker processes and ran slower),
    in hundredths, at least 0.25."""
    tasks = max(1, round(left))
    return max(0.25, math.floor(left / tasks * 100 + 1e-9) / 100)


def split_cpus(cpus: float, node_cpus: float, actors: int, decode_ms: float, model_ms: float | None
               ) -> tuple[float, float]:
    """``(cpus_per_actor, decode_cpus)`` for ``actors`` predictor actors on a cluster of ``cpus``
    CPUs (the largest node has ``node_cpus``), from the measured costs of one file's read+decode
    and one image's model on one core (``model_ms=None``: GPU actors, one CPU each).

    CPU actors get the model's share of the CPUs, ``model / (model + decode)``, in quarter CPUs
    (at least 0.25, at most a node, leaving decoding at least 0.25); decoding gets the rest
    (:func:`decode_task_cpus`)."""
    if model_ms is None:
        per_actor = 1.0
    else:
        share = cpus * model_ms / max(model_ms + decode_ms, 1e-9)
        per_actor = min(quarter(share / actors), node_cpus, quarter((cpus - 0.25) / actors))
    return per_actor, decode_task_cpus(cpus - actors * per_actor)


def measure_costs(ckpt: LoadedCheckpoint, score: ScoreConfig, paths: list[str], limits: DataConfig,
                  model: bool = True) -> tuple[float | None, float | None]:
    """Milliseconds on one core of reading + decoding one of ``paths`` (the job's first files,
    by its read+decode stage: only read + header check for ``score.decode=gpu``; None without
    paths, or when most of them fail here) and, with ``model``, of the model on one image (in
    the job's backend and precision, on this process's CPU, batches of 4; else None).
    Each after one warm-up call; the whole measurement takes about a second (ResNet-50: 2 s)."""
    import torch

    contract = ckpt.preprocessing
    decode_ms = None
    if paths:
        def decode(chunk: list[str]) -> int:
            """Read + decode ``chunk`` as the tasks do; how many files decoded."""
            out = read_and_decode({"path": np.array(chunk, dtype=object), "label": np.zeros(len(chunk), np.int8)},
                                  contract.cache_size, contract.image_size, limits.max_pixels, limits.read_timeout_s,
                                  limits.max_file_mb, for_device=score.decode == "gpu")
            return int(sum(e == "" for e in out["error"]))

        decode(paths[:1])
        timed = paths[1:] or paths
        start = time.perf_counter()
        ok = decode(timed)
        if 2 * ok >= len(timed):  # a failed file's error path is not what a decode costs
            decode_ms = (time.perf_counter() - start) * 1e3 / len(timed)
        else:
            log.warning("[score] %d of the %d files timed for the CPU split failed to read or decode here; "
                        "splitting the CPUs evenly", len(timed) - ok, len(timed))
    if not model:
        return decode_ms, None
    images = np.zeros((4, 1, contract.image_size, contract.image_size), np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if score.backend == "onnxruntime":
            from cxr_ray.apps.export import cached_export

            onnx = OnnxModel(cached_export(ckpt, "onnx"), threads=1)
            run = lambda: onnx.logits(images.astype(np.float32) / np.float32(255.0))  # noqa: E731
        else:
            predictor = Predictor(ckpt, "cpu", score.amp)
            run = lambda: predictor.logits(images)  # noqa: E731
        run()
        start = time.perf_counter()
        run()
        model_ms = (time.perf_counter() - start) * 1e3 / len(images)
    finally:
        torch.set_num_threads(threads)
    return decode_ms, model_ms


def resolve_score(score: ScoreConfig, ckpt: LoadedCheckpoint, paths: list[str] | None = None,
                  limits: DataConfig | None = None) -> tuple[ScoreConfig, CpuSplit]:
    """``score`` with its auto settings made concrete for the running cluster, once per job,
    and the CPU split it chose:

    - ``decode=auto``: ``gpu`` (the actors decode JPEGs on their GPU) when ``gpus_per_actor > 0``, else ``cpu``;
    - ``amp=auto``: the checkpoint's own precision where the actors' device runs it fast
      (:meth:`LoadedCheckpoint.precision`), decided here so every actor of a job uses the same;
      fp32 for ``backend=onnxruntime``;
    - ``backend=auto``: ``onnxruntime`` when the job runs fp32 on CPU and the onnx extra is
      installed (ONNX Runtime fp32 scored 1.7x torch fp32 here), else ``torch`` (bf16 is
      faster in torch; GPUs; ``score.compile``). With ``onnxruntime`` the checkpoint is exported
      here first (cached per machine), so a model that cannot be exported fails before any work;
    - ``cpus_per_actor=0`` / ``decode_cpus=0``: the cluster's CPUs split between the model and
      decoding by their costs, measured here on ``paths`` (the job's first files) and the model
      (:func:`measure_costs`, :func:`split_cpus`); GPU actors take one CPU each. A value the user
      set is kept, and the other one takes what is left.
    """
    import torch

    gpu = score.gpus_per_actor > 0
    decode_mode = score.decode if score.decode != "auto" else ("gpu" if gpu else "cpu")
    if decode_mode == "gpu" and not gpu:
        log.warning("score.decode=gpu with CPU actors (score.gpus_per_actor=0): the actors decode JPEGs on "
                    "their CPU with torchvision, which only moves the work (the path's own test setting)")
    device = torch.device("cuda" if gpu else "cpu")
    backend = score.backend
    if backend == "onnxruntime":
        amp = ckpt.precision("fp32", device, why="score.backend=onnxruntime runs fp32")
    elif gpu and not torch.cuda.is_available() and score.amp == "auto":
        amp = ckpt.val_precision  # a driver without a GPU cannot probe the actors' one
    else:
        amp = ckpt.precision(score.amp, device)
    if backend == "auto":  # TTA runs its views in torch
        fp32_cpu = not gpu and amp == "fp32" and not score.compile and score.tta == "none"
        backend = "onnxruntime" if fp32_cpu and onnxruntime_installed() else "torch"
    if backend == "onnxruntime":
        check_onnxruntime()

        from cxr_ray.apps.export import cached_export  # the ONNX exporter loads only when it is used

        log.info("[score] backend onnxruntime (score.backend=%s): %s", score.backend, cached_export(ckpt, "onnx"))
    score = dataclasses.replace(score, amp=amp, backend=backend, decode=decode_mode)
    cpus = cluster_cpus()
    node_cpus = max((float(n["Resources"].get("CPU", 0)) for n in alive_nodes()), default=cpus)
    actors = max(score.num_actors, score.max_actors)
    decode_ms = model_ms = None
    if score.cpus_per_actor and score.decode_cpus:  # both set
        per_actor, decode = score.cpus_per_actor, score.decode_cpus
    elif score.decode_cpus:  # the actors share what one decode task leaves
        per_actor, decode = (1.0 if gpu else cpu_share(score.decode_cpus, actors)), score.decode_cpus
    elif score.cpus_per_actor:  # decoding takes what the actors leave
        decode_ms, _ = measure_costs(ckpt, score, (paths or [])[:9], limits or DataConfig(), model=False)
        per_actor, decode = score.cpus_per_actor, decode_task_cpus(cpus - actors * score.cpus_per_actor)
    else:
        decode_ms, model_ms = measure_costs(ckpt, score, (paths or [])[:9], limits or DataConfig(), model=not gpu)
        even = model_ms if model_ms is not None else 1.0  # not measured: as much as the model
        per_actor, decode = split_cpus(cpus, node_cpus, actors, decode_ms if decode_ms is not None else even,
                                       model_ms)
    split = CpuSplit(cpus, decode_ms, model_ms, per_actor, decode)
    return dataclasses.replace(score, cpus_per_actor=per_actor, decode_cpus=decode), split


def onnxruntime_installed() -> bool:
    """True when the onnx extra (onnx, onnxscript, onnxruntime) can be imported."""

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


def check_onnxruntime() -> None:
    """``score.backend=onnxruntime`` without the packages it needs fails before any work."""
    if not onnxruntime_installed():
        raise ScoreError("score.backend=onnxruntime needs the onnx extra (onnx, onnxscript, onnxruntime): "
                         "pip install 'cxr_ray[onnx]'")


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


@dataclass
class Todo:
    """What this run scores, listed in a stream: input blocks in Ray's object store (the
    driver keeps only their refs) and the counts."""

    blocks: list[Any]  # ObjectRefs of pandas frames (path, label, error), see list_todo
    files_seen: int = 0
    already_done: int = 0
    labelled: int = 0
    first_paths: list[str] = dataclasses.field(default_factory=list)  # up to 9: the split's decode measurement

    @property
    def first_path(self) -> str | None:
        return self.first_paths[0] if self.first_paths else None

    @property
    def files(self) -> int:
        return self.files_seen - self.already_done


def list_todo(inputs: list[str], done: PathSet) -> Todo:
    """Stream the inputs' listing (:func:`iter_inputs`), drop paths in ``done``, and put the
    rest in the object store in blocks (:data:`BLOCK_FILES` rows, :data:`LARGE_BLOCK_FILES`
    after the first :data:`SMALL_BLOCKS`). Driver memory: one listing chunk and the block
    refs, plus 8 bytes a path for de-duplication."""
    import ray

    todo = Todo([])
    for chunk in iter_inputs(inputs):
        todo.files_seen += len(chunk)
        todo.labelled += int((chunk["label"] != UNKNOWN_LABEL).sum())
        if len(done):
            keep = ~done.contains(chunk["path"])
            todo.already_done += int((~keep).sum())
            chunk = chunk[keep].reset_index(drop=True)
        i = 0
        while i < len(chunk):
            size = BLOCK_FILES if len(todo.blocks) < SMALL_BLOCKS else LARGE_BLOCK_FILES
            todo.blocks.append(ray.put(chunk.iloc[i:i + size].reset_index(drop=True)))
            i += size
        if len(todo.first_paths) < 9:  # files the listing found readable
            readable = chunk["path"][chunk["error"] == ""] if "error" in chunk else chunk["path"]
            todo.first_paths += readable.iloc[:9 - len(todo.first_paths)].tolist()
    return todo


def build_dataset(blocks: list[Any], checkpoint: str, contract: Preprocessing, score: ScoreConfig,
                  limits: DataConfig):
    """The streaming Ray Dataset of scored rows for the input ``blocks`` (see :func:`list_todo`).

    Preprocessing comes from the checkpoint's contract; the input-safety limits
    (``data.max_pixels``, ``data.max_file_mb``, ``data.read_timeout_s``) from the user's (``limits``)."""
    import ray

    pool = (ray.data.ActorPoolStrategy(min_size=score.num_actors, max_size=score.max_actors)
            if score.max_actors > score.num_actors else ray.data.ActorPoolStrategy(size=score.num_actors))
    ds = ray.data.from_pandas_refs(blocks)
    ds = ds.map_batches(read_and_decode, batch_size=score.decode_batch_size, batch_format="numpy",
                        num_cpus=score.decode_cpus,
                        fn_kwargs={"cache_size": contract.cache_size, "image_size": contract.image_size,
                                   "max_pixels": limits.max_pixels, "timeout_s": limits.read_timeout_s,
                                   "max_file_mb": limits.max_file_mb, "for_device": score.decode == "gpu"})
    return ds.map_batches(ScoreActor, batch_size=score.batch_size, batch_format="numpy", compute=pool,
                          num_cpus=score.cpus_per_actor, num_gpus=score.gpus_per_actor or None,
                          # Reserving memory per actor also keeps Ray Data from fusing decoding into
                          # the actors (it fuses only stages with equal resource requests), where it
                          # would run in series with the model instead of overlapping it.
                          memory=int(score.memory_per_actor_gb * 2**30) or None,
                          fn_constructor_kwargs={"checkpoint": checkpoint, "score": dataclasses.asdict(score),
                                                 "max_pixels": limits.max_pixels})


def _stream(ds, writer: PartWriter, with_labels: bool, failures: list[tuple[str, str]], lease: Lease,
            stall_s: float) -> Iterator[tuple[int, int]]:
    """Write every batch the pipeline yields (while ``lease`` is ours); yields (scored, failed) per
    batch. No batch for ``stall_s`` seconds: :class:`~cxr_ray.cluster.StageStalled`."""
    for batch in watched(ds.iter_batches(batch_size=None, batch_format="numpy"), "score", stall_s):
        table = to_output_table(batch, with_labels)
        lease.check()  # before ``add``, which may commit a part
        writer.add(table)
        errors = table.column("error").to_pylist()
        bad = [(p, e) for p, e in zip(table.column("path").to_pylist(), errors) if e is not None]
        for path, err in bad:  # every failure is in the output; the first ones are also logged
            if len(failures) < MAX_LOGGED_FAILURES:
                log.warning("cannot score %s: %s", path, err)
                failures.append((path, err))
        yield table.num_rows - len(bad), len(bad)


def run_score(checkpoint: str | LoadedCheckpoint, inputs: list[str], output: str, score: ScoreConfig,
              resume: bool = False, with_labels: bool = False, limits: DataConfig | None = None) -> ScoreSummary:
    """Score every file of ``inputs`` not yet in ``output``; Ray must be initialised.

    ``checkpoint``: a folder/URI, or one the caller already loaded (actors load it from its
    path); ``inputs``: folders, globs, manifests (checked by
    :func:`cxr_ray.data.listing.check_inputs`, listed in a stream); ``score.tta``: the test-time
    augmentation, with the checkpoint's threshold for it (``LoadedCheckpoint.with_tta``); ``limits``: the user's
    ``data`` config (max pixels, read timeout; defaults when None). On Ctrl-C the rows already
    scored are committed before the interrupt propagates.
    """
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    if ckpt.tta != score.tta:  # the job's TTA mode, with the threshold chosen for it
        if ckpt.tta != "none":
            raise ScoreError(f"the checkpoint given applies TTA {ckpt.tta!r}, score.tta is {score.tta!r}")
        ckpt = ckpt.with_tta(score.tta)
    out = OutputFolder(output)
    check_output(out, ckpt.model_id, with_labels, resume)
    check_inputs(inputs)
    try:
        lease = acquire(store.join(output, LEASE_FILE), "score")
    except LeaseHeld as e:
        raise ScoreError(f"--out {output!r} is in use: {e}; wait for that job to finish (then "
                         f"--resume), or choose another --out") from e
    with lease:
        return _run_leased(ckpt, out, inputs, score, resume, with_labels, limits, lease)


def _run_leased(ckpt: LoadedCheckpoint, out: OutputFolder, inputs: list[str], score: ScoreConfig,
                resume: bool, with_labels: bool, limits: DataConfig | None, lease: Lease) -> ScoreSummary:
    """:func:`run_score`'s work, with the output's lease held (no other job writes there)."""
    checkpoint, output = ckpt.path, out.uri
    out.clear_tmp()  # temp files of an interrupted run (never committed, never read; ours now)
    done = out.done_paths() if resume else PathSet()
    todo = list_todo(inputs, done)
    if with_labels and todo.labelled == 0:
        raise ScoreError("--with-labels: no input file sits in a NORMAL/PNEUMONIA folder and no "
                         "manifest has a 'label' column")
    score, split = resolve_score(score, ckpt, todo.first_paths, limits)
    check_resources(score)
    log.info("[score] model on the %s backend in %s", score.backend, score.amp)
    log.info("%s", split.describe(score))
    check_shared_paths({"--input": todo.first_path} if todo.first_path else {})  # read on every node
    job = out.read_job() or {"started_at": datetime.now(timezone.utc).isoformat(), "runs": []}
    job.update(checkpoint=str(checkpoint), model=ckpt.model_id, threshold=ckpt.threshold,
               with_labels=with_labels, inputs=list(inputs), score=dataclasses.asdict(score),
               cpu_split=dataclasses.asdict(split))
    lease.check()  # listing may have taken long: write only while the output is still ours
    out.write_json(JOB_FILE, job)
    writer = PartWriter(out, output_schema(with_labels), score.rows_per_file)
    scored = failed = first_rows = 0
    failures: list[tuple[str, str]] = []
    start = first_at = time.perf_counter()
    try:
        if todo.blocks:
            last_log = start
            ds = build_dataset(todo.blocks, checkpoint, ckpt.preprocessing, score, limits or DataConfig())
            stall_s = (limits or DataConfig()).stall_timeout_s
            for s, f in _stream(ds, writer, with_labels, failures, lease, stall_s):
                if not first_rows:  # the pipeline's start-up ends with its first batch
                    first_rows, first_at = s + f, time.perf_counter()
                scored, failed = scored + s, failed + f
                if time.perf_counter() - last_log > 30:
                    last_log = time.perf_counter()
                    log.info("scored %d/%d files (%.1f images/s)", scored + failed, todo.files,
                             (scored + failed) / (last_log - start))
    finally:
        lease.check()  # lost: leave the output (its temp files, the job record) to the job holding it now
        writer.close()  # complete rows only: also on Ctrl-C, so --resume redoes less
        out.clear_tmp()
        seconds = time.perf_counter() - start
        job["runs"].append({"run_id": writer.run_id, "files": todo.files, "scored": scored,
                            "failed": failed, "seconds": round(seconds, 2),
                            "finished": scored + failed == todo.files,
                            "ended_at": datetime.now(timezone.utc).isoformat()})
        out.write_json(JOB_FILE, job)
    summary = ScoreSummary(output, todo.files_seen, todo.already_done, scored, failed, seconds,
                           len(done) + writer.rows_written, failures, first_batch_s=first_at - start,
                           first_rows=first_rows)
    summary.drift = output_drift(ckpt, out, inputs, limits or DataConfig())
    if summary.drift is not None:
        job["drift"] = summary.drift
        lease.check()
        out.write_json(JOB_FILE, job)
    if with_labels:
        summary.metrics = labelled_metrics(out, ckpt.threshold)
        if summary.metrics is not None:
            summary.metrics["tta"] = ckpt.tta
            lease.check()
            out.write_json(METRICS_FILE, summary.metrics)
    return summary


def output_drift(ckpt: LoadedCheckpoint, out: OutputFolder, inputs: list[str],
                 limits: DataConfig | None = None) -> dict[str, Any] | None:
    """Every scored row of the output against the checkpoint's validation (``drift.compare``,
    label-free); None without a reference (older checkpoints, TTA). The raw logits are
    recovered from the stored probabilities (``logit = T * (log(p / (1 - p)) - b)``; float32
    probabilities saturate near |logit| 16, which only clips the far tails). Acquisition
    statistics come from a seeded sample of the scored files (:func:`sampled_acquisition`)."""

    ref = ckpt.drift_reference
    if ref is None:
        return None
    probs = [b.column("prob_pneumonia").drop_null().to_numpy() for b in out.batches(["prob_pneumonia"])]
    p = np.clip(np.concatenate(probs).astype(np.float64) if probs else np.empty(0), 1e-7, 1 - 1e-7)
    logits = ckpt.temperature * (np.log(p / (1 - p)) - ckpt.logit_bias)
    acquisition = sampled_acquisition(ckpt, out, limits or DataConfig()) if ref.get("acquisition") else None
    return compare(ref, logits, acquisition, probs=p, threshold=ckpt.threshold, checkpoint=str(ckpt.path),
                   data=", ".join(inputs)[:200])


def sampled_acquisition(ckpt: LoadedCheckpoint, out: OutputFolder, limits: DataConfig,
                        seed: int = 0) -> dict[str, np.ndarray] | None:
    """``drift.acquisition_stats`` of up to ``drift.MAX_STAT_IMAGES`` scored files, drawn with
    ``seed`` from the output's scored rows and decoded again, in this process, by the scoring
    job's own preprocessing (``read_and_decode``: the checkpoint's contract, the user's limits).
    A file that no longer decodes is left out. None when nothing was scored."""

    def scored() -> Iterator[pa.Array]:  # two passes over the output: an archive's paths never sit in memory
        for b in out.batches(["path", "error"]):
            yield b.column("path").filter(b.column("error").is_null())

    total = sum(len(part) for part in scored())
    if not total:
        return None
    cap = drift.MAX_STAT_IMAGES  # read at call time: tunable for a job
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(cap, total), replace=False))
    paths, start = [], 0
    for part in scored():
        mine = chosen[(chosen >= start) & (chosen < start + len(part))] - start
        paths += part.take(pa.array(mine)).to_pylist() if len(mine) else []
        start += len(part)
    contract = ckpt.preprocessing

    def measure(chunk: list[str]) -> dict[str, np.ndarray] | None:
        d = read_and_decode({"path": np.array(chunk, dtype=object), "label": np.zeros(len(chunk), np.int8)},
                            contract.cache_size, contract.image_size, limits.max_pixels, limits.read_timeout_s,
                            limits.max_file_mb)
        ok = d["error"] == ""
        return acquisition_stats(d["image"][ok]) if ok.any() else None

    log.info("[score] drift: measuring acquisition statistics of %d scored files", len(paths))
    chunks = [paths[i:i + 32] for i in range(0, len(paths), 32)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # reads overlap; decodes share cores
        parts = [p for p in pool.map(measure, chunks) if p is not None]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None


def labelled_metrics(out: OutputFolder, threshold: float) -> dict[str, Any] | None:
    """Metrics with 95% CIs over the output's scored rows that have a label (None if too few).

    Reads the output part by part and keeps 13 bytes a labelled row (label, probability,
    a patient code), never the output's strings."""

    labels, probs, patient_codes = [], [], []
    codes: dict[str, int] = {}
    for batch in out.batches(["path", "label", "prob_pneumonia", "error"]):
        df = batch.to_pandas()
        df = df[df["error"].isna() & df["label"].notna()]
        labels.append((df["label"] == CLASSES[1]).to_numpy(np.int8))
        probs.append(df["prob_pneumonia"].to_numpy(np.float32))
        patient_codes.append(np.fromiter((codes.setdefault(patient_id(p), len(codes)) for p in df["path"]),
                                         np.int64, len(df)))
    y = np.concatenate(labels) if labels else np.empty(0, np.int8)
    if len(np.unique(y)) < 2:
        log.warning("--with-labels: need scored images of both classes for metrics; found %d NORMAL, %d PNEUMONIA",
                    int((y == 0).sum()), int((y == 1).sum()))
        return None
    preds = pd.DataFrame({"label": y.astype(np.int64), "probability": np.concatenate(probs).astype(np.float64),
                          "patient": np.concatenate(patient_codes)})
    return metrics_report(preds, threshold)
