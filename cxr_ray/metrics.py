"""Binary metrics, the selection metric, and bootstrap confidence intervals.

Label 1 = PNEUMONIA is the positive class. The selection metric is
``recall_at_specificity``: the highest recall any threshold reaches while keeping
specificity >= ``min_specificity``. Missing a pneumonia is the costly error, but plain
recall crowns the model that calls everything pneumonia (recall 1.0, specificity 0.0);
that model scores 0 here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (average_precision_score, confusion_matrix, f1_score, precision_score,
                             recall_score, roc_auc_score, roc_curve)

SELECTION_METRIC = "recall_at_specificity"
CI_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def threshold_for_specificity(labels: np.ndarray, probs: np.ndarray, min_specificity: float
                              ) -> tuple[float, float]:
    """``(recall, threshold)``: best recall with specificity >= ``min_specificity``.

    Predictions are ``prob >= threshold``. Every distinct score is a candidate threshold.
    Raises ``ValueError`` when ``labels`` lack a class: the metric is then undefined, and a
    silent default would let a broken validation split pick models and thresholds.
    """
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=np.float64)
    require_both_classes(labels, "threshold selection")
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    ok = (1.0 - fpr) >= min_specificity - 1e-12
    best = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])  # the first point always qualifies (fpr=0)
    # roc_curve's first threshold is +inf (nothing positive); keep it finite but above any prob
    threshold = float(min(thresholds[best], np.nextafter(1.0, 2.0)))
    return float(tpr[best]), threshold


def require_both_classes(labels: np.ndarray, what: str) -> None:
    """``ValueError`` naming the class counts unless ``labels`` hold both 0 and 1."""
    labels = np.asarray(labels).astype(int)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        raise ValueError(f"{what} needs both classes, got NORMAL={len(labels) - n_pos}, PNEUMONIA={n_pos}")


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy, precision, recall, specificity, F1, ROC-AUC, PR-AUC and the confusion matrix."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    preds = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, preds, labels=[0, 1]).ravel()
    both = 0 < labels.sum() < len(labels)
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "precision": float(precision_score(labels, preds, zero_division=0)),
        "recall": float(recall_score(labels, preds, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        "f1": float(f1_score(labels, preds, zero_division=0)),
        "roc_auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
        "pr_auc": float(average_precision_score(labels, probs)) if both else float("nan"),
        "threshold": float(threshold),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
        "n": int(len(labels)),
    }


def validation_metrics(labels: np.ndarray, probs: np.ndarray, min_specificity: float) -> dict[str, Any]:
    """Metrics at the threshold chosen on this set, plus the selection metric."""
    score, threshold = threshold_for_specificity(labels, probs, min_specificity)
    metrics = binary_metrics(labels, probs, threshold)
    metrics[SELECTION_METRIC] = score
    return metrics


def _cluster_resampler(groups: np.ndarray | None, n: int, rng: np.random.Generator):
    """A function drawing one bootstrap sample of row indices: whole groups (patients) with
    replacement when ``groups`` is given, else single rows."""
    if groups is None:
        return lambda: rng.integers(0, n, n)
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def draw() -> np.ndarray:
        g = rng.integers(0, len(counts), len(counts))
        sizes = counts[g]
        # row positions of each drawn group, concatenated: start + 0..size-1
        offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return order[np.repeat(starts[g], sizes) + offsets]

    return draw


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95, groups: np.ndarray | None = None
                 ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs for ``CI_METRICS`` at a fixed threshold.

    With ``groups`` (patient ids) it is a cluster bootstrap: whole patients are resampled,
    because one patient's images are correlated and resampling images would give CIs that
    are too narrow. Without, single images are resampled.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draw = _cluster_resampler(groups, len(labels), rng)
    samples: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    for _ in range(n_boot):
        idx = draw()
        y, p = labels[idx], probs[idx]
        if y.min() == y.max():
            continue  # a one-class resample has no AUC/specificity; skip it
        m = _fast_metrics(y, p, threshold)
        for k in CI_METRICS:
            samples[k].append(m[k])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v else (float("nan"),) * 2
            for k, v in samples.items()}


def _fast_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = p >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    tn = float(np.sum(~pred & (y == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(y), "precision": precision, "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "roc_auc": float(roc_auc_score(y, p)),
    }
