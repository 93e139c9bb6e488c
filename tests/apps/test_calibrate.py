"""Site calibration: a new hospital's labelled sample refits the decision; figures are
cross-fitted; the new checkpoint records the sample and is sealed like any other."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import run_cli, write_image

from cxr_ray.apps.calibrate import (
    MIN_PER_CLASS,
    calibrate_on_sample,
    format_calibration,
    patient_folds,
    provenance,
    sample_catalog,
    write_calibrated,
)
from cxr_ray.checkpoint import load_checkpoint
from cxr_ray.errors import CheckpointError, DataError


def _site_preds(n_patients: int = 60, seed: int = 0, normal_shift: float = 4.0) -> pd.DataFrame:
    """Predictions at a site where NORMAL films score higher than at the training site (as the
    withheld hospital did: specificity halves, recall holds): two images per patient."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.random(n_patients) < 0.5, 2).astype(int)
    logits = np.where(labels == 1, rng.normal(3.5, 1.0, len(labels)),
                      rng.normal(-3.0 + normal_shift, 1.0, len(labels)))
    return pd.DataFrame({"path": [f"/site/{i}.png" for i in range(len(labels))], "label": labels,
                         "patient": np.repeat([f"p{i}" for i in range(n_patients)], 2), "logit": logits,
                         "probability": 1 / (1 + np.exp(-logits))})


def test_folds_keep_patients_whole_and_both_classes_in_each():
    preds = _site_preds()
    folds = patient_folds(preds["patient"].to_numpy(), preds["label"].to_numpy())
    assert preds.groupby("patient").apply(lambda g: folds[g.index].min() == folds[g.index].max()).all()
    for f in np.unique(folds):
        assert set(preds["label"][folds == f]) == {0, 1}


def test_calibration_restores_specificity_with_cross_fitted_figures(checkpoint):
    ckpt = load_checkpoint(checkpoint)  # threshold 0.5, the training site's
    result = calibrate_on_sample(ckpt, _site_preds())
    before, after = result["before"], result["after"]
    assert before["recall"] > 0.95 and before["specificity"] < 0.3  # NORMAL films drifted up
    assert after["specificity"] > 0.6 and after["recall"] >= 0.7  # refitted on other folds, measured on the held one
    # the refitted cut, back in the model's own logits (z = T (logit(t) - b)), lies above the
    # training site's (threshold 0.5 at T = 1, b = 0: z = 0), where the drifted NORMAL films were
    d = result["decision"]
    cut = d["temperature"] * (np.log(d["threshold"] / (1 - d["threshold"])) - d["logit_bias"])
    assert cut > 1.0, d
    lines = format_calibration(result)
    assert lines[0].startswith("[calibrate] as trained") and "cross-fitted" in lines[1] and "(" in lines[1]


def test_calibrated_checkpoint_records_the_sample_and_is_sealed(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint)
    preds = _site_preds()
    cat = pd.DataFrame({"path": preds["path"], "label": preds["label"], "patient": preds["patient"],
                        "size_bytes": 100, "mtime_ns": 1})
    out = write_calibrated(ckpt, calibrate_on_sample(ckpt, preds), provenance(cat, "/site", ckpt),
                           str(tmp_path / "site_ck"), "fp32")
    new = load_checkpoint(out)
    site = new.meta["site_calibration"]
    assert site["counts"] == {"NORMAL": int((preds["label"] == 0).sum()), "PNEUMONIA": int(preds["label"].sum())}
    assert site["fingerprint"].startswith("sha256:") and site["source_digest"] == ckpt.digest
    assert new.threshold != ckpt.threshold and new.digest != ckpt.digest and not new.tta_modes
    meta = json.loads((tmp_path / "site_ck" / "checkpoint.json").read_text())
    meta["site_calibration"]["counts"]["NORMAL"] = 1000  # the provenance is in the digest
    (tmp_path / "site_ck" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
        load_checkpoint(out)
    with pytest.raises(CheckpointError, match="exists"):
        write_calibrated(ckpt, calibrate_on_sample(ckpt, preds), {}, out, "fp32")


def test_too_small_a_sample_is_refused_with_the_counts(tmp_path):
    for i in range(MIN_PER_CLASS):
        write_image(tmp_path / "site" / "PNEUMONIA" / f"p{i}.png")
    for i in range(5):
        write_image(tmp_path / "site" / "NORMAL" / f"n{i}.png")
    with pytest.raises(DataError, match=r"needs >= 30 images of >= 10 patients per class.*NORMAL 5 images / 5 pat"):
        sample_catalog(str(tmp_path / "site"))


@pytest.mark.slow
def test_calibrate_command_writes_a_checkpoint_that_loads(checkpoint, tmp_path):
    from cxr_ray.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "syn", n=260, size=64, seed=4,
                                  split_shares={"train": 0.45, "val": 0.05, "test": 0.5})
    r = run_cli("calibrate", "--checkpoint", checkpoint, "--data", root / "test", "--out", tmp_path / "site_ck",
                "--cache", tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "site_ck") and any("cross-fitted" in ln for ln in lines)
    new = load_checkpoint(tmp_path / "site_ck")  # loads (and verifies) like any checkpoint
    assert new.meta["site_calibration"]["counts"]["NORMAL"] >= MIN_PER_CLASS and new.drift_reference is not None
    assert new.drift_reference["acquisition"]["p50"]["n"] == new.drift_reference["n"]  # the site's own images
