"""Operating points chosen on validation and carried to another split, with CIs and PPV/NPV."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_ray.analysis.metrics import operating_points, operating_thresholds, predictive_values
from cxr_ray.cli import parse_prevalences
from cxr_ray.errors import ConfigError


def _scores(n: int, seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.7).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 2.2 * y - 1.0 - shift)))
    return y, p.astype(np.float32)  # as engine.probabilities makes them: thresholds are float32 scores


def test_each_rule_holds_on_the_set_it_was_chosen_on():
    y, p = _scores(600, 0)
    t = operating_thresholds(y, p)
    for s in (0.85, 0.90, 0.95):
        assert ((p < t[f"specificity >= {s:.2f}"]) & (y == 0)).sum() / (y == 0).sum() >= s
    assert ((p >= t["recall >= 0.95"]) & (y == 1)).sum() / (y == 1).sum() >= 0.95
    # thresholds move the right way: stricter specificity -> higher threshold
    assert t["specificity >= 0.85"] <= t["specificity >= 0.90"] <= t["specificity >= 0.95"]
    j = {th: ((p >= th) & (y == 1)).mean() / (y == 1).mean() + ((p < th) & (y == 0)).mean() / (y == 0).mean()
         for th in np.unique(p)}
    assert j[t["Youden's J"]] == pytest.approx(max(j.values()))


def test_rows_report_the_other_split_with_cis_and_predictive_values():
    yv, pv = _scores(400, 1)
    ye, pe = _scores(500, 2, shift=0.5)  # a shifted split: the validation choices move
    rows = operating_points(yv, pv, ye, pe, ("stored", 0.5), groups=np.arange(500) // 2, prevalences=(0.05, 0.2))
    assert [r["rule"] for r in rows][:2] == ["stored", "specificity >= 0.85"] and len(rows) == 6
    for r in rows:
        assert r["recall_ci"][0] <= r["recall"] <= r["recall_ci"][1]
        assert r["specificity_ci"][0] <= r["specificity"] <= r["specificity_ci"][1]
        assert [v["prevalence"] for v in r["predictive_values"]] == [pytest.approx((ye == 1).mean()), 0.05, 0.2]
        low, high = r["predictive_values"][1:]
        assert low["ppv"] < high["ppv"] and low["npv"] > high["npv"]  # rarer disease: lower PPV, higher NPV


def test_predictive_values_by_hand_and_prevalence_parsing():
    ppv, npv = predictive_values(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(0.09 / (0.09 + 0.18)) and npv == pytest.approx(0.72 / (0.72 + 0.01))
    assert parse_prevalences("0.05, 0.2") == (0.05, 0.2) and parse_prevalences("") == ()
    for bad in ("5%", "0", "1.2"):
        with pytest.raises(ConfigError, match="--prevalence"):
            parse_prevalences(bad)
