"""Ray Train wiring: the per-worker loop, the TorchTrainer, and running it.

The optimisation itself is ``engine/loop.py`` (plain PyTorch); this module only connects it to
Ray Train V2: dataset shards, DDP via ``prepare_model``, ``ray.train.report`` with a
checkpoint every epoch, resume from ``ray.train.get_checkpoint()`` after a worker failure,
and early stopping that all workers decide together.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cxr_ray.analysis.calibration import fit_decision
from cxr_ray.analysis.drift import StatsCollector
from cxr_ray.analysis.metrics import SELECTION_METRICS
from cxr_ray.checkpoint import MODEL_FILE, load_train_state, safe_load, save_checkpoint, unwrap
from cxr_ray.cluster import (
    check_shared_paths,
    cluster_gpus,
    cpu_share,
    release_placement_groups,
    this_jobs_placement_groups,
)
from cxr_ray.config import ExperimentConfig, config_diff
from cxr_ray.data.pipeline import TorchCollate, check_cache_size, collated_keeping, epoch_batches, split_datasets
from cxr_ray.data.preprocessing import Preprocessing, resolve_preprocessing
from cxr_ray.engine.loop import (
    EarlyStopping,
    make_optimizer,
    make_scheduler,
    pos_weight_from_counts,
    predict_logits,
    restore_train_state,
    schedule_geometry,
    train_one_epoch,
    train_state,
)
from cxr_ray.engine.precision import prefers_channels_last, resolve_precision
from cxr_ray.errors import ConfigError, DataError
from cxr_ray.models.registry import build_model
from cxr_ray.storage import uri as store
from cxr_ray.training.progress import ProgressPrinter, ProgressReporter

log = logging.getLogger(__name__)

REPORTED = ("epoch", "train_loss", "val_loss", "roc_auc", "pr_auc", "accuracy", "precision", "recall",
            "specificity", "f1", "threshold", "n", *SELECTION_METRICS, "specificity_lower_bound", "best_epoch",
            "train_images_per_s", "stop", "temperature", "logit_bias", "val_ece_before", "val_ece")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(values: np.ndarray) -> np.ndarray:
    """Concatenate an array across all Ray Train workers (identity for one worker)."""
    if _world() == 1:
        return values
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return np.concatenate(parts)


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every worker (identity for one worker)."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TrainLoopRunner:
    """One Ray Train worker's run: build, maybe restore, then epochs until done or stopped.

    Training reads this worker's shard of ``train``; validation runs on rank 0 over the
    whole ``val`` split (never sharded, so no image is dropped or counted twice, whatever
    the number of workers) and its metrics are broadcast so all workers stop together.
    """

    def __init__(self, config: dict[str, Any]):
        self.cfg = ExperimentConfig.from_dict(config["cfg"])
        self.preprocessing = Preprocessing.from_dict(config["preprocessing"])  # resolved once, by the driver
        t = self.cfg.train
        self.ctx = ray.train.get_context()
        self.rank = self.ctx.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.gpu = self.device.type == "cuda"
        if not self.gpu and t.cpus_per_worker:  # Ray pins one thread per reserved CPU, rounded down
            torch.set_num_threads(t.torch_threads or math.ceil(t.cpus_per_worker))
        self.selection = config.get("selection_metric") or self.cfg.metric.selection
        self.progress = ProgressReporter(config.get("progress") if self.rank == 0 else None)
        # With a progress queue the driver prints each epoch; worker log lines would repeat it.
        self.log = log.info if self.rank == 0 and config.get("progress") is None else log.debug
        torch.manual_seed(t.seed + self.rank)
        # one precision for training and validation: the threshold is chosen in it (val_precision)
        self.precision = resolve_precision(t.amp, self.device)
        self.channels_last = prefers_channels_last(self.device)
        model = build_model(self.cfg.model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = ray.train.torch.prepare_model(model)
        self.schedule = schedule_geometry(config["n_train"], t, self.ctx.get_world_size())
        self.images_per_worker = int(np.ceil(config["n_train"] / max(1, self.ctx.get_world_size())))
        self.optimizer = make_optimizer(self.model, t)
        self.scheduler = make_scheduler(self.optimizer, self.schedule.warmup_steps, self.schedule.total_steps)
        pos_weight = torch.tensor(config["pos_weight"], device=self.device)
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.stopper = EarlyStopping(t.patience, t.min_delta)
        self.start_epoch = 0
        self.val_acquisition: dict[str, np.ndarray] | None = None  # measured on the first validation pass
        self.train_data = ray.train.get_dataset_shard("train")
        self.val_data = ray.train.get_dataset_shard("val")

    def warn(self, text: str) -> None:
        """A warning for the user: in this worker's log, and on the driver's terminal through the
        progress queue (workers' own log lines stay in Ray's log files)."""
        log.warning("%s", text)
        self.progress.emit("note", text=f"[train] WARNING: {text}")

    def restore(self) -> None:
        """Continue from the latest reported checkpoint (``--resume``, or a worker-group restart)."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            state = load_train_state(d)
            weights = safe_load(Path(d) / MODEL_FILE)
        # first: a ConfigError when the checkpoint's LR schedule was counted for other workers
        self.start_epoch = restore_train_state(state, self.optimizer, self.scheduler, self.stopper, self.schedule,
                                               warn=self.warn)
        unwrap(self.model).load_state_dict(weights)
        self.log("[train] resumed from checkpoint after epoch %d", state["epoch"])

    def train_batches(self, epoch: int):
        """Model-ready ``(x, y)`` batches of this worker's shard of ``train``, reshuffled per epoch.

        On CPU the collate (augmentation) runs in this thread: in a prefetch thread it would
        compete with the model's threads for the same cores. On GPU it prefetches.
        """
        t = self.cfg.train
        collate = TorchCollate(self.preprocessing, self.device, self.cfg.augment, seed=t.seed + 1000 * self.rank,
                               epoch=epoch, channels_last=self.channels_last)
        return epoch_batches(self.train_data, t.batch_size, collate, shuffle_seed=t.seed * 1000 + self.rank,
                             epoch=epoch, prefetch_batches=2 if self.gpu else 0)

    def validate(self) -> dict[str, Any]:
        """Rank 0: metrics over the whole validation split, in the training precision (recorded
        in the checkpoint as ``val_precision``), with the threshold chosen by
        ``metric.threshold_rule`` over patients.

        The unwrapped model runs outside DDP, so no collective waits on the other workers.
        """
        kept: dict[str, list] = {}
        collate = TorchCollate(self.preprocessing, self.device, channels_last=self.channels_last)
        stream = self.val_data.iter_batches(batch_size=self.cfg.train.batch_size, batch_format="numpy")
        stats = None
        if self.val_acquisition is None:  # the drift report's acquisition reference: the images never change
            stats = StatsCollector()
            stream = stats.watch(stream)
        batches = collated_keeping(stream, collate, ("patient",), kept)
        logits, labels, val_loss = predict_logits(unwrap(self.model), batches, self.device, self.precision,
                                                  loss_fn=self.loss_fn)
        if stats is not None:
            self.val_acquisition = stats.result()
        return fit_decision(logits, labels, np.asarray(kept.get("patient", [])), self.cfg.metric, val_loss,
                            acquisition=self.val_acquisition)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, validate on the whole validation split, return the metrics."""
        result = train_one_epoch(self.model, self.train_batches(epoch), self.optimizer, self.scheduler,
                                 self.loss_fn, self.device, self.precision,
                                 on_batch=lambda n, sec: self.progress.batch(epoch, n, sec))
        totals = _gather(np.array([[result.loss * result.images, result.images, result.seconds]]))
        metrics = _broadcast(self.validate() if self.rank == 0 else None)
        self.stopper.update(metrics[self.selection], epoch)
        metrics.update(epoch=epoch, train_loss=float(totals[:, 0].sum() / max(totals[:, 1].sum(), 1)),
                       train_images_per_s=float(totals[:, 1].sum() / max(totals[:, 2].max(), 1e-9)),
                       best_epoch=self.stopper.best_epoch,
                       stop=self.stopper.should_stop or epoch + 1 >= self.cfg.train.epochs)
        metrics["best_" + self.selection] = self.stopper.best
        return metrics

    def report(self, epoch: int, metrics: dict[str, Any]) -> None:
        """``ray.train.report`` the epoch; rank 0 attaches the checkpoint."""
        scalars = {k: metrics[k] for k in (*REPORTED, self.selection, "best_" + self.selection)}
        if self.rank != 0:
            ray.train.report(scalars, checkpoint=None)
            return
        self.log("[train] epoch %d: loss %.4f val_loss %.4f auc %.4f %s %.4f (%.0f img/s)", epoch,
                 metrics["train_loss"], metrics["val_loss"], metrics["roc_auc"], self.selection,
                 metrics[self.selection], metrics["train_images_per_s"])
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, self.model, self.cfg, metrics["threshold"], metrics, epoch,
                            train_state(self.optimizer, self.scheduler, self.stopper, epoch, self.schedule),
                            val_precision=self.precision, temperature=metrics["temperature"],
                            logit_bias=metrics["logit_bias"], preprocessing=self.preprocessing)
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(d))
        self.progress.emit("epoch", epoch=epoch, metrics=scalars)

    def run(self) -> None:
        """Epochs from the restored position until the last epoch or early stopping."""
        self.restore()
        how = self.precision + (", channels_last" if self.channels_last else "")
        self.progress.emit("start", epochs=self.cfg.train.epochs, start_epoch=self.start_epoch,
                           images=self.images_per_worker, precision=f"{how} (train.amp={self.cfg.train.amp})")
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            metrics = self.run_epoch(epoch)
            self.report(epoch, metrics)
            if self.stopper.should_stop:  # every worker saw the same broadcast metrics
                self.log("[train] early stop after epoch %d (best epoch %d)", epoch, self.stopper.best_epoch)
                self.progress.emit("stop", epoch=epoch, best_epoch=self.stopper.best_epoch)
                break


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds ``cfg`` (a dict), ``pos_weight``, ``n_train`` and
    optionally ``selection_metric`` (default ``metric.selection``) and ``progress`` (a queue)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.get("progress") is not None:
        _quiet_console()
    TrainLoopRunner(config).run()


def _quiet_console() -> None:
    """Keep this worker's INFO lines out of the terminal (the driver prints progress; Ray Train
    logs every report): they still go to Ray Train's log files, and warnings and errors still
    reach the terminal."""
    for name in (None, "ray", "ray.data", "ray.train"):  # Ray configures some with their own handlers
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)


def run_name(cfg: ExperimentConfig, prefix: str = "train") -> str:
    """The configured run name, else ``<prefix>-<model>-<timestamp>-<4 hex>`` (unique per start)."""
    return cfg.train.name or f"{prefix}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


TRIAL_DRIVER_CPUS = 0.01  # a tune trial's driver function (it only starts the trial's Ray Train run)


def resolve_gpu(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``train.use_gpu=auto`` made ``true`` when the running cluster has a GPU for
    every worker (``train.num_workers`` x ``train.gpus_per_worker``), else ``false``."""
    t = cfg.train
    if t.use_gpu != "auto":
        return cfg
    need = max(1, t.num_workers) * t.gpus_per_worker
    return cfg.replace(**{"train.use_gpu": "true" if cluster_gpus() >= need else "false"})


def uses_gpu(cfg: ExperimentConfig) -> bool:
    """Whether ``cfg`` trains on GPUs (``train.use_gpu`` resolved by :func:`resolve_gpu`)."""
    if cfg.train.use_gpu == "auto":
        raise AssertionError("train.use_gpu=auto must be resolved (resolve_gpu) before it is read")
    return cfg.train.use_gpu == "true"


def resolve_resources(cfg: ExperimentConfig, for_tune: bool = False) -> ExperimentConfig:
    """``cfg`` with ``train.cpus_per_worker=0`` (auto) and ``train.use_gpu=auto`` made concrete
    for the running cluster.

    A training run shares the cluster's CPUs among its workers after ``train.data_cpus``
    (never more than one node has), so a 1-worker run on a laptop trains on all its cores.
    A tune trial's workers take 1 CPU each, so concurrent trials share the machine, or less on
    a cluster where one trial would not fit beside ``tune.data_cpus`` (a 2-CPU laptop: 0.75).
    """
    cfg = resolve_gpu(cfg)
    t = cfg.train
    if t.cpus_per_worker > 0:
        return cfg
    if for_tune:
        cpus = min(1.0, cpu_share(cfg.tune.data_cpus + TRIAL_DRIVER_CPUS, t.num_workers))
    else:
        cpus = cpu_share(t.data_cpus, t.num_workers)
    return cfg.replace(**{"train.cpus_per_worker": cpus})


@dataclass
class TrainingInputs:
    """What the driver hands to a TorchTrainer: Ray Datasets plus loop config."""

    datasets: dict[str, Any]
    loop_config: dict[str, Any]


def check_splits(cache: Any) -> None:
    """:class:`DataError` unless train and val each hold both classes (before any worker starts).

    A one-class validation split has no ROC curve, so neither the threshold nor the
    selection metric is defined; a one-class train split has no class weight.
    """
    for split in ("train", "val"):
        n_normal, n_pneu = cache.split_counts(split)
        if not n_normal or not n_pneu:
            raise DataError(
                f"the {split} split of {cache.meta['root']!r} has NORMAL={n_normal}, PNEUMONIA={n_pneu} "
                f"decodable images; training needs both classes in train and in val (the threshold and "
                f"the selection metric are undefined on one class). See: cxr-ray inspect --data ROOT")


def training_inputs(cfg: ExperimentConfig, cache: Any, selection_metric: str = "") -> TrainingInputs:
    """Datasets and the loop config (class weight from the train counts) for ``cfg``.

    Only ``train`` is sharded across workers and reshuffled per epoch (seeded by
    ``train.seed``); ``val`` is read whole by rank 0.
    """
    check_splits(cache)
    # Per-epoch shard reads would print progress bars and start lines per epoch and worker.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True  # reproducible row order under train.seed
    n_normal, n_pneu = cache.split_counts("train")
    pos_weight = cfg.train.pos_weight or pos_weight_from_counts(n_normal, n_pneu)
    contract = resolve_preprocessing(cfg)
    check_cache_size(cache, contract, "this config's preprocessing")
    return TrainingInputs(
        datasets=split_datasets(cache, contract.image_size, materialize_gb=cfg.data.materialize_gb,
                                shuffle_seed=cfg.train.seed),
        loop_config={"cfg": cfg.to_dict(), "preprocessing": contract.to_dict(), "pos_weight": float(pos_weight),
                     "n_train": n_normal + n_pneu,
                     "selection_metric": selection_metric or cfg.metric.selection})


def build_trainer(cfg: ExperimentConfig, inputs: TrainingInputs, name: str, storage_path: str,
                  callbacks: list | None = None):
    """A Ray Train V2 ``TorchTrainer`` for ``cfg`` (scale, checkpoints, failures from config).

    The best ``train.keep_checkpoints`` checkpoints by the loop's selection metric are kept.
    """
    t = cfg.train
    gpu = uses_gpu(cfg)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=inputs.loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources if t.num_workers else None),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute=inputs.loop_config["selection_metric"],
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets=inputs.datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),  # val: whole, on rank 0
    )


def check_resources(cfg: ExperimentConfig, trials: int = 1, data_cpus: float = 1.0) -> None:
    """Fail before training when ``trials`` runs of ``cfg`` would leave Ray Data no CPU.

    Train workers hold their CPUs for the whole run; the pipeline feeding them needs at least
    ``data_cpus`` more, or reading stalls forever (Ray Data warns, then hangs).
    """
    total = float(ray.cluster_resources().get("CPU", 0.0))
    t = cfg.train
    need = trials * max(1, t.num_workers) * t.cpus_per_worker
    if need + data_cpus > total + 1e-9:
        raise ConfigError(
            f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker}"
            f"{f' x {trials} concurrent trials' if trials > 1 else ''} = {need:g} CPUs, plus {data_cpus:g} "
            f"for Ray Data, exceeds the cluster's {total:g} CPUs; lower train.cpus_per_worker "
            f"(fractions are fine; 0 = auto) or train.num_workers")
    if uses_gpu(cfg) and float(ray.cluster_resources().get("GPU", 0.0)) < max(1, t.num_workers) * t.gpus_per_worker:
        raise ConfigError(f"train.use_gpu=true needs {max(1, t.num_workers) * t.gpus_per_worker:g} GPUs; "
                          f"the cluster has {ray.cluster_resources().get('GPU', 0):g}")


# Keys that may differ when a run is resumed: where and how fast it runs, not what it learns.
# (train.num_workers only between 0 and 1, one process either way: see check_resume_workers.)
RESUMABLE_CHANGES = ("train.cpus_per_worker", "train.torch_threads", "train.data_cpus", "train.num_workers",
                     "train.use_gpu", "train.gpus_per_worker", "train.max_failures", "train.storage_path", "train.name",
                     "data.cache_dir", "data.materialize_gb", "storage.endpoint_url", "train.amp")


def read_run_config(run_dir: str) -> ExperimentConfig:
    """The config a training run folder was started with (its ``config.yaml``)."""
    path = store.join(run_dir, "config.yaml")
    if not store.exists(path):
        raise ConfigError(f"--resume {run_dir!r}: not a cxr-ray training run (no config.yaml there)")
    return ExperimentConfig.from_saved(yaml.safe_load(store.read_bytes(path)))


def check_run_dir(cfg: ExperimentConfig, run_dir: str, resume: bool) -> None:
    """Refuse to start over an existing run, or to resume one with a different config.

    Ray Train restores a run folder's latest checkpoint by name, so starting a "new" run in an
    existing folder would silently continue the old one (old weights, optimizer and epoch).
    """
    if not resume:
        if store.exists(run_dir):
            raise ConfigError(
                f"run folder {run_dir!r} already exists (train.name={cfg.train.name!r}): choose another "
                f"train.name for a new run, or continue that one with: cxr-ray train --resume {run_dir}")
        return
    saved = read_run_config(run_dir)
    check_resume_workers(saved, cfg, run_dir)
    changed = [d for d in config_diff(saved, cfg) if d.split(":", 1)[0] not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"--resume {run_dir!r}: the config differs from the run's config.yaml in "
                          f"{'; '.join(changed)}; a resumed run must train the same thing (start a new "
                          f"run with another train.name instead)")


def check_resume_workers(saved: ExperimentConfig, cfg: ExperimentConfig, run_dir: str) -> None:
    """:class:`ConfigError` when resuming ``run_dir`` (config ``saved``) on another number of
    training processes: the LR schedule counts optimizer steps per epoch, which the workers
    share, so a restored step count would not fit the rebuilt schedule (the workers check the
    checkpoint's own record again, ``engine.check_resumed_schedule``)."""
    old, new = max(1, saved.train.num_workers), max(1, cfg.train.num_workers)
    if old != new:
        raise ConfigError(f"--resume {run_dir!r}: train.num_workers was {saved.train.num_workers} when the run "
                          f"started and is {cfg.train.num_workers} now; the learning-rate schedule and the "
                          f"steps it has taken are counted per worker, so a run resumes on as many workers as it "
                          f"trained on (set train.num_workers={saved.train.num_workers}, or start a new run with "
                          f"another train.name)")


def run_training(cfg: ExperimentConfig, cache: Any, resume: bool = False, progress: bool = True):
    """Train ``cfg`` on a prepared cache; returns Ray Train's Result.

    The run folder is ``train.storage_path/train.name`` (a generated name when empty); it
    must not exist unless ``resume``. Its ``config.yaml`` is the resolved config. With
    ``progress`` the driver prints a line per epoch and in-epoch progress. This is the Ray Train
    step only: ``apps.workflows.train`` (what ``cxr-ray train`` runs) checks the inputs before
    Ray, prepares the cache, and then fits the ``metric.tta`` decisions of the best checkpoint.
    """
    cfg = resolve_resources(cfg)
    check_resources(cfg, data_cpus=cfg.train.data_cpus)
    storage, name = store.absolute(cfg.train.storage_path), run_name(cfg)
    cfg = cfg.replace(**{"train.name": name, "train.storage_path": storage})
    run_dir = store.join(storage, name)
    check_run_dir(cfg, run_dir, resume)
    inputs = training_inputs(cfg, cache)
    check_shared_paths({"train.storage_path": storage})
    store.write_bytes(store.join(run_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    trainer = build_trainer(cfg, inputs, name, storage)
    held = this_jobs_placement_groups()
    try:
        if not progress:
            return trainer.fit()
        with ProgressPrinter(cfg.metric.selection) as printer:
            inputs.loop_config["progress"] = printer.queue
            return trainer.fit()
    finally:  # the stages after training (TTA, evaluation) need the CPUs its worker group held
        release_placement_groups(held, "train")
