"""Temperature scaling: it recovers a known over-confidence, lowers ECE, changes no decision,
and the temperature is part of a checkpoint's identity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cxr_ray.calibration import brier, calibration_report, ece, fit_temperature, nll, sigmoid
from cxr_ray.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cxr_ray.engine import probabilities


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


def test_ece_and_brier_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 0.7])
    # bins: 0.1 twice (observed 0), 0.9 (observed 1), 0.7 (observed 1)
    assert ece(y, p) == pytest.approx((2 * 0.1 + 0.1 + 0.3) / 4)
    assert brier(y, p) == pytest.approx((0.01 + 0.01 + 0.01 + 0.09) / 4)


def test_temperature_is_stored_applied_and_part_of_the_checkpoint_identity(checkpoint, tmp_path):
    base = load_checkpoint(checkpoint)
    assert base.temperature == 1.0  # checkpoints without one: T = 1
    path = save_checkpoint(tmp_path / "t", base.model, base.cfg, 0.7, {}, 0, temperature=2.5)
    ckpt = load_checkpoint(path)
    assert ckpt.temperature == 2.5 and ckpt.digest != load_checkpoint(
        save_checkpoint(tmp_path / "t1", base.model, base.cfg, 0.7, {}, 0)).digest
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    meta = json.loads((edited / "checkpoint.json").read_text())
    meta["temperature"] = 1.0
    (edited / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
        load_checkpoint(edited)
