"""Scoring's Ray Data stages (run in Ray workers): read + decode tasks, the scoring actors."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np

from cxr_ray.config import ScoreConfig
from cxr_ray.data.decode import (
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_PIXELS,
    DEFAULT_READ_TIMEOUT_S,
    ImageDecodeError,
    decode_image,
)
from cxr_ray.data.images import load_images, to_model_size


def read_and_decode(batch: dict[str, np.ndarray], cache_size: int, image_size: int,
                    max_pixels: int = DEFAULT_MAX_PIXELS, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                    max_file_mb: float = DEFAULT_MAX_FILE_MB, for_device: bool = False) -> dict[str, np.ndarray]:
    """Ray Data UDF: ``path``/``label`` rows (and ``error`` from the listing, when present)
    -> model-size uint8 images, by training's own preprocessing.

    Every row is kept: a file that was refused by the listing, or cannot be read or decoded
    for any reason, gets a black image, zero size and the reason in ``error`` ("" when decoded).
    ``for_device`` (``score.decode=gpu``): JPEGs the actor's device decoder takes are only read
    and header-checked here; their bytes travel in ``encoded`` (``images.load_images``).
    """
    listed = batch["error"] if "error" in batch else None
    loaded = load_images(batch["path"], cache_size, image_size, listed, max_pixels, timeout_s, max_file_mb,
                         for_device)
    return {"path": batch["path"], "label": np.asarray(batch["label"], np.int8), **loaded}


def score_device(score: ScoreConfig):
    """CUDA when the actor asks for GPUs (and one is visible), else CPU."""
    import torch

    if score.gpus_per_actor > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("score.gpus_per_actor > 0 but this actor sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


class ScoreActor:
    """Ray Data callable class: loads the checkpoint once per actor, scores decoded batches.

    ``score.backend=torch``: the checkpoint's model through the one :class:`Predictor`
    (``inference/predictor.py``), in the precision the driver resolved for the job
    (``score.amp``, see ``job.resolve_score``), channels_last where faster, on CPU with
    ``score.torch_threads`` (default: the actor's CPUs) intra-op threads.
    ``score.backend=onnxruntime``: its ONNX export (``export.cached_export``: made once per
    machine), fp32, with as many ONNX Runtime threads. (``auto`` was resolved by the driver.)
    ``score.decode=gpu``: rows that arrive with ``encoded`` JPEG bytes are decoded here, on the
    actor's device (``data/device_decode.py``: nvJPEG on a GPU), and any file the device decoder
    refuses is decoded on this CPU by the CPU path, with its errors (``max_pixels``: the user's limit).
    """

    def __init__(self, checkpoint: str, score: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS):
        # Deferred: the read + decode tasks import this module too; the model stack (torch
        # models, sklearn, ONNX export) is loaded only in the scoring actors.
        import torch

        from cxr_ray.analysis.metrics import decision_threshold
        from cxr_ray.checkpoint import load_checkpoint
        from cxr_ray.engine.loop import probabilities
        from cxr_ray.engine.precision import resolve_precision
        from cxr_ray.inference.onnx import OnnxModel
        from cxr_ray.inference.predictor import Predictor

        self.score = ScoreConfig(**score)
        self.device = score_device(self.score)
        self.max_pixels = max_pixels
        threads = self.score.torch_threads or math.ceil(self.score.cpus_per_actor)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        ckpt = load_checkpoint(checkpoint).with_tta(self.score.tta)
        self.contract = ckpt.preprocessing
        self.threshold, self.model_id = decision_threshold(ckpt.threshold), ckpt.model_id  # float32, as compared
        self.temperature, self.bias, self._probabilities = ckpt.temperature, ckpt.logit_bias, probabilities
        self.onnx, self.predictor = None, None
        if self.score.backend == "onnxruntime":
            from cxr_ray.apps.export import cached_export  # the exporter loads only for this backend

            self.onnx = OnnxModel(cached_export(ckpt, "onnx"), threads if self.device.type == "cpu" else 0,
                                  cuda=self.device.type == "cuda")
            return
        # the driver resolved score.amp for the job (job.resolve_score) and warned about a mismatch
        precision = resolve_precision(self.score.amp, self.device, ckpt.val_precision)
        self.predictor = Predictor(ckpt, self.device, precision, compile=self.score.compile)

    def probabilities(self, images: Any) -> np.ndarray:
        """Calibrated PNEUMONIA probabilities (``sigmoid(logit / temperature + bias)``) of uint8
        ``(B, 1, N, N)`` images (numpy, or a tensor on the actor's device): the :class:`Predictor`
        (evaluation's own), or the ONNX export (normalisation inside) and the same sigmoid."""
        if self.onnx is not None:
            if not isinstance(images, np.ndarray):
                images = images.cpu().numpy()
            logits = self.onnx.logits(images.astype(np.float32) / np.float32(255.0))
            return self._probabilities(logits, self.temperature, self.bias)
        return self.predictor.probabilities(images)

    def decode_encoded(self, batch: dict[str, np.ndarray], error: np.ndarray, width: np.ndarray,
                       height: np.ndarray) -> Any:
        """The batch's model-input images with the ``encoded`` rows decoded on the actor's
        device: a uint8 tensor there. A file the device decoder refuses is decoded on this CPU
        by the CPU path (``decode.decode_image``); a file that fails there too gets its error in
        ``error`` and zero ``width`` / ``height`` (updated in place, as the read tasks give a file
        they cannot decode) and stays black. Never raises for a file."""
        import torch  # deferred: the read tasks import this module and run without torch

        from cxr_ray.data.device_decode import decode_batch  # torch + torchvision: actors only

        images = torch.from_numpy(np.array(batch["image"])).to(self.device)  # a copy: Ray's views are read-only
        rows = [i for i, b in enumerate(batch["encoded"]) if len(b) and error[i] == ""]
        blobs = [bytes(batch["encoded"][i]) for i in rows]
        sizes = [(int(width[i]), int(height[i])) for i in rows]
        cache, size = self.contract.cache_size, self.contract.image_size
        for i, blob, image in zip(rows, blobs, decode_batch(blobs, sizes, cache, size, self.device)):
            if image is not None:
                images[i] = image
                continue
            path = str(batch["path"][i])
            try:  # the device decoder refused it: the CPU path decodes it, or says why not
                pixels, _, _ = decode_image(blob, cache, path, max_pixels=self.max_pixels)
                images[i] = torch.from_numpy(to_model_size(pixels[None], size)[0]).to(self.device)
                continue
            except ImageDecodeError as e:
                error[i] = e.reason
            except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the job
                error[i] = f"unexpected {type(e).__name__} while decoding: {e}"
            width[i] = height[i] = 0
        return images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # copies: device decoding may add errors (and zero the size of a file it cannot decode)
        error = np.array(batch["error"], dtype=object)
        width, height = np.array(batch["width"], np.int32), np.array(batch["height"], np.int32)
        images = self.decode_encoded(batch, error, width, height) if "encoded" in batch else batch["image"]
        ok = np.asarray([e == "" for e in error], dtype=bool)
        probs = np.full(len(ok), np.nan, np.float32)
        if ok.any():
            probs[ok] = self.probabilities(images[ok] if isinstance(images, np.ndarray) else images[_mask(ok, images)])
        n = len(ok)
        return {"path": batch["path"], "prob_pneumonia": probs,
                "threshold": np.full(n, self.threshold, np.float32),
                "model": np.full(n, self.model_id, dtype=object),
                "width": width, "height": height, "error": error,
                "label": batch["label"],
                "scored_at": np.full(n, np.datetime64(datetime.now(timezone.utc).replace(tzinfo=None), "us"))}


def _mask(ok: np.ndarray, like: Any) -> Any:
    """``ok`` as a bool tensor on ``like``'s device, to index it."""
    import torch  # deferred: the read tasks import this module and run without torch

    return torch.from_numpy(ok).to(like.device)
