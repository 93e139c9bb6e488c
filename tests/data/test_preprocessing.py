"""The preprocessing contract: resolved from (model, weights, data config), stored in every
checkpoint, applied from a JPEG to the model input by scoring's own stages; and checkpoints
written before contracts existed still score exactly as they did (a pinned fixture)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FIXTURES
from PIL import Image

from cxr_ray.apps.score.stages import ScoreActor, read_and_decode
from cxr_ray.checkpoint import load_checkpoint, save_checkpoint
from cxr_ray.config import ExperimentConfig, ScoreConfig
from cxr_ray.data.preprocessing import LEGACY_MEAN, LEGACY_STD, Preprocessing, resolve_preprocessing
from cxr_ray.errors import CheckpointError, ConfigError, PreprocessingError
from cxr_ray.models.registry import build_model

LEGACY = FIXTURES / "legacy_v1"
SCORE = ScoreConfig(backend="torch", amp="fp32", cpus_per_actor=1).__dict__


def score_files(checkpoint: str | Path, paths: list[Path]) -> np.ndarray:
    """Probabilities from scoring's two stages (read + decode, then the ScoreActor), without Ray."""
    contract = load_checkpoint(checkpoint).preprocessing
    batch = read_and_decode({"path": np.asarray([str(p) for p in paths], dtype=object),
                             "label": np.zeros(len(paths), np.int8)}, contract.cache_size, contract.image_size)
    out = ScoreActor(str(checkpoint), SCORE)(batch)
    assert (out["error"] == "").all(), out["error"]
    return out["prob_pneumonia"]


@pytest.mark.parametrize("mode", ["fixed", "per_image"])
def test_checkpoints_written_before_contracts_score_as_they_did(mode):
    """tests/fixtures/legacy_v1: written and scored by cxr_ray at 4d1ead3 (make_fixture.py)."""
    pinned = json.loads((LEGACY / "scores.json").read_text())[mode]
    ckpt = load_checkpoint(LEGACY / mode)
    assert "preprocessing" not in ckpt.meta
    assert ckpt.preprocessing == Preprocessing(48, 32, mode, LEGACY_MEAN, LEGACY_STD, 1.0, source="legacy")
    paths = sorted((LEGACY / "images").iterdir())
    probs = score_files(LEGACY / mode, paths)
    assert np.abs(probs - np.array([pinned[p.name] for p in paths])).max() < 1e-6


def _jpeg(path: Path) -> Path:
    """A 300x260 gray JPEG with pure black and pure white areas (so the value range is reached)."""
    yy, xx = np.mgrid[0:260, 0:300]
    img = (127 + 100 * np.sin(xx / 17.0) * np.cos(yy / 13.0)).astype(np.uint8)
    img[:60, :80], img[-60:, -80:] = 0, 255
    Image.fromarray(img).save(path, quality=95)
    return path


@pytest.mark.parametrize("name, weights, size, value_range", [
    ("resnet50", "imagenet", 224, None),  # per_image by default
    ("densenet121", "txrv:densenet121-res224-all", 224, (-1024.0, 1024.0)),
    ("resnet50", "txrv:resnet50-res512-all", 512, (-1024.0, 1024.0)),
])
def test_contract_from_jpeg_to_model_input(tmp_path, name, weights, size, value_range):
    """What the model's first convolution receives when scoring a JPEG: the weights' size,
    one channel, and their value range, without the user setting anything but the weights."""
    cfg = ExperimentConfig().replace(**{"model.name": name, "model.weights": weights, "model.unfreeze_depth": 0})
    contract = resolve_preprocessing(cfg)  # no download: only the weights' name is read
    assert (contract.image_size, contract.cache_size, contract.channels) == (size, size, 1)
    assert contract.value_range == value_range
    model = build_model(ExperimentConfig().replace(**{"model.name": name, "model.weights": "none"}).model)
    ckpt = save_checkpoint(tmp_path / "ck", model, cfg, 0.5, {}, 0)
    assert json.loads((ckpt / "checkpoint.json").read_text())["preprocessing"] == contract.to_dict()
    seen = []
    actor = ScoreActor(str(ckpt), SCORE)
    stem = actor.predictor.model.features.conv0 if name == "densenet121" else actor.predictor.model.conv1
    stem.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    batch = read_and_decode({"path": np.asarray([str(_jpeg(tmp_path / "x.jpeg"))], dtype=object),
                             "label": np.zeros(1, np.int8)}, contract.cache_size, contract.image_size)
    actor(batch)
    x = seen[0]
    assert x.shape == (1, 1, size, size) and x.dtype == torch.float32
    if value_range:
        assert (x.min().item(), x.max().item()) == pytest.approx(value_range, abs=1e-3)
    else:
        assert abs(x.mean().item()) < 1e-4 and x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_per_image_on_txrv_weights_is_scaled_to_their_range():
    cfg = ExperimentConfig().replace(**{"model.name": "densenet121", "model.weights": "txrv:densenet121-res224-all",
                                        "data.normalize": "per_image", "data.image_size": 128})
    contract = resolve_preprocessing(cfg)
    assert (contract.normalize, contract.scale, contract.image_size, contract.value_range) == ("per_image", 512.0,
                                                                                               128, None)


def test_edited_contract_is_refused_and_unknown_fields_are_errors(tmp_path):
    cfg = ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.weights": "none", "model.width": 4,
                                        "data.image_size": 32})
    path = save_checkpoint(tmp_path / "ck", build_model(cfg.model), cfg, 0.5, {}, 0)
    meta = json.loads((path / "checkpoint.json").read_text())
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    meta["preprocessing"]["std"] = 0.5
    (edited / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
        load_checkpoint(edited)
    with pytest.raises(PreprocessingError, match=r"unknown field\(s\) \['crop'\]"):
        Preprocessing.from_dict({**meta["preprocessing"], "crop": "centre"})
    with pytest.raises(PreprocessingError, match="image_size"):
        Preprocessing(32, 64, "fixed")
    with pytest.raises(ConfigError, match="data.image_size"):
        ExperimentConfig().replace(**{"data.image_size": 8})
