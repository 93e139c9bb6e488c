"""Ray Train wiring: the per-worker loop, the TorchTrainer, and running it.

The optimisation itself is ``engine.py`` (plain PyTorch); this module only connects it to
Ray Train V2: dataset shards, DDP via ``prepare_model``, ``ray.train.report`` with a
checkpoint every epoch, resume from ``ray.train.get_checkpoint()`` after a worker failure,
and early stopping that all workers decide together.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import ray.train
import ray.train.torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cxr_ray.checkpoint import MODEL_FILE, load_train_state, safe_load, save_checkpoint, unwrap
from cxr_ray.config import ExperimentConfig
from cxr_ray.data import io
from cxr_ray.data.pipeline import TorchCollate, split_datasets
from cxr_ray.engine import (EarlyStopping, make_optimizer, make_scheduler, pos_weight_from_counts,
                            predict, train_one_epoch)
from cxr_ray.metrics import SELECTION_METRIC, validation_metrics
from cxr_ray.models import build_model
from cxr_ray.runtime import check_shared_paths

log = logging.getLogger(__name__)

REPORTED = ("epoch", "train_loss", "val_loss", "roc_auc", "pr_auc", "accuracy", "precision", "recall",
            "specificity", "f1", "threshold", SELECTION_METRIC, "best_" + SELECTION_METRIC,
            "train_images_per_s", "stop")


def _gather(values: np.ndarray) -> np.ndarray:
    """Concatenate an array across all Ray Train workers (identity for one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return np.concatenate(parts)


class TrainLoopRunner:
    """One Ray Train worker's run: build, maybe restore, then epochs until done or stopped."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = ExperimentConfig.from_dict(config["cfg"])
        t = self.cfg.train
        self.ctx = ray.train.get_context()
        self.rank = self.ctx.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.gpu = self.device.type == "cuda"
        torch.manual_seed(t.seed + self.rank)
        model = build_model(self.cfg.model)
        if self.gpu:
            model = model.to(memory_format=torch.channels_last)
        self.model = ray.train.torch.prepare_model(model)
        steps = max(1, int(np.ceil(config["n_train"] / (t.batch_size * max(1, self.ctx.get_world_size())))))
        self.optimizer = make_optimizer(self.model, t)
        self.scheduler = make_scheduler(self.optimizer, int(t.warmup_epochs * steps), t.epochs * steps)
        pos_weight = torch.tensor(config["pos_weight"], device=self.device)
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.stopper = EarlyStopping(t.patience, t.min_delta)
        self.start_epoch = 0
        self.train_data = ray.train.get_dataset_shard("train")
        self.val_data = ray.train.get_dataset_shard("val")

    def restore(self) -> None:
        """Continue from the latest reported checkpoint (after a worker-group restart)."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            state = load_train_state(d)
            weights = safe_load(Path(d) / MODEL_FILE)
        unwrap(self.model).load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.start_epoch = int(state["epoch"]) + 1
        if self.rank == 0:
            log.info("[train] resumed from checkpoint after epoch %d", state["epoch"])

    def batches(self, split: str, epoch: int):
        """Model-ready ``(x, y)`` batches of this worker's shard of ``split``."""
        train = split == "train"
        data = self.train_data if train else self.val_data
        collate = TorchCollate(self.device, self.cfg.augment if train else None,
                               seed=self.cfg.train.seed + 1000 * self.rank, epoch=epoch,
                               channels_last=self.gpu)
        return data.iter_torch_batches(
            batch_size=self.cfg.train.batch_size, collate_fn=collate, prefetch_batches=2,
            local_shuffle_buffer_size=4 * self.cfg.train.batch_size if train else None,
            local_shuffle_seed=(self.cfg.train.seed + epoch) if train else None)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, evaluate on the whole validation split, return the metrics."""
        result = train_one_epoch(self.model, self.batches("train", epoch), self.optimizer,
                                 self.scheduler, self.loss_fn, self.device, amp=self.gpu)
        probs, labels, val_loss = predict(self.model, self.batches("val", epoch), self.device,
                                          amp=self.gpu, loss_fn=self.loss_fn)
        local_loss_sum = val_loss * len(probs) if len(probs) else 0.0  # a shard may be empty
        probs, labels = _gather(probs), _gather(labels)
        val_loss = float(_gather(np.array([local_loss_sum])).sum() / max(len(labels), 1))
        metrics = validation_metrics(labels, probs, self.cfg.metric.min_specificity)
        self.stopper.update(metrics[SELECTION_METRIC], epoch)
        metrics.update(epoch=epoch, train_loss=result.loss, val_loss=val_loss,
                       train_images_per_s=result.images_per_s,
                       stop=self.stopper.should_stop or epoch + 1 >= self.cfg.train.epochs)
        metrics["best_" + SELECTION_METRIC] = self.stopper.best
        return metrics

    def report(self, epoch: int, metrics: dict[str, Any]) -> None:
        """``ray.train.report`` the epoch; rank 0 attaches the checkpoint."""
        scalars = {k: metrics[k] for k in REPORTED}
        if self.rank != 0:
            ray.train.report(scalars, checkpoint=None)
            return
        log.info("[train] epoch %d: loss %.4f val_loss %.4f auc %.4f %s %.4f (%.0f img/s)", epoch,
                 metrics["train_loss"], metrics["val_loss"], metrics["roc_auc"], SELECTION_METRIC,
                 metrics[SELECTION_METRIC], metrics["train_images_per_s"])
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, self.model, self.cfg, metrics["threshold"], metrics, epoch, {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "early_stopping": self.stopper.state_dict(), "epoch": epoch})
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(d))

    def run(self) -> None:
        """Epochs from the restored position until the last epoch or early stopping."""
        self.restore()
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            metrics = self.run_epoch(epoch)
            self.report(epoch, metrics)
            if self.stopper.should_stop:  # every worker saw the same gathered metrics
                if self.rank == 0:
                    log.info("[train] early stop after epoch %d (best epoch %d)", epoch,
                             self.stopper.best_epoch)
                break


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds ``cfg`` (a dict), ``pos_weight``, ``n_train``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    TrainLoopRunner(config).run()


def storage_uri(path: str) -> str:
    """Ray needs absolute local paths; URIs pass through."""
    return path if io.is_uri(path) else os.path.abspath(os.path.expanduser(path))


def run_name(cfg: ExperimentConfig, prefix: str = "train") -> str:
    """The configured run name, else ``<prefix>-<model>-<timestamp>``."""
    return cfg.train.name or f"{prefix}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class TrainingInputs:
    """What the driver hands to a TorchTrainer: Ray Datasets plus loop config."""

    datasets: dict[str, Any]
    loop_config: dict[str, Any]


def training_inputs(cfg: ExperimentConfig, cache: Any) -> TrainingInputs:
    """Datasets and the loop config (class weight from the train counts) for ``cfg``."""
    # Per-epoch shard reads would print progress bars per epoch and worker; epochs are logged.
    ray.data.DataContext.get_current().enable_progress_bars = False
    n_normal, n_pneu = cache.split_counts("train")
    pos_weight = cfg.train.pos_weight or pos_weight_from_counts(n_normal, n_pneu)
    return TrainingInputs(
        datasets=split_datasets(cache, cfg.data.image_size, materialize_gb=cfg.data.materialize_gb),
        loop_config={"cfg": cfg.to_dict(), "pos_weight": float(pos_weight), "n_train": n_normal + n_pneu})


def build_trainer(cfg: ExperimentConfig, inputs: TrainingInputs, name: str, storage_path: str,
                  callbacks: list | None = None, score_attribute: str = SELECTION_METRIC):
    """A Ray Train V2 ``TorchTrainer`` for ``cfg`` (scale, checkpoints, failures from config).

    The best ``train.keep_checkpoints`` checkpoints by ``score_attribute`` are kept.
    """
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=inputs.loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources if t.num_workers else None),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute=score_attribute,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets=inputs.datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
    )


def check_resources(cfg: ExperimentConfig, trials: int = 1, data_cpus: float = 1.0) -> None:
    """Fail before training when ``trials`` runs of ``cfg`` would leave Ray Data no CPU.

    Train workers hold their CPUs for the whole run; the pipeline feeding them needs at least
    ``data_cpus`` more, or reading stalls forever (Ray Data warns, then hangs).
    """
    from cxr_ray.config import ConfigError

    total = float(ray.cluster_resources().get("CPU", 0.0))
    t = cfg.train
    need = trials * max(1, t.num_workers) * t.cpus_per_worker
    if need + data_cpus > total + 1e-9:
        raise ConfigError(
            f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker}"
            f"{f' x {trials} concurrent trials' if trials > 1 else ''} = {need:g} CPUs, plus {data_cpus:g} "
            f"for Ray Data, exceeds the cluster's {total:g} CPUs; lower train.cpus_per_worker "
            f"(fractions are fine) or train.num_workers")
    if t.use_gpu and float(ray.cluster_resources().get("GPU", 0.0)) < max(1, t.num_workers) * t.gpus_per_worker:
        raise ConfigError(f"train.use_gpu=true needs {max(1, t.num_workers) * t.gpus_per_worker:g} GPUs; "
                          f"the cluster has {ray.cluster_resources().get('GPU', 0):g}")


def run_training(cfg: ExperimentConfig, cache: Any):
    """Train ``cfg`` on a prepared cache; writes ``config.yaml`` next to the run. Returns the Result."""
    check_resources(cfg)
    name = run_name(cfg)
    storage = storage_uri(cfg.train.storage_path)
    check_shared_paths({"train.storage_path": storage})
    io.write_bytes(io.join(storage, name, "config.yaml"),
                   yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    trainer = build_trainer(cfg, training_inputs(cfg, cache), name, storage)
    return trainer.fit()
