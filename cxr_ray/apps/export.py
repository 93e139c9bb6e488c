"""Exported models for serving: ONNX or TorchScript, with a JSON sidecar (the input contract).

An export folder holds::

    model.onnx | model.torchscript.pt   the model: the one-channel stem, the checkpoint's own
                                        normalisation and the network; input ``image`` float32
                                        ``(batch, 1, N, N)`` = 8-bit gray / 255, output
                                        ``logit`` ``(batch, 1)``, the PNEUMONIA logit; any batch
    model.json                          the contract (:func:`sidecar`): how to make the input from
                                        a file, how to turn the logit into a probability and a
                                        class, which checkpoint it came from, cxr_ray's version

so a serving system needs nothing from cxr_ray. Both formats can live in one folder (the
sidecar lists each); a folder holding another checkpoint's export is refused.

``cached_export`` gives the scoring job's ``onnxruntime`` backend a local export of a
checkpoint, made once per machine and keyed by the checkpoint's content digest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import cxr_ray
from cxr_ray.analysis.metrics import DECISION_DTYPE, decision_threshold
from cxr_ray.checkpoint import LoadedCheckpoint
from cxr_ray.config import DataConfig
from cxr_ray.data.preprocessing import Preprocessing
from cxr_ray.data.transforms import normalize
from cxr_ray.errors import ExportError
from cxr_ray.inference.onnx import INPUT_NAME, OUTPUT_NAME, OnnxModel
from cxr_ray.storage import uri as store

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
SIDECAR = "model.json"
ONNX_OPSET = 18
# max |logit difference| between the export and the checkpoint (fp32), per unit of the largest
# |logit| when that is above 1: float32 rounding grows with the logits' scale
PARITY_TOLERANCE = 1e-4


class ServingModel(nn.Module):
    """What is exported: float32 ``(B, 1, N, N)`` in [0, 1] (8-bit gray / 255) -> ``(B, 1)``
    PNEUMONIA logits, through the normalisation of the checkpoint's preprocessing contract and its model."""

    def __init__(self, model: nn.Module, contract: Preprocessing):
        super().__init__()
        self.model = model
        self.contract = contract  # traced / exported as constants

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(image, self.contract))


def serving_model(ckpt: LoadedCheckpoint) -> ServingModel:
    """The checkpoint's model with its normalisation in front, fp32, CPU, eval mode."""
    return ServingModel(ckpt.model.float().cpu().eval(), ckpt.preprocessing).eval()


def input_contract(contract: Preprocessing) -> dict[str, Any]:
    """How a file becomes the exported model's input: the checkpoint's preprocessing contract
    (``data/preprocessing.py``) spelled out, the steps training, evaluation and scoring run."""
    n, s = contract.image_size, contract.cache_size
    steps = [
        "decode to one 8-bit gray channel: RGB/CMYK/palette to luminance (PIL 'L'), transparency "
        "on black, 16-bit min-max stretched; DICOM: modality LUT, VOI LUT or first window, "
        "MONOCHROME1 inverted",
        f"resize to {s}x{s}, aspect ratio not kept, PIL bilinear (antialiased); JPEGs may first be "
        f"reduced by libjpeg's DCT scaling (draft mode) to no less than {s} px",
    ]
    if s != n:
        steps.append(f"resize {s}x{s} -> {n}x{n}: bilinear, antialias, align_corners=False "
                     f"(torch.nn.functional.interpolate), rounded back to uint8")
    steps.append("float32 = uint8 / 255, shape (batch, 1, H, W)")
    norm: dict[str, Any] = {"mode": contract.normalize, "in_model": True, "source": contract.source}
    if contract.normalize == "fixed":
        norm.update(mean=contract.mean, std=contract.std, formula="(x - mean) / std",
                    model_value_range=list(contract.value_range))
    else:
        norm.update(scale=contract.scale, formula="(x - mean(x)) / max(std(x, unbiased), 1e-3) * scale per image")
    return {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", contract.channels, n, n], "layout": "NCHW",
            "channels": contract.channels, "color": "grayscale, bone bright", "value_range": [0.0, 1.0],
            "image_size": n, "decode_size": s, "preprocessing": steps, "normalization": norm,
            "contract": contract.to_dict()}


def sidecar(ckpt: LoadedCheckpoint, artifacts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``model.json`` contract of ``ckpt``'s export with ``artifacts`` ({format: details})."""
    meta = ckpt.meta  # as stored: the sidecar names a calibration only where the checkpoint has one
    temperature, bias = meta.get("temperature"), meta.get("logit_bias")
    formula = "logit" + (" / temperature" if temperature else "") + (" + logit_bias" if bias is not None else "")
    decision = {
        "probability": f"sigmoid({formula})",
        "threshold": float(decision_threshold(ckpt.threshold)),  # the float32 that cxr_ray compares against
        "rule": f"{ckpt.info.positive_class} when probability >= threshold, both as "
                f"{np.dtype(DECISION_DTYPE).name} (as cxr_ray's metrics, evaluate and score decide)",
        "dtype": np.dtype(DECISION_DTYPE).name,
        "threshold_rule": meta.get("threshold_rule"),
        "threshold_precision": ckpt.val_precision,
    }
    if temperature:
        decision["temperature"] = float(temperature)
    if bias is not None:
        decision["logit_bias"] = float(bias)
    return {
        "cxr_ray_version": cxr_ray.__version__,
        "artifacts": artifacts,
        "input": input_contract(ckpt.preprocessing),
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 1],
                   "meaning": "logit of PNEUMONIA (class 1) vs NORMAL (class 0)"},
        "decision": decision,
        "class_map": ckpt.info.class_map,
        "source": {"checkpoint": str(ckpt.path), "digest": ckpt.digest, "model_id": ckpt.model_id,
                   "epoch": ckpt.info.epoch, "model": ckpt.cfg.model.name,
                   "validation_metrics": ckpt.info.metrics, "versions": ckpt.info.versions},
    }


def example_input(ckpt: LoadedCheckpoint, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random input batch of the model's size (values in [0, 1])."""
    n = ckpt.preprocessing.image_size
    return torch.rand(batch, 1, n, n, generator=torch.Generator().manual_seed(seed))


def export_onnx(model: ServingModel, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """Write ``model`` to ``path`` as ONNX (torch's ``torch.export``-based exporter, needs the
    ``onnx`` extra) with a dynamic batch dimension; returns the artifact's details."""
    try:
        import onnx  # noqa: F401 - the exporter needs both
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx extra (pip install 'cxr_ray[onnx]'): {e}") from e
    batch = torch.export.Dim("batch", min=1, max=65536)
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # one INFO line per graph rewrite otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                                    dynamic_shapes={"image": {0: batch}}, verbose=False)
        program.save(str(path), external_data=False)
    return {"file": path.name, "opset": ONNX_OPSET, "exporter": f"torch.onnx (dynamo) {torch.__version__}"}


def export_torchscript(model: ServingModel, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """Write ``model`` to ``path`` as TorchScript (traced; any batch size); the artifact's details."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(path))
    return {"file": path.name, "exporter": f"torch.jit.trace {torch.__version__}",
            "load": "torch.jit.load(path, map_location='cpu')"}


def run_export(path: Path, fmt: str, images: np.ndarray, threads: int = 0) -> np.ndarray:
    """Logits ``(B,)`` of the exported model at ``path`` for float32 ``(B, 1, N, N)`` ``images``."""
    if fmt == "onnx":
        return OnnxModel(path, threads).logits(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.10: "torch.jit.load is deprecated"
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(images, np.float32))).squeeze(1).numpy()


def parity(ckpt: LoadedCheckpoint, model: ServingModel, path: Path, fmt: str) -> tuple[float, float] | None:
    """Max |logit difference| between the export and the checkpoint's fp32 model on a batch of
    3 random images (a batch size other than the traced one: the batch is dynamic), and the
    tolerance it must meet (:data:`PARITY_TOLERANCE` x max(1, max |logit|)); ``None`` when ONNX
    Runtime is not installed to run an ONNX export."""
    x = example_input(ckpt, batch=3, seed=1)
    with torch.no_grad():
        ref = model(x).squeeze(1).numpy()
    try:
        got = run_export(path, fmt, x.numpy())
    except ImportError:
        return None
    return float(np.abs(got - ref).max()), PARITY_TOLERANCE * max(1.0, float(np.abs(ref).max()))


def _read_sidecar(folder: str) -> dict[str, Any] | None:
    target = store.join(folder, SIDECAR)
    return json.loads(store.read_bytes(target)) if store.exists(target) else None


def export_checkpoint(ckpt: LoadedCheckpoint, fmt: str, out: str) -> dict[str, Any]:
    """Export ``ckpt`` as ``fmt`` (``onnx`` / ``torchscript``) into the folder or URI ``out``;
    returns the sidecar written there. A folder holding another checkpoint's export is refused;
    one holding this checkpoint's other format gains this one. The export must reproduce the
    checkpoint's fp32 logits within the tolerance of :func:`parity` or nothing is written."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not one of {list(FORMATS)}")
    existing = _read_sidecar(out)
    if existing and existing.get("source", {}).get("digest") != ckpt.digest:
        raise ExportError(f"{out} holds the export of another checkpoint "
                          f"({existing.get('source', {}).get('checkpoint')}); choose an empty folder")
    model = serving_model(ckpt)
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        path = Path(tmp) / FORMATS[fmt]
        details = (export_onnx if fmt == "onnx" else export_torchscript)(model, example_input(ckpt), path)
        checked = parity(ckpt, model, path, fmt)
        diff, tolerance = checked if checked is not None else (None, None)
        if diff is not None and diff > tolerance:
            raise ExportError(f"the {fmt} export's logits differ from the checkpoint's by {diff:.2e} "
                              f"(> {tolerance:.2g}); nothing written to {out}")
        details["parity_max_abs_logit_diff"] = diff
        artifacts = {**(existing or {}).get("artifacts", {}), fmt: details}
        meta = sidecar(ckpt, artifacts)
        (Path(tmp) / SIDECAR).write_text(json.dumps(meta, indent=1))
        for name in (FORMATS[fmt], SIDECAR):  # the model first: a sidecar never names a missing file
            store.write_bytes(store.join(out, name), (Path(tmp) / name).read_bytes())
    return meta


def cached_export(ckpt: LoadedCheckpoint, fmt: str = "onnx") -> Path:
    """A local export of ``ckpt`` under ``$CXR_RAY_CACHE/exports/<digest>/``, made on first use
    on this machine (concurrent callers: the first to finish wins, the others reuse it)."""

    key = ckpt.digest.split(":", 1)[-1][:24]
    folder = Path(DataConfig().resolved_cache_dir) / "exports" / key
    if (folder / FORMATS[fmt]).is_file() and (folder / SIDECAR).is_file():
        return folder / FORMATS[fmt]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp", dir=folder.parent))
    try:
        export_checkpoint(ckpt, fmt, str(tmp))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race (or an export of the other format exists)
            if not (folder / FORMATS[fmt]).is_file():
                shutil.copy2(tmp / FORMATS[fmt], folder / FORMATS[fmt])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / FORMATS[fmt]
