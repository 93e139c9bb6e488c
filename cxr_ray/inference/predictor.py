"""The one way a loaded checkpoint is applied to images, for every job that predicts:
evaluation, the scoring actors, Grad-CAM, and fitting a TTA / ensemble / site decision.

A :class:`Predictor` fixes the device, the precision (``engine/precision.py``: a checkpoint's
threshold belongs to the precision it was chosen in), the memory format (channels_last where
faster) and the checkpoint's preprocessing contract (``data/preprocessing.py``), so the same
file gets the same probability from ``evaluate``, ``score`` and ``explain``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxr_ray.analysis.drift import StatsCollector
from cxr_ray.checkpoint import LoadedCheckpoint
from cxr_ray.cluster import watched
from cxr_ray.data.pipeline import check_cache_size, collated_keeping, split_dataset
from cxr_ray.data.transforms import Collate
from cxr_ray.engine.loop import predict_logits, probabilities
from cxr_ray.engine.precision import prefers_channels_last


class Predictor:
    """``ckpt``'s model on ``device`` in ``precision`` (``bf16`` / ``fp32``, as resolved by
    ``LoadedCheckpoint.precision``), channels_last where it is faster (``channels_last=None``)
    or as given, optionally ``torch.compile``-d. Inputs are model-size uint8 images
    ``(B, 1, N, N)``; outputs are fp32 logits and calibrated probabilities
    ``sigmoid(logit / temperature + bias)``."""

    def __init__(self, ckpt: LoadedCheckpoint, device: torch.device | str = "cpu", precision: str = "fp32",
                 channels_last: bool | None = None, compile: bool = False):
        self.ckpt, self.device, self.precision = ckpt, torch.device(device), precision
        if channels_last is None:
            channels_last = prefers_channels_last(self.device)
        model = ckpt.model.to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if compile else model
        self.collate = Collate(ckpt.preprocessing, self.device, channels_last=channels_last)

    def inputs(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The model's input tensor for uint8 ``(B, 1, N, N)`` images, numpy or a tensor (on any
        device), normalised by the contract."""
        x, _ = self.collate({"image": images, "label": np.zeros(len(images), np.float32)})
        return x

    def logits_of(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
        """fp32 logits and labels of collated ``(inputs, labels)`` batches."""
        logits, labels, _ = predict_logits(self.model, batches, self.device, self.precision)
        return logits, labels

    def logits(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """fp32 PNEUMONIA logits ``(B,)`` of uint8 ``(B, 1, N, N)`` images."""
        return self.logits_of([(self.inputs(images), torch.zeros(len(images)))])[0]

    def probabilities(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Calibrated PNEUMONIA probabilities ``(B,)`` (float32) of uint8 ``(B, 1, N, N)`` images."""
        return self.calibrated(self.logits(images))

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """``sigmoid(logit / temperature + bias)`` with the checkpoint's calibration, float32."""
        return probabilities(logits, self.ckpt.temperature, self.ckpt.logit_bias).astype(np.float32)

    def predict_split(self, cache: Any, split: str, batch_size: int = 64,
                      stats: StatsCollector | None = None) -> pd.DataFrame:
        """``path, patient, label, logit, probability`` (sorted by path) for every decodable image
        of ``split`` of a prepared cache, read by Ray Data into this process. ``stats`` measures
        the model-input images' acquisition statistics on the way (the drift report's)."""
        contract = self.ckpt.preprocessing
        check_cache_size(cache, contract, str(self.ckpt.path))
        ds = split_dataset(cache, split, contract.image_size, with_paths=True)
        stream: Iterable[Mapping[str, Any]] = watched(ds.iter_batches(batch_size=batch_size, batch_format="numpy"),
                                                      f"predict {split}", self.ckpt.cfg.data.stall_timeout_s)
        if stats is not None:
            stream = stats.watch(stream)
        kept: dict[str, list] = {}
        logits, labels = self.logits_of(collated_keeping(stream, self.collate, ("path", "patient"), kept))
        return pd.DataFrame({"path": kept.get("path", []), "patient": kept.get("patient", []),
                             "label": labels.astype(np.int64), "logit": logits.astype(np.float32),
                             "probability": self.calibrated(logits)}
                            ).sort_values("path", ignore_index=True)


def predict_split(ckpt: LoadedCheckpoint, cache: Any, split: str, batch_size: int = 64, precision: str = "fp32",
                  stats: StatsCollector | None = None) -> pd.DataFrame:
    """:meth:`Predictor.predict_split` of ``ckpt`` on this process's CPU in ``precision``."""
    return Predictor(ckpt, "cpu", precision).predict_split(cache, split, batch_size, stats)
