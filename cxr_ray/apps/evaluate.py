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

from cxr_ray.analysis.calibration import calibration_report
from cxr_ray.analysis.cues import format_strata, model_within_cues
from cxr_ray.analysis.drift import StatsCollector, compare, format_drift
from cxr_ray.analysis.metrics import is_positive, metrics_report, operating_points, predicted_classes
from cxr_ray.apps.audit import audit_catalog
from cxr_ray.apps.explain import explain_files, write_gallery
from cxr_ray.checkpoint import LoadedCheckpoint
from cxr_ray.data.cache import prepare_cache
from cxr_ray.data.catalog import CLASSES
from cxr_ray.inference.predictor import predict_split
from cxr_ray.storage import uri as store

log = logging.getLogger(__name__)

TABLE_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "specificity")


def drift_report(ckpt: LoadedCheckpoint, logits: np.ndarray, probs: np.ndarray, data: str,
                 acquisition: dict[str, np.ndarray] | None = None) -> dict[str, Any] | None:
    """These images' logits (and ``acquisition`` statistics) against the checkpoint's validation
    (``drift.compare``, label-free); None when the checkpoint has no summary (saved before it
    existed) or applies TTA."""

    ref = ckpt.drift_reference
    if ref is None or len(logits) == 0:
        return None
    return compare(ref, logits, acquisition, probs=probs, threshold=ckpt.threshold, checkpoint=str(ckpt.path),
                   data=data)


def cue_strata_report(preds: pd.DataFrame, stall_s: float = 600.0) -> dict[str, Any]:
    """Does the model separate the classes where acquisition and framing cues cannot?

    Measures the audit's cues of every predicted image (Ray Data, ``apps/audit.audit_catalog``),
    cross-fits a cue-only classifier on them by patient, and reports the model's ROC-AUC
    within strata of that cue score (``analysis/cues.model_within_cues``). ``{"error": reason}`` when
    there are too few patients per class for the folds."""

    preds = preds.sort_values("path", ignore_index=True)  # the patient folds follow row order: fix it
    cues = audit_catalog(preds[["path", "label", "patient"]].assign(split="evaluated"), stall_s)
    cues = preds[["path"]].merge(cues, on="path", how="left", validate="one_to_one")
    try:
        return model_within_cues(cues, preds["probability"].to_numpy())
    except ValueError as e:
        return {"error": str(e)}


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
    for (i, j), v in np.ndenumerate(cm):  # white on the dark cells, black on the light ones
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                color="white" if v > cm.max() / 2 else "black")
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
        for k, row in enumerate((metrics.get("operating_points") or {}).get("rows", [])):
            ax.errorbar(1 - row["specificity"], row["recall"], fmt="*" if k == 0 else "o", ms=9 if k == 0 else 4,
                        xerr=[[row["specificity"] - row["specificity_ci"][0]],
                              [row["specificity_ci"][1] - row["specificity"]]],
                        yerr=[[row["recall"] - row["recall_ci"][0]], [row["recall_ci"][1] - row["recall"]]],
                        capsize=2, lw=0.8, label=f"{row['rule']} (t={row['threshold']:.3f})")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("recall (sensitivity)")
        ax.legend(loc="lower right", fontsize=6)
        files.append(_save(fig, out / "roc_curve.png"))
        prec, rec, _ = precision_recall_curve(y, p)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(rec, prec, label=f"AP {metrics['pr_auc']:.3f}")
        ax.plot(metrics["recall"], metrics["precision"], "*", ms=9,
                label=f"stored threshold {metrics['threshold']:.3f}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.legend(loc="lower left")
        files.append(_save(fig, out / "pr_curve.png"))
    if "calibration" in metrics:
        files.append(reliability_plot(metrics["calibration"], out / "reliability.png"))
    return files


def operating_table(ckpt: LoadedCheckpoint, val: pd.DataFrame, preds: pd.DataFrame,
                    prevalences: tuple[float, ...]) -> dict[str, Any] | None:
    """Operating points chosen on ``val`` and what each gives on ``preds`` (see
    ``metrics.operating_points``); None when ``val`` lacks a class or ``preds`` is empty."""
    yv = val["label"].to_numpy()
    if len(preds) == 0 or len(np.unique(yv)) < 2:
        return None
    rows = operating_points(yv, val["probability"].to_numpy(), preds["label"].to_numpy(),
                            preds["probability"].to_numpy(),
                            (f"stored ({ckpt.info.threshold_rule})", ckpt.threshold),
                            groups=preds["patient"].to_numpy(), prevalences=tuple(prevalences))
    return {"chosen_on": f"validation split ({len(val)} images)", "rows": rows}


def explain_gallery(ckpt: LoadedCheckpoint, preds: pd.DataFrame, n: int, out: Path) -> Path:
    """Grad-CAM gallery of the ``n`` most confident true positives, false positives and false
    negatives of ``preds`` (``explain.write_gallery``), re-read from their files."""

    positive = pd.Series(is_positive(preds["probability"], ckpt.threshold), index=preds.index)
    groups = {"most confident true positives": preds[positive & (preds["label"] == 1)].nlargest(n, "probability"),
              "most confident false positives": preds[positive & (preds["label"] == 0)].nlargest(n, "probability"),
              "most confident false negatives": preds[~positive & (preds["label"] == 1)].nsmallest(n, "probability")}
    paths = [p for g in groups.values() for p in g["path"]]
    items = explain_files(ckpt, paths)
    sections, start = {}, 0
    for title, g in groups.items():
        sections[title] = list(range(start, start + len(g)))
        start += len(g)
    return write_gallery(items, out, f"cxr_ray Grad-CAM: {ckpt.model_id}", sections)


def reliability_plot(cal: dict[str, Any], path: Path) -> Path:
    """Reliability diagram: observed share of PNEUMONIA against the mean predicted probability
    per bin, before (the raw logits) and after calibration, with each curve's ECE."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    after = f"T = {cal['temperature']:.2f}, b = {cal.get('logit_bias', 0.0):+.2f}"
    for key, style, name in (("before", "o-", "raw"), ("after", "s-", after)):
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
    how += f", TTA {metrics['tta']}" if metrics.get("tta", "none") != "none" else ""
    lines.append(f"threshold {metrics['threshold']:.4f} (from validation{how}); n = {metrics['n']}; "
                 f"confusion [[TN, FP], [FN, TP]] = {metrics['confusion_matrix']}")
    if "ci_method" in metrics:
        lines.append(f"95% CIs: {metrics['ci_method']}")
    table = metrics.get("operating_points")
    if table:
        lines.append(f"operating points chosen on the {table['chosen_on']}, applied to this split "
                     f"(95% CIs); PPV/NPV at prevalence:")
        prevs = [pv["prevalence"] for pv in table["rows"][0]["predictive_values"]]
        head = "".join(f"  {'PPV/NPV @' + format(p, '.3g') + ('*' if i == 0 else ''):<17}" for i, p in enumerate(prevs))
        lines.append(f"  {'rule':<26}{'threshold':>9}  {'val rec/spec':<13}  {'recall':<22}  {'specificity':<22}{head}")
        for r in table["rows"]:
            pv = "".join(f"  {format(v['ppv'], '.3f') + ' / ' + format(v['npv'], '.3f'):<17}"
                         for v in r["predictive_values"])
            lines.append(f"  {r['rule']:<26}{r['threshold']:>9.4f}  {r['val_recall']:.2f}/{r['val_specificity']:.2f}"
                         f"{'':<4}  {_with_ci(r, 'recall'):<22}  {_with_ci(r, 'specificity'):<22}{pv}")
        lines.append("  (* this split's own prevalence)")
    if "calibration" in metrics:
        c = metrics["calibration"]
        lines.append(f"calibration: temperature {c['temperature']:.3f}, bias {c.get('logit_bias', 0.0):+.3f} "
                     f"(from validation); ECE "
                     f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}, Brier {c['brier_before']:.4f} -> "
                     f"{c['brier_after']:.4f} (raw -> calibrated)")
    if metrics.get("drift"):

        lines += [f"drift: {line}" if i == 0 else line for i, line in enumerate(format_drift(metrics["drift"]))]
    strata = metrics.get("cue_strata")
    if strata:

        lines.append(f"cue strata: {strata['error']}" if "error" in strata else f"cue strata: {format_strata(strata)}")
    return "\n".join(lines)


def _with_ci(row: dict[str, Any], key: str) -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def evaluate_checkpoint(ckpt: LoadedCheckpoint, data_root: str, split: str, out_dir: str,
                        cache_dir: str = "", amp: str = "auto", prevalences: tuple[float, ...] = (),
                        explain: int = 0, cue_strata: bool = False) -> dict[str, Any]:
    """Run the full evaluation; writes metrics.json, predictions.parquet and plots to ``out_dir``.

    ``amp`` (``auto`` | ``bf16`` | ``fp32``): ``auto`` is the precision the checkpoint's
    threshold was chosen in, where this CPU runs it fast (see ``LoadedCheckpoint.precision``).
    The operating-point table's thresholds are chosen on the validation split of the same
    data root; ``prevalences`` adds PPV / NPV at those shares of PNEUMONIA. ``explain`` > 0
    writes a Grad-CAM gallery (``explain/index.html``) of the most confident true positives,
    false positives and false negatives, that many of each. ``cue_strata`` measures the audit's
    cues of every image and adds ``metrics["cue_strata"]`` (:func:`cue_strata_report`)."""

    data_cfg = dataclasses.replace(ckpt.cfg.data, root=data_root,
                                   cache_dir=cache_dir or ckpt.cfg.data.cache_dir)
    cfg = dataclasses.replace(ckpt.cfg, data=data_cfg)
    cache = prepare_cache(cfg, preprocessing=ckpt.preprocessing, training=False)  # any labelled folder
    precision = ckpt.precision(amp, torch.device("cpu"))
    compared = (ckpt.drift_reference or {}).get("acquisition")  # older references have none: measure nothing
    stats = StatsCollector() if compared else None
    preds = predict_split(ckpt, cache, split, precision=precision, stats=stats)
    preds["prediction"] = predicted_classes(preds["probability"], ckpt.threshold)
    metrics = metrics_report(preds, ckpt.threshold)
    metrics["drift"] = drift_report(ckpt, preds["logit"].to_numpy(), preds["probability"].to_numpy(), data_root,
                                    stats.result() if stats else None)
    metrics.update(split=split, checkpoint=ckpt.path, data=data_root, amp=precision, tta=ckpt.tta,
                   val_precision=ckpt.val_precision, preprocessing=ckpt.preprocessing.to_dict(),
                   calibration=calibration_report(preds["label"].to_numpy(), preds["logit"].to_numpy(),
                                                  ckpt.temperature, ckpt.logit_bias))
    if split != "val" and min(cache.split_counts("val")) == 0:  # a labelled sample has no validation split
        val = None
    else:
        val = preds if split == "val" else predict_split(ckpt, cache, "val", precision=precision)
    metrics["operating_points"] = operating_table(ckpt, val, preds, prevalences) if val is not None else None
    if cue_strata:
        metrics["cue_strata"] = cue_strata_report(preds, ckpt.cfg.data.stall_timeout_s)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if store.is_uri(out_dir) else Path(out_dir)  # URIs: write locally, then upload
        out.mkdir(parents=True, exist_ok=True)
        preds.to_parquet(out / "predictions.parquet", index=False)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        write_plots(preds, metrics, out)
        if explain > 0:
            explain_gallery(ckpt, preds, explain, out / "explain")
        if store.is_uri(out_dir):
            for f in out.rglob("*"):
                if f.is_file():
                    store.write_bytes(store.join(out_dir, *f.relative_to(out).parts), f.read_bytes())
    return metrics
