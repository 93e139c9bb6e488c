"""Temperature and Platt scaling: they recover a known over-confidence (and a known shift of
every logit), lower ECE, change no decision, and are part of a checkpoint's identity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cxr_ray.analysis.calibration import brier, calibration_report, ece, fit_platt, fit_temperature, nll, sigmoid
from cxr_ray.checkpoint import load_checkpoint, save_checkpoint
from cxr_ray.engine.loop import probabilities
from cxr_ray.errors import CheckpointError


def _overconfident(n: int = 4000, factor: float = 4.0, seed: int = 0):
    """Labels drawn from sigmoid(z), and the logits of a model that says ``factor * z``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.8, 2.0, n)
    y = (rng.random(n) < sigmoid(z)).astype(np.int64)
    return (factor * z).astype(np.float32), y


def test_fit_recovers_the_overconfidence_and_ece_drops_with_no_decision_changed():
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert t == pytest.approx(4.0, rel=0.15)
    report = calibration_report(y, logits, t)
    assert report["ece_after"] < report["ece_before"] / 2 and report["brier_after"] < report["brier_before"]
    assert nll(logits, y, t) < nll(logits, y, 1.0)
    raw, cal = probabilities(logits), probabilities(logits, t)
    for threshold in (0.1, 0.5, 0.9):  # a threshold moved onto the calibrated scale keeps every decision
        on_cal = float(probabilities(np.array([np.log(threshold / (1 - threshold))], np.float32), t)[0])
        assert ((raw >= threshold) == (cal >= on_cal)).all()
    order = np.argsort(logits)  # both keep the logits' order (raw fp32 probabilities may tie at 1.0)
    assert (np.diff(raw[order]) >= 0).all() and (np.diff(cal[order]) >= 0).all()


def test_a_calibrated_model_keeps_temperature_near_one_and_degenerate_sets_get_one():
    logits, y = _overconfident(factor=1.0, seed=1)
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.1)
    assert fit_temperature(np.array([1.0, 2.0]), np.array([1, 1])) == 1.0  # one class: nothing to fit
    assert fit_temperature(np.array([1.0]), np.array([1])) == 1.0


def test_platt_undoes_a_shift_that_temperature_cannot():
    """A class-weighted loss shifts every logit (here by -3 on an over-confident model): a
    temperature alone cannot move the base rate, Platt's bias can; no decision changes."""
    logits, y = _overconfident(factor=2.0, seed=2)
    shifted = logits - 3.0
    t, b = fit_platt(shifted, y)
    assert t == pytest.approx(2.0, rel=0.15) and b == pytest.approx(1.5, abs=0.3)  # z = (2z' - 3) / 2 + 1.5
    only_t = calibration_report(y, shifted, fit_temperature(shifted, y))
    platt = calibration_report(y, shifted, t, b)
    assert platt["ece_after"] < 0.03 < only_t["ece_after"] and platt["ece_after"] < platt["ece_before"] / 4
    assert nll(shifted, y, t, b) < nll(shifted, y, only_t["temperature"])
    raw, cal = probabilities(shifted), probabilities(shifted, t, b)
    on_cal = float(probabilities(np.array([0.0], np.float32), t, b)[0])  # raw 0.5 on the calibrated scale
    assert ((raw >= 0.5) == (cal >= on_cal)).all()
    assert fit_platt(np.array([1.0, 2.0]), np.array([1, 1])) == (1.0, 0.0)  # one class: nothing to fit


def test_platt_stays_finite_on_a_separable_validation_set():
    """One threshold separates these 100 images: 0/1 targets would sharpen without limit
    (probabilities of exactly 0 and 1, tied in float32); Platt's targets keep T moderate."""
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(30, np.int64), np.ones(70, np.int64)]
    logits = np.where(y == 1, rng.uniform(0.5, 8, 100), rng.uniform(-8, -0.5, 100)).astype(np.float32)
    t, b = fit_platt(logits, y)
    assert t > 0.5
    p = probabilities(logits, t, b)
    assert 0.0 < p.min() and p.max() < 1.0 and len(np.unique(p)) == len(np.unique(logits))


def test_ece_and_brier_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 0.7])
    # bins: 0.1 twice (observed 0), 0.9 (observed 1), 0.7 (observed 1)
    assert ece(y, p) == pytest.approx((2 * 0.1 + 0.1 + 0.3) / 4)
    assert brier(y, p) == pytest.approx((0.01 + 0.01 + 0.01 + 0.09) / 4)


def test_temperature_is_stored_applied_and_part_of_the_checkpoint_identity(checkpoint, tmp_path):
    base = load_checkpoint(checkpoint)
    assert base.temperature == 1.0  # checkpoints without one: T = 1
    assert base.logit_bias == 0.0
    path = save_checkpoint(tmp_path / "t", base.model, base.cfg, 0.7, {}, 0, temperature=2.5, logit_bias=1.25)
    ckpt = load_checkpoint(path)
    assert (ckpt.temperature, ckpt.logit_bias) == (2.5, 1.25) and ckpt.digest != load_checkpoint(
        save_checkpoint(tmp_path / "t1", base.model, base.cfg, 0.7, {}, 0, temperature=2.5)).digest
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    meta = json.loads((edited / "checkpoint.json").read_text())
    for key in ("temperature", "logit_bias"):
        (edited / "checkpoint.json").write_text(json.dumps({**meta, key: 1.0}))
        with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
            load_checkpoint(edited)
