"""On the shared real chest X-rays (skipped where absent): counts, labels, and that it learns."""

import numpy as np
import pandas as pd
import pytest

from cxr_ray.config import ExperimentConfig
from cxr_ray.data.cache import prepare_cache
from cxr_ray.data.catalog import load_catalog
from cxr_ray.data.pipeline import TorchCollate, split_dataset
from cxr_ray.data.preprocessing import Preprocessing

pytestmark = pytest.mark.real_data


def test_counts_match_the_dataset_readme(real_root):
    df = load_catalog(str(real_root))
    counts = df.groupby(["source_split", "label"]).size().to_dict()
    assert counts == {("train", 0): 326, ("train", 1): 975, ("val", 0): 8, ("val", 1): 8}


def _cfg(real_root, tmp_path, **over):
    return ExperimentConfig().replace(**{"data.root": str(real_root), "data.cache_dir": str(tmp_path / "c"),
                                         "data.image_size": 128, **over})


@pytest.mark.slow
def test_pipeline_yields_correctly_labelled_tensors(ray_local, real_root, tmp_path):
    cache = prepare_cache(_cfg(real_root, tmp_path))
    assert cache.meta["n_bad"] == 0 and cache.meta["split_leaks"] == []
    assert cache.meta["cross_split_duplicates"] == []
    ds = split_dataset(cache, "val", 128, with_paths=True)
    n = 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        x, y = TorchCollate(Preprocessing(64, 64, "per_image"), "cpu")(batch)
        assert x.shape[1:] == (1, 128, 128)
        expected = [1.0 if "/PNEUMONIA/" in p else 0.0 for p in batch["path"]]
        assert y.tolist() == expected
        n += len(y)
    assert n == sum(cache.split_counts("val")) > 100  # carved, patient-grouped validation split


@pytest.mark.slow
def test_scratch_cnn_learns_real_pneumonia_and_scoring_matches_evaluate(ray_local, real_root, tmp_path):
    from cxr_ray.apps.evaluate import evaluate_checkpoint
    from cxr_ray.apps.score.job import run_score
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.config import ScoreConfig
    from cxr_ray.training.train import run_training

    cfg = _cfg(real_root, tmp_path, **{
        "model.name": "simple_cnn", "model.width": 16, "train.epochs": 3, "train.lr": 0.003,
        "train.num_workers": 1, "train.batch_size": 32, "train.storage_path": str(tmp_path / "runs"),
        "augment.rotation_deg": 5.0})
    result = run_training(cfg, prepare_cache(cfg))
    assert result.error is None
    best_ckpt, best = max(result.best_checkpoints, key=lambda cm: cm[1]["roc_auc"])
    assert best["roc_auc"] >= 0.90, result.best_checkpoints

    # The batch predictor on the same real images gives evaluate's metrics.
    ev = evaluate_checkpoint(load_checkpoint(best_ckpt.path), str(real_root), "val", str(tmp_path / "eval"),
                             cache_dir=str(tmp_path / "c"))
    preds = pd.read_parquet(tmp_path / "eval" / "predictions.parquet")
    manifest = tmp_path / "val.csv"
    preds[["path", "label"]].to_csv(manifest, index=False)  # the carved, patient-grouped val split
    summary = run_score(best_ckpt.path, [str(manifest)], str(tmp_path / "scores"),
                        ScoreConfig(cpus_per_actor=1.0, decode_cpus=0.5), with_labels=True)
    assert summary.failed == 0 and summary.scored == len(preds)
    # the stored threshold is one validation image's own float32 score, so that image sits exactly on
    # it; the scoring actors' bf16 batches may move it by a rounding step: at most one image flips,
    # which moves recall or specificity by one image of its class
    n_pos = int(preds["label"].sum())
    one = {"accuracy": 1.0 / len(preds), "recall": 1.0 / n_pos, "specificity": 1.0 / (len(preds) - n_pos),
           "precision": 0.02}
    for key in ("roc_auc", "threshold"):
        assert summary.metrics[key] == pytest.approx(ev[key], abs=1e-6), key
    for key, tol in one.items():
        assert summary.metrics[key] == pytest.approx(ev[key], abs=tol + 1e-9), key
    assert np.abs(np.array(summary.metrics["confusion_matrix"]) - np.array(ev["confusion_matrix"])).sum() <= 2
    # Both reports compare these images with the checkpoint's validation pass, which saw the same
    # images: acquisition statistics measured by training, evaluate (cache) and score (the files
    # decoded again by the scoring preprocessing) agree, so nothing drifts.
    from cxr_ray.analysis.drift import ACQUISITION_STATS

    for drift in (ev["drift"], summary.drift):
        assert set(drift["acquisition"]) == set(ACQUISITION_STATS) and not drift["warn"], drift
        assert not any(a["drift"] for a in drift["acquisition"].values()), drift["acquisition"]
        shifts = [a["median_shift_iqr"] for a in drift["acquisition"].values()]
        assert all(x is None or abs(x) < 1e-6 for x in shifts), drift["acquisition"]  # the same medians

    # Training chose the threshold in its own precision (bf16 where this CPU runs it fast), and
    # bf16 and fp32 probabilities agree on the real images: all 1,317 where bf16 is fast (the
    # threshold sits on one validation image's own score, so the 134 validation images alone
    # allow no flip at all); where bf16 is emulated (~4x slower than fp32 here, and never chosen
    # by train.amp=auto), the validation images, with at most that one image flipping.
    from cxr_ray.engine.loop import probabilities
    from cxr_ray.engine.precision import cpu_runs_bf16_fast
    from cxr_ray.inference.predictor import predict_split

    ckpt = load_checkpoint(best_ckpt.path)
    fast = cpu_runs_bf16_fast()
    assert ckpt.val_precision == ("bf16" if fast else "fp32") == ev["amp"]
    cache = prepare_cache(cfg)
    splits = ("train", "val") if fast else ("val",)
    z32, z16 = (np.concatenate([predict_split(ckpt, cache, split, precision=p)["logit"].to_numpy()
                                for split in splits]) for p in ("fp32", "bf16"))
    # the network's own probabilities (T = 1, b = 0) agree within 0.02; the calibrated ones within
    # 0.02 / T (dividing by T scales every logit difference), and decisions stay >= 99.5% the same
    t, b = ckpt.temperature, ckpt.logit_bias
    (p32, p16) = (probabilities(z32), probabilities(z16))
    (c32, c16) = (probabilities(z32, t, b), probabilities(z16, t, b))
    print(f"bf16 vs fp32 on {len(p32)} real images: max |dp| {np.abs(p16 - p32).max():.4f} raw, "
          f"{np.abs(c16 - c32).max():.4f} calibrated (T = {t:.3f}, b = {b:+.3f})")
    assert len(p32) == (1317 if fast else len(preds)) and np.abs(p16 - p32).max() <= 0.02
    assert np.abs(c16 - c32).max() <= 0.02 / min(t, 1.0) + 1e-6
    flips = int(((c16 >= ckpt.threshold) != (c32 >= ckpt.threshold)).sum())
    assert flips / len(c32) <= 0.005 if fast else flips <= 1, flips

    # The ONNX Runtime backend scores the validation images with the fp32 model's probabilities.
    onnx = run_score(best_ckpt.path, [str(manifest)], str(tmp_path / "scores_onnx"),
                     ScoreConfig(cpus_per_actor=1.0, decode_cpus=0.5, backend="onnxruntime"), with_labels=True)
    assert onnx.failed == 0 and onnx.scored == len(preds)
    by_path = pd.read_parquet(tmp_path / "scores_onnx").set_index("path")["prob_pneumonia"]
    fp32_val = predict_split(ckpt, cache, "val", precision="fp32").set_index("path")["probability"]
    assert np.abs(by_path.loc[fp32_val.index].to_numpy() - fp32_val.to_numpy()).max() <= 1e-5


def test_every_patient_of_the_real_data_stays_in_one_split(real_root):
    from cxr_ray.config import DataConfig
    from cxr_ray.data.catalog import assign_splits, check_patient_leaks

    df = load_catalog(str(real_root))
    # IM-XXXX-YYYY-ZZZZ names belong to patient IM-XXXX, like IM-XXXX-YYYY
    multi = df[df["path"].str.contains(r"/(?:NORMAL2-)?IM-\d+-\d+-\d+\.jpeg$")]
    assert len(multi) >= 30 and multi["patient"].str.fullmatch(r"(NORMAL2-)?IM-\d+").all()
    assert df["patient"].str.fullmatch(r"person\d+|(NORMAL2-)?IM-\d+").all()  # no name fell back to its stem
    for seed in (0, 1, 2):
        split = assign_splits(df, DataConfig(seed=seed))
        assert (split.groupby("patient")["split"].nunique() == 1).all()
        assert check_patient_leaks(split)[0] == "patients shared between train and val: 0"
