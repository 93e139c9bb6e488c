"""One decision rule everywhere: PNEUMONIA where float32(prob) >= float32(threshold)
(``metrics.is_positive``), and a "nothing qualifies" threshold that is exact in float32, so a
saturated probability of 1.0 gets the same class in the metrics, evaluate, score, explain and
the export's contract. (No Ray: the functions are called directly.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cxr_ray.analysis.metrics import (
    NOTHING_POSITIVE,
    binary_metrics,
    bootstrap_ci,
    decision_threshold,
    is_positive,
    metrics_report,
    operating_points,
    predicted_classes,
    threshold_for_specificity,
    threshold_spec_lower_bound,
    validation_metrics,
)
from cxr_ray.apps.explain import rows_to_explain
from cxr_ray.apps.export import sidecar
from cxr_ray.apps.score.output import to_output_table
from cxr_ray.apps.score.stages import ScoreActor
from cxr_ray.checkpoint import load_checkpoint, save_checkpoint
from cxr_ray.config import ExperimentConfig, ScoreConfig
from cxr_ray.models.registry import build_model

# Two NORMAL images saturated at exactly 1.0 (float32): no threshold <= 1.0 reaches specificity 1.
LABELS = np.array([0, 0, 1, 1, 0, 1])
PROBS = np.array([1.0, 1.0, 1.0, 0.7, 0.2, 0.9], np.float32)
LEGACY_SENTINEL = float(np.nextafter(1.0, 2.0))  # what checkpoints stored before: 1.0 in float32


def _scored_batch(probs: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """A scoring ScoreActor's output batch (``score/stages.py``) for ``probs`` at ``threshold``."""
    n = len(probs)
    return {"path": np.array([f"/x/{i}.png" for i in range(n)], dtype=object), "prob_pneumonia": probs,
            "threshold": np.full(n, decision_threshold(threshold), np.float32),
            "model": np.full(n, "m", dtype=object), "width": np.full(n, 8, np.int32),
            "height": np.full(n, 8, np.int32), "error": np.array([""] * n, dtype=object),
            "label": LABELS.astype(np.int8), "scored_at": np.full(n, np.datetime64("2026-01-01T00:00:00", "us"))}


def test_the_sentinel_is_exact_in_float32_and_above_every_probability():
    assert float(np.float32(NOTHING_POSITIVE)) == NOTHING_POSITIVE  # no rounding on the way to float32
    assert np.float32(NOTHING_POSITIVE) > np.float32(1.0) and NOTHING_POSITIVE > 1.0
    assert not is_positive(np.float32(1.0), NOTHING_POSITIVE)
    assert decision_threshold(LEGACY_SENTINEL) == np.float32(NOTHING_POSITIVE)  # older checkpoints: same rule
    assert decision_threshold(2.0) == np.float32(NOTHING_POSITIVE) and decision_threshold(0.5) == np.float32(0.5)
    with pytest.raises(ValueError, match="expected a number, got nan"):
        decision_threshold(float("nan"))


def test_nothing_qualifies_gives_the_sentinel():
    recall, t = threshold_for_specificity(LABELS, PROBS, 0.99)
    assert (recall, t) == (0.0, NOTHING_POSITIVE)
    t, lower = threshold_spec_lower_bound(LABELS, PROBS, 0.99)
    assert t == NOTHING_POSITIVE and lower == 1.0
    m = validation_metrics(LABELS, PROBS, 0.99, rule="spec_lower_bound")
    assert m["threshold"] == NOTHING_POSITIVE and m["recall"] == 0.0 and m["specificity"] == 1.0


@pytest.mark.parametrize("threshold", [NOTHING_POSITIVE, LEGACY_SENTINEL])
def test_a_saturated_probability_is_normal_in_every_place(tmp_path, threshold):
    everything_normal = [[3, 0], [3, 0]]  # [[TN, FP], [FN, TP]]
    # metrics: training's validation metrics, evaluate's metrics.json, score's _metrics.json
    assert binary_metrics(LABELS, PROBS, threshold)["confusion_matrix"] == everything_normal
    preds = pd.DataFrame({"label": LABELS, "probability": PROBS, "patient": np.arange(6) // 2})
    report = metrics_report(preds, threshold, n_boot=20)
    assert report["confusion_matrix"] == everything_normal and report["ci"]["recall"] == [0.0, 0.0]
    assert bootstrap_ci(LABELS, PROBS, threshold, n_boot=20)["specificity"] == (1.0, 1.0)
    row = operating_points(LABELS, PROBS, LABELS, PROBS, ("stored", threshold))[0]
    assert (row["recall"], row["specificity"], row["val_recall"]) == (0.0, 1.0, 0.0)
    # evaluate's predictions.parquet column, and scoring's output rows
    assert list(predicted_classes(PROBS, threshold)) == ["NORMAL"] * 6
    table = to_output_table(_scored_batch(PROBS, threshold), with_labels=True)
    assert table.column("prediction").to_pylist() == ["NORMAL"] * 6
    stored = np.float32(table.column("threshold").to_pylist()[0])
    assert stored == np.float32(NOTHING_POSITIVE) and not (np.float32(1.0) >= stored)  # a reader's own check
    # explain of a scoring job: the positive rows (none)
    assert rows_to_explain(table.to_pandas()).empty
    # a checkpoint holding it: scoring's actors and the export's contract (a serving system
    # comparing float32 or float64 gets NORMAL too)
    cfg = ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.weights": "none", "model.width": 4,
                                        "data.image_size": 32})
    path = save_checkpoint(tmp_path / "ck", build_model(cfg.model), cfg, threshold, {}, epoch=0)
    predictor = ScoreActor(str(path), dataclasses.asdict(ScoreConfig(torch_threads=1)))
    assert predictor.threshold == np.float32(NOTHING_POSITIVE) and not is_positive(np.float32(1.0), predictor.threshold)
    decision = sidecar(load_checkpoint(path), {})["decision"]
    assert decision["dtype"] == "float32"
    assert not np.float32(1.0) >= np.float32(decision["threshold"]) and not 1.0 >= decision["threshold"]


def test_float64_scores_are_decided_as_the_float32_they_are_stored_as():
    # 0.1 + 1e-9 and 0.1 are one float32: the same class, wherever they are compared
    probs = np.array([0.1 + 1e-9, 0.1, 0.05, 0.9])
    assert is_positive(probs, 0.1 + 1e-9).tolist() == [True, True, False, True]
    assert binary_metrics(np.array([1, 1, 0, 1]), probs, 0.1 + 1e-9)["recall"] == 1.0
