"""Pure PyTorch training and evaluation: no Ray import, so it is testable and benchmarkable alone.

Batches are ``(images, labels)`` tensors already on the device (see
``data.transforms.Collate``): images normalised float ``(B, 1, N, N)``, labels float ``(B,)``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from cxr_ray.config import TrainConfig
from cxr_ray.engine.precision import autocast
from cxr_ray.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak LR over ``warmup_steps``, then cosine decay to 0."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class ScheduleGeometry:
    """What one step of the LR schedule means: a restored scheduler step count is only right
    for the geometry it was counted in (with twice the workers an epoch has half the steps)."""

    world_size: int  # Ray Train workers sharing each epoch (max(1, train.num_workers))
    steps_per_epoch: int  # optimizer steps of one worker per epoch
    warmup_steps: int
    total_steps: int

    def to_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "steps_per_epoch": self.steps_per_epoch,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def schedule_geometry(n_train: int, cfg: TrainConfig, world_size: int) -> ScheduleGeometry:
    """The schedule of ``cfg`` for ``n_train`` training images shared by ``world_size`` workers:
    ``ceil(n_train / (batch_size * world_size))`` steps per epoch, warmup and total in those steps."""
    world = max(1, int(world_size))
    steps = max(1, math.ceil(n_train / (cfg.batch_size * world)))
    return ScheduleGeometry(world_size=world, steps_per_epoch=steps, warmup_steps=int(cfg.warmup_epochs * steps),
                            total_steps=cfg.epochs * steps)


def check_resumed_schedule(saved: Mapping[str, Any] | None, current: ScheduleGeometry) -> bool:
    """Whether a checkpoint's scheduler state (its train state's ``schedule``, ``saved``) fits
    the schedule rebuilt for this run; ``False`` for checkpoints written before it was recorded
    (nothing to compare). A different geometry is a :class:`ConfigError`: restoring its step
    count would put the learning rate at another point of the schedule (with 1 -> 2 workers,
    past the end: ~0 for the rest of the run)."""
    if saved is None:
        return False
    mine = current.to_dict()
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
    if not diff:
        return True
    old_world = saved.get("world_size")
    cause = (f"it was trained with train.num_workers={old_world}, this run has train.num_workers="
             f"{current.world_size}; resume with train.num_workers={old_world}" if old_world != current.world_size
             else "the number of training images, train.batch_size, train.epochs or train.warmup_epochs changed")
    raise ConfigError(f"cannot resume: the checkpoint's learning-rate schedule ({', '.join(diff)}) does not fit "
                      f"this run: {cause} (or start a new run with another train.name)")


def pos_weight_from_counts(n_normal: int, n_pneumonia: int) -> float:
    """BCE positive-class weight that balances the classes: n_normal / n_pneumonia."""
    if n_normal <= 0 or n_pneumonia <= 0:
        raise ValueError(f"need both classes in train, got NORMAL={n_normal}, PNEUMONIA={n_pneumonia}")
    return n_normal / n_pneumonia


@dataclass
class EpochResult:
    """What one pass over the data produced."""

    loss: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, loss_fn: nn.Module,
                    device: torch.device, precision: str = "fp32",
                    on_batch: Callable[[int, float], None] | None = None) -> EpochResult:
    """One optimisation pass; returns the mean loss per image, image count and wall time.

    ``on_batch(images_so_far, seconds_so_far)`` is called after every step (progress).
    """
    model.train()
    total, n, start = 0.0, 0, time.perf_counter()
    for x, y in batches:
        with autocast(device, precision):
            logits = model(x).squeeze(1)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        if on_batch is not None:
            on_batch(n, time.perf_counter() - start)
    return EpochResult(total / max(n, 1), n, time.perf_counter() - start)


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[Batch], device: torch.device, precision: str = "fp32",
                   loss_fn: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """fp32 PNEUMONIA logits, the labels, and the mean loss (nan without ``loss_fn``)."""
    model.eval()
    logits_all, labels, total = [], [], 0.0
    for x, y in batches:
        with autocast(device, precision):
            logits = model(x).squeeze(1).float()
        if loss_fn is not None:
            total += float(loss_fn(logits, y)) * len(y)
        logits_all.append(logits.cpu().numpy())
        labels.append(y.cpu().numpy())
    z = np.concatenate(logits_all) if logits_all else np.zeros(0, np.float32)
    t = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    return z, t, (total / len(z) if loss_fn is not None and len(z) else float("nan"))


def probabilities(logits: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """float32 ``sigmoid(logits / temperature + bias)`` computed by torch in fp32, as everywhere
    in cxr_ray (``cxr_ray/analysis/calibration.py``: the checkpoint's calibration)."""
    z = torch.tensor(np.asarray(logits, np.float32))  # a copy: pandas/Ray arrays may be read-only
    if temperature != 1.0:
        z = z / temperature
    if bias != 0.0:
        z = z + bias
    return torch.sigmoid(z).numpy()


def predict(model: nn.Module, batches: Iterable[Batch], device: torch.device, precision: str = "fp32",
            loss_fn: nn.Module | None = None, temperature: float = 1.0,
            bias: float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities of PNEUMONIA (``sigmoid(logit / temperature + bias)``), the labels, and the
    mean loss (nan without ``loss_fn``; always of the raw logits)."""
    z, t, loss = predict_logits(model, batches, device, precision, loss_fn)
    return probabilities(z, temperature, bias), t, loss


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta``."""

    patience: int
    min_delta: float = 0.0
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[float] = field(default_factory=list)

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's score (higher is better); True when it is a new best."""
        self.history.append(float(value))
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.bad_epochs, self.history = int(state["bad_epochs"]), list(state["history"])


def train_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                stopper: EarlyStopping, epoch: int, schedule: ScheduleGeometry) -> dict[str, Any]:
    """What a checkpoint's train state holds to resume after ``epoch``, with the schedule's geometry."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "early_stopping": stopper.state_dict(), "epoch": int(epoch), "schedule": schedule.to_dict()}


def restore_train_state(state: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, stopper: EarlyStopping,
                        schedule: ScheduleGeometry, warn: Callable[[str], None] = log.warning) -> int:
    """Load a :func:`train_state` into the optimizer, scheduler and early stopping built for
    ``schedule``; returns the epoch to continue from. A checkpoint counted in another geometry
    is a :class:`ConfigError` (:func:`check_resumed_schedule`) before anything is loaded; one
    older than recorded schedules is resumed with a ``warn``-ing."""
    if not check_resumed_schedule(state.get("schedule"), schedule):
        warn(f"the checkpoint predates recorded LR schedules: resuming it assumes the train.num_workers "
             f"({schedule.world_size}), train.batch_size and training images it was written with")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stopper.load_state_dict(state["early_stopping"])
    return int(state["epoch"]) + 1
