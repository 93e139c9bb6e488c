"""Batch scoring on a real local Ray: exactly-once with bad files, schema, resume after a kill,
and no preprocessing drift against ``evaluate``."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import run_cli, start_cli
from PIL import Image

from cxr_ray.apps.score.job import run_score
from cxr_ray.apps.score.output import OUTPUT_SCHEMA, output_schema
from cxr_ray.checkpoint import load_checkpoint, save_checkpoint, write_meta
from cxr_ray.config import DataConfig, ScoreConfig
from cxr_ray.data.listing import list_inputs
from cxr_ray.data.synthetic import chest_image, make_synthetic_dataset, write_dicom
from cxr_ray.errors import ScoreError

SCORE = ScoreConfig(batch_size=8, decode_batch_size=4, cpus_per_actor=1.0, decode_cpus=0.5,
                    rows_per_file=7)


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Good files of every supported kind and bad files of every kind; returns (root, {bad name: reason})."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    for cls in ("NORMAL", "PNEUMONIA"):
        d = root / cls / "nested"
        d.mkdir(parents=True)
        pneu = cls == "PNEUMONIA"
        for i in range(4):
            _save(Image.fromarray(chest_image(120, pneu, rng)), d / f"gray{i}.jpeg", "JPEG", quality=90)
        _save(Image.fromarray(chest_image(150, pneu, rng)).convert("RGB"), d / "rgb.jpg", "JPEG")
        _save(Image.fromarray(chest_image(100, pneu, rng)), d / "eight.png", "PNG")
        _save(Image.fromarray(chest_image(100, pneu, rng).astype(np.uint16) * 257), d / "sixteen.png", "PNG")
        write_dicom(d / "mono2.dcm", chest_image(128, pneu, rng).astype(np.uint16) * 16)
        write_dicom(d / "mono1_windowed.dcm", 4095 - chest_image(128, pneu, rng).astype(np.uint16) * 16,
                    photometric="MONOCHROME1", window=(2048, 3000))
        write_dicom(d / "PACS_EXPORT_0001", chest_image(96, pneu, rng).astype(np.uint16) * 16)  # no extension
    bad = root / "NORMAL"
    (bad / "empty.jpeg").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(chest_image(200, False, rng)).save(good, format="JPEG")
    (bad / "truncated.jpeg").write_bytes(good.getvalue()[:600])
    (bad / "notes.txt").write_text("not an image")
    (bad / "fake.png").write_text("<html>an error page saved as .png</html>")
    _save(Image.new("LAB", (64, 64)), bad / "lab.tiff", "TIFF")
    (bad / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    (bad / ".DS_Store").write_bytes(b"hidden files are not inputs")
    reasons = {"empty.jpeg": "empty file", "truncated.jpeg": "cannot decode", "notes.txt": "not a recognised",
               "fake.png": "not a recognised", "lab.tiff": "unsupported image mode", "broken.dcm": "DICOM",
               "vanished.jpeg": "cannot read file"}
    return root, reasons


def _manifest_with_missing(root: Path, tmp_path: Path) -> Path:
    """A manifest naming one file that does not exist (deleted after listing, unmounted ...)."""
    manifest = tmp_path / "extra.csv"
    pd.DataFrame({"path": [str(root / "NORMAL" / "vanished.jpeg")], "label": ["NORMAL"]}).to_csv(manifest)
    return manifest


@pytest.mark.slow
def test_every_file_exactly_once_with_errors_named(ray_local, checkpoint, mixed_folder, tmp_path):
    root, reasons = mixed_folder
    inputs = [str(root), str(root / "PNEUMONIA" / "nested" / "*.jpeg"),  # overlaps the folder
              str(_manifest_with_missing(root, tmp_path))]
    listing = list_inputs(inputs)
    out = tmp_path / "out"
    summary = run_score(checkpoint, inputs, str(out), SCORE, with_labels=True)
    df = pd.read_parquet(out)
    assert len(df) == len(listing) == df["path"].nunique() == 2 * 10 + len(reasons)
    assert set(df["path"]) == set(listing["path"])
    assert not any(p.endswith(".DS_Store") for p in df["path"])
    failed = df[df["error"].notna()].set_index(df["path"][df["error"].notna()].map(lambda p: Path(p).name))
    assert set(failed.index) == set(reasons)
    for name, reason in reasons.items():
        assert reason in failed.at[name, "error"], (name, failed.at[name, "error"])
    assert failed["prob_pneumonia"].isna().all() and failed["prediction"].isna().all()
    scored = df[df["error"].isna()]
    assert len(scored) == 20 and scored["prob_pneumonia"].between(0, 1).all()
    assert (scored["prediction"] == np.where(scored["prob_pneumonia"] >= 0.5, "PNEUMONIA", "NORMAL")).all()
    assert scored["prob_pneumonia"].std() > 1e-3  # real, image-dependent scores
    assert set(scored["width"]) == {120, 150, 100, 128, 96}
    assert (scored["label"] == np.where(scored["path"].str.contains("/PNEUMONIA/"), "PNEUMONIA", "NORMAL")).all()
    assert (summary.scored, summary.failed, summary.files_seen) == (20, len(reasons), len(listing))
    assert summary.metrics is not None and summary.metrics["n"] == 20
    assert len(list(out.glob("part-*.parquet"))) == -(-len(df) // SCORE.rows_per_file)
    assert not (out / "_tmp").exists()


@pytest.mark.slow
def test_output_schema_readable_without_cxr_ray(ray_local, checkpoint, mixed_folder, tmp_path):
    root, _ = mixed_folder
    out = tmp_path / "out"
    run_score(checkpoint, [str(root)], str(out), SCORE)
    table = pq.read_table(out)  # pyarrow reads the folder as one dataset; _-files are ignored
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    assert table.schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    df = pd.read_parquet(out)
    assert str(df["prob_pneumonia"].dtype) == "float32" and str(df["threshold"].dtype) == "float32"
    assert df["model"].nunique() == 1 and re.search(r"@epoch0#[0-9a-f]{12}$", df["model"].iat[0])
    duckdb = pytest.importorskip("duckdb")
    (n, n_err), = duckdb.sql(f"SELECT count(*), count(error) FROM read_parquet('{out}/*.parquet')").fetchall()
    assert (n, n_err) == (len(df), df["error"].notna().sum())
    assert output_schema(True).names[-1] == "label"


@pytest.mark.slow
def test_refuses_to_mix_runs_and_models(ray_local, checkpoint, mixed_folder, tmp_path):
    root, _ = mixed_folder
    inputs = [str(root / "PNEUMONIA")]
    listing = list_inputs(inputs)
    out = str(tmp_path / "out")
    run_score(checkpoint, inputs, out, SCORE)
    with pytest.raises(ScoreError, match="already holds .* pass --resume"):
        run_score(checkpoint, inputs, out, SCORE)
    with pytest.raises(ScoreError, match="with --with-labels|without --with-labels"):
        run_score(checkpoint, inputs, out, SCORE, resume=True, with_labels=True)
    summary = run_score(checkpoint, inputs, out, SCORE, resume=True)  # nothing left to do
    assert (summary.already_done, summary.scored, summary.total_rows) == (len(listing), 0, len(listing))
    # A checkpoint re-exported at the same path is another model: resuming with it is refused.
    best = tmp_path / "best"
    shutil.copytree(checkpoint, best)
    run_score(str(best), inputs, str(tmp_path / "out2"), SCORE)
    old = load_checkpoint(best)
    with torch.no_grad():
        old.model.head[-1].bias.add_(1.0)
    save_checkpoint(best, old.model, old.cfg, old.threshold, {}, 0)
    with pytest.raises(ScoreError, match=r"was scored by model '.*best@epoch0#[0-9a-f]{12}'"):
        run_score(str(best), inputs, str(tmp_path / "out2"), SCORE, resume=True)


@pytest.mark.slow
def test_scores_equal_evaluate_no_preprocessing_drift(ray_local, checkpoint, tmp_path):
    from cxr_ray.apps.evaluate import evaluate_checkpoint

    root = make_synthetic_dataset(tmp_path / "syn", n=120, size=110, seed=3)
    evaluate_checkpoint(load_checkpoint(checkpoint), str(root), "test", str(tmp_path / "eval"),
                        cache_dir=str(tmp_path / "cache"))
    ev = pd.read_parquet(tmp_path / "eval" / "predictions.parquet").set_index("path")
    run_score(checkpoint, [str(root / "test")], str(tmp_path / "scores"), SCORE)
    sc = pd.read_parquet(tmp_path / "scores").set_index("path")
    assert set(sc.index) == set(ev.index) and len(ev) >= 15
    diff = np.abs(sc.loc[ev.index, "prob_pneumonia"].to_numpy() - ev["probability"].to_numpy())
    assert diff.max() <= 1e-5, diff.max()
    assert (sc.loc[ev.index, "prediction"] == ev["prediction"]).all()


@pytest.mark.slow
def test_a_labelled_sample_without_train_split_evaluates(ray_local, checkpoint, tmp_path):
    """A hospital's sample is class folders only (SITE/{NORMAL,PNEUMONIA}): evaluate needs no
    training images; there is no validation split, so no operating-point table."""
    from cxr_ray.apps.evaluate import evaluate_checkpoint

    root = make_synthetic_dataset(tmp_path / "syn", n=120, size=110, seed=3)
    ckpt = load_checkpoint(checkpoint)
    whole = evaluate_checkpoint(ckpt, str(root), "test", str(tmp_path / "eval"), cache_dir=str(tmp_path / "cache"))
    site = evaluate_checkpoint(ckpt, str(root / "test"), "test", str(tmp_path / "site"),
                               cache_dir=str(tmp_path / "cache"), cue_strata=True)
    assert site["n"] == whole["n"] >= 15 and site["roc_auc"] == pytest.approx(whole["roc_auc"])
    assert site["operating_points"] is None
    saved = json.loads((tmp_path / "site" / "metrics.json").read_text())
    assert saved["data"] == str(root / "test")
    # --cue-strata needs 5 patients per class for its patient folds: 3 NORMAL patients are refused, by name
    assert "NORMAL=3" in saved["cue_strata"]["error"] and "patients per class" in saved["cue_strata"]["error"]
    # on the training split (11 NORMAL, 31 PNEUMONIA patients): the audit's cues of each image,
    # matched to its prediction by path (shuffled below: a positional join would pair the wrong rows)
    from cxr_ray.apps.evaluate import cue_strata_report

    train = evaluate_checkpoint(ckpt, str(root), "train", str(tmp_path / "train"), cache_dir=str(tmp_path / "cache"),
                                cue_strata=True)
    strata = train["cue_strata"]
    assert strata["n"] == train["n"] and strata["model_auc"] == pytest.approx(train["roc_auc"], abs=1e-6), strata
    preds = pd.read_parquet(tmp_path / "train" / "predictions.parquet").sample(frac=1.0, random_state=0)
    again = cue_strata_report(preds.reset_index(drop=True))
    assert again["model_auc"] == pytest.approx(strata["model_auc"]) and again["strata"] == strata["strata"]


class _Output:
    """The part of ``OutputFolder`` that ``sampled_acquisition`` reads: committed record batches."""

    def __init__(self, rows: list[tuple[str, str | None]]):
        self.table = pa.table({"path": [r[0] for r in rows], "error": pa.array([r[1] for r in rows], pa.string())})

    def batches(self, columns):
        yield from self.table.select(columns).to_batches(max_chunksize=7)


def test_drift_samples_only_scored_files_and_measures_them_as_scoring_does(checkpoint, tmp_path):
    """``score``'s acquisition statistics: a seeded sample of the rows that scored (never an
    error row), decoded again by the scoring preprocessing, capped at MAX_STAT_IMAGES."""
    from cxr_ray.analysis import drift
    from cxr_ray.apps.score.job import sampled_acquisition
    from cxr_ray.data.decode import decode_image
    from cxr_ray.data.images import to_model_size

    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        path = tmp_path / f"f{i}.png"
        Image.fromarray(chest_image(96, i % 2 == 0, rng)).save(path)
        rows.append((str(path), None))
    rows += [(str(tmp_path / "gone.png"), "cannot read: missing"), (str(tmp_path / "f0.png"), "refused: too big")]
    ckpt = load_checkpoint(checkpoint)
    got = sampled_acquisition(ckpt, _Output(rows), DataConfig())
    c = ckpt.preprocessing
    images = [to_model_size(decode_image(Path(p).read_bytes(), c.cache_size, p)[0][None], c.image_size)
              for p, _ in rows[:30]]
    expected = drift.acquisition_stats(np.concatenate(images))
    for k in drift.ACQUISITION_STATS:  # all 30 scored files, none of the error rows, in the file order
        np.testing.assert_allclose(np.sort(got[k]), np.sort(expected[k]), rtol=1e-6, err_msg=k)
    old = drift.MAX_STAT_IMAGES
    try:
        drift.MAX_STAT_IMAGES = 12
        capped = sampled_acquisition(ckpt, _Output(rows), DataConfig())
    finally:
        drift.MAX_STAT_IMAGES = old
    assert all(len(v) == 12 for v in capped.values())
    assert sampled_acquisition(ckpt, _Output(rows[30:]), DataConfig()) is None


@pytest.mark.slow
def test_resume_after_kill_loses_nothing_duplicates_nothing(checkpoint, tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", n=900, size=64, seed=5)
    (root / "train" / "NORMAL" / "zero.jpeg").write_bytes(b"")
    out = tmp_path / "out"
    args = ["score", "--checkpoint", checkpoint, "--input", str(root), "--output", str(out),
            "--set", "score.rows_per_file=40", "--set", "score.batch_size=4",
            "--set", "score.decode_batch_size=4", "--set", "score.decode_cpus=0.5"]
    proc = start_cli(*args)
    try:
        deadline = time.time() + 240
        while len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be interrupted: " + proc.stderr.read()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a crash or an OOM kill would
        proc.wait()
    first = pd.read_parquet(out)  # only whole committed parts are visible
    n_files = len(list_inputs([str(root)]))
    assert 0 < len(first) < n_files and first["path"].is_unique
    again = run_cli(*args, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr  # no silent second copy
    resumed = run_cli(*args, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = pd.read_parquet(out)
    assert len(final) == n_files and final["path"].is_unique
    assert set(final["path"]) == set(list_inputs([str(root)])["path"])
    kept = final.set_index("path").loc[first["path"], "scored_at"]
    assert (kept.to_numpy() == first["scored_at"].to_numpy()).all()  # committed rows untouched
    assert final.loc[final["path"].str.endswith("zero.jpeg"), "error"].iat[0].startswith("empty file")
    assert f"already in the output: {len(first)}" in resumed.stdout
    assert resumed.stdout.strip().splitlines()[-1] == str(out)


@pytest.mark.slow
def test_uri_inputs_and_output(ray_local, checkpoint, mixed_folder, tmp_path):
    """``file://`` goes through the same pyarrow-filesystem paths as ``s3://`` and ``gs://``."""
    root, _ = mixed_folder
    inputs = [f"file://{root}/PNEUMONIA", f"file://{root}/NORMAL/nested/*.jpeg"]
    listing = list_inputs(inputs)
    assert listing["path"].str.startswith("file:///").all() and len(listing) == 14
    out = f"file://{tmp_path}/uri_out"
    summary = run_score(f"file://{checkpoint}", inputs, out, SCORE, with_labels=True)
    df = pd.read_parquet(tmp_path / "uri_out")
    assert set(df["path"]) == set(listing["path"]) and df["error"].isna().all()
    assert summary.scored == 14 and summary.metrics is not None
    assert (tmp_path / "uri_out" / "_metrics.json").is_file() and not (tmp_path / "uri_out" / "_tmp").exists()


@pytest.mark.slow
def test_defaults_split_the_cluster_by_measured_cost_and_keep_the_checkpoint_precision(ray_local, checkpoint,
                                                                                       mixed_folder, tmp_path,
                                                                                       monkeypatch):
    """Nothing set: the job measures a file's read+decode and the model on one core and splits the
    2-CPU cluster by them (``split_cpus``); the model runs in the precision its threshold was
    chosen in, where the CPU runs it fast; a value the user sets is kept."""
    from cxr_ray.apps.score.job import resolve_score, split_cpus
    from cxr_ray.engine import precision as engine

    paths = sorted(str(p) for p in (mixed_folder[0] / "NORMAL" / "nested").glob("gray*.jpeg"))
    fp32 = load_checkpoint(checkpoint)  # saved with val_precision fp32
    bf16_dir = tmp_path / "bf16"
    shutil.copytree(checkpoint, bf16_dir)
    meta = json.loads((bf16_dir / "checkpoint.json").read_text())
    write_meta(bf16_dir, {**meta, "val_precision": "bf16"})  # val_precision is in the digest: sealed anew
    bf16 = load_checkpoint(bf16_dir)
    for fast in (True, False):
        monkeypatch.setattr(engine, "cpu_runs_bf16_fast", lambda fast=fast: fast)
        auto, split = resolve_score(ScoreConfig(), bf16, paths)
        assert auto.amp == ("bf16" if fast else "fp32") and auto.decode == "cpu"
        assert split.decode_ms > 0 and split.model_ms > 0 and split.cpus == 2
        assert (auto.cpus_per_actor, auto.decode_cpus) == split_cpus(2, 2, 1, split.decode_ms, split.model_ms)
        assert auto.cpus_per_actor + auto.decode_cpus <= 2
        # backend=auto: torch runs bf16; an fp32 job on CPU goes to ONNX Runtime (installed here)
        assert auto.backend == ("torch" if fast else "onnxruntime")
        assert [resolve_score(ScoreConfig(), fp32)[0].amp, resolve_score(ScoreConfig(), fp32)[0].backend] == [
            "fp32", "onnxruntime"]
        assert [resolve_score(ScoreConfig(amp="bf16"), fp32)[0].amp,
                resolve_score(ScoreConfig(amp="bf16"), fp32)[0].backend] == ["bf16", "torch"]
        assert resolve_score(ScoreConfig(compile=True), fp32)[0].backend == "torch"
        assert resolve_score(ScoreConfig(backend="torch"), fp32)[0].backend == "torch"
    two, split = resolve_score(ScoreConfig(num_actors=2, decode_cpus=0.4), fp32, paths)
    assert (two.cpus_per_actor, two.decode_cpus, split.decode_ms) == (0.75, 0.4, None)  # set: nothing measured
    one, split = resolve_score(ScoreConfig(cpus_per_actor=1.5), fp32, paths)
    assert (one.cpus_per_actor, one.decode_cpus, split.model_ms) == (1.5, 0.5, None)  # decoding takes the rest
    assert split.decode_ms > 0
    bad = [str(mixed_folder[0] / "NORMAL" / name) for name in ("empty.jpeg", "truncated.jpeg", "fake.png")]
    even, split = resolve_score(ScoreConfig(), fp32, bad)  # failing files time the error path: not measured
    assert split.decode_ms is None and (even.cpus_per_actor, even.decode_cpus) == (1.0, 1.0)
    gpu, split = resolve_score(ScoreConfig(gpus_per_actor=1), fp32, paths)  # sized before the GPU check refuses
    assert (gpu.decode, gpu.cpus_per_actor, gpu.decode_cpus, split.model_ms) == ("gpu", 1.0, 1.0, None)
    assert "read + header check" in split.describe(gpu)


def test_split_cpus_gives_the_cpus_to_where_the_work_is():
    """The model's share of the CPUs is model / (model + decode), in quarter CPUs; decoding gets
    the rest in tasks of about one CPU; GPU actors take one CPU each."""
    from cxr_ray.apps.score.job import decode_task_cpus, split_cpus

    assert split_cpus(2, 2, 1, decode_ms=6.0, model_ms=0.3) == (0.25, 0.87)  # decode-bound: 2 tasks
    assert split_cpus(2, 2, 1, decode_ms=6.0, model_ms=6.0) == (1.0, 1.0)
    assert split_cpus(2, 2, 1, decode_ms=1.5, model_ms=150.0) == (1.75, 0.25)  # ResNet-50 on CPU
    assert split_cpus(16, 16, 1, decode_ms=6.0, model_ms=None) == (1.0, 1.0)  # a GPU actor: 15 1-CPU tasks
    assert split_cpus(16, 16, 2, decode_ms=6.0, model_ms=None) == (1.0, 1.0)
    assert split_cpus(64, 16, 1, decode_ms=0.1, model_ms=100.0) == (16, 1.0)  # at most a node
    assert split_cpus(2, 2, 4, decode_ms=1.0, model_ms=100.0) == (0.25, 1.0)  # four actors of the least
    assert decode_task_cpus(0.25) == 0.25 and decode_task_cpus(14.5) == 1.03 and decode_task_cpus(1.75) == 0.87


def _by_path(batch: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame({"path": batch["path"], "prob": batch["prob_pneumonia"],
                         "error": list(batch["error"])}).set_index("path").sort_index()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_gpu_decode_path_on_cpu_scores_like_the_cpu_path_with_the_same_errors(checkpoint, mixed_folder, backend,
                                                                             tmp_path, monkeypatch):
    """score.decode=gpu run on the CPU (the code the GPU runs, with torchvision's libjpeg): JPEGs
    travel as bytes to the actor and are decoded there; every other file, and every bad one, takes
    the CPU path with the same error; probabilities agree with the CPU path's, on both backends
    (ONNX Runtime takes the device-decoded tensor as numpy)."""
    import dataclasses

    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path))  # the ONNX export's cache

    from cxr_ray.apps.score.stages import ScoreActor, read_and_decode

    root, reasons = mixed_folder
    c = load_checkpoint(checkpoint).preprocessing
    listing = list_inputs([str(root)])
    batch = {"path": listing["path"].to_numpy(object), "label": listing["label"].to_numpy(np.int8)}
    outs = {}
    for mode in ("cpu", "gpu"):
        decoded = read_and_decode(batch, c.cache_size, c.image_size, for_device=mode == "gpu")
        if mode == "gpu":
            jpeg = [len(b) > 0 for b in decoded["encoded"]]
            names = {Path(p).name for p, j in zip(decoded["path"], jpeg) if j}
            assert names == {f"gray{i}.jpeg" for i in range(4)} | {"rgb.jpg"}  # PNG, DICOM, bad files: CPU path
            assert not decoded["image"][np.array(jpeg)].any()  # not decoded in the task
        score = dataclasses.replace(SCORE, decode=mode, backend=backend, amp="fp32")
        outs[mode] = _by_path(ScoreActor(checkpoint, dataclasses.asdict(score))(decoded))
    cpu, gpu = outs["cpu"], outs["gpu"]
    assert list(cpu.index) == list(gpu.index) and (cpu["error"] == gpu["error"]).all()
    assert {Path(p).name for p in cpu.index[cpu["error"] != ""]} == set(reasons) - {"vanished.jpeg"}
    ok = cpu["error"] == ""
    assert cpu.loc[ok, "prob"].std() > 1e-3
    assert np.abs(cpu.loc[ok, "prob"] - gpu.loc[ok, "prob"]).max() < 0.02


def _score_each(checkpoint: str, root: Path, tmp_path: Path, runs: dict[str, ScoreConfig]
                ) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """``run_score`` of ``root`` once per named config: the outputs (indexed and sorted by path)
    and the job records."""
    frames, jobs = {}, {}
    for name, score in runs.items():
        out = tmp_path / name
        run_score(checkpoint, [str(root)], str(out), score)
        frames[name] = pd.read_parquet(out).set_index("path").sort_index()
        jobs[name] = json.loads((out / "_score_job.json").read_text())
    return frames, jobs


@pytest.mark.slow
def test_gpu_decode_through_ray_gives_every_file_the_cpu_paths_row(ray_local, checkpoint, mixed_folder, tmp_path):
    """score.decode=gpu through Ray Data (JPEG bytes travel from the read tasks to the actors) on
    CPU actors: the same rows and errors as score.decode=cpu, probabilities within 0.02; the job
    record says where it decoded."""
    import dataclasses

    root, _ = mixed_folder
    runs, jobs = _score_each(checkpoint, root, tmp_path, {m: dataclasses.replace(SCORE, decode=m, backend="torch")
                                                          for m in ("cpu", "gpu")})
    assert [jobs[m]["score"]["decode"] for m in ("cpu", "gpu")] == ["cpu", "gpu"]
    cpu, gpu = runs["cpu"], runs["gpu"]
    assert list(cpu.index) == list(gpu.index) and len(cpu) == len(list_inputs([str(root)]))
    assert (cpu["error"].fillna("") == gpu["error"].fillna("")).all()
    assert (cpu["width"].fillna(0) == gpu["width"].fillna(0)).all()
    ok = cpu["error"].isna()
    assert np.abs(cpu.loc[ok, "prob_pneumonia"] - gpu.loc[ok, "prob_pneumonia"]).max() < 0.02


def test_a_jpeg_the_device_decoder_refuses_takes_the_cpu_path_in_the_actor(checkpoint, mixed_folder):
    """Bytes the device decoder refuses after the read task passed them (a decoded size other
    than the header's, a scan it cannot decode) are decoded by the CPU path in the actor: the
    same image, or the CPU path's own error."""
    import dataclasses

    from cxr_ray.apps.score.stages import ScoreActor, read_and_decode

    root, _ = mixed_folder
    c = load_checkpoint(checkpoint).preprocessing
    paths = np.array([str(root / "NORMAL" / "nested" / f"gray{i}.jpeg") for i in range(2)], dtype=object)
    decoded = dict(read_and_decode({"path": paths, "label": np.zeros(2, np.int8)}, c.cache_size, c.image_size,
                                   for_device=True))
    reference = read_and_decode({"path": paths, "label": np.zeros(2, np.int8)}, c.cache_size, c.image_size)
    decoded["width"] = decoded["width"] + np.array([1, 0], np.int32)  # row 0: the device's size will not match
    decoded["encoded"] = np.array([decoded["encoded"][0], b"\xff\xd8\xff\xe0junk\xff\xd9"], dtype=object)
    actor = ScoreActor(checkpoint, dataclasses.asdict(dataclasses.replace(SCORE, decode="gpu", backend="torch",
                                                                          amp="fp32")))
    error = np.array(decoded["error"], dtype=object)
    width, height = decoded["width"].copy(), decoded["height"].copy()
    images = actor.decode_encoded(decoded, error, width, height)
    assert np.array_equal(images[0].numpy(), reference["image"][0])  # the CPU path's own pixels
    assert error[0] == "" and error[1].startswith("cannot decode")
    assert width[0] > 0 and (width[1], height[1]) == (0, 0)  # as the read tasks give an undecodable file
    out = actor(decoded)
    assert np.isfinite(out["prob_pneumonia"][0]) and np.isnan(out["prob_pneumonia"][1])
    assert out["width"][1] == 0 and out["error"][1].startswith("cannot decode")


@pytest.mark.slow
def test_onnxruntime_backend_scores_like_the_torch_model(ray_local, checkpoint, mixed_folder, tmp_path):
    """score.backend=onnxruntime: the actors run the checkpoint's ONNX export (fp32) and give
    the torch model's fp32 probabilities; bad files are reported the same way."""
    import dataclasses

    root, _ = mixed_folder
    runs, jobs = _score_each(checkpoint, root, tmp_path, {b: dataclasses.replace(SCORE, backend=b, amp="fp32")
                                                          for b in ("torch", "onnxruntime")})
    for backend, job in jobs.items():
        assert (job["score"]["backend"], job["score"]["amp"]) == (backend, "fp32")
    torch_df, onnx_df = runs["torch"], runs["onnxruntime"]
    assert list(torch_df.index) == list(onnx_df.index)
    assert (torch_df["error"].fillna("") == onnx_df["error"].fillna("")).all()
    ok = torch_df["error"].isna()
    assert ok.sum() == 20 and torch_df.loc[ok, "prob_pneumonia"].std() > 1e-3
    diff = np.abs(torch_df.loc[ok, "prob_pneumonia"] - onnx_df.loc[ok, "prob_pneumonia"])
    assert diff.max() <= 1e-5, diff.max()
    assert (torch_df["prediction"].fillna("") == onnx_df["prediction"].fillna("")).all()
    with pytest.raises(Exception, match="score.amp: expected auto or fp32 with score.backend=onnxruntime"):
        ScoreConfig(backend="onnxruntime", amp="bf16")
