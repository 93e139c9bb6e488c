"""Test-time augmentation and ensembles: the views, the per-mode decisions stored in the
checkpoint (and its digest), ensemble checkpoints and their refusals, and through the CLI an
ensemble whose validation figures evaluate reproduces."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import run_cli

from cxr_ray.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_tta_decisions
from cxr_ray.config import ExperimentConfig
from cxr_ray.ensemble import EnsembleError, EnsembleModel, check_members
from cxr_ray.models import build_model
from cxr_ray.tta import TTAModel, parse_modes, views


class LeftMinusRight(nn.Module):
    """A 'model' whose logit is the left half's mean minus the right half's: a mirror negates it."""

    def forward(self, x):
        w = x.shape[-1] // 2
        return (x[..., :w].mean((1, 2, 3)) - x[..., w:].mean((1, 2, 3)))[:, None]


def small_cfg(**over) -> ExperimentConfig:
    return ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.weights": "none", "model.width": 4,
                                         "data.image_size": 32, **over})


def test_views_and_the_mean_logit():
    x = torch.rand(3, 1, 32, 32)
    flipped = views(x, "hflip")
    assert len(flipped) == 2 and torch.equal(flipped[1], torch.flip(x, dims=(-1,)))
    crops = views(x, "crop5")
    assert len(crops) == 5 and all(c.shape == x.shape for c in crops)
    assert not torch.allclose(crops[1], crops[4])  # top-left and bottom-right differ
    model = LeftMinusRight()
    assert model(x).abs().min() > 0
    assert torch.allclose(TTAModel(model, "hflip")(x), torch.zeros(3, 1), atol=1e-6)
    assert parse_modes("hflip, crop5,hflip") == ("hflip", "crop5") and parse_modes("") == ()


def test_tta_decisions_live_in_the_checkpoint_and_its_digest(tmp_path):
    cfg = small_cfg()
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "ck", build_model(cfg.model), cfg, 0.5, {}, epoch=0, temperature=1.5)
    plain = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no threshold chosen with TTA 'hflip'.*cxr-ray fit-tta"):
        plain.with_tta("hflip")
    assert plain.with_tta("none") is plain
    digest = write_tta_decisions(str(path), {"hflip": {"threshold": 0.3, "temperature": 2.0, "val_precision": "fp32"}})
    ckpt = load_checkpoint(path)
    assert ckpt.digest == digest != plain.digest and ckpt.tta_modes == ["hflip"]
    assert ckpt.threshold == 0.5 and ckpt.temperature == 1.5  # the plain decision is unchanged
    tta = ckpt.with_tta("hflip")
    assert (tta.threshold, tta.temperature, tta.tta) == (0.3, 2.0, "hflip")
    assert tta.model_id.endswith("+tta=hflip") and tta.model_id.split("+")[0] == ckpt.model_id
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = (ckpt.model(x) + ckpt.model(torch.flip(x, dims=(-1,)))) / 2
        assert torch.allclose(tta.model(x), want, atol=1e-6)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["tta"]["hflip"]["threshold"] = 0.1  # edited by hand: refused
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
        load_checkpoint(path)


def test_ensemble_members_must_share_preprocessing_and_split(tmp_path):
    def ckpt(name, **over):
        cfg = small_cfg(**over)
        return load_checkpoint(save_checkpoint(tmp_path / name, build_model(cfg.model), cfg, 0.5, {}, epoch=0))

    a = ckpt("a", **{"model.dropout": 0.1, "train.lr": 1e-3})
    b = ckpt("b", **{"model.dropout": 0.5, "train.lr": 1e-4, "model.width": 8})  # what a search tunes: fine
    check_members([a, b])
    with pytest.raises(EnsembleError, match=r"preprocessing .*image each member sees.*b2: .*image_size: 32 vs 48"):
        check_members([a, ckpt("b2", **{"data.image_size": 48})])
    with pytest.raises(EnsembleError, match=r"data.seed .*may have trained on"):
        check_members([a, ckpt("c", **{"data.seed": 1})])
    with pytest.raises(EnsembleError, match="normalize: 'per_image' vs 'fixed'"):
        check_members([a, ckpt("d", **{"data.normalize": "fixed"})])
    with pytest.raises(EnsembleError, match="at least 2"):
        check_members([a])
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(EnsembleModel([a.model, b.model], ["simple_cnn"] * 2)(x),
                              (a.model(x) + b.model(x)) / 2, atol=1e-6)


@pytest.mark.slow
def test_ensemble_cli_evaluate_and_score(synthetic_root, tmp_path):
    """Two members (different dropout and width, same data and split) through `cxr-ray ensemble`:
    the checkpoint holds both, evaluate on val reproduces its stored validation figures (plain
    and hflip), score --tta applies the hflip threshold, members that differ are refused."""
    sources = []
    for i, over in enumerate(({"model.dropout": 0.1}, {"model.dropout": 0.4, "model.width": 8})):
        cfg = small_cfg(**{"data.root": str(synthetic_root), "data.cache_dir": str(tmp_path / "cache"), **over})
        torch.manual_seed(i)
        model = build_model(cfg.model)
        with torch.no_grad():
            model.head[-1].weight.mul_(50.0)  # spread the logits
        sources.append(str(save_checkpoint(tmp_path / f"m{i}", model, cfg, 0.5, {}, epoch=0)))
    out = tmp_path / "ens"
    r = run_cli("ensemble", "--checkpoints", *sources, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(out)
    assert "[ensemble] member 1:" in r.stdout and "[ensemble] hflip" in r.stdout
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["kind"] == "ensemble" and len(meta["members"]) == 2 and set(meta["tta"]) == {"hflip"}
    assert (out / "members" / "1" / "model.pt").is_file()
    assert meta["members"][1]["settings"]["model.width"] == 8

    for tta, decision in (("hflip", meta["tta"]["hflip"]),):  # (the plain decision: as train's, test_train_e2e)
        rep = tmp_path / f"val-{tta}"
        ev = run_cli("evaluate", "--checkpoint", out, "--split", "val", "--out", rep, "--tta", tta)
        assert ev.returncode == 0, ev.stderr[-3000:]
        m = json.loads((rep / "metrics.json").read_text())
        assert m["tta"] == tta and m["n"] == decision["n"]
        for key in ("threshold", "roc_auc", "recall", "specificity"):
            assert m[key] == pytest.approx(decision[key], abs=1e-6), (tta, key)
        assert m["calibration"]["temperature"] == pytest.approx(decision["temperature"])

    scored = tmp_path / "scored"
    sc = run_cli("score", "--checkpoint", out, "--input", synthetic_root / "test", "--output", scored,
                 "--tta", "hflip", "--with-labels")
    assert sc.returncode == 0, sc.stderr[-3000:]
    rows = pd.read_parquet(scored)
    assert len(rows) and np.allclose(rows["threshold"], meta["tta"]["hflip"]["threshold"])
    assert rows["model"].str.endswith("+tta=hflip").all() and "ensemble of 2" in rows["model"].iloc[0]

    with pytest.raises(CheckpointError, match="no threshold chosen with TTA 'crop5'"):
        load_checkpoint(out).with_tta("crop5")  # (score/evaluate --tta crop5: refused before Ray, exit 2)
    fit = run_cli("fit-tta", "--checkpoint", out, "--tta", "crop5")  # adds the mode: the digest changes
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert fit.stdout.strip().splitlines()[-1] == str(out) and "[fit-tta] crop5" in fit.stdout
    after = json.loads((out / "checkpoint.json").read_text())
    assert set(after["tta"]) == {"hflip", "crop5"} and after["tta"]["hflip"] == meta["tta"]["hflip"]
    assert after["digest"] != meta["digest"] and after["base_digest"] == meta["base_digest"]
    crop5 = load_checkpoint(out).with_tta("crop5")
    assert crop5.threshold == after["tta"]["crop5"]["threshold"] and crop5.tta == "crop5"
    cfg = small_cfg(**{"data.root": str(synthetic_root), "data.image_size": 48})
    other = save_checkpoint(tmp_path / "other", build_model(cfg.model), cfg, 0.5, {}, epoch=0)
    r = run_cli("ensemble", "--checkpoints", sources[0], other, "--out", tmp_path / "ens2")
    assert r.returncode == 2 and "members differ in preprocessing" in r.stderr and "image_size: 32 vs 48" in r.stderr
    assert "Started a local Ray instance" not in r.stderr  # refused before Ray started
    assert not Path(tmp_path / "ens2").exists()
