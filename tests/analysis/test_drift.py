"""The label-free drift report: quiet on held-out images of the validation distribution (and on
a prevalence change alone, which EM estimates), loud on NORMAL films that score higher and on a
moved acquisition statistic, silent below MIN_IMAGES; the summary is small JSON.

Simulated logits: NORMAL ~ N(-3, 1), PNEUMONIA ~ N(3, 1), validation prevalence 0.7, threshold
at logit -1 (validation specificity ~0.98, recall ~1)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_ray.analysis.calibration import sigmoid
from cxr_ray.analysis.drift import MIN_IMAGES, compare, em_prevalence, format_drift, ks_critical, reference_summary

THRESHOLD = float(sigmoid(np.array([-1.0]))[0])


def _logits(n: int, prevalence: float, seed: int, normal_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    return np.where(y == 1, rng.normal(3.0, 1.0, n), rng.normal(-3.0 + normal_shift, 1.0, n)), y


def _exposure(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5 + shift, 0.05, n)


@pytest.fixture(scope="module")
def summary() -> dict:
    z, y = _logits(600, 0.7, seed=0)
    return reference_summary(z, y, sigmoid(z), THRESHOLD, {"exposure_p50": _exposure(600, 1)})


def _check(summary: dict, z: np.ndarray, **kw) -> dict:
    return compare(summary, z, probs=sigmoid(z), **kw)


@pytest.mark.parametrize("n", [200, 2000])
def test_held_out_images_of_the_validation_distribution_never_warn(summary, n):
    for seed in range(1, 9):
        z, _ = _logits(n, 0.7, seed=100 * n + seed)
        r = _check(summary, z, acquisition={"exposure_p50": _exposure(n, seed + 50)})
        assert not r["warn"], r["reasons"]
        assert "drift" in r["message"] and "no drift" in r["message"]
        assert r["ks_adjusted"] < r["ks_critical"] and abs(r["prevalence_em"] - 0.7) < 0.1
        assert not r["acquisition"]["exposure_p50"]["drift"]


def test_false_alarm_rate_stays_below_two_percent(summary):
    warned = 0
    for seed in range(200):
        z, _ = _logits(300, 0.7, seed=10_000 + seed)
        warned += _check(summary, z, acquisition={"exposure_p50": _exposure(300, 20_000 + seed)})["warn"]
    assert warned / 200 < 0.02


def test_normal_films_scoring_higher_warn_with_the_ks_and_what_to_do(summary):
    """The new hospital: NORMAL logits up by 2 (specificity at the threshold ~0.98 -> ~0.5, recall kept)."""
    z, y = _logits(500, 0.7, seed=7, normal_shift=2.0)
    assert np.mean(sigmoid(z[y == 0]) < THRESHOLD) < 0.6  # specificity really dropped
    r = _check(summary, z, checkpoint="runs/best", data="/data/site-b")
    assert r["warn"] and r["direction"] == "up" and r["where"] == "NORMAL"
    assert r["ks_adjusted"] > r["ks_critical"]
    message = r["message"]
    assert "drift" in message and "KS" in message and "NORMAL-like films score higher" in message
    assert "cxr-ray calibrate --checkpoint runs/best --data /data/site-b --out DIR" in message
    assert r["positive_rate"] > r["positive_rate_expected"]  # more called PNEUMONIA than EM's prevalence explains
    lines = format_drift(r)
    assert lines[0].startswith("WARNING drift") and any("logits: KS" in line for line in lines)


def test_a_prevalence_change_alone_is_estimated_and_stated_not_warned(summary):
    """0.7 -> 0.3 with the same class-conditionals: recall and specificity hold, so no warning
    (``ks_logits``, against validation's mix, is large; ``ks_adjusted`` is not)."""
    for seed in (1, 2, 3):
        z, y = _logits(1000, 0.3, seed=seed)
        r = _check(summary, z)
        assert r["prevalence_em"] == pytest.approx(0.3, abs=0.07) and r["em_converged"]
        assert abs(r["prevalence_em"] - y.mean()) < 3 * r["prevalence_em_se"]
        assert r["ks_logits"] > 0.3 and r["ks_adjusted"] < r["ks_critical"]
        assert not r["warn"]
        assert f"estimated prevalence {r['prevalence_em']:.2f} (validation 0.67)" in r["message"]
        assert "prevalence change alone" in r["message"]
    # ... unless the caller says what prevalence is plausible at the site
    r = _check(summary, z, prevalence_range=(0.5, 0.9))
    assert r["warn"] and "outside the plausible 0.50-0.90" in r["message"]


def test_too_few_images_are_not_judged(summary):
    z, _ = _logits(20, 0.7, seed=3, normal_shift=4.0)  # a gross shift, but 20 images
    r = _check(summary, z, acquisition={"exposure_p50": _exposure(20, 4, shift=0.5)})
    assert not r["warn"] and not r["enough"] and r["reasons"] == []
    assert "too few images to judge" in r["message"] and "drift" in r["message"]
    assert format_drift(r) == [r["message"]]
    assert MIN_IMAGES > 20 and not compare(summary, np.array([]))["warn"]


def test_a_moved_acquisition_statistic_warns_by_name(summary):
    z, _ = _logits(300, 0.7, seed=5)
    r = _check(summary, z, acquisition={"exposure_p50": _exposure(300, 6, shift=0.08), "new_stat": np.ones(300)})
    a = r["acquisition"]["exposure_p50"]
    assert r["warn"] and a["drift"] and a["direction"] == "up" and a["median_shift_iqr"] > 1.0
    assert "exposure_p50 moved up" in r["message"] and "drift" in r["message"]
    assert r["ks_adjusted"] < r["ks_critical"]  # the logits themselves did not move
    assert r["acquisition_skipped"] == ["new_stat"]
    assert any("exposure_p50" in line and "<- drift" in line for line in format_drift(r))


def test_a_discrete_acquisition_statistic_is_compared_through_its_jumps():
    rng = np.random.default_rng(0)
    z, y = _logits(600, 0.7, seed=1)
    bits = rng.choice([8, 12, 16], size=600, p=[0.5, 0.3, 0.2])
    s = reference_summary(z, y, sigmoid(z), THRESHOLD, {"bit_depth": bits})
    same = rng.choice([8, 12, 16], size=400, p=[0.5, 0.3, 0.2])
    moved = rng.choice([8, 12, 16], size=400, p=[0.1, 0.3, 0.6])
    z_new, _ = _logits(400, 0.7, seed=2)
    assert not compare(s, z_new, {"bit_depth": same})["warn"]
    r = compare(s, z_new, {"bit_depth": moved})
    assert r["warn"] and r["acquisition"]["bit_depth"]["direction"] == "up"


def test_summary_is_small_json_and_results_are_json(summary):
    text = json.dumps(summary)
    assert len(text) < 5000 and json.loads(text) == summary
    assert summary["n_per_class"]["NORMAL"] + summary["n_per_class"]["PNEUMONIA"] == summary["n"] == 600
    assert summary["recall"] > 0.99 and summary["specificity"] > 0.95
    assert len(summary["quantiles"]["all"]) == summary["levels"] == 41
    three = {f"stat_{i}": _exposure(600, i) for i in range(3)}
    z, y = _logits(600, 0.7, seed=0)
    assert len(json.dumps(reference_summary(z, y, sigmoid(z), THRESHOLD, three))) < 5000
    r = _check(json.loads(text), _logits(300, 0.7, seed=9, normal_shift=2.0)[0],
               acquisition={"exposure_p50": _exposure(300, 2)})
    assert json.loads(json.dumps(r)) == r


def test_bad_inputs_say_what_was_expected(summary):
    z, y = _logits(100, 0.7, seed=0)
    with pytest.raises(ValueError, match="needs both classes"):
        reference_summary(z, np.zeros_like(y), sigmoid(z), THRESHOLD)
    with pytest.raises(ValueError, match="one entry per image"):
        reference_summary(z, y[:-1], sigmoid(z), THRESHOLD)
    with pytest.raises(ValueError, match="expected a reference_summary"):
        compare({"n": 3}, z)
    with pytest.raises(ValueError, match="one entry per logit"):
        compare(summary, z, probs=sigmoid(z)[:-1])
    with pytest.raises(ValueError, match="prevalence_range"):
        compare(summary, z, prevalence_range=(0.9, 0.1))


def test_non_finite_logits_are_dropped_and_another_threshold_skips_the_rate_check(summary):
    z, _ = _logits(300, 0.7, seed=11)
    with_nan = np.append(z, [np.nan, np.inf])
    r = compare(summary, with_nan, probs=sigmoid(with_nan))
    assert r["n"] == 300 and not r["warn"]
    other = compare(summary, z, probs=sigmoid(z), threshold=0.9)
    assert other["positive_rate"] is not None and other["positive_rate_expected"] is None


def test_em_recovers_a_known_prevalence_and_stops_within_its_bounds():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.2
    z = np.where(y, rng.normal(1.0, 1.0, 5000), rng.normal(-1.0, 1.0, 5000))
    post_at_half = sigmoid(2.0 * z)  # exact posteriors of these Gaussians at prevalence 0.5
    em = em_prevalence(post_at_half, 0.5)
    assert em.converged and em.prevalence == pytest.approx(y.mean(), abs=3 * em.se)
    all_normal = em_prevalence(np.full(200, 1e-20), 0.5)  # clipped, bounded, no NaN
    assert all_normal.prevalence == pytest.approx(0.001) and np.isfinite(all_normal.se)


def test_logits_beyond_every_validation_logit_keep_their_side(summary):
    """Far above every PNEUMONIA logit is PNEUMONIA, far below every NORMAL one NORMAL (the
    density tails must not flip the posterior there)."""
    assert compare(summary, np.full(200, 1e6))["prevalence_em"] > 0.99
    assert compare(summary, np.full(200, -1e6))["prevalence_em"] < 0.01


def test_the_ks_critical_value_has_a_floor_and_shrinks_with_n():
    assert ks_critical(100, 600) > ks_critical(300, 600) > ks_critical(100_000, 600) > 0
    assert ks_critical(10**6, 10**6) == pytest.approx(0.1)


def _films(n: int, seed: int, gamma: float = 1.0, blur: float = 0.0) -> np.ndarray:
    """``n`` synthetic uint8 chest films ``(n, 1, 64, 64)``, half with opacities; ``gamma`` and
    ``blur`` play another site's exposure curve and sharpness."""
    from PIL import Image, ImageFilter

    from cxr_ray.data.synthetic import chest_image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray(chest_image(64, i % 2 == 1, rng))
        img = img.point([int(round(255 * (v / 255) ** gamma)) for v in range(256)])
        out.append(np.asarray(img.filter(ImageFilter.GaussianBlur(blur)) if blur else img))
    return np.stack(out)[:, None]


def test_acquisition_stats_of_images_flag_another_site_and_not_held_out_films():
    """The drift report's acquisition statistics, measured on model-input images as training,
    evaluate and score measure them: held-out films of the reference's kind do not move them;
    another exposure curve and a softer image do, by name."""
    from cxr_ray.analysis.drift import ACQUISITION_STATS, StatsCollector, acquisition_stats

    z, y = _logits(300, 0.5, seed=11)
    films = _films(300, seed=1)
    capped = StatsCollector(limit=100)
    batches = list(capped.watch({"image": films[i:i + 64]} for i in range(0, 300, 64)))
    assert len(batches) == 5 and np.array_equal(batches[0]["image"], films[:64])  # passed through unchanged
    assert capped.n == 100 and all(len(v) == 100 for v in capped.result().values())  # the first 100 only
    collector = StatsCollector(limit=1000)
    list(collector.watch({"image": films[i:i + 64, 0]} for i in range(0, 300, 64)))  # (B, N, N) too
    ref_stats = collector.result()
    assert set(ref_stats) == set(ACQUISITION_STATS) and all(len(v) == 300 for v in ref_stats.values())
    ref = reference_summary(z, y, sigmoid(z), 0.5, ref_stats)
    z_new, _ = _logits(300, 0.5, seed=12)
    same = compare(ref, z_new, acquisition_stats(_films(300, seed=2)))
    assert not same["warn"], same["reasons"]
    assert not any(a["drift"] for a in same["acquisition"].values()), same["acquisition"]
    other = compare(ref, z_new, acquisition_stats(_films(300, seed=2, gamma=0.6, blur=1.0)))
    moved = {k for k, a in other["acquisition"].items() if a["drift"]}
    assert other["warn"] and {"p50", "sharpness"} <= moved, other["acquisition"]
    assert StatsCollector(limit=10).result() is None
