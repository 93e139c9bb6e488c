"""Calibrated probabilities: temperature and Platt scaling, ECE, Brier, reliability.

A network trained with a class-weighted loss, early-stopped on validation, is rarely
calibrated: its 0.9 is not 90%. Two maps fitted on the validation logits (minimum negative
log-likelihood) make ``sigmoid(logit / T + b)`` a calibrated probability:

- ``platt`` (default, ``metric.calibration``): a temperature ``T`` and a bias ``b`` (Platt 1999,
  with his smoothed targets, :func:`platt_targets`).
  The bias is needed because the class-weighted loss (``train.pos_weight``) and early stopping
  shift every logit: on the shared real X-rays a scratch CNN's validation logits sat about 4
  units too low, temperature alone *raised* ECE there (0.28 -> 0.33), Platt lowered it to 0.07 (benchmarks/RESULTS.md).
- ``temperature`` (Guo et al. 2017): ``T`` only, ``b = 0``.

Both keep the order of the images (``T > 0``), so ROC-AUC, the ranking and every decision at a
threshold expressed on the same scale are unchanged. Training fits them at every validation pass
(the checkpoint stores them beside the threshold, which is chosen on the calibrated
probabilities); ``evaluate`` and ``score`` apply them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr_ray.analysis.drift import reference_summary
from cxr_ray.analysis.metrics import sigmoid, validation_metrics
from cxr_ray.engine.loop import probabilities

ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)  # T outside this range means the validation set says nothing sensible
B_BOUNDS = (-20.0, 20.0)  # the bias, in calibrated-logit units


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits / temperature + bias)`` (stable: log-sum-exp form)."""
    z = np.asarray(logits, np.float64) / temperature + bias
    y = np.asarray(labels, np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in :data:`T_BOUNDS` minimising the NLL of ``sigmoid(logits / T)``; 1.0 when
    the set cannot calibrate anything (fewer than 2 images or a single class)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels)
    if len(y) < 2 or len(np.unique(y)) < 2:
        return 1.0
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def platt_targets(labels: np.ndarray) -> np.ndarray:
    """Platt's (1999) targets: ``(N+ + 1) / (N+ + 2)`` for PNEUMONIA, ``1 / (N- + 2)`` for NORMAL.
    Against 0/1 targets a validation set that one threshold separates (common: 100-odd images,
    ROC-AUC 0.999) drives the fit to T -> 0: probabilities of exactly 0 or 1 that tie in float32,
    which loses the ranking and is over-confident on new images (measured on the shared real
    X-rays: T 0.14 / bias 11 with 0/1 targets, T 0.92 / bias 1.5 with these; held-out ECE 0.033
    vs 0.020, ROC-AUC of the float32 probabilities 0.980 vs 0.991)."""
    y = np.asarray(labels, np.float64)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    return np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(T, b)`` in :data:`T_BOUNDS` x :data:`B_BOUNDS` minimising the cross-entropy of
    ``sigmoid(logits / T + b)`` against :func:`platt_targets`; ``(1.0, 0.0)`` when the set cannot
    calibrate anything."""
    from scipy.optimize import minimize

    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return 1.0, 0.0
    y = platt_targets(labels)
    z = np.asarray(logits, np.float64)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:  # in (log T, b), with its gradient
        t, b = np.exp(params[0]), params[1]
        u = z / t + b
        r = sigmoid(u) - y  # d nll / d u, per image
        return float(np.mean(np.logaddexp(0.0, u) - y * u)), np.array([np.mean(r * -z / t), np.mean(r)])

    res = minimize(loss, np.array([0.0, 0.0]), jac=True, method="L-BFGS-B",
                   bounds=[(np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])), B_BOUNDS])
    return float(np.exp(res.x[0])), float(res.x[1])


def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: str) -> tuple[float, float]:
    """``(T, b)`` for ``metric.calibration`` ``method``: ``platt``, ``temperature`` (b = 0) or
    ``none`` (1, 0)."""
    if method == "platt":
        return fit_platt(logits, labels)
    if method == "temperature":
        return fit_temperature(logits, labels), 0.0
    if method == "none":
        return 1.0, 0.0
    raise ValueError(f"calibration {method!r}: expected platt, temperature or none")


def ece(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the PNEUMONIA probability: ``bins`` equal-width bins of
    the predicted probability, |mean predicted - observed share of PNEUMONIA| weighted by the
    bin's share of images."""
    y, p = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    if len(y) == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / len(y))


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared error of the PNEUMONIA probability against the 0/1 label."""
    y, p = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    return float(np.mean((p - y) ** 2)) if len(y) else float("nan")


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its range, the mean predicted probability, the observed share of
    PNEUMONIA and the number of images (the reliability diagram's points)."""
    y, p = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append({"low": b / bins, "high": (b + 1) / bins, "predicted": float(p[m].mean()),
                        "observed": float(y[m].mean()), "n": int(m.sum())})
    return out


def calibration_report(labels: np.ndarray, logits: np.ndarray, temperature: float,
                       bias: float = 0.0) -> dict[str, Any]:
    """ECE and Brier score of ``sigmoid(logit)`` (before) and ``sigmoid(logit / T + b)`` (after),
    from the same fp32 probabilities training, evaluate and score compute (an image on a bin
    edge must land in the same bin everywhere)."""
    before, after = probabilities(logits), probabilities(logits, temperature, bias)
    return {"temperature": float(temperature), "logit_bias": float(bias), "ece_bins": ECE_BINS,
            "ece_before": ece(labels, before), "ece_after": ece(labels, after),
            "brier_before": brier(labels, before), "brier_after": brier(labels, after),
            "reliability_before": reliability(labels, before), "reliability_after": reliability(labels, after)}


def fit_decision(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, metric: Any,
                 val_loss: float = float("nan"), acquisition: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """What a validation pass decides for one way of computing logits (a model, a TTA mode, an
    ensemble): the temperature and bias (``metric.calibration``, nothing without
    ``metric.calibrate``), then the threshold by ``metric.threshold_rule`` on the calibrated
    probabilities over patients ``groups``, with the validation metrics at it
    (``metrics.validation_metrics``), ECE raw -> calibrated, and the drift reference
    (``drift.reference_summary``, with the images' ``acquisition`` statistics when given)."""
    temperature, bias = fit_calibration(logits, labels, metric.calibration if metric.calibrate else "none")
    probs = probabilities(logits, temperature, bias)  # the threshold is chosen on the calibrated scale
    out = validation_metrics(labels, probs, metric.min_specificity, groups=groups, rule=metric.threshold_rule,
                             val_loss=val_loss, target_recall=metric.target_recall)
    out.update(val_loss=val_loss, temperature=temperature, logit_bias=bias,
               val_ece_before=ece(labels, probabilities(logits)), val_ece=ece(labels, probs),
               drift_reference=reference_summary(logits, labels, probs, out["threshold"], acquisition))
    return out
