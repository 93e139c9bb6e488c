"""Pure PyTorch training and evaluation: no Ray import, so it is testable and benchmarkable alone.

Batches are ``(images, labels)`` tensors already on the device (see
``data.transforms.Collate``): images normalised float ``(B, 1, N, N)``, labels float ``(B,)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from cxr_ray.config import TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor]


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op otherwise (fp32 on CPU)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
                    device: torch.device, amp: bool = False,
                    on_batch: Callable[[int, float], None] | None = None) -> EpochResult:
    """One optimisation pass; returns the mean loss per image, image count and wall time.

    ``on_batch(images_so_far, seconds_so_far)`` is called after every step (progress).
    """
    model.train()
    total, n, start = 0.0, 0, time.perf_counter()
    for x, y in batches:
        with autocast(device, amp):
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
def predict(model: nn.Module, batches: Iterable[Batch], device: torch.device, amp: bool = False,
            loss_fn: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities of PNEUMONIA, the labels, and the mean loss (nan without ``loss_fn``)."""
    model.eval()
    probs, labels, total = [], [], 0.0
    for x, y in batches:
        with autocast(device, amp):
            logits = model(x).squeeze(1).float()
        if loss_fn is not None:
            total += float(loss_fn(logits, y)) * len(y)
        probs.append(torch.sigmoid(logits).cpu().numpy())
        labels.append(y.cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    t = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    return p, t, (total / len(p) if loss_fn is not None and len(p) else float("nan"))


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
