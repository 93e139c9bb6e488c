import numpy as np
import pytest

from cxr_ray.analysis.metrics import (
    SELECTION_METRIC,
    binary_metrics,
    bootstrap_ci,
    selection_score,
    threshold_for_specificity,
    validation_metrics,
)


def test_binary_metrics_hand_computed():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.95, 0.55])
    m = binary_metrics(y, p, 0.5)
    # TN=3 FP=1 FN=1 TP=5
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["recall"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(5 / 6)
    # AUC: pairs (pos > neg) out of 24; only 0.6 beats 0.4 and 0.55 -> 22/24
    assert m["roc_auc"] == pytest.approx(22 / 24)


def test_threshold_for_specificity():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.95, 0.55])
    recall, thr = threshold_for_specificity(y, p, 0.75)  # one FP allowed: threshold 0.4 -> all 6
    assert recall == pytest.approx(1.0) and thr == pytest.approx(0.4)
    recall, thr = threshold_for_specificity(y, p, 1.0 - 1e-9)  # no FP: must stay above 0.6
    assert recall == pytest.approx(4 / 6) and thr == pytest.approx(0.7)
    m = binary_metrics(y, p, thr)
    assert m["specificity"] == 1.0 and m["recall"] == pytest.approx(4 / 6)


def test_everything_is_pneumonia_model_cannot_win():
    y = np.array([0] * 30 + [1] * 70)
    constant = np.full(100, 0.99)
    assert binary_metrics(y, constant, 0.5)["recall"] == 1.0  # plain recall is fooled
    trivial = validation_metrics(y, constant, 0.9, val_loss=0.5)
    assert trivial["recall_at_specificity"] == 0.0 and trivial["pauc"] == pytest.approx(0.5)  # chance level
    rng = np.random.default_rng(0)
    decent = np.clip(y * 0.5 + rng.normal(0.25, 0.15, 100), 0, 1)
    assert validation_metrics(y, decent, 0.9, val_loss=0.5)[SELECTION_METRIC] > trivial[SELECTION_METRIC] + 0.2


def test_selection_does_not_saturate_and_ties_go_to_the_lower_loss():
    y = np.array([0] * 40 + [1] * 60)
    good = np.r_[np.linspace(0.0, 0.5, 40), np.linspace(0.48, 1.0, 60)]  # 2 NORMAL outrank some PNEUMONIA
    better = np.r_[np.linspace(0.0, 0.5, 40), np.linspace(0.49, 1.0, 60)]  # 1 does
    a, b = validation_metrics(y, good, 0.9), validation_metrics(y, better, 0.9)
    assert a["recall_at_specificity"] == b["recall_at_specificity"] == 1.0  # saturated: cannot tell them apart
    assert b["pauc"] > a["pauc"] and b["selection_score"] > a["selection_score"]
    # equal pAUC: the lower validation loss wins, but never against a larger pAUC difference
    assert selection_score(0.95, 0.2) > selection_score(0.95, 0.4)
    assert selection_score(0.952, 5.0) > selection_score(0.95, 0.0)


def test_threshold_rules_point_sits_on_one_image_lower_bound_keeps_a_margin():
    rng = np.random.default_rng(2)
    patients = np.arange(140) // 2
    y = np.repeat(rng.random(70) < 0.7, 2).astype(int)
    p = np.clip(np.where(y == 1, rng.normal(0.7, 0.15, 140), rng.normal(0.3, 0.15, 140)), 0, 1)
    p = p.astype(np.float32)  # as engine.probabilities makes them: thresholds are float32 scores
    point = validation_metrics(y, p, 0.9, groups=patients, rule="point")
    robust = validation_metrics(y, p, 0.9, groups=patients, rule="spec_lower_bound")
    assert robust["threshold_rule"] == "spec_lower_bound" and point["threshold_rule"] == "point"
    assert validation_metrics(y, p, 0.9, groups=patients)["threshold_rule"] == "recall_target"  # the default
    assert point["specificity"] >= 0.9 and point["threshold"] in set(p[y == 1])  # sits on a pneumonia score
    assert robust["threshold"] > point["threshold"] and robust["specificity"] > point["specificity"]
    assert robust["specificity_lower_bound"] >= 0.9 > point["specificity_lower_bound"]


def test_recall_target_takes_the_highest_threshold_that_keeps_the_recall():
    """On a separable validation set the specificity rule sits among the highest NORMAL scores
    (the lowest threshold its bound allows); recall_target sits as high as the PNEUMONIA scores
    allow (a margin for NORMAL films that drift up at a new site), its recall still on target."""
    from cxr_ray.analysis.metrics import threshold_recall_target

    y = np.array([0] * 50 + [1] * 100)
    p = np.concatenate([np.linspace(0.0, 0.30, 50), np.linspace(0.40, 1.0, 100)]).astype(np.float32)
    target = validation_metrics(y, p, 0.9, rule="recall_target", target_recall=0.95)
    spec = validation_metrics(y, p, 0.9, rule="spec_lower_bound")
    assert target["threshold_rule"] == "recall_target" and target["recall"] >= 0.95
    assert target["recall"] < 0.96  # the highest such threshold: one more step up loses the target
    assert target["threshold"] == threshold_recall_target(y, p, 0.95) == p[y == 1][5]
    assert target["threshold"] > spec["threshold"] and target["specificity"] == 1.0 > spec["specificity"]
    # ties: every PNEUMONIA image at one score keeps recall 1.0 at that score
    tied = np.where(y == 1, 0.8, 0.2).astype(np.float32)
    assert threshold_recall_target(y, tied, 0.95) == pytest.approx(0.8)


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.4 + rng.random(300) * 0.6, 0, 1)
    ci = bootstrap_ci(y, p, 0.5, n_boot=200)
    m = binary_metrics(y, p, 0.5)
    for k in ("accuracy", "recall", "specificity", "roc_auc"):
        lo, hi = ci[k]
        assert lo <= m[k] <= hi and hi - lo < 0.2


def test_single_class_validation_is_an_error_not_a_default():
    with pytest.raises(ValueError, match="needs both classes, got NORMAL=0, PNEUMONIA=5"):
        threshold_for_specificity(np.ones(5), np.linspace(0.1, 0.9, 5), 0.9)
    with pytest.raises(ValueError, match="NORMAL=4, PNEUMONIA=0"):
        validation_metrics(np.zeros(4), np.linspace(0.1, 0.9, 4), 0.9)


def test_threshold_search_sees_every_distinct_score():
    # Five tied (NORMAL, PNEUMONIA) pairs make collinear ROC points, which roc_curve drops by
    # default; the best threshold at specificity >= 0.8 is one of them (recall 0.7 at 0.7).
    pairs = [0.8, 0.7, 0.6, 0.5, 0.4]
    y = np.array([1] * 5 + [0, 1] * 5 + [0] * 5)
    p = np.array([0.95, 0.94, 0.93, 0.92, 0.91] + [s for s in pairs for _ in (0, 1)] + [0.2] * 5)
    recall, thr = threshold_for_specificity(y, p, 0.8)
    assert (recall, thr) == pytest.approx((0.7, 0.7))
    assert binary_metrics(y, p, thr)["specificity"] == pytest.approx(0.8)


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_correlated_images():
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(60), 5)  # 5 images per patient, scored alike
    y = np.repeat(rng.integers(0, 2, 60), 5)
    p = np.clip(np.repeat(y[::5] * 0.3 + rng.random(60) * 0.7, 5) + rng.normal(0, 0.01, 300), 0, 1)
    images = bootstrap_ci(y, p, 0.5, n_boot=300)
    clustered = bootstrap_ci(y, p, 0.5, n_boot=300, groups=patients)
    for k in ("accuracy", "roc_auc"):
        assert np.diff(clustered[k])[0] > 1.5 * np.diff(images[k])[0], k


def test_rank_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from cxr_ray.analysis.metrics import rank_auc

    rng = np.random.default_rng(5)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        p = np.round(rng.random(60), 1)  # many ties
        assert rank_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
