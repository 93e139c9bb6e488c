import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from cxr_ray.checkpoint import fetch_checkpoint, load_checkpoint, save_checkpoint
from cxr_ray.config import ExperimentConfig, TrainConfig
from cxr_ray.data.preprocessing import resolve_preprocessing
from cxr_ray.engine.loop import (
    EarlyStopping,
    make_optimizer,
    make_scheduler,
    pos_weight_from_counts,
    predict,
    train_one_epoch,
)
from cxr_ray.errors import CheckpointError
from cxr_ray.models.registry import build_model


def _cfg():
    return ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.width": 8,
                                         "data.image_size": 32})


def test_checkpoint_round_trip(tmp_path):
    cfg = _cfg()
    model = build_model(cfg.model).eval()
    save_checkpoint(tmp_path / "ck", model, cfg, 0.37, {"roc_auc": 0.9}, epoch=4)
    loaded = load_checkpoint(tmp_path / "ck")
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), loaded.model(x))
    assert loaded.cfg == cfg and loaded.threshold == pytest.approx(0.37)
    assert loaded.meta["class_map"] == {"0": "NORMAL", "1": "PNEUMONIA"}
    assert set(loaded.meta["versions"]) == {"torch", "torchvision", "ray", "cxr_ray"}
    assert loaded.meta["epoch"] == 4


def test_checkpoint_saved_before_data_normalize_existed_keeps_fixed_normalisation(tmp_path):
    import yaml

    cfg = _cfg()
    assert resolve_preprocessing(cfg).normalize == "per_image"  # today's default for new runs
    model = build_model(cfg.model).eval()
    save_checkpoint(tmp_path / "old", model, cfg.replace(**{"data.normalize": "fixed"}), 0.5, {}, epoch=0)
    saved = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    del saved["data"]["normalize"]  # as written by cxr_ray before the key existed
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    meta = json.loads((tmp_path / "old" / "checkpoint.json").read_text())
    for key in ("digest", "base_digest", "format_version", "files", "preprocessing"):
        del meta[key]  # nor did digests, the format version and contracts exist then
    (tmp_path / "old" / "checkpoint.json").write_text(json.dumps(meta))
    old = load_checkpoint(tmp_path / "old")
    assert old.cfg.data.normalize == old.preprocessing.normalize == "fixed"


def test_checkpoint_loads_from_a_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path / "cache"))
    cfg = _cfg()
    model = build_model(cfg.model).eval()
    save_checkpoint(tmp_path / "runs" / "exp" / "best", model, cfg, 0.4, {}, epoch=2)
    uri = f"file://{tmp_path}/runs/exp/best"  # a pyarrow URI, as s3:// or gs:// would be
    loaded = load_checkpoint(uri)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), loaded.model(x)) and loaded.path == uri
    model_id = load_checkpoint(tmp_path / "runs" / "exp" / "best").model_id
    assert loaded.model_id == model_id and model_id.startswith("exp/best@epoch2#")
    assert model_id.endswith("#" + loaded.digest[len("sha256:"):][:12])
    with pytest.raises(CheckpointError, match="no such folder"):
        load_checkpoint(f"file://{tmp_path}/runs/exp/missing")


def test_reexported_checkpoint_is_a_new_model_and_edits_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path / "cache"))
    cfg = ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.width": 8, "data.image_size": 32})
    best = tmp_path / "runs" / "exp" / "best"
    torch.manual_seed(0)
    save_checkpoint(best, build_model(cfg.model).eval(), cfg, 0.4, {}, epoch=2)
    first = load_checkpoint(f"file://{best}")
    torch.manual_seed(1)  # the search re-exports best/ at the same URI with other weights
    new_model = build_model(cfg.model).eval()
    save_checkpoint(best, new_model, cfg, 0.4, {}, epoch=2)
    second = load_checkpoint(f"file://{best}")  # fetched again: the cached copy is keyed on content
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(second.model(x), new_model(x)) and second.model_id != first.model_id
    meta = json.loads((best / "checkpoint.json").read_text())
    meta["threshold"] = 0.1  # edited in place: no longer the model that was validated
    (best / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
        load_checkpoint(best)
    del meta["digest"]  # a checkpoint of today's format without its digest: refused
    (best / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 2 has no digest"):
        load_checkpoint(best)
    for key in ("base_digest", "format_version", "files"):  # one from before digests: computed
        del meta[key]
    (best / "checkpoint.json").write_text(json.dumps(meta))
    assert load_checkpoint(best).digest.startswith("sha256:")


@pytest.mark.parametrize("field, value", [
    ("class_map", {"0": "PNEUMONIA", "1": "NORMAL"}), ("positive_class", "NORMAL"), ("val_precision", "bf16"),
    ("tta", {"hflip": {"threshold": 0.5, "temperature": 1.0, "logit_bias": 0.0, "threshold_rule": "edited"}}),
    ("temperature", 9.0), ("metrics", {"recall": 1.0}),
])
def test_digest_covers_every_field_that_changes_a_decision(tmp_path, field, value):
    cfg = _cfg()
    save_checkpoint(tmp_path / "ck", build_model(cfg.model).eval(), cfg, 0.5, {"recall": 0.9}, epoch=1)
    meta = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert meta["format_version"] == 2 and set(meta["files"]) == {"model.pt", "config.yaml"}
    meta[field] = value
    (tmp_path / "ck" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("digest", ["sha256:../../x", "sha256:/tmp/x", "sha256:" + "A" * 64, 42, None])
def test_a_remote_digest_that_is_not_a_hash_never_names_a_folder(tmp_path, monkeypatch, digest):
    """A URI checkpoint's digest names its cache folder: ``sha256:../../x`` would place the
    fetched files outside the cache; only ``sha256:`` + 64 hex digits is accepted."""
    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path / "cache"))
    cfg = _cfg()
    save_checkpoint(tmp_path / "ck", build_model(cfg.model).eval(), cfg, 0.5, {}, epoch=1)
    meta = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    meta["digest"] = digest
    (tmp_path / "ck" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="is not 'sha256:' \\+ 64 hex digits"):
        load_checkpoint(f"file://{tmp_path}/ck")
    assert not (tmp_path / "x").exists() and not list((tmp_path / "cache" / "checkpoints").glob("*/model.pt"))


def test_a_foreign_folder_under_a_cached_digest_is_fetched_again(tmp_path, monkeypatch):
    """The fetch cache is keyed by the full digest; a folder there that holds another
    checkpoint (planted, or left by a crash) is replaced, not trusted by its name."""
    import shutil

    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path / "cache"))
    cfg = _cfg()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a", build_model(cfg.model).eval(), cfg, 0.5, {}, epoch=1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "b", build_model(cfg.model).eval(), cfg, 0.5, {}, epoch=1)
    first = fetch_checkpoint(f"file://{tmp_path}/a")
    assert len(first.name) == 64
    shutil.rmtree(first)
    shutil.copytree(tmp_path / "b", first)  # another model under a's digest
    again = load_checkpoint(f"file://{tmp_path}/a")
    assert again.digest == load_checkpoint(tmp_path / "a").digest != load_checkpoint(tmp_path / "b").digest


def test_a_uri_checkpoint_from_before_digests_loads_again_and_again(tmp_path, monkeypatch):
    """No digest to key the cache on before fetching: each load fetches, computes it, and finds
    the copy already placed by the one before."""
    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path / "cache"))
    cfg = _cfg()
    save_checkpoint(tmp_path / "old", build_model(cfg.model).eval(), cfg, 0.5, {}, epoch=1)
    meta = json.loads((tmp_path / "old" / "checkpoint.json").read_text())
    for key in ("digest", "base_digest", "format_version", "files"):
        del meta[key]
    (tmp_path / "old" / "checkpoint.json").write_text(json.dumps(meta))
    first = load_checkpoint(f"file://{tmp_path}/old")
    assert load_checkpoint(f"file://{tmp_path}/old").digest == first.digest == load_checkpoint(tmp_path / "old").digest


def test_actors_fetching_one_uri_checkpoint_at_once_do_not_collide(tmp_path, monkeypatch):
    """Several processes on one node fetch the same checkpoint into the cache at the same time."""
    import multiprocessing as mp

    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path / "cache"))
    cfg = _cfg()
    save_checkpoint(tmp_path / "ck", build_model(cfg.model).eval(), cfg, 0.5, {}, epoch=1)
    uri = f"file://{tmp_path}/ck"
    with mp.get_context("fork").Pool(4) as pool:
        folders = pool.map(fetch_checkpoint, [uri] * 8)
    assert len(set(folders)) == 1 and load_checkpoint(uri).digest.startswith("sha256:")
    assert not list((tmp_path / "cache" / "checkpoints").glob("fetch.tmp*"))


def test_checkpoint_of_frozen_resnet_round_trips(tmp_path):
    cfg = ExperimentConfig().replace(**{"model.weights": "none", "model.unfreeze_depth": 2})
    model = build_model(cfg.model).eval()
    save_checkpoint(tmp_path / "ck", model, cfg, 0.5, {}, epoch=0)
    x = torch.randn(1, 1, 64, 64)
    assert torch.allclose(model(x), load_checkpoint(tmp_path / "ck").model(x))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_weights_are_refused(tmp_path):
    """A model.pt swapped for a pickle that runs code: refused by its hash, and, re-sealed by
    an attacker who also rewrote checkpoint.json, by the weights_only loader; nothing runs."""
    from cxr_ray.checkpoint import write_meta

    cfg, marker = _cfg(), tmp_path / "marker"
    save_checkpoint(tmp_path / "ck", build_model(cfg.model), cfg, 0.5, {}, epoch=0)
    with open(tmp_path / "ck" / "model.pt", "wb") as f:
        pickle.dump({"conv.weight": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
        load_checkpoint(tmp_path / "ck")
    write_meta(tmp_path / "ck", json.loads((tmp_path / "ck" / "checkpoint.json").read_text()))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "ck")
    assert not marker.exists()


def test_missing_files_named(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_checkpoint(tmp_path / "ck")
    cfg = ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.width": 4, "data.image_size": 32})
    save_checkpoint(tmp_path / "ck", build_model(cfg.model), cfg, 0.5, {}, epoch=0)
    (tmp_path / "ck" / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="model.pt is missing"):
        load_checkpoint(tmp_path / "ck")


def test_engine_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    x = torch.randn(256, 1, 16, 16)
    y = (x[:, 0, :8].mean(dim=(1, 2)) > x[:, 0, 8:].mean(dim=(1, 2))).float()
    model = build_model(_cfg().model.__class__(name="simple_cnn", width=8, dropout=0.0))
    opt = make_optimizer(model, TrainConfig(lr=3e-3))
    sched = make_scheduler(opt, 4, 80)
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    loss_fn = nn.BCEWithLogitsLoss()
    first = train_one_epoch(model, batches, opt, sched, loss_fn, torch.device("cpu"))
    for _ in range(9):
        last = train_one_epoch(model, batches, opt, sched, loss_fn, torch.device("cpu"))
    assert last.loss < first.loss * 0.7 and last.images == 256
    probs, labels, val_loss = predict(model, batches, torch.device("cpu"), loss_fn=loss_fn)
    assert probs.shape == (256,) and np.array_equal(labels, y.numpy()) and val_loss < first.loss


def test_scheduler_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_early_stopping_patience_and_state():
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert es.update(0.5, 0) and not es.update(0.505, 1) and not es.should_stop
    assert not es.update(0.4, 2) and es.should_stop and es.best_epoch == 0
    clone = EarlyStopping(patience=2)
    clone.load_state_dict(es.state_dict())
    assert clone.should_stop and clone.best == 0.5


def test_pos_weight():
    assert pos_weight_from_counts(300, 900) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="both classes"):
        pos_weight_from_counts(0, 10)


def test_precision_policy(monkeypatch):
    """auto = bf16 where the device runs it fast; a checkpoint's fp32 threshold stays fp32."""
    from cxr_ray.engine import precision as engine

    cpu = torch.device("cpu")
    for fast in (True, False):
        monkeypatch.setattr(engine, "cpu_runs_bf16_fast", lambda fast=fast: fast)
        want = "bf16" if fast else "fp32"
        assert engine.resolve_precision("auto", cpu) == want  # training
        assert engine.resolve_precision("auto", cpu, stored="bf16") == want  # bf16 threshold, if fast
        assert engine.resolve_precision("auto", cpu, stored="fp32") == "fp32"
        assert engine.resolve_precision("bf16", cpu, stored="fp32") == "bf16"  # forced
    with pytest.raises(ValueError, match="expected one of"):
        engine.resolve_precision("fp16", cpu)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    monkeypatch.undo()
    engine.cpu_runs_bf16_fast.cache_clear()
    assert engine.cpu_runs_bf16_fast() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_bf16_on_cpu_runs_and_keeps_probabilities_fp32():
    torch.manual_seed(0)
    model = build_model(ExperimentConfig().replace(**{"model.name": "simple_cnn", "model.weights": "none",
                                                      "model.width": 8}).model)
    x, y = torch.randn(6, 1, 32, 32), torch.zeros(6)
    p32, _, _ = predict(model, [(x, y)], torch.device("cpu"), "fp32")
    p16, _, _ = predict(model, [(x, y)], torch.device("cpu"), "bf16")
    assert p16.dtype == np.float32 and np.abs(p16 - p32).max() < 0.02


def test_old_true_false_amp_settings_still_load():
    from cxr_ray.config import load_config

    assert load_config(None, ["score.amp=true"]).score.amp == "bf16"
    assert ExperimentConfig.from_saved({"score": {"amp": False}}).score.amp == "fp32"
