"""Ray Tune wiring: search space, ASHA scheduler, searcher, trial driver, best-trial export.

Each trial is a Ray Train run of the same training code (``train.build_trainer``), started
by a driver function with ``TuneReportCallback`` -- the Train V2 way; no ``Tuner(trainer)``.
All trials read one prepared cache; a search over backbones whose preprocessing decodes at
different sizes shares one cache at the largest (:func:`with_shared_cache_size`), recorded in
every trial's contract. Backbones are searched as one joint choice of model settings::

    tune:
      search_space:
        model:                      # each value sets these model.* keys together
          type: choice
          values:
            - {name: resnet50, weights: imagenet}
            - {name: densenet121, weights: "txrv:densenet121-res224-all"}

An experiment folder holds Tune's own results, the
resolved ``experiment_config.yaml``, ``trials.csv``, ``best/`` and, when the dataset has a
test split, ``best_test_report/``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd
import pyarrow.fs as pafs
import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback

from cxr_ray.analysis.metrics import SELECTION_METRIC, SELECTION_METRICS
from cxr_ray.cluster import check_shared_paths, ray_log_dir, release_placement_groups, this_jobs_placement_groups
from cxr_ray.config import ExperimentConfig, valid_keys
from cxr_ray.data.cache import open_cache
from cxr_ray.data.preprocessing import resolve_preprocessing
from cxr_ray.errors import ConfigError
from cxr_ray.storage import uri as store
from cxr_ray.training.progress import trial_line
from cxr_ray.training.train import (
    TRIAL_DRIVER_CPUS,
    build_trainer,
    check_resources,
    resolve_gpu,
    resolve_resources,
    training_inputs,
    uses_gpu,
)

log = logging.getLogger(__name__)

SPACE_TYPES = ("choice", "uniform", "loguniform", "randint")
TUNABLE_METRICS = (*SELECTION_METRICS, "pr_auc", "accuracy", "f1", "recall", "specificity", "precision")
EXPERIMENT_CONFIG = "experiment_config.yaml"
CHECKPOINT_URI = "checkpoint_uri"  # reported with every checkpoint (see UriReportCallback)
JOINT_SECTIONS = ("model",)  # sections a search space may choose as a whole (key "model", mapping values)
JOINT_HINT = ("search architecture and weights together as one choice of model settings: "
              "search_space: {model: {type: choice, values: [{name: ..., weights: ...}, ...]}}")


def _space_error(key: str, msg: str) -> ConfigError:
    return ConfigError(f"tune.search_space[{key!r}]: {msg}")


def _probe(cfg: ExperimentConfig, key: str, value: Any) -> None:
    """Check that ``value`` is a legal setting of ``key`` (so every sample is a valid config)."""
    try:
        cfg.replace(**{key: value})
    except ConfigError as e:
        hint = f"; {JOINT_HINT}" if key in ("model.name", "model.weights", "model.weights_format") else ""
        raise _space_error(key, f"value {value!r} is impossible: {e}{hint}") from e


def joint_label(values: Mapping[str, Any]) -> str:
    """The trial parameter of one joint choice, e.g. ``name=densenet121, weights=txrv:...``."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


def trial_overrides(cfg: ExperimentConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted config overrides of one trial's sampled ``params`` (joint choices expanded)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in JOINT_SECTIONS:
            chosen = next(v for v in cfg.tune.search_space[key]["values"] if joint_label(v) == value)
            out.update({f"{key}.{k}": v for k, v in chosen.items()})
        else:
            out[key] = value
    return out


def _validate_joint(cfg: ExperimentConfig, key: str, spec: Any) -> None:
    values = spec.get("values") if isinstance(spec, Mapping) else None
    if spec.get("type") != "choice" or not isinstance(values, list) or not values or \
            not all(isinstance(v, Mapping) and v for v in values):
        raise _space_error(key, f"a whole section is searched as type choice with a list of mappings of {key}.* "
                                f"settings, e.g. [{{name: resnet50, weights: imagenet}}], got {spec!r}")
    for v in values:
        try:
            cfg.replace(**{f"{key}.{k}": x for k, x in v.items()})
        except ConfigError as e:
            raise _space_error(key, f"value {dict(v)!r} is impossible: {e}") from e
        if any(f"{key}.{k}" in cfg.tune.search_space for k in v):
            raise _space_error(key, f"{dict(v)!r} sets keys that are also searched on their own")


def model_variants(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """Every combination of the search's choices of model settings (the architectures, weights
    and so preprocessing contracts its trials can have); :class:`ConfigError` for a combination
    that cannot exist, e.g. ``model.name`` and ``model.weights`` searched separately."""
    dims = []
    for key, spec in cfg.tune.search_space.items():
        if key in JOINT_SECTIONS:
            dims.append([{f"{key}.{k}": v for k, v in value.items()} for value in spec["values"]])
        elif key.startswith("model.") and spec.get("type") == "choice":
            dims.append([{key: v} for v in spec["values"]])
    variants = []
    for combo in itertools.product(*dims):
        overrides = {k: v for part in combo for k, v in part.items()}
        try:
            variants.append(cfg.replace(**overrides))
        except ConfigError as e:
            raise ConfigError(f"tune.search_space: the combination {overrides} is impossible ({e}); "
                              f"{JOINT_HINT}") from e
    return variants


def with_shared_cache_size(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``data.cache_size`` set to the largest cache size of its search's model
    variants when they differ (one cache for every trial; each trial resizes from it to its
    own image size, and its contract records it); unchanged otherwise."""

    sizes = {resolve_preprocessing(v).cache_size for v in model_variants(cfg)}
    if cfg.data.cache_size or len(sizes) < 2:
        return cfg
    log.info("[tune] trials decode at %s px; one cache at %d px serves them all", sorted(sizes), max(sizes))
    return cfg.replace(**{"data.cache_size": max(sizes)})


def validate_search_space(cfg: ExperimentConfig) -> None:
    """Unknown parameters, bad types, impossible ranges and unreported metrics, before any trial."""
    keys = valid_keys()
    for key, spec in cfg.tune.search_space.items():
        if key in JOINT_SECTIONS and isinstance(spec, Mapping):
            _validate_joint(cfg, key, spec)
            continue
        if key.startswith("data."):
            raise _space_error(key, "data settings cannot be searched: every trial reads the one cache "
                                    "prepared for the experiment, and trials with different data or "
                                    "validation splits would not be comparable; run one experiment per setting")
        if key == "train.epochs":
            raise _space_error(key, "train.epochs cannot be searched: ASHA decides how many epochs each "
                                    "trial gets (up to train.epochs), and the LR schedule depends on it")
        if key not in keys or key.startswith("tune."):
            raise _space_error(key, f"unknown parameter; valid keys: {[k for k in keys if not k.startswith('tune.')]}")
        if not isinstance(spec, Mapping) or spec.get("type") not in SPACE_TYPES:
            raise _space_error(key, f"expected a mapping with type one of {list(SPACE_TYPES)}, got {spec!r}")
        kind = spec["type"]
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise _space_error(key, f"choice needs a non-empty list 'values', got {values!r}")
            for v in values:
                _probe(cfg, key, v)
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (low, high)):
            raise _space_error(key, f"{kind} needs numeric 'low' and 'high', got {low!r}, {high!r}")
        if not low < high:
            raise _space_error(key, f"impossible range: low {low} must be < high {high}")
        if kind == "loguniform" and low <= 0:
            raise _space_error(key, f"loguniform needs low > 0, got {low}")
        if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
            raise _space_error(key, f"randint needs int bounds, got {low!r}, {high!r}")
        _probe(cfg, key, low)
        _probe(cfg, key, high - 1 if kind == "randint" else high)
    model_variants(cfg)  # separately searched model settings that cannot go together
    if cfg.tune_metric not in TUNABLE_METRICS:
        raise ConfigError(f"tune.metric: no trial reports {cfg.tune_metric!r}; choose one of {list(TUNABLE_METRICS)}")
    if cfg.tune.metric and cfg.tune.metric != cfg.metric.selection:
        log.info("[tune] trials are ranked by tune.metric=%s; each trial's early stopping follows it too",
                 cfg.tune.metric)
    if cfg.tune_metric in ("recall", "precision", "specificity"):
        log.warning("[tune] tune.metric=%s can be won by a trivial model; %s is the safe choice",
                    cfg.tune_metric, SELECTION_METRIC)


def param_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """Tune sampling domains, keyed by dotted config key."""
    domains = {}
    for key, spec in cfg.tune.search_space.items():
        kind = spec["type"]
        if key in JOINT_SECTIONS:  # string labels: searchers sample categories of plain values
            domains[key] = ray.tune.choice([joint_label(v) for v in spec["values"]])
        elif kind == "choice":
            domains[key] = ray.tune.choice(spec["values"])
        elif kind == "uniform":
            domains[key] = ray.tune.uniform(spec["low"], spec["high"])
        elif kind == "loguniform":
            domains[key] = ray.tune.loguniform(spec["low"], spec["high"])
        else:
            domains[key] = ray.tune.randint(spec["low"], spec["high"])
    return domains


def max_concurrent_trials(cfg: ExperimentConfig) -> int:
    """Trials that fit the cluster at once, leaving ``tune.data_cpus`` CPUs for Ray Data."""
    res = ray.cluster_resources()
    t = cfg.train
    workers = max(1, t.num_workers)
    trial_cpus = workers * t.cpus_per_worker + TRIAL_DRIVER_CPUS
    fit = math.floor((float(res.get("CPU", 0)) - cfg.tune.data_cpus) / trial_cpus + 1e-9)
    if fit < 1:
        raise ConfigError(
            f"one trial needs {trial_cpus:g} CPUs (train.num_workers x train.cpus_per_worker + driver) "
            f"plus tune.data_cpus={cfg.tune.data_cpus:g} for Ray Data, more than the cluster's "
            f"{res.get('CPU', 0):g}; lower train.cpus_per_worker or train.num_workers")
    if uses_gpu(cfg):
        fit = min(fit, math.floor(float(res.get("GPU", 0)) / (workers * t.gpus_per_worker) + 1e-9))
    if cfg.tune.max_concurrent_trials:
        fit = min(fit, cfg.tune.max_concurrent_trials)
    return max(1, min(fit, cfg.tune.num_samples))


def train_driver_fn(params: dict[str, Any], base: dict[str, Any], cache_uri: str, runs_uri: str) -> None:
    """One Tune trial: a full Ray Train run of ``base`` with the sampled ``params`` applied.

    The run is named after the trial id, so a restored experiment's unfinished trial
    continues from its own latest Train checkpoint instead of starting over.
    """
    cfg = ExperimentConfig.from_dict(base)
    cfg = resolve_gpu(cfg.replace(**trial_overrides(cfg, params)))  # (a sampled train.use_gpu=auto)
    trial_id = ray.tune.get_context().get_trial_id()
    # Early stopping and the kept checkpoints follow the experiment's metric.
    inputs = training_inputs(cfg, open_cache(cache_uri), selection_metric=cfg.tune_metric)
    trainer = build_trainer(cfg, inputs, name=trial_id, storage_path=runs_uri,
                            callbacks=[UriReportCallback()])
    trainer.fit()


class UriReportCallback(TuneReportCallback):
    """Ray's ``TuneReportCallback`` that also reports each checkpoint's URI (``s3://...``) as
    ``checkpoint_uri``: Ray's own ``checkpoint_path`` is the path inside the filesystem
    (``bucket/...``), which reads as a local path once it leaves Ray."""

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None:
            metrics = [{**metrics[0], CHECKPOINT_URI: store.checkpoint_uri(checkpoint)}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


class TrialProgress(ray.tune.Callback):
    """A Ray Tune callback (driver side) printing one line on stderr per trial start, epoch
    result, end and failure, in place of Tune's status tables (``RunConfig(verbose=0)``)."""

    def __init__(self, metric: str, epochs: int):
        self.metric, self.epochs = metric, epochs

    def _say(self, event: str, trial: Any, result: dict[str, Any] | None = None) -> None:
        line = trial_line(event, trial.trial_id, trial.config, result, self.metric, self.epochs)
        print(line, file=sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say("start", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._say("result", trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._say("complete", trial, trial.last_result)  # fewer epochs than train.epochs: ASHA stopped it

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say("error", trial)


def _quiet_optuna() -> None:
    """Optuna's own INFO lines (one per study and trial) off the terminal, where it is installed."""
    try:
        import optuna
    except ImportError:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _searcher(cfg: ExperimentConfig):
    if cfg.tune.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.tune_metric, mode="max", seed=cfg.tune.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.tune.seed)


def _trainable(cfg: ExperimentConfig, cache_uri: str, exp_uri: str):
    fn = ray.tune.with_parameters(train_driver_fn, base=cfg.to_dict(), cache_uri=cache_uri,
                                  runs_uri=store.join(exp_uri, "train_runs"))
    # The driver only waits on its TorchTrainer, whose workers reserve the CPUs/GPUs; Tune
    # refuses an empty reservation, so the driver holds a token share instead of a whole CPU.
    return ray.tune.with_resources(fn, {"CPU": TRIAL_DRIVER_CPUS})


def build_tuner(cfg: ExperimentConfig, cache_uri: str, storage: str, name: str, callbacks: list):
    """A ``Tuner`` over ``train_driver_fn`` with ASHA on epochs and the configured searcher."""
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                              grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                              reduction_factor=cfg.tune.reduction_factor)
    return ray.tune.Tuner(
        _trainable(cfg, cache_uri, store.join(storage, name)),
        param_space=param_space(cfg),
        tune_config=ray.tune.TuneConfig(
            metric=cfg.tune_metric, mode="max", num_samples=cfg.tune.num_samples,
            search_alg=_searcher(cfg), scheduler=scheduler,
            max_concurrent_trials=max_concurrent_trials(cfg)),
        # verbose=0: Tune's status tables stay off stdout (the callbacks print cxr_ray's own lines)
        run_config=ray.tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=0,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
    )


@dataclass
class TuneOutcome:
    """What an experiment left: its folder, the trials table and the best checkpoint."""

    experiment_uri: str
    trials: pd.DataFrame
    best_checkpoint: str | None
    n_failed: int


def _stop_reason(metrics: pd.DataFrame, error: Any, epochs: int) -> str:
    if error is not None:
        return "failed"
    if metrics.empty:
        return "not started"
    if len(metrics) >= epochs:
        return "completed"
    if bool(metrics["stop"].iloc[-1]):
        return "early_stopping"
    return "asha"


def checkpoint_uris(df: pd.DataFrame, fs: pafs.FileSystem) -> pd.Series:
    """Each reported epoch's checkpoint as a URI: ``checkpoint_uri`` where the trial reported it,
    else (experiments started before it existed) Ray's ``checkpoint_path`` inside ``fs``, the
    experiment's filesystem, which every trial's checkpoints share."""
    uris = df[CHECKPOINT_URI] if CHECKPOINT_URI in df else pd.Series(None, index=df.index, dtype=object)
    paths = df["checkpoint_path"] if "checkpoint_path" in df else pd.Series(None, index=df.index, dtype=object)
    return pd.Series([u if isinstance(u, str) else (store.uri(fs, p) if isinstance(p, str) else None)
                      for u, p in zip(uris, paths)], index=df.index, dtype=object)


def _best_row(df: pd.DataFrame, metric: str) -> pd.Series | None:
    """The best epoch of a trial whose checkpoint still exists (Train keeps the newest of ties)."""
    if metric not in df or not df[metric].notna().any():
        return None
    ranked = df.sort_values([metric, "epoch"], ascending=[False, False])
    for _, row in ranked.iterrows():
        uri = row.get(CHECKPOINT_URI)
        if isinstance(uri, str) and store.exists(uri):
            return row
    return ranked.iloc[0]


def trials_table(grid: Any, cfg: ExperimentConfig) -> pd.DataFrame:
    """One row per trial: parameters, epochs run, stop reason, best metric (and its AUC, checkpoint)."""
    rows = []
    metric = cfg.tune_metric
    for result in grid:
        df = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        if not df.empty:
            df = df.assign(**{CHECKPOINT_URI: checkpoint_uris(df, result.filesystem)})
        row: dict[str, Any] = {"trial_id": (result.metrics or {}).get("trial_id") or store.name(result.path)}
        row.update({k: result.config.get(k) for k in cfg.tune.search_space})
        row["epochs_run"] = int(len(df))
        row["stop_reason"] = _stop_reason(df, result.error, cfg.train.epochs)
        best = _best_row(df, metric)
        row["best_" + metric] = float(best[metric]) if best is not None else float("nan")
        for k in ("pauc", "roc_auc"):
            row[k] = float(best[k]) if best is not None and k in best else float("nan")
        row["best_epoch"] = int(best["epoch"]) if best is not None else -1
        row["checkpoint_path"] = best.get(CHECKPOINT_URI) if best is not None else None  # a URI or local path
        row["error"] = str(result.error).strip().splitlines()[0][:500] if result.error else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("best_" + metric, ascending=False, na_position="last", ignore_index=True)


def export_best(table: pd.DataFrame, exp_uri: str) -> str | None:
    """Copy the best trial's best-epoch checkpoint to ``<experiment>/best``; returns its path."""
    ok = table[table["checkpoint_path"].notna() & (table["stop_reason"] != "failed")]
    if ok.empty:
        return None
    dst = store.join(exp_uri, "best")
    store.copy_tree(ok.iloc[0]["checkpoint_path"], dst)
    return dst


def write_experiment_config(cfg: ExperimentConfig, cache_uri: str, exp_uri: str) -> None:
    """Save the resolved config and cache location so ``--resume`` needs nothing else."""
    doc = {"config": cfg.to_dict(), "cache_uri": cache_uri}
    store.write_bytes(store.join(exp_uri, EXPERIMENT_CONFIG), yaml.safe_dump(doc, sort_keys=False).encode())


def read_experiment_config(exp_uri: str) -> tuple[ExperimentConfig, str]:
    """The config and cache of an experiment folder (for ``--resume``)."""
    path = store.join(exp_uri, EXPERIMENT_CONFIG)
    if not store.exists(path):
        raise ConfigError(f"--resume {exp_uri!r}: not a cxr_ray tune experiment ({EXPERIMENT_CONFIG} missing)")
    doc = yaml.safe_load(store.read_bytes(path))
    return ExperimentConfig.from_saved(doc["config"]), doc["cache_uri"]


def tracking_callbacks(mlflow_uri: str | None, name: str) -> list:
    """Extra experiment tracking; Ray's CSV/JSON/TensorBoard loggers are on by default."""
    if not mlflow_uri:
        return []
    try:
        from ray.air.integrations.mlflow import (
            MLflowLoggerCallback,  # Ray's own MLflow integration
        )
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ConfigError("--mlflow needs the mlflow extra: pip install 'cxr_ray[mlflow]'") from e
    return [MLflowLoggerCallback(tracking_uri=mlflow_uri, experiment_name=name, save_artifact=False)]


def run_tune(cfg: ExperimentConfig, cache_uri: str, name: str, resume: bool = False,
             mlflow_uri: str | None = None) -> TuneOutcome:
    """Run (or resume) the experiment ``name`` and write trials.csv and best/."""
    validate_search_space(cfg)
    cfg = resolve_resources(cfg, for_tune=True)
    storage = store.absolute(cfg.train.storage_path)
    exp_uri = store.join(storage, name)
    check_resources(cfg, trials=1, data_cpus=cfg.tune.data_cpus)
    check_shared_paths({"train.storage_path": storage})  # before the first trial
    concurrent = max_concurrent_trials(cfg)  # raises when not even one trial fits
    callbacks = [TrialProgress(cfg.tune_metric, cfg.train.epochs), *tracking_callbacks(mlflow_uri, name)]
    if resume:
        tuner = ray.tune.Tuner.restore(exp_uri, trainable=_trainable(cfg, cache_uri, exp_uri),
                                       resume_unfinished=True, resume_errored=False)
    else:
        write_experiment_config(cfg, cache_uri, exp_uri)
        tuner = build_tuner(cfg, cache_uri, storage, name, callbacks)
    log.info("[tune] experiment %s: %d trials, up to %d at once", exp_uri, cfg.tune.num_samples, concurrent)
    held = this_jobs_placement_groups()
    _quiet_optuna()  # (a restored searcher too)
    tune_out = os.path.join(ray_log_dir(), f"tune-{name.replace('/', '_')}-{os.getpid()}.out")
    log.info("[tune] Ray Tune's own output: %s", tune_out)
    try:  # Tune prints its experiment box and paths whatever its verbosity: to its log, not stdout
        with open(tune_out, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out):
            grid = tuner.fit()
    finally:  # a trial stopped while its worker group was starting leaves that group reserved
        release_placement_groups(held, "tune")
    table = trials_table(grid, cfg)
    store.write_bytes(store.join(exp_uri, "trials.csv"), table.to_csv(index=False).encode())
    best = export_best(table, exp_uri)
    return TuneOutcome(exp_uri, table, best, int((table["stop_reason"] == "failed").sum()))


def format_trials(table: pd.DataFrame, limit: int = 20) -> str:
    """A short table of trials for the terminal (``table`` comes ranked: :func:`trials_table`)."""
    cols = [c for c in table.columns if c not in ("checkpoint_path", "error")]
    shown = table[cols].head(limit).copy()
    for c in shown.columns:
        if shown[c].dtype.kind == "f":
            shown[c] = shown[c].map(lambda v: f"{v:.4g}")
    return shown.to_string(index=False)
