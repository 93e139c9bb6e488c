"""Where the model looked: Grad-CAM heatmaps (Captum's ``LayerGradCam``) and overlay galleries.

The target of a one-logit head is the PNEUMONIA logit; a NORMAL prediction is explained with
the negative logit (what pushed the image towards NORMAL). The layer is the last convolutional
stage: ResNet-50's ``layer4``, ``simple_cnn``'s last convolution. Heatmaps are upsampled to the
model's input size and scaled to [0, 1] per image.

``explain_files`` decodes files through the checkpoint's own preprocessing (as ``score``
does), writes one overlay PNG per image (the X-ray, the heatmap, the probability and the
prediction in the corner) and an ``index.html`` gallery; a file that cannot be read is listed
there with the reason, and the others go on. Captum is the ``explain`` extra.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from cxr_ray.analysis.metrics import is_positive, predicted_classes
from cxr_ray.checkpoint import LoadedCheckpoint, load_checkpoint
from cxr_ray.cluster import watched
from cxr_ray.data.catalog import CLASSES
from cxr_ray.data.images import load_images
from cxr_ray.errors import ExplainError
from cxr_ray.inference.predictor import Predictor
from cxr_ray.models.registry import gradcam_layer
from cxr_ray.models.wrappers import base_models
from cxr_ray.storage import uri as store


def require_captum(what: str = "Grad-CAM") -> None:
    """:class:`ExplainError` naming the extra to install when Captum is missing."""
    try:
        import captum  # noqa: F401
    except ImportError as e:
        raise ExplainError(f"{what} needs Captum: pip install 'cxr_ray[explain]' ({e})") from e


def gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, positive: np.ndarray) -> np.ndarray:
    """Grad-CAM maps ``(B, H, W)`` in [0, 1] of normalised fp32 input ``x`` ``(B, 1, H, W)``:
    for the PNEUMONIA logit where ``positive``, for its negative elsewhere."""
    require_captum()
    from captum.attr import LayerAttribution, LayerGradCam

    sign = torch.where(torch.as_tensor(positive, dtype=torch.bool), 1.0, -1.0).to(x.device)

    def signed_logit(inp: torch.Tensor) -> torch.Tensor:  # (B, 1): the explained class's logit
        return model(inp) * sign[: len(inp), None]

    model.eval()
    x = x.detach().float().clone().requires_grad_(True)  # frozen backbones: gradients still reach the layer
    cam = LayerGradCam(signed_logit, layer).attribute(x, target=0, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    cam = cam.detach().cpu().numpy().astype(np.float32)
    top = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(cam, top, out=np.zeros_like(cam), where=top > 0)


@dataclass
class Explained:
    """One image's explanation: the model-size image, its heatmap, probability and class."""

    path: str
    image: np.ndarray | None  # uint8 (N, N)
    heatmap: np.ndarray | None  # float (N, N) in [0, 1]
    probability: float = float("nan")
    prediction: str = ""
    error: str = ""


def explain_images(ckpt: LoadedCheckpoint, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities ``(B,)`` and Grad-CAM maps ``(B, N, N)`` of uint8 model-size
    images ``(B, 1, N, N)`` (fp32, CPU), each map for the class the model predicts."""
    ckpt.model.float().eval()  # Grad-CAM needs fp32 gradients
    predictor = Predictor(ckpt, "cpu", "fp32", channels_last=False)
    x = predictor.inputs(images)
    with torch.no_grad():
        probs = predictor.calibrated(predictor.model(x).squeeze(1).numpy())
    return probs, member_maps(ckpt.model, ckpt.cfg.model.name, x, is_positive(probs, ckpt.threshold))


def member_maps(model: nn.Module, name: str, x: torch.Tensor, positive: np.ndarray) -> np.ndarray:
    """Grad-CAM maps of ``model``; for an ensemble, the mean of its members' maps (each at its
    own layer) rescaled to [0, 1] per image. TTA is not explained: the maps are of the image as is."""
    nets = base_models(model, name)
    if len(nets) == 1:
        return gradcam(nets[0][0], gradcam_layer(*nets[0]), x, positive)
    cam = np.mean([gradcam(m, gradcam_layer(m, n), x, positive) for m, n in nets], axis=0)
    top = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(cam, top, out=np.zeros_like(cam), where=top > 0)


def explain_files(ckpt: LoadedCheckpoint, paths: list[str], errors: list[str] | None = None,
                  batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[Explained]:
    """Decode ``paths`` with the checkpoint's preprocessing (``images.load_images``) and
    explain them, in their order; a file that cannot be decoded, or whose listing ``errors``
    entry is set, gets ``error`` instead."""
    contract = ckpt.preprocessing
    errors = errors or [""] * len(paths)
    out: list[Explained] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        loaded = load_images(chunk, contract.cache_size, contract.image_size, errors[start:start + batch_size])
        ok = loaded["error"] == ""
        probs, maps = explain_images(ckpt, loaded["image"][ok]) if ok.any() else ([], [])
        results = iter(zip(loaded["image"][ok][:, 0], probs, maps))
        for path, good, error in zip(chunk, ok, loaded["error"]):
            if not good:
                out.append(Explained(path, None, None, error=error))
                continue
            img, p, m = next(results)
            out.append(Explained(path, img, m, float(p), CLASSES[int(is_positive(p, ckpt.threshold))]))
        if on_batch:
            on_batch(min(start + batch_size, len(paths)))
    return out


def overlay(image: np.ndarray, heatmap: np.ndarray, caption: str, scale: int = 2):
    """A PIL RGB image: the gray X-ray with the heatmap (jet, 40%) over it, ``scale`` x the
    model size, and ``caption`` in the top-left corner on a dark box."""
    import matplotlib
    from PIL import Image, ImageDraw

    gray = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    heat = matplotlib.colormaps["jet"](heatmap)[..., :3]
    alpha = 0.4 * heatmap[..., None] ** 0.5  # faint where the map is near zero
    rgb = ((1 - alpha) * gray + alpha * heat) * 255
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((4, 4), caption)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 4), caption, fill=(255, 255, 255))
    return img


def overlay_name(rank: int, path: str) -> str:
    """The overlay file of the ``rank``-th explained image: ``00012_<safe stem>.png``."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).stem)[:60]
    return f"{rank:05d}_{stem}.png"


def save_overlay(item: Explained, out: str, name: str, caption: str = "") -> None:
    """Write ``item``'s overlay PNG as ``out/name`` (a local folder or URI)."""
    from io import BytesIO


    buf = BytesIO()
    overlay(item.image, item.heatmap, caption or f"{item.prediction}  p={item.probability:.3f}").save(buf, "PNG")
    store.write_bytes(store.join(str(out), name), buf.getvalue())


def write_gallery(items: list[Explained], out: str | os.PathLike, title: str,
                  sections: dict[str, list[int]] | None = None) -> Path:
    """One overlay PNG per explained item and ``index.html`` linking them (grouped by
    ``sections``: title -> item indices; default one section); unreadable items are listed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, it in enumerate(items):
        name = "" if it.error else overlay_name(i, it.path)
        if name:
            save_overlay(it, str(out), name)
        records.append({"path": it.path, "name": name, "prediction": it.prediction,
                        "probability": it.probability, "error": it.error})
    write_index(records, str(out), title, sections)
    return out / "index.html"


def write_index(records: list[dict[str, Any]], out: str, title: str,
                sections: dict[str, list[int]] | None = None) -> str:
    """``out/index.html``: a figure per record (``path``, overlay ``name``, ``prediction``,
    ``probability``, ``error``) grouped by ``sections`` (title -> record indices); returns its path."""

    sections = sections or {"": list(range(len(records)))}
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;background:#111;color:#eee}figure{display:inline-block;"
             "margin:6px;width:300px;vertical-align:top}img{width:300px}figcaption{font-size:12px;"
             "word-break:break-all}.err{color:#f88}</style>", f"<h1>{html.escape(title)}</h1>",
             "<p>Grad-CAM of the predicted class (PNEUMONIA: the PNEUMONIA logit; NORMAL: its negative); "
             "red = most influence. Probabilities are calibrated.</p>"]
    for heading, idx in sections.items():
        if heading:
            parts.append(f"<h2>{html.escape(heading)} ({len(idx)})</h2>")
        for i in idx:
            r = records[i]
            if r["error"]:
                parts.append(f"<figure><figcaption class='err'>{html.escape(r['path'])}: could not be read: "
                             f"{html.escape(r['error'])}</figcaption></figure>")
            else:
                name = html.escape(r["name"], quote=True)
                parts.append(f"<figure><a href='{name}'><img src='{name}' alt='' loading='lazy'></a><figcaption>"
                             f"{html.escape(r['prediction'])} p={r['probability']:.3f}<br>{html.escape(r['path'])}"
                             "</figcaption></figure>")
    index = store.join(str(out), "index.html")
    store.write_bytes(index, "\n".join(parts).encode())
    return index


class ExplainActor:
    """Ray Data callable class: loads the checkpoint once (with the job's TTA mode) and writes
    the overlay of every row (``path``, ``name``, ``probability``, ``prediction``: the scored
    values, shown in the caption) to ``out``; returns ``path``, ``name`` and ``error``."""

    def __init__(self, checkpoint: str, tta: str, out: str, threads: int):

        torch.set_num_threads(max(1, threads))
        self.ckpt, self.out = load_checkpoint(checkpoint).with_tta(tta), out

    def __call__(self, rows: Any) -> Any:
        items = explain_files(self.ckpt, list(rows["path"]))
        errors = []
        for it, name, p, pred in zip(items, rows["name"], rows["probability"], rows["prediction"]):
            if not it.error:
                save_overlay(it, self.out, name, f"{pred}  p={p:.3f}")
            errors.append(it.error)
        return rows.assign(error=errors)


def rows_to_explain(scored: Any, top: int = 0) -> Any:
    """The scored rows to explain, highest probability first, with their overlay ``name``,
    ``probability`` and ``prediction``: the positive predictions, or the ``top`` highest
    probabilities when ``top`` > 0; rows with an error never."""
    ok = scored[scored["error"].fillna("") == ""]
    chosen = ok.nlargest(top, "prob_pneumonia") if top > 0 else ok[is_positive(ok["prob_pneumonia"], ok["threshold"])]
    chosen = chosen.sort_values("prob_pneumonia", ascending=False, ignore_index=True)
    rows = chosen.assign(name=[overlay_name(i, p) for i, p in enumerate(chosen["path"])],
                         probability=chosen["prob_pneumonia"].astype(float),
                         prediction=predicted_classes(chosen["prob_pneumonia"], chosen["threshold"]))
    return rows[["path", "name", "probability", "prediction"]]


def explain_scored(ckpt: LoadedCheckpoint, scored: Any, out: str, top: int = 0, actors: int = 1,
                   cpus_per_actor: float = 1.0) -> dict[str, Any]:
    """Grad-CAM overlays of a scoring job's rows by ``actors`` Ray Data actors, and
    ``out/index.html`` (highest probability first). ``scored``: the job's ``path``,
    ``prob_pneumonia``, ``threshold`` and ``error`` columns (pandas); explained are its positive
    predictions or, with ``top`` > 0, its ``top`` highest probabilities. Each image is decoded
    again (the score pass keeps no pixels); Ray must be initialised."""

    import pandas as pd
    import ray

    rows = rows_to_explain(scored, top)
    done = rows.assign(error="")
    if len(rows):
        ds = ray.data.from_pandas(rows).map_batches(
            ExplainActor, batch_size=8, batch_format="pandas", concurrency=max(1, actors), num_cpus=cpus_per_actor,
            fn_constructor_kwargs={"checkpoint": ckpt.path, "tta": ckpt.tta, "out": out,
                                   "threads": math.ceil(cpus_per_actor)})
        parts = [pd.DataFrame(b) for b in watched(ds.iter_batches(batch_format="pandas"), "explain",
                                                  ckpt.cfg.data.stall_timeout_s)]
        done = pd.concat(parts, ignore_index=True).sort_values("name", ignore_index=True)
    what = f"the {top} highest probabilities" if top > 0 else "positive predictions"
    index = write_index(done.to_dict("records"), out, f"cxr_ray Grad-CAM of {what}: {ckpt.model_id}")
    failed = done[done["error"] != ""]
    return {"explained": int(len(done) - len(failed)), "failed": list(zip(failed["path"], failed["error"])),
            "index": index, "what": what}


def summary(items: list[Explained]) -> dict[str, Any]:
    """Counts for the command's output."""
    ok = [it for it in items if not it.error]
    return {"explained": len(ok), "failed": len(items) - len(ok),
            "pneumonia": sum(it.prediction == CLASSES[1] for it in ok)}
