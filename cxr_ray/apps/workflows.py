"""The jobs the command line runs, callable from Python with the same result.

Each workflow checks its inputs before Ray starts (a bad dataset, bucket, weights file or run
folder fails in seconds), joins or starts Ray (``cluster.init_ray``), runs, and returns what
it made; nothing here prints. Progress lines go to ``say`` (the CLI passes ``print``; the
default logs them). Ray is left running: the caller decides when to stop it.

- :func:`train`: Ray Train, then the ``metric.tta`` decisions of the best checkpoint, copied to
  ``<run>/best``;
- :func:`tune`: Ray Tune, then the best trial's TTA decisions, the ensemble of the top
  trials, and both models' test-split reports;
- :func:`prepare`, :func:`fit_tta_on`, :func:`calibrate`, :func:`ensemble`, :func:`audit`,
  :func:`explain_scoring_job`;
- :func:`demo_config`: the small search ``cxr-ray tune --demo`` runs on generated data.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cxr_ray.analysis.drift import StatsCollector
from cxr_ray.apps.audit import audit_catalog, write_report
from cxr_ray.apps.calibrate import calibrate_on_sample, provenance, sample_catalog, write_calibrated
from cxr_ray.apps.ensemble import build_ensemble, check_members, top_k_checkpoints
from cxr_ray.apps.evaluate import evaluate_checkpoint
from cxr_ray.apps.explain import explain_scored
from cxr_ray.apps.score.output import OutputFolder
from cxr_ray.apps.tta import fit_tta_decisions
from cxr_ray.checkpoint import LoadedCheckpoint, load_checkpoint
from cxr_ray.cluster import cluster_gpus, cpu_share, init_ray
from cxr_ray.config import ExperimentConfig, ScoreConfig
from cxr_ray.data.cache import PreparedCache, open_cache, prepare_cache
from cxr_ray.data.catalog import assign_splits, check_patient_leaks, load_catalog
from cxr_ray.data.preprocessing import resolve_preprocessing
from cxr_ray.data.synthetic import make_synthetic_dataset
from cxr_ray.errors import ConfigError, EnsembleError
from cxr_ray.inference.predictor import predict_split
from cxr_ray.models.weights import ensure_available
from cxr_ray.storage import uri as store
from cxr_ray.training.train import check_run_dir, resolve_gpu, run_name, run_training
from cxr_ray.training.tune import model_variants, run_tune, validate_search_space, with_shared_cache_size

log = logging.getLogger(__name__)
Say = Callable[[str], None]
BEST = "best"  # <run>/best: the best checkpoint of a training run, at a path that does not change

# Small enough for a 2-core laptop in a few minutes, and it learns: the from-scratch CNN on 64 px
# synthetic images (ResNet-50 from random weights learns nothing in 3 CPU epochs). The non-demo
# default searches ResNet-50 unfreeze depth, dropout and lr.
DEMO_OVERRIDES: dict[str, Any] = {
    "data.image_size": 64, "model.name": "simple_cnn", "model.weights": "none", "model.width": 16,
    # 2 trials x 0.45 CPU workers on 2 cores leaves a whole core for Ray Data's read tasks.
    "train.epochs": 4, "train.batch_size": 16, "train.num_workers": 1, "train.cpus_per_worker": 0.45,
    "train.patience": 2, "train.warmup_epochs": 0.5,
    "tune.num_samples": 4, "tune.grace_period": 1, "tune.reduction_factor": 2, "tune.data_cpus": 1.0,
    "tune.search_space": {
        "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.6},
        "train.lr": {"type": "loguniform", "low": 3e-4, "high": 1e-2},
        "model.width": {"type": "choice", "values": [8, 16, 32]},
    },
}
# 900 images, ~225 of them in test so the test report's CIs mean something
DEMO_DATA = {"n": 900, "size": 96, "seed": 0, "split_shares": {"train": 0.6, "val": 0.15, "test": 0.25}}


def check_storage(cfg: ExperimentConfig, *keys: str) -> None:
    """Fail before Ray when a location setting (``data.root``, ``data.cache_dir``,
    ``train.storage_path``) names a missing or unreachable bucket."""
    values = {"data.root": cfg.data.root, "data.cache_dir": cfg.data.resolved_cache_dir,
              "train.storage_path": cfg.train.storage_path}
    for key in keys:
        store.check_location(values[key], key)


def demo_dataset(cfg: ExperimentConfig) -> str:
    """The synthetic demo dataset under the cache folder, generated on first use. A URI cache
    folder gets it generated locally and uploaded, so every node of a cluster reads the same images."""
    root = store.join(store.absolute(cfg.data.resolved_cache_dir), "demo-synthetic-900")
    if store.exists(store.join(root, ".complete")):
        return root
    # a folder left by an interrupted first run is rewritten
    if not store.is_uri(root):
        make_synthetic_dataset(root, **DEMO_DATA)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            store.copy_tree(str(make_synthetic_dataset(Path(tmp) / "demo", **DEMO_DATA)), root)
    store.write_bytes(store.join(root, ".complete"), b"ok")
    return root


def demo_config(cfg: ExperimentConfig, user: Mapping[str, Any], data_given: bool) -> ExperimentConfig:
    """``cfg`` with :data:`DEMO_OVERRIDES` (the ``user``'s own ``--set`` keys still win) and, unless
    the user gave a dataset, the generated demo dataset as ``data.root``."""
    cfg = cfg.replace(**{**DEMO_OVERRIDES, **user})
    return cfg if data_given else cfg.replace(**{"data.root": demo_dataset(cfg)})


def prepare(cfg: ExperimentConfig, address: str | None = None, check_leaks: bool = False,
            say: Say = log.info) -> PreparedCache:
    """The catalog and split of ``cfg.data`` (for training, with the patient-leak check) before
    Ray; then Ray and the decoded cache (reused when unchanged)."""
    check_storage(cfg, "data.root", "data.cache_dir")
    catalog = assign_splits(load_catalog(cfg.data.root), cfg.data)  # fails fast, before Ray
    if check_leaks:
        for line in check_patient_leaks(catalog):
            say(f"[data] {line}")
    init_ray(address)
    return prepare_cache(cfg, catalog)


def fit_tta(checkpoint: str, cache: PreparedCache, cfg: ExperimentConfig, say: Say = log.info) -> dict[str, dict]:
    """The ``metric.tta`` modes' temperatures and thresholds, chosen on the validation split
    and written into ``checkpoint`` (the best one of a run, before its path is given out)."""
    modes = cfg.metric.tta_modes
    if modes:
        say(f"[tta] choosing the temperature and threshold of TTA {', '.join(modes)} on the validation split")
    return fit_tta_decisions(checkpoint, cache, modes)


def said_gpu(cfg: ExperimentConfig, command: str, say: Say) -> ExperimentConfig:
    """``cfg`` with ``train.use_gpu=auto`` resolved for the running cluster, said in one line."""
    resolved = resolve_gpu(cfg)
    if cfg.train.use_gpu == "auto":
        where = "GPU" if resolved.train.use_gpu == "true" else "CPU"
        say(f"[{command}] train.use_gpu=auto: {cluster_gpus():g} GPU(s) in the cluster, training on {where}")
    return resolved


@dataclass
class TrainOutcome:
    """What :func:`train` made: the run folder, the best checkpoint (``<run>/best``, a copy of
    Ray Train's best-epoch checkpoint ``source_checkpoint``; None when the run made none), its
    validation metrics, the epochs run and the TTA decisions fitted on it."""

    cfg: ExperimentConfig
    run_dir: str
    best_checkpoint: str | None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    epochs_run: int = 0
    tta: dict[str, dict] = field(default_factory=dict)
    source_checkpoint: str = ""


def train(cfg: ExperimentConfig, address: str | None = None, resume: bool = False,
          say: Say = log.info) -> TrainOutcome:
    """Train ``cfg`` on Ray Train (``training.train.run_training``), then fit the ``metric.tta``
    decisions of the best checkpoint (``cxr-ray train``). ``resume``: continue the run folder
    ``train.storage_path/train.name`` from its latest checkpoint."""
    check_storage(cfg, "train.storage_path")
    ensure_available(cfg.model.name, cfg.model.weights, cfg.model.weights_format)  # fails here, before Ray
    if cfg.train.name:  # a named run folder is checked before the cache is built (again in run_training)
        check_run_dir(cfg, store.join(store.absolute(cfg.train.storage_path), cfg.train.name), resume)
    say(f"[train] {cfg.model.name}, weights {cfg.model.weights}; preprocessing: "
        f"{resolve_preprocessing(cfg).describe()}")
    cache = prepare(cfg, address, check_leaks=True, say=say)
    cfg = said_gpu(cfg, "train", say)
    result = run_training(cfg, cache, resume=resume)  # a failure raises (Train V2)
    best = result.get_best_checkpoint(cfg.metric.selection, "max")
    run_dir = store.checkpoint_uri(result)
    if best is None:
        return TrainOutcome(cfg, run_dir, None, epochs_run=int((result.metrics or {}).get("epoch", -1)) + 1)
    path = store.checkpoint_uri(best)  # s3://... stays s3://: Ray's own .path is the key in the bucket
    metrics = next(bm for c, bm in result.best_checkpoints if c.path == best.path)
    tta = fit_tta(path, cache, cfg, say)
    stable = store.join(run_dir, BEST)  # replaced on --resume, as tune's <experiment>/best
    store.copy_tree(path, stable)
    return TrainOutcome(cfg, run_dir, stable, dict(metrics), int((result.metrics or {}).get("epoch", -1)) + 1, tta,
                        source_checkpoint=path)


@dataclass
class TuneOutcome:
    """What :func:`tune` made: the experiment folder, the trials table, the best checkpoint and
    its TTA decisions, the ensemble of the top trials (or why there is none) and the test
    reports (``{"best": metrics, "ensemble": metrics}``, folders in ``report_dirs``)."""

    experiment: str
    trials: pd.DataFrame
    n_failed: int
    best_checkpoint: str | None
    tta: dict[str, dict] = field(default_factory=dict)
    best: LoadedCheckpoint | None = None
    ensemble: LoadedCheckpoint | None = None
    ensemble_error: str = ""
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    report_dirs: dict[str, str] = field(default_factory=dict)


def check_tune(cfg: ExperimentConfig, ensemble_top_k: int, resumed: bool) -> ExperimentConfig:
    """The search space, every backbone's weights, ``ensemble_top_k`` and the locations, checked
    before Ray; returns ``cfg`` with one cache size shared by every backbone the search can pick."""
    validate_search_space(cfg)
    if not resumed:  # (a resumed experiment's saved config has it)
        cfg = with_shared_cache_size(cfg)
    for variant in model_variants(cfg):
        ensure_available(variant.model.name, variant.model.weights, variant.model.weights_format)
    if ensemble_top_k and not 2 <= ensemble_top_k <= cfg.tune.num_samples:
        raise ConfigError(f"--ensemble-top-k: expected 0 or an int in [2, tune.num_samples = "
                          f"{cfg.tune.num_samples}], got {ensemble_top_k}")
    check_storage(cfg, "train.storage_path")  # (data.root and data.cache_dir: prepare, or tune's resume)
    return cfg


def tune(cfg: ExperimentConfig, address: str | None = None, resume: str = "", cache_uri: str = "",
         mlflow_uri: str | None = None, ensemble_top_k: int = 0, say: Say = log.info) -> TuneOutcome:
    """Ray Tune search (``training.tune.run_tune``), then the best trial's TTA decisions, the
    ensemble of the ``ensemble_top_k`` best trials (0: none) and the test-split reports of
    both (``cxr-ray tune``). ``resume``: the experiment folder to continue, with ``cfg`` and
    ``cache_uri`` its saved ones (``training.tune.read_experiment_config``)."""
    cfg = check_tune(cfg, ensemble_top_k, bool(resume))
    if cache_uri:  # resumed: the experiment's own cache
        check_storage(cfg, "data.root", "data.cache_dir")
        init_ray(address)
        cache = open_cache(cache_uri)
    else:
        cache = prepare(cfg, address, check_leaks=True, say=say)
    cfg = said_gpu(cfg, "tune", say)
    name = store.name(resume) if resume else (cfg.tune.name or run_name(cfg, "tune"))
    if resume:
        cfg = cfg.replace(**{"train.storage_path": store.parent(resume)})
    run = run_tune(cfg, cache.uri, name, resume=bool(resume), mlflow_uri=mlflow_uri)
    say(f"[tune] search done: {len(run.trials)} trials, {run.n_failed} failed; experiment folder "
        f"{run.experiment_uri} (trials.csv, best/); next: TTA, ensemble, test reports")
    out = TuneOutcome(run.experiment_uri, run.trials, run.n_failed, run.best_checkpoint)
    if run.best_checkpoint is None:
        return out
    out.tta = fit_tta(run.best_checkpoint, cache, cfg, say)
    out.best = load_checkpoint(run.best_checkpoint)
    if ensemble_top_k:
        try:
            top = top_k_checkpoints(run.experiment_uri, ensemble_top_k)
            out.ensemble = build_ensemble(top, store.join(run.experiment_uri, f"ensemble-top{ensemble_top_k}"),
                                          cache=cache, replace=True)  # replaced on --resume
        except EnsembleError as e:  # too few checkpoints, members that differ in preprocessing
            out.ensemble_error = str(e)
    if sum(cache.split_counts("test")):
        for key, ckpt in (("best", out.best), ("ensemble", out.ensemble)):
            if ckpt is not None:
                out.report_dirs[key] = store.join(run.experiment_uri, f"{key}_test_report")
                out.reports[key] = evaluate_checkpoint(ckpt, cfg.data.root, "test", out.report_dirs[key],
                                                       cache_dir=cfg.data.cache_dir)
    return out


def fit_tta_on(checkpoint: str, modes: tuple[str, ...], data: str = "", cache_dir: str = "", amp: str = "auto",
               address: str | None = None) -> tuple[LoadedCheckpoint, dict[str, dict]]:
    """Choose ``modes``' temperatures and thresholds on the checkpoint's own validation split
    (of ``data``, default the one it was trained on) and store them in it (``cxr-ray fit-tta``)."""
    if not modes:
        raise ConfigError("--tta: name at least one mode (hflip, crop5)")
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.cfg.replace(**{"data.root": data or ckpt.cfg.data.root,
                              "data.cache_dir": cache_dir or ckpt.cfg.data.cache_dir})
    check_storage(cfg, "data.root", "data.cache_dir")
    init_ray(address)
    # the same split the checkpoint was validated on (its own data config), at its own cache size
    cache = prepare_cache(cfg, preprocessing=ckpt.preprocessing)
    return ckpt, fit_tta_decisions(checkpoint, cache, modes, amp=amp)


def calibrate(checkpoint: str, data: str, out: str, cache_dir: str = "", amp: str = "auto",
              address: str | None = None) -> tuple[str, dict[str, Any]]:
    """A new checkpoint at ``out``: ``checkpoint`` with its calibration and threshold refitted on
    a site's labelled sample ``data`` (``cxr-ray calibrate``); returns its path and the
    cross-fitted result (``apps.calibrate.calibrate_on_sample``)."""
    ckpt = load_checkpoint(checkpoint)
    catalog = sample_catalog(data)  # too small a sample is refused before Ray
    store.check_location(out, "--out")
    if store.exists(out):
        raise ConfigError(f"--out {out} exists; choose a new folder (a checkpoint is never written over)")
    cfg = ckpt.cfg.replace(**{"data.root": data, "data.cache_dir": cache_dir or ckpt.cfg.data.cache_dir})
    init_ray(address)
    cache = prepare_cache(cfg, catalog, preprocessing=ckpt.preprocessing, training=False)
    precision = ckpt.precision(amp, torch.device("cpu"))
    stats = StatsCollector()  # the site's images become the new checkpoint's drift reference
    preds = predict_split(ckpt, cache, "test", precision=precision, stats=stats)
    result = calibrate_on_sample(ckpt, preds, stats.result())
    return write_calibrated(ckpt, result, provenance(catalog, data, ckpt), out, precision), result


def ensemble(out: str, experiment: str = "", top_k: int = 3, checkpoints: list[str] | None = None,
             amp: str = "auto", address: str | None = None) -> LoadedCheckpoint:
    """The ensemble checkpoint at ``out`` of a tune ``experiment``'s ``top_k`` trials or of
    ``checkpoints`` (``cxr-ray ensemble``); the members are checked before Ray."""
    if bool(experiment) == bool(checkpoints):
        raise ConfigError("give --from EXPERIMENT (with --top-k) or --checkpoints CKPT CKPT ..., not both")
    if experiment and top_k < 2:
        raise ConfigError(f"--top-k: expected an int >= 2, got {top_k}")
    store.check_location(out, "--out")
    if store.exists(out):
        raise EnsembleError(f"--out {out} exists; choose a new folder (an ensemble is never written over another)")
    members = [load_checkpoint(s) for s in (top_k_checkpoints(experiment, top_k) if experiment else checkpoints)]
    check_members(members)  # before Ray
    init_ray(address)
    return build_ensemble(members, out, amp=amp)


def audit(cfg: ExperimentConfig, out: str, address: str | None = None, say: Say = log.info) -> dict[str, Any]:
    """Measure the cues of every image of ``cfg.data.root`` and write the audit report to ``out``
    (``cxr-ray audit``); returns its summary."""
    catalog = load_catalog(cfg.data.root)  # a bad dataset fails before Ray
    init_ray(address)
    say(f"[audit] measuring {len(catalog)} images of {cfg.data.root}")
    return write_report(audit_catalog(catalog, cfg.data.stall_timeout_s), out)


def explain_scoring_job(ckpt: LoadedCheckpoint, output: str, explain_dir: str, top: int, score: ScoreConfig,
                        say: Say = log.info) -> dict[str, Any]:
    """Grad-CAM overlays of a finished scoring job's positive predictions (or its ``top`` highest
    probabilities) in ``explain_dir``, by as many Ray Data actors as the job had, each with the
    job's CPUs per actor (``score --explain-dir``)."""
    scored = OutputFolder(output).read(["path", "prob_pneumonia", "threshold", "error"]).to_pandas()
    say(f"[score] Grad-CAM overlays -> {explain_dir}")
    cpus = score.cpus_per_actor or cpu_share(0.0, score.num_actors)  # Grad-CAM runs on CPU
    return explain_scored(ckpt, scored, explain_dir, top, actors=score.num_actors, cpus_per_actor=cpus)

