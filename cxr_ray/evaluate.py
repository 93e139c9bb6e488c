"""Evaluate a checkpoint on one split: metrics.json, predictions.parquet, plots, a table.

The checkpoint's own config rebuilds the preprocessing and the split; its stored threshold
(chosen on validation) is applied as is, never re-tuned on the split being reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxr_ray.calibration import calibration_report
from cxr_ray.checkpoint import LoadedCheckpoint
from cxr_ray.data import io
from cxr_ray.data.catalog import CLASSES
from cxr_ray.data.transforms import Collate
from cxr_ray.engine import predict_logits, prefers_channels_last, probabilities
from cxr_ray.metrics import binary_metrics, bootstrap_ci

log = logging.getLogger(__name__)

TABLE_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "specificity")


def predict_split(ckpt: LoadedCheckpoint, cache: Any, split: str, batch_size: int = 64,
                  precision: str = "fp32") -> pd.DataFrame:
    """``path, patient, label, logit, probability`` for every decodable image of ``split``
    (driver process, CPU), in ``precision`` (``"bf16"`` / ``"fp32"``, see
    ``LoadedCheckpoint.precision``); ``probability`` is ``sigmoid(logit / ckpt.temperature)``."""
    from cxr_ray.data.pipeline import collated_keeping, split_dataset

    device = torch.device("cpu")
    channels_last = prefers_channels_last(ckpt.cfg.model.name, device)
    model = ckpt.model.to(memory_format=torch.channels_last) if channels_last else ckpt.model
    ds = split_dataset(cache, split, ckpt.cfg.data.image_size, with_paths=True)
    kept: dict[str, list] = {}
    collate = Collate(device, channels_last=channels_last, normalize=ckpt.cfg.data.normalize)
    batches = collated_keeping(ds.iter_batches(batch_size=batch_size, batch_format="numpy"),
                               collate, ("path", "patient"), kept)
    logits, labels, _ = predict_logits(model, batches, device, precision)
    return pd.DataFrame({"path": kept.get("path", []), "patient": kept.get("patient", []),
                         "label": labels.astype(np.int64), "logit": logits.astype(np.float32),
                         "probability": probabilities(logits, ckpt.temperature)}
                        ).sort_values("path", ignore_index=True)


def metrics_report(preds: pd.DataFrame, threshold: float, n_boot: int = 1000) -> dict[str, Any]:
    """metrics.json content: top-level numbers, the confusion matrix, ``ci`` (95%) and ``ci_method``.

    With a ``patient`` column the CIs come from a patient-level (cluster) bootstrap: one
    patient's images are correlated, so resampling images would overstate the precision.
    """
    y, p = preds["label"].to_numpy(), preds["probability"].to_numpy()
    groups = preds["patient"].to_numpy() if "patient" in preds else None
    metrics = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, threshold, n_boot=n_boot, groups=groups)
    metrics["ci"] = {k: list(v) for k, v in ci.items()}
    metrics["ci_method"] = (f"percentile bootstrap, {n_boot} resamples of "
                            + (f"{len(set(groups))} patients (cluster bootstrap)" if groups is not None
                               else f"{len(y)} images"))
    return metrics


def write_plots(preds: pd.DataFrame, metrics: dict[str, Any], out: Path) -> list[Path]:
    """Confusion matrix, ROC and precision-recall curves as PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    y, p = preds["label"].to_numpy(), preds["probability"].to_numpy()
    files = []
    fig, ax = plt.subplots(figsize=(4, 4))
    cm = np.array(metrics["confusion_matrix"])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=14)
    ax.set_xticks([0, 1], CLASSES)
    ax.set_yticks([0, 1], CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"threshold {metrics['threshold']:.3f}")
    files.append(_save(fig, out / "confusion_matrix.png"))
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, p)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, label=f"AUC {metrics['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("recall (sensitivity)")
        ax.legend(loc="lower right")
        files.append(_save(fig, out / "roc_curve.png"))
        prec, rec, _ = precision_recall_curve(y, p)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(rec, prec, label=f"AP {metrics['pr_auc']:.3f}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.legend(loc="lower left")
        files.append(_save(fig, out / "pr_curve.png"))
    if "calibration" in metrics:
        files.append(reliability_plot(metrics["calibration"], out / "reliability.png"))
    return files


def reliability_plot(cal: dict[str, Any], path: Path) -> Path:
    """Reliability diagram: observed share of PNEUMONIA against the mean predicted probability
    per bin, before (T = 1) and after temperature scaling, with each curve's ECE."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    for key, style, name in (("before", "o-", "raw"), ("after", "s-", f"T = {cal['temperature']:.2f}")):
        pts = cal[f"reliability_{key}"]
        ax.plot([b["predicted"] for b in pts], [b["observed"] for b in pts], style, ms=4,
                label=f"{name}: ECE {cal[f'ece_{key}']:.3f}, Brier {cal[f'brier_{key}']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability of PNEUMONIA")
    ax.set_ylabel("observed share of PNEUMONIA")
    ax.set_title(f"reliability ({cal['ece_bins']} bins)")
    ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(metrics: dict[str, Any], title: str) -> str:
    """The results table people compare against, plus specificity and 95% CIs."""
    lines = [title, f"{'metric':<12}{'value':>8}   95% CI"]
    for k in TABLE_METRICS:
        lo, hi = metrics["ci"].get(k, (float("nan"), float("nan")))
        lines.append(f"{k:<12}{metrics[k]:>8.4f}   [{lo:.4f}, {hi:.4f}]")
    how = f", applied in {metrics['amp']}" if "amp" in metrics else ""
    lines.append(f"threshold {metrics['threshold']:.4f} (from validation{how}); n = {metrics['n']}; "
                 f"confusion [[TN, FP], [FN, TP]] = {metrics['confusion_matrix']}")
    if "ci_method" in metrics:
        lines.append(f"95% CIs: {metrics['ci_method']}")
    if "calibration" in metrics:
        c = metrics["calibration"]
        lines.append(f"calibration: temperature {c['temperature']:.3f} (from validation); ECE "
                     f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}, Brier {c['brier_before']:.4f} -> "
                     f"{c['brier_after']:.4f} (raw -> calibrated)")
    return "\n".join(lines)


def evaluate_checkpoint(ckpt: LoadedCheckpoint, data_root: str, split: str, out_dir: str,
                        cache_dir: str = "", amp: str = "auto") -> dict[str, Any]:
    """Run the full evaluation; writes metrics.json, predictions.parquet and plots to ``out_dir``.

    ``amp`` (``auto`` | ``bf16`` | ``fp32``): ``auto`` is the precision the checkpoint's
    threshold was chosen in, where this CPU runs it fast (see ``LoadedCheckpoint.precision``)."""
    from cxr_ray.data.cache import prepare_cache

    data_cfg = dataclasses.replace(ckpt.cfg.data, root=data_root,
                                   cache_dir=cache_dir or ckpt.cfg.data.cache_dir)
    cfg = dataclasses.replace(ckpt.cfg, data=data_cfg)
    cache = prepare_cache(cfg)
    precision = ckpt.precision(amp, torch.device("cpu"))
    preds = predict_split(ckpt, cache, split, precision=precision)
    preds["prediction"] = np.where(preds["probability"] >= ckpt.threshold, CLASSES[1], CLASSES[0])
    metrics = metrics_report(preds, ckpt.threshold)
    metrics.update(split=split, checkpoint=ckpt.path, data=data_root, amp=precision,
                   val_precision=ckpt.val_precision,
                   calibration=calibration_report(preds["label"].to_numpy(), preds["logit"].to_numpy(),
                                                  ckpt.temperature))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if io.is_uri(out_dir) else Path(out_dir)  # URIs: write locally, then upload
        out.mkdir(parents=True, exist_ok=True)
        preds.to_parquet(out / "predictions.parquet", index=False)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        write_plots(preds, metrics, out)
        if io.is_uri(out_dir):
            for f in out.iterdir():
                io.write_bytes(io.join(out_dir, f.name), f.read_bytes())
    return metrics
