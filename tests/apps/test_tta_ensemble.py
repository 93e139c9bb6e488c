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
import torch.nn.functional as F
from helpers import run_cli

from cxr_ray.apps.ensemble import EnsembleModel, check_members
from cxr_ray.checkpoint import load_checkpoint, save_checkpoint, write_tta_decisions
from cxr_ray.config import ExperimentConfig
from cxr_ray.config import parse_tta_modes as parse_modes
from cxr_ray.data.preprocessing import Preprocessing
from cxr_ray.data.transforms import normalize
from cxr_ray.errors import CheckpointError, EnsembleError
from cxr_ray.models.registry import build_model
from cxr_ray.models.wrappers import CROP_SCALE, VIEWS_VERSION, TTAModel, crop_boxes, views

PER_IMAGE = Preprocessing(32, 32, "per_image", scale=2.0)
FIXED = Preprocessing(32, 32, "fixed", mean=0.45, std=0.22)


class Recorder(nn.Module):
    """A 'model' that keeps every input it is given and returns a zero logit."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(len(x), 1)


def lit_top_left(n: int = 3, size: int = 32) -> torch.Tensor:
    """[0, 1] images brighter and flatter towards the top-left: every crop5 view has other
    pixel statistics than the whole image."""
    ramp = torch.linspace(0, 1, size)
    light = 1 - (ramp[:, None] + ramp[None, :]) / 2
    noise = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    return (0.6 * light + 0.4 * noise * ramp[None, :]).clamp(0, 1)


def per_view_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(1)
    return flat.mean(1), flat.std(1)  # unbiased, as normalize's


def raw_crops(pixels: torch.Tensor) -> list[torch.Tensor]:
    """The crop5 views of [0, 1] pixels, resized back, before any normalisation."""
    h, w = pixels.shape[-2:]
    return [F.interpolate(pixels[..., t:t + ch, s:s + cw], size=(h, w), mode="bilinear", align_corners=False)
            for t, s, ch, cw in crop_boxes(h, w)]


class LeftMinusRight(nn.Module):
    """A 'model' whose logit is the left half's mean minus the right half's: a mirror negates it."""

    def forward(self, x):
        w = x.shape[-1] // 2
        return (x[..., :w].mean((1, 2, 3)) - x[..., w:].mean((1, 2, 3)))[:, None]


def small_cfg(**over) -> ExperimentConfig:
    return ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.weights": "none", "model.width": 4,
                                         "data.image_size": 32, **over})


def test_views_and_the_mean_logit():
    x = normalize(torch.rand(3, 1, 32, 32), PER_IMAGE)
    flipped = views(x, "hflip", PER_IMAGE)
    assert len(flipped) == 2 and torch.equal(flipped[1], torch.flip(x, dims=(-1,)))
    crops = views(x, "crop5", PER_IMAGE)
    assert len(crops) == 5 and all(c.shape == x.shape for c in crops)
    assert not torch.allclose(crops[1], crops[4])  # top-left and bottom-right differ
    assert crop_boxes(32, 32)[0] == (2, 2, 28, 28) and round(32 * CROP_SCALE) == 28  # the centre
    model = LeftMinusRight()
    assert model(x).abs().min() > 0
    assert torch.allclose(TTAModel(model, "hflip", PER_IMAGE)(x), torch.zeros(3, 1), atol=1e-6)
    assert parse_modes("hflip, crop5,hflip") == ("hflip", "crop5") and parse_modes("") == ()


def test_crop5_views_are_normalised_after_cropping_like_training_crops():
    """per_image: each view the model sees is standardised on its own pixels (mean 0, std = the
    contract's scale), i.e. the crop of the [0, 1] image normalised, as training's zoom-in
    crops are; cutting it from the already-normalised image left the corners off-centre."""
    pixels = lit_top_left()
    x = normalize(pixels, PER_IMAGE)  # what Collate hands the model
    recorder = Recorder()
    TTAModel(recorder, "crop5", PER_IMAGE)(x)
    assert len(recorder.seen) == 5
    for seen, raw in zip(recorder.seen, raw_crops(pixels)):
        mean, std = per_view_stats(seen)
        assert torch.allclose(mean, torch.zeros(3), atol=1e-5) and torch.allclose(std, torch.full((3,), 2.0), atol=1e-4)
        assert torch.allclose(seen, normalize(raw, PER_IMAGE), atol=1e-4)
    old_corner = x[..., :28, :28]  # (what the top-left view was standardised on before: the whole image)
    assert per_view_stats(old_corner)[0].abs().min() > 0.3


def test_hflip_and_none_views_are_unchanged_and_fixed_crops_commute():
    x = normalize(lit_top_left(), PER_IMAGE)
    for mode, want in (("hflip", [x, torch.flip(x, dims=(-1,))]),):
        recorder = Recorder()
        TTAModel(recorder, mode, PER_IMAGE)(x)
        assert all(torch.equal(a, b) for a, b in zip(recorder.seen, want, strict=True))
    assert views(x, "none", PER_IMAGE)[0] is x
    # fixed: normalising before or after cropping is the same (a constant affine map)
    pixels = lit_top_left()
    fixed = views(normalize(pixels, FIXED), "crop5", FIXED)
    for view, raw in zip(fixed, raw_crops(pixels), strict=True):
        assert torch.allclose(view, normalize(raw, FIXED), atol=1e-5)


def test_crop5_decisions_chosen_on_the_old_views_are_refused_for_per_image(tmp_path):
    old = {"threshold": 0.4, "temperature": 1.2, "val_precision": "fp32"}  # written before VIEWS_VERSION
    for normalization, refused in (("per_image", True), ("fixed", False)):
        cfg = small_cfg(**{"data.normalize": normalization})
        path = save_checkpoint(tmp_path / normalization, build_model(cfg.model), cfg, 0.5, {}, epoch=0)
        write_tta_decisions(str(path), {"crop5": old, "hflip": old})
        ckpt = load_checkpoint(path)
        assert ckpt.with_tta("hflip").threshold == 0.4  # hflip views have not changed
        if refused:
            with pytest.raises(CheckpointError, match=r"crop5 .*views version 1.*cxr-ray fit-tta --checkpoint .* "
                                                      r"--tta crop5"):
                ckpt.with_tta("crop5")
        else:
            assert ckpt.with_tta("crop5").tta == "crop5"  # fixed: the views are the same as before
        write_tta_decisions(str(path), {"crop5": {**old, "views_version": VIEWS_VERSION}})
        assert load_checkpoint(path).with_tta("crop5").threshold == 0.4


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
    assert "Ray at " not in r.stderr  # refused before Ray started
    assert not Path(tmp_path / "ens2").exists()
