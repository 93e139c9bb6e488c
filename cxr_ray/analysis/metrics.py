"""Binary metrics, model selection, the operating threshold, and bootstrap confidence intervals.

Label 1 = PNEUMONIA is the positive class. Missing a pneumonia is the costly error, but plain
recall crowns the model that calls everything pneumonia (recall 1.0, specificity 0.0).

**Selection** (``selection_score``, what early stopping, kept checkpoints and tune rank by):
the standardised partial ROC-AUC over specificity >= ``min_specificity`` (McClish; sklearn's
``roc_auc_score(max_fpr=1 - min_specificity)``): how well the model ranks pneumonia above
normal in the operating region. Unlike ``recall_at_specificity`` (also reported) it does not
saturate at 1.0 once one threshold separates the validation set, and the all-pneumonia (or
any constant) model scores 0.5, chance level. Tie-break: ``selection_score = pauc - 0.001 *
min(val_loss, 1)``: at equal pAUC the lower validation loss wins, and the loss can never
outweigh a pAUC difference larger than 0.001.

**Threshold** (``threshold_rule``): ``recall_target`` (default) takes the *highest* threshold
whose validation recall still reaches ``target_recall``: recall first, and as much specificity as
that leaves. ``spec_lower_bound`` takes the lowest threshold at which the lower end of the 95%
patient-bootstrap CI of validation specificity still reaches ``min_specificity``, so the
threshold does not sit on the single lowest-scoring image that a point estimate would pick;
``point`` is that point estimate (the highest recall whose validation specificity >=
``min_specificity``). Which threshold is higher depends on the split: where the specificity
rules leave validation recall above ``target_recall``, ``recall_target`` sits higher (room for
NORMAL films to drift up); where they leave it below, lower (recall kept).
See ``benchmarks/real_accuracy.py`` for how each holds on a shifted copy of the validation images.

**Decision** (:func:`is_positive`, the one rule training, evaluate, score, explain and the export's
contract apply): PNEUMONIA where ``float32(prob) >= float32(threshold)``. Probabilities are
float32 everywhere (``engine/loop.probabilities``, the scored Parquet), so thresholds are chosen on
float32 scores too. When no threshold qualifies it is :data:`NOTHING_POSITIVE`, the smallest
float32 above 1.0: every probability, 1.0 included, is then NORMAL, in float32 and float64 alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxr_ray.data.catalog import CLASSES

SELECTION_METRIC = "selection_score"
SELECTION_METRICS = (SELECTION_METRIC, "pauc", "recall_at_specificity", "roc_auc")  # metric.selection choices
THRESHOLD_RULES = ("spec_lower_bound", "point", "recall_target")
CI_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
LOSS_TIE_BREAK = 1e-3
DECISION_DTYPE = np.float32  # probabilities and thresholds are compared in this dtype, everywhere
# "nothing qualifies": the smallest float32 above 1.0, exact in float32, float64 and JSON (a float64
# nextafter(1.0) would round to 1.0 in float32 and turn a saturated 1.0 into PNEUMONIA)
NOTHING_POSITIVE = float(np.nextafter(DECISION_DTYPE(1.0), DECISION_DTYPE(2.0)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float64."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def decision_scores(probs: Any) -> np.ndarray:
    """``probs`` as the float32 array every decision compares (see :func:`is_positive`)."""
    return np.asarray(probs, dtype=DECISION_DTYPE)


def decision_threshold(threshold: Any) -> Any:
    """``threshold`` (a number or an array) as the float32 every decision compares against.

    Any threshold above 1.0 means "nothing is PNEUMONIA" and becomes :data:`NOTHING_POSITIVE`
    (checkpoints written before it stored float64 ``nextafter(1.0)``, which is 1.0 in float32).
    A NaN threshold is a ``ValueError``: it would call every image NORMAL without saying so.
    """
    t = np.asarray(threshold, dtype=np.float64)
    if np.isnan(t).any():
        raise ValueError(f"decision threshold: expected a number, got {threshold!r}")
    out = np.where(t > 1.0, NOTHING_POSITIVE, t).astype(DECISION_DTYPE)
    return out[()]  # a float32 scalar for a scalar threshold


def is_positive(probs: Any, threshold: Any) -> np.ndarray:
    """The decision rule: True (PNEUMONIA) where ``float32(prob) >= float32(threshold)``
    (:func:`decision_scores`, :func:`decision_threshold`); NaN probabilities are False."""
    return np.asarray(decision_scores(probs) >= decision_threshold(threshold))


def predicted_classes(probs: Any, threshold: Any) -> np.ndarray:
    """``"PNEUMONIA"`` / ``"NORMAL"`` per probability (an object array), by :func:`is_positive`."""
    return np.where(is_positive(probs, threshold), CLASSES[1], CLASSES[0]).astype(object)


def partial_auc(labels: np.ndarray, probs: np.ndarray, min_specificity: float) -> float:
    """Standardised partial ROC-AUC over specificity >= ``min_specificity`` (0.5 = chance, 1 = perfect)."""
    labels = np.asarray(labels).astype(int)
    require_both_classes(labels, "partial ROC-AUC")
    return float(roc_auc_score(labels, np.asarray(probs, dtype=np.float64), max_fpr=1.0 - min_specificity))


def selection_score(pauc: float, val_loss: float) -> float:
    """``pauc - 0.001 * min(val_loss, 1)``: pAUC, ties broken by the lower validation loss."""
    loss = val_loss if np.isfinite(val_loss) else 1.0
    return float(pauc - LOSS_TIE_BREAK * min(max(loss, 0.0), 1.0))


def threshold_for_specificity(labels: np.ndarray, probs: np.ndarray, min_specificity: float
                              ) -> tuple[float, float]:
    """``(recall, threshold)``: best recall with specificity >= ``min_specificity``.

    Predictions are :func:`is_positive` (``prob >= threshold`` in float32). Every distinct
    float32 score is a candidate threshold. Raises ``ValueError`` when ``labels`` lack a class:
    the metric is then undefined, and a silent default would let a broken validation split
    pick models and thresholds.
    """
    labels, probs = np.asarray(labels).astype(int), decision_scores(probs)
    require_both_classes(labels, "threshold selection")
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    ok = (1.0 - fpr) >= min_specificity - 1e-12
    best = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])  # the first point always qualifies (fpr=0)
    # roc_curve's first threshold is +inf (nothing positive); keep it finite but above any prob
    threshold = float(min(float(thresholds[best]), NOTHING_POSITIVE))
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
    preds = is_positive(probs, threshold).astype(int)
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


def spec_lower_bounds(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                      groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> np.ndarray:
    """Lower end of the bootstrap CI of specificity at each of ``thresholds``.

    Only NORMAL images enter specificity, so only they are resampled: whole NORMAL patients
    when ``groups`` is given (a cluster bootstrap), else single images.
    """
    labels, probs = np.asarray(labels).astype(int), decision_scores(probs)
    neg, thresholds = probs[labels == 0], decision_threshold(np.atleast_1d(thresholds))
    draw = _cluster_resampler(None if groups is None else np.asarray(groups)[labels == 0], len(neg),
                              np.random.default_rng(seed))
    # specificity at threshold t = share of the resampled NORMAL scores below t (in float32: is_positive)
    spec = np.stack([np.searchsorted(np.sort(sample), thresholds, side="left") / len(sample)
                     for sample in (neg[draw()] for _ in range(n_boot))])
    return np.percentile(spec, (1 - level) / 2 * 100, axis=0)


def threshold_spec_lower_bound(labels: np.ndarray, probs: np.ndarray, min_specificity: float,
                               groups: np.ndarray | None = None) -> tuple[float, float]:
    """``(threshold, specificity lower bound)``: the lowest threshold (so the highest recall)
    whose 95% bootstrap lower bound of specificity is >= ``min_specificity``; above every
    score when none qualifies."""
    labels = np.asarray(labels).astype(int)
    require_both_classes(labels, "threshold selection")
    candidates = np.append(np.unique(decision_scores(probs)).astype(np.float64), NOTHING_POSITIVE)
    lower = spec_lower_bounds(labels, probs, candidates, groups)
    ok = np.flatnonzero(lower >= min_specificity - 1e-12)
    i = int(ok[0]) if len(ok) else len(candidates) - 1
    return float(min(candidates[i], NOTHING_POSITIVE)), float(lower[i])


def threshold_recall_target(labels: np.ndarray, probs: np.ndarray, target_recall: float) -> float:
    """The highest threshold at which validation recall is still >= ``target_recall``: the
    ``ceil(target_recall * n_pneumonia)``-th highest PNEUMONIA score (float32, as every decision)."""
    labels = np.asarray(labels).astype(int)
    require_both_classes(labels, "threshold selection")
    pos = np.sort(decision_scores(probs)[labels == 1])[::-1]
    k = max(1, int(np.ceil(target_recall * len(pos) - 1e-9)))
    return float(pos[k - 1])


def validation_metrics(labels: np.ndarray, probs: np.ndarray, min_specificity: float,
                       groups: np.ndarray | None = None, rule: str = "recall_target",
                       val_loss: float = float("nan"), target_recall: float = 0.95) -> dict[str, Any]:
    """Metrics at the threshold ``rule`` chooses on this set (see the module doc), plus
    ``pauc``, ``selection_score``, ``recall_at_specificity``, ``threshold_rule`` and
    ``specificity_lower_bound`` (the 95% bootstrap lower bound at the chosen threshold).
    ``target_recall``: what ``recall_target`` keeps."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r}: expected one of {list(THRESHOLD_RULES)}")
    best_recall, threshold = threshold_for_specificity(labels, probs, min_specificity)
    if rule == "spec_lower_bound":
        threshold, lower = threshold_spec_lower_bound(labels, probs, min_specificity, groups)
    else:
        if rule == "recall_target":
            threshold = threshold_recall_target(labels, probs, target_recall)
        lower = float(spec_lower_bounds(labels, probs, np.array([threshold]), groups)[0])
    metrics = binary_metrics(labels, probs, threshold)
    pauc = partial_auc(labels, probs, min_specificity)
    metrics.update(recall_at_specificity=best_recall, pauc=pauc, selection_score=selection_score(pauc, val_loss),
                   threshold_rule=rule, specificity_lower_bound=lower)
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
    pred = is_positive(p, threshold)
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
        "roc_auc": rank_auc(y, p),
    }


def rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic (ties count half), equal to sklearn's
    ``roc_auc_score`` for binary labels, ~50x faster on a bootstrap's small samples; NaN
    without both classes."""
    from scipy.stats import rankdata

    pos = np.asarray(y) == 1
    n_pos, n_neg = int(pos.sum()), int(len(pos) - pos.sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((rankdata(np.asarray(p, dtype=np.float64))[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# Operating points chosen on validation, reported on the evaluated split (evaluate's table).
OPERATING_SPECIFICITIES = (0.85, 0.90, 0.95)
OPERATING_RECALL = 0.95


def operating_thresholds(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Thresholds chosen on one (validation) set by common rules: the highest recall at
    specificity >= 0.85 / 0.90 / 0.95, the highest specificity at recall >= 0.95, and Youden's
    J (max recall + specificity - 1). Predictions are :func:`is_positive`."""
    labels, probs = np.asarray(labels).astype(int), decision_scores(probs)
    require_both_classes(labels, "operating points")
    out = {f"specificity >= {s:.2f}": threshold_for_specificity(labels, probs, s)[1]
           for s in OPERATING_SPECIFICITIES}
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    thresholds = np.minimum(thresholds.astype(np.float64), NOTHING_POSITIVE)  # roc_curve's first is +inf
    out[f"recall >= {OPERATING_RECALL:.2f}"] = float(thresholds[int(np.argmax(tpr >= OPERATING_RECALL - 1e-12))])
    out["Youden's J"] = float(thresholds[int(np.argmax(tpr - fpr))])
    return out


def threshold_cis(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, groups: np.ndarray | None = None,
                  n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, np.ndarray]:
    """Percentile bootstrap CIs of recall, specificity and accuracy at each of ``thresholds``
    (arrays of shape ``(2, len(thresholds))``: low, high); whole patients resampled with ``groups``."""
    labels, probs = np.asarray(labels).astype(int), decision_scores(probs)
    thresholds = decision_threshold(np.atleast_1d(thresholds))  # counts below: as is_positive decides
    draw = _cluster_resampler(groups, len(labels), np.random.default_rng(seed))
    rows: dict[str, list[np.ndarray]] = {"recall": [], "specificity": [], "accuracy": []}
    for _ in range(n_boot):
        idx = draw()
        y, p = labels[idx], probs[idx]
        pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
        if not len(pos) or not len(neg):
            continue
        tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
        tn = np.searchsorted(neg, thresholds, side="left")
        rows["recall"].append(tp / len(pos))
        rows["specificity"].append(tn / len(neg))
        rows["accuracy"].append((tp + tn) / len(y))
    q = ((1 - level) / 2 * 100, (1 + level) / 2 * 100)
    return {k: np.percentile(np.stack(v), q, axis=0) if v else np.full((2, len(thresholds)), np.nan)
            for k, v in rows.items()}


def predictive_values(recall: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """``(PPV, NPV)`` of a test with this recall (sensitivity) and specificity where a share
    ``prevalence`` of the images are PNEUMONIA (Bayes' rule; nan where undefined)."""
    tp, fp = recall * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - recall) * prevalence
    return (tp / (tp + fp) if tp + fp else float("nan"), tn / (tn + fn) if tn + fn else float("nan"))


def operating_points(val_labels: np.ndarray, val_probs: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                     stored: tuple[str, float], groups: np.ndarray | None = None,
                     prevalences: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """One row per operating point: ``stored`` (name, threshold) and those of
    :func:`operating_thresholds` on the validation set, each with its validation recall and
    specificity and, on the evaluated set, recall, specificity and accuracy with 95% CIs, and
    PPV / NPV at the evaluated set's own prevalence and at each of ``prevalences``."""
    chosen = {stored[0]: float(stored[1]), **operating_thresholds(val_labels, val_probs)}
    names, ts = list(chosen), np.array(list(chosen.values()))
    ci = threshold_cis(labels, probs, ts, groups)
    own = float(np.mean(np.asarray(labels) == 1))
    rows = []
    for i, (name, t) in enumerate(zip(names, ts)):
        val, ev = _fast_counts(val_labels, val_probs, t), _fast_counts(labels, probs, t)
        row: dict[str, Any] = {"rule": name, "threshold": float(t), "val_recall": val["recall"],
                               "val_specificity": val["specificity"], **ev,
                               **{f"{k}_ci": [float(ci[k][0, i]), float(ci[k][1, i])] for k in ci}}
        row["predictive_values"] = [
            {"prevalence": pi, "ppv": ppv, "npv": npv, "own": pi == own}
            for pi in (own, *prevalences) for ppv, npv in [predictive_values(ev["recall"], ev["specificity"], pi)]]
        rows.append(row)
    return rows


def _fast_counts(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    y, pred = np.asarray(labels).astype(int), is_positive(probs, threshold)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    tp, tn = int((pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    return {"recall": tp / n_pos if n_pos else float("nan"), "specificity": tn / n_neg if n_neg else float("nan"),
            "accuracy": (tp + tn) / len(y) if len(y) else float("nan")}


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
