"""The ``cxr-ray`` command: one subcommand per job, all driven by one ExperimentConfig.

Every subcommand accepts ``--config FILE`` and repeated ``--set key=value`` overrides; the
config is loaded and validated before Ray starts. ``experiments/*.py`` are thin wrappers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from cxr_ray.config import ConfigError, ExperimentConfig, load_config, parse_override


def _config_and_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.image_size=224 (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a cluster "
                   "running on this node, else a new local Ray)")


def _common(p: argparse.ArgumentParser) -> None:
    _config_and_address(p)
    p.add_argument("--data", help="dataset root or CSV/Parquet manifest (sets data.root)")
    p.add_argument("--cache", help="cache folder or URI (sets data.cache_dir)")
    p.add_argument("--size", type=int, help="image side in pixels (sets data.image_size)")


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides plus the shortcut flags (``--data``, ``--cache``, ``--size``)."""
    shortcuts = {"data": "data.root", "cache": "data.cache_dir", "size": "data.image_size"}
    overrides = list(args.set)
    for flag, key in shortcuts.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Build the validated config from ``--config``, ``--set`` and the shortcut flags."""
    return load_config(args.config, _overrides(args))


def use_storage_from_args(args: argparse.Namespace) -> None:
    """Apply ``storage.endpoint_url`` from ``--config`` / ``--set`` before anything reads a URI
    (a resumed run or a checkpoint may itself live behind that endpoint)."""
    from cxr_ray.data import io

    if not hasattr(args, "set"):
        return
    storage_sets = [o for o in args.set if o.split("=", 1)[0].strip().startswith("storage.")]
    io.use_endpoint(load_config(args.config, storage_sets).storage.endpoint_url)


def refuse_model_settings(args: argparse.Namespace, command: str) -> None:
    """Commands that apply a checkpoint take its own config: only ``storage.*`` may be ``--set``."""
    bad = [o for o in args.set if not o.split("=", 1)[0].strip().startswith("storage.")]
    if bad:
        raise ConfigError(f"{command} uses the checkpoint's own config; only storage.* may be set, not {bad}")


def check_storage(cfg: ExperimentConfig, *settings: str) -> None:
    """Fail before Ray when a URI setting names a missing or unreachable bucket."""
    from cxr_ray.data import io

    values = {"data.root": cfg.data.root, "data.cache_dir": cfg.data.resolved_cache_dir,
              "train.storage_path": cfg.train.storage_path}
    for key in settings:
        io.check_location(values[key], key)


def shutdown_ray() -> None:
    """Stop (or disconnect from) Ray so no late worker logs follow our final output."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    """Write a synthetic dataset in the Kermany layout."""
    from cxr_ray.data import io
    from cxr_ray.data.synthetic import make_synthetic_dataset

    if io.is_uri(args.out):
        raise ConfigError(f"make-synthetic writes a local folder, not {args.out}; write it here, then "
                          f"upload it (aws s3 sync / gcloud storage cp -r)")
    root = make_synthetic_dataset(args.out, n=args.n, size=args.size, seed=args.seed)
    print(f"wrote a SYNTHETIC dataset (not medical images) to {root}")
    return 0


def _prepare(args: argparse.Namespace, cfg: ExperimentConfig | None = None, check_leaks: bool = False):
    """Catalog, split (and for training, the patient-leak check) before Ray; then the cache."""
    from cxr_ray.data.cache import prepare_cache
    from cxr_ray.data.catalog import assign_splits, check_patient_leaks, load_catalog
    from cxr_ray.runtime import init_ray

    cfg = cfg or config_from_args(args)
    check_storage(cfg, "data.root", "data.cache_dir")
    catalog = assign_splits(load_catalog(cfg.data.root), cfg.data)  # fails fast, before Ray
    if check_leaks:
        for line in check_patient_leaks(catalog):
            print(f"[data] {line}", flush=True)
    init_ray(args.address)
    return cfg, prepare_cache(cfg, catalog)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Decode every image once into the Parquet cache (reused when unchanged)."""
    _, cache = _prepare(args)
    shutdown_ray()  # no worker log lines may arrive after the cache URI below
    print(format_report(cache.meta))
    print(cache.uri)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print counts, patients, sizes and problems (builds or reuses the cache)."""
    _, cache = _prepare(args)
    shutdown_ray()
    print(format_report(cache.meta))
    return 0


def format_report(meta: dict) -> str:
    """Human-readable dataset report from a cache's ``meta.json``."""
    lines = [f"dataset {meta['root']}  (cache {meta['size']}px, fingerprint {meta['fingerprint']})",
             f"{'split':<8}{'NORMAL':>8}{'PNEUMONIA':>11}{'patients':>10}"]
    for split, counts in meta["counts"].items():
        lines.append(f"{split:<8}{counts.get('NORMAL', 0):>8}{counts.get('PNEUMONIA', 0):>11}"
                     f"{meta['patients'].get(split, 0):>10}")
    for dim, s in meta.get("original_size", {}).items():
        lines.append(f"original {dim}: min {s['min']}, median {s['median']:.0f}, max {s['max']}")
    problems = [f"unreadable: {b['path']}: {b['error']}" for b in meta["bad_files"]]
    problems += [f"byte-identical files across splits {d['splits']}: {d['paths']}"
                 for d in meta["cross_split_duplicates"]]
    problems += [f"patient leak: {leak}" for leak in meta["split_leaks"]]
    within = len(meta["duplicates"]) - len(meta["cross_split_duplicates"])
    if within:
        problems.append(f"{within} group(s) of byte-identical files within one split (kept)")
    lines.append(f"problems: {len(problems) or 'none'}")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


def train_config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Config for ``train``; with ``--resume RUN_DIR``, the run's own config.yaml (plus any
    --config/--set given, which ``run_training`` then refuses if they change what is trained)."""
    from cxr_ray.config import apply_overrides
    from cxr_ray.data import io
    from cxr_ray.train import read_run_config

    if not args.resume:
        return config_from_args(args)
    run_dir = args.resume.rstrip("/")
    base = load_config(args.config) if args.config else read_run_config(run_dir)
    cfg = apply_overrides(base, dict(parse_override(o) for o in _overrides(args)))
    return cfg.replace(**{"train.storage_path": io.parent(run_dir), "train.name": io.name(run_dir)})


def cmd_train(args: argparse.Namespace) -> int:
    """Train on Ray Train; prints a summary and, last, the best checkpoint's path."""
    from cxr_ray.data import io
    from cxr_ray.data.preprocessing import resolve_preprocessing
    from cxr_ray.train import check_run_dir, run_training
    from cxr_ray.tta import format_decisions
    from cxr_ray.weights import ensure_available

    cfg = train_config_from_args(args)
    check_storage(cfg, "train.storage_path")
    ensure_available(cfg.model.name, cfg.model.weights, cfg.model.weights_format)  # fails here, before Ray
    if cfg.train.name:  # a named run folder is checked before the cache is built (again in run_training)
        check_run_dir(cfg, io.join(io.absolute(cfg.train.storage_path), cfg.train.name), bool(args.resume))
    print(f"[train] {cfg.model.name}, weights {cfg.model.weights}; preprocessing: "
          f"{resolve_preprocessing(cfg).describe()}", flush=True)
    cfg, cache = _prepare(args, cfg, check_leaks=True)
    result = run_training(cfg, cache, resume=bool(args.resume))  # a failure raises (Train V2)
    selection = cfg.metric.selection
    best = result.get_best_checkpoint(selection, "max")
    m = result.metrics or {}
    tta = fit_tta(io.checkpoint_uri(best), cache, cfg) if best is not None else {}
    shutdown_ray()  # no worker log lines may arrive after the checkpoint path below
    if best is None:
        print("cxr-ray train: the run produced no checkpoint", file=sys.stderr)
        return 1
    b = next(bm for c, bm in result.best_checkpoints if c.path == best.path)
    print(f"[train] {m.get('epoch', -1) + 1} epoch(s); best epoch {b['epoch'] + 1}: val roc_auc "
          f"{b['roc_auc']:.4f}, pAUC {b['pauc']:.4f} ({selection} {b[selection]:.4f}); recall "
          f"{b['recall']:.4f} and specificity {b['specificity']:.4f} (95% lower bound "
          f"{b['specificity_lower_bound']:.4f}) at threshold {b['threshold']:.4f}, chosen by "
          f"{cfg.metric.threshold_rule} on {b['n']} validation images")
    if cfg.metric.calibrate and "temperature" in b:  # (checkpoints of runs started before it: absent)
        print(f"[train] probabilities calibrated on validation ({cfg.metric.calibration}): temperature "
              f"{b['temperature']:.3f}, bias {b.get('logit_bias', 0.0):+.3f}, ECE {b['val_ece_before']:.4f} -> "
              f"{b['val_ece']:.4f}")
    for line in format_decisions(tta, prefix="[train] TTA"):
        print(line)
    print(f"[train] run folder: {io.checkpoint_uri(result)}")
    print(io.checkpoint_uri(best))  # s3://... stays s3://: Ray's own .path is the key in the bucket
    return 0


def fit_tta(checkpoint: str, cache: Any, cfg: ExperimentConfig) -> dict[str, dict]:
    """The ``metric.tta`` modes' temperatures and thresholds, chosen on the validation split
    and written into ``checkpoint`` (the best one of a run, before its path is printed)."""
    from cxr_ray.tta import fit_tta_decisions, parse_modes

    modes = parse_modes(cfg.metric.tta)
    if modes:
        print(f"[tta] choosing the temperature and threshold of TTA {', '.join(modes)} on the validation split",
              flush=True)
    return fit_tta_decisions(checkpoint, cache, modes)


def cmd_fit_tta(args: argparse.Namespace) -> int:
    """Choose TTA modes' temperatures and thresholds on a checkpoint's validation split and store
    them in it; last line: the checkpoint."""
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data.cache import prepare_cache
    from cxr_ray.runtime import init_ray
    from cxr_ray.tta import fit_tta_decisions, format_decisions, parse_modes

    refuse_model_settings(args, "fit-tta")
    modes = parse_modes(args.tta, "--tta")
    if not modes:
        raise ConfigError("--tta: name at least one mode (hflip, crop5)")
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.cfg.replace(**{"data.root": args.data or ckpt.cfg.data.root,
                              "data.cache_dir": args.cache or ckpt.cfg.data.cache_dir})
    check_storage(cfg, "data.root", "data.cache_dir")
    init_ray(args.address)
    # the same split the checkpoint was validated on (its own data config), at its own cache size
    cache = prepare_cache(cfg, preprocessing=ckpt.preprocessing)
    decisions = fit_tta_decisions(args.checkpoint, cache, modes, amp=args.amp)
    shutdown_ray()
    for line in format_decisions(decisions, ckpt.meta.get("metrics"), prefix="[fit-tta]"):
        print(line)
    print(args.checkpoint)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Acquisition and framing cues by class and split, and how well they alone separate the
    classes (a shortcut a network could learn); last line: the report folder."""
    from cxr_ray.audit import audit_catalog, format_report, write_report
    from cxr_ray.data.catalog import load_catalog
    from cxr_ray.runtime import init_ray

    cfg = config_from_args(args)
    catalog = load_catalog(cfg.data.root)  # a bad dataset fails before Ray
    out = args.out or os.path.join(os.getcwd(), "audit")
    init_ray(args.address)
    print(f"[audit] measuring {len(catalog)} images of {cfg.data.root}", flush=True)
    cues = audit_catalog(catalog, cfg.data.stall_timeout_s)
    shutdown_ray()
    summary = write_report(cues, out)
    for line in format_report(summary):
        print(f"[audit] {line}")
    print(out)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Refit a checkpoint's calibration and threshold on a labelled sample from a new site; prints
    cross-fitted figures; last line: the new checkpoint."""
    import torch

    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data import io
    from cxr_ray.data.cache import prepare_cache
    from cxr_ray.drift import StatsCollector
    from cxr_ray.evaluate import predict_split
    from cxr_ray.runtime import init_ray
    from cxr_ray.site_calibration import (calibrate_on_sample, format_calibration, provenance, sample_catalog,
                                          write_calibrated)

    refuse_model_settings(args, "calibrate")
    ckpt = load_checkpoint(args.checkpoint)
    catalog = sample_catalog(args.data)  # too small a sample is refused before Ray
    io.check_location(args.out, "--out")
    if io.exists(args.out):
        raise ConfigError(f"--out {args.out} exists; choose a new folder (a checkpoint is never written over)")
    cfg = ckpt.cfg.replace(**{"data.root": args.data, "data.cache_dir": args.cache or ckpt.cfg.data.cache_dir})
    init_ray(args.address)
    cache = prepare_cache(cfg, catalog, preprocessing=ckpt.preprocessing, training=False)
    precision = ckpt.precision(args.amp, torch.device("cpu"))
    stats = StatsCollector()  # the site's images become the new checkpoint's drift reference
    preds = predict_split(ckpt, cache, "test", precision=precision, stats=stats)
    shutdown_ray()
    result = calibrate_on_sample(ckpt, preds, stats.result())
    out = write_calibrated(ckpt, result, provenance(catalog, args.data, ckpt), args.out, precision)
    for line in format_calibration(result):
        print(line)
    print(out)
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Build an ensemble checkpoint from a tune experiment's top trials or named checkpoints;
    last line: the ensemble checkpoint."""
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data import io
    from cxr_ray.ensemble import EnsembleError, build_ensemble, check_members, format_ensemble, top_k_checkpoints
    from cxr_ray.runtime import init_ray

    refuse_model_settings(args, "ensemble")
    if bool(args.from_experiment) == bool(args.checkpoints):
        raise ConfigError("give --from EXPERIMENT (with --top-k) or --checkpoints CKPT CKPT ..., not both")
    if args.from_experiment and args.top_k < 2:
        raise ConfigError(f"--top-k: expected an int >= 2, got {args.top_k}")
    io.check_location(args.out, "--out")
    if io.exists(args.out):
        raise EnsembleError(f"--out {args.out} exists; choose a new folder (an ensemble is never written over another)")
    sources = top_k_checkpoints(args.from_experiment, args.top_k) if args.from_experiment else args.checkpoints
    members = [load_checkpoint(s) for s in sources]
    check_members(members)  # before Ray
    init_ray(args.address)
    ckpt = build_ensemble(members, args.out, amp=args.amp)
    shutdown_ray()
    for line in format_ensemble(ckpt):
        print(line)
    print(args.out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a split with its own config and stored threshold."""
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data import io
    from cxr_ray.evaluate import evaluate_checkpoint, format_table
    from cxr_ray.runtime import init_ray

    refuse_model_settings(args, "evaluate")
    prevalences = parse_prevalences(args.prevalence)
    ckpt = load_checkpoint(args.checkpoint).with_tta(args.tta)  # a mode without a decision fails here
    root = args.data or ckpt.cfg.data.root
    io.check_location(args.out, "--out")
    init_ray(args.address)
    if args.explain < 0:
        raise ConfigError(f"--explain: expected a count >= 0, got {args.explain}")
    metrics = evaluate_checkpoint(ckpt, root, args.split, args.out, cache_dir=args.cache or "", amp=args.amp,
                                  prevalences=prevalences, explain=args.explain, cue_strata=args.cue_strata)
    shutdown_ray()  # no worker log lines may arrive after the report folder below
    print(format_table(metrics, f"[evaluate] {args.split} split of {root}"))
    if args.explain:
        print(f"[evaluate] Grad-CAM gallery: {io.join(args.out, 'explain', 'index.html')}")
    print(args.out)
    return 0


def parse_prevalences(text: str) -> tuple[float, ...]:
    """``--prevalence 0.05,0.2`` -> (0.05, 0.2); each a share of PNEUMONIA strictly between 0 and 1."""
    values = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        try:
            v = float(part)
        except ValueError:
            v = float("nan")
        if not 0.0 < v < 1.0:
            raise ConfigError(f"--prevalence: {part!r} is not a share of PNEUMONIA between 0 and 1 (e.g. 0.05,0.2)")
        values.append(v)
    return tuple(values)


def cmd_score(args: argparse.Namespace) -> int:
    """Score image folders/globs/manifests into a Parquet dataset; last line: the output folder."""
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data import io
    from cxr_ray.data.listing import check_inputs
    from cxr_ray.evaluate import format_table
    from cxr_ray.runtime import init_ray
    from cxr_ray.score import OutputFolder, check_output, run_score

    cfg = load_config(args.config, args.set + ([f"score.tta={args.tta}"] if args.tta else []))
    # a bad checkpoint, or a TTA mode it has no threshold for, fails here, before listing and Ray
    ckpt = load_checkpoint(args.checkpoint).with_tta(cfg.score.tta)
    io.check_location(args.output, "--output")
    check_inputs(args.input)  # fails fast on a missing input, before Ray (listed later, in a stream)
    check_output(OutputFolder(args.output), ckpt.model_id, args.with_labels, args.resume)  # before Ray
    explain_dir = check_explain_flags(args)
    init_ray(args.address)
    try:
        summary = run_score(ckpt, args.input, args.output, cfg.score,
                            resume=args.resume, with_labels=args.with_labels, limits=cfg.data)
    except KeyboardInterrupt:
        print(f"cxr-ray score: interrupted; finished rows are committed in {args.output}. "
              f"Re-run with --resume to score the rest.", file=sys.stderr)
        return 130
    explained = explain_job(ckpt, args.output, explain_dir, args.explain_top, cfg.score) if explain_dir else None
    shutdown_ray()
    if summary.failed:
        print(f"[score] {summary.failed} file(s) could not be scored (their rows have the error column set):")
        for path, err in summary.failures[:20]:
            print(f"  - {path}: {err}")
        if summary.failed > 20:
            print(f"  ... and {summary.failed - 20} more: read them with error IS NOT NULL")
    if summary.metrics is not None:
        print(format_table(summary.metrics, f"[score] metrics over the labelled rows of {args.output}"))
    if summary.drift is not None:
        from cxr_ray.drift import format_drift

        for line in format_drift(summary.drift):
            print(f"[score] {line}")
    print(summary.format())
    if explained is not None:
        print(f"[score] Grad-CAM of {explained['what']}: {explained['explained']} overlay(s), "
              f"{len(explained['failed'])} could not be read; gallery: {explained['index']}")
    print(args.output)
    return 0


def check_explain_flags(args: argparse.Namespace) -> str:
    """``score --explain-dir/--explain-top``, checked before Ray: the folder (absolute, so every
    actor writes to the same place) or ""."""
    from cxr_ray.data import io
    from cxr_ray.explain import require_captum

    if args.explain_top < 0:
        raise ConfigError(f"--explain-top: expected a count >= 0, got {args.explain_top}")
    if not args.explain_dir:
        if args.explain_top:
            raise ConfigError("--explain-top needs --explain-dir (where the overlays go)")
        return ""
    io.check_location(args.explain_dir, "--explain-dir")
    require_captum("--explain-dir: Grad-CAM")
    return io.absolute(args.explain_dir)


def explain_job(ckpt: Any, output: str, explain_dir: str, top: int, score: Any) -> dict[str, Any]:
    """Grad-CAM overlays of a finished scoring job's positive predictions (or ``top`` highest),
    by as many Ray Data actors as the job had, each with the job's CPUs per actor."""
    from cxr_ray.explain import explain_scored
    from cxr_ray.runtime import cpu_share
    from cxr_ray.score import OutputFolder

    scored = OutputFolder(output).read(["path", "prob_pneumonia", "threshold", "error"]).to_pandas()
    print(f"[score] Grad-CAM overlays -> {explain_dir}", flush=True)
    cpus = score.cpus_per_actor or cpu_share(0.0, score.num_actors)  # Grad-CAM runs on CPU
    return explain_scored(ckpt, scored, explain_dir, top, actors=score.num_actors, cpus_per_actor=cpus)


def cmd_explain(args: argparse.Namespace) -> int:
    """Grad-CAM overlays of images and an index.html gallery; last line: the output folder."""
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data.listing import list_inputs
    from cxr_ray.explain import explain_files, summary, write_gallery

    ckpt = load_checkpoint(args.checkpoint)
    listing = list_inputs(args.input)  # a missing input fails here, naming it
    paths, errors = listing["path"].tolist(), listing["error"].fillna("").tolist()
    print(f"[explain] {len(paths)} file(s), {ckpt.cfg.model.name}, {ckpt.preprocessing.describe()}", flush=True)
    items = explain_files(ckpt, paths, errors, on_batch=lambda n: print(f"[explain] {n}/{len(paths)}", flush=True)
                          if len(paths) > 64 else None)
    index = write_gallery(items, args.out, f"cxr_ray Grad-CAM: {ckpt.model_id}")
    c = summary(items)
    print(f"[explain] {c['explained']} explained ({c['pneumonia']} PNEUMONIA, {c['explained'] - c['pneumonia']} "
          f"NORMAL at threshold {ckpt.threshold:.4f}); {c['failed']} could not be read")
    for it in [it for it in items if it.error][:20]:
        print(f"  - {it.path}: {it.error}")
    print(f"[explain] gallery: {index}")
    print(args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint as ONNX or TorchScript with its JSON contract; last line: the folder."""
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data import io
    from cxr_ray.export import FORMATS, SIDECAR, export_checkpoint

    refuse_model_settings(args, "export")
    ckpt = load_checkpoint(args.checkpoint)
    io.check_location(args.out, "--out")
    meta = export_checkpoint(ckpt, args.format, args.out)
    art, inp, dec = meta["artifacts"][args.format], meta["input"], meta["decision"]
    diff = art["parity_max_abs_logit_diff"]
    print(f"[export] {ckpt.model_id} -> {io.join(args.out, FORMATS[args.format])} ({art['exporter']})")
    shape = "(" + ", ".join(map(str, inp["shape"])) + ")"
    print(f"[export] input {inp['name']}: float32 {shape}, 8-bit gray / 255, "
          f"normalisation inside the model ({ckpt.preprocessing.describe()}); output {meta['output']['name']}: "
          f"PNEUMONIA logit; PNEUMONIA when {dec['probability']} >= {dec['threshold']:.6g}")
    print("[export] parity with the checkpoint (fp32, 3 random images): "
          + (f"max |logit difference| {diff:.2e}" if diff is not None else
             "not checked (onnxruntime is not installed: pip install 'cxr_ray[onnx]')"))
    print(f"[export] contract: {io.join(args.out, SIDECAR)}")
    print(args.out)
    return 0


DEMO_OVERRIDES = {
    # Small enough for a 2-core laptop in a few minutes, and it learns: the from-scratch CNN on
    # 64 px synthetic images (ResNet-50 from random weights learns nothing in 3 CPU epochs).
    # The non-demo default searches ResNet-50 unfreeze depth, dropout and lr.
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


DEMO_DATA = {"n": 900, "size": 96, "seed": 0, "split_shares": {"train": 0.6, "val": 0.15, "test": 0.25}}


def demo_dataset(cfg: ExperimentConfig) -> str:
    """The synthetic demo dataset under the cache folder, generated on first use: 900 images,
    ~225 of them in test so the test report's CIs mean something. A URI cache folder gets it
    generated locally and uploaded, so every node of a cluster reads the same images."""
    import tempfile

    from cxr_ray.data import io
    from cxr_ray.data.synthetic import make_synthetic_dataset

    root = io.join(io.absolute(cfg.data.resolved_cache_dir), "demo-synthetic-900")
    if io.exists(io.join(root, ".complete")):
        return root
    # a folder left by an interrupted first run is rewritten
    if not io.is_uri(root):
        make_synthetic_dataset(root, **DEMO_DATA)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            io.copy_tree(str(make_synthetic_dataset(Path(tmp) / "demo", **DEMO_DATA)), root)
    io.write_bytes(io.join(root, ".complete"), b"ok")
    return root


def tune_config_from_args(args: argparse.Namespace) -> tuple[ExperimentConfig, str | None]:
    """Config for ``tune``: --resume reads the experiment's saved config; --demo sets small sizes."""
    from cxr_ray.tune import read_experiment_config

    if args.resume:
        cfg, cache_uri = read_experiment_config(args.resume)
        return cfg, cache_uri
    cfg = config_from_args(args)
    if args.demo:
        user = dict(parse_override(o) for o in args.set)  # the user's --set still wins
        cfg = cfg.replace(**{**DEMO_OVERRIDES, **user})
        if not args.data:
            cfg = cfg.replace(**{"data.root": demo_dataset(cfg)})
    return cfg, None


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune search; prints the ranked trials and, last, the best checkpoint's path."""
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data import io
    from cxr_ray.data.cache import open_cache, prepare_cache
    from cxr_ray.data.catalog import assign_splits, check_patient_leaks, load_catalog
    from cxr_ray.evaluate import evaluate_checkpoint, format_table
    from cxr_ray.runtime import init_ray
    from cxr_ray.train import run_name
    from cxr_ray.tta import format_decisions
    from cxr_ray.tune import format_trials, model_variants, run_tune, validate_search_space, with_shared_cache_size
    from cxr_ray.weights import ensure_available

    cfg, cache_uri = tune_config_from_args(args)
    validate_search_space(cfg)
    if not cache_uri:  # (--resume: the experiment's saved config has it)
        cfg = with_shared_cache_size(cfg)
    for variant in model_variants(cfg):  # every backbone the search can pick, before Ray
        ensure_available(variant.model.name, variant.model.weights, variant.model.weights_format)
    if args.ensemble_top_k is None:  # the demo shows an ensemble of its best 3 trials
        k = min(3, cfg.tune.num_samples) if args.demo and not args.resume else 0
        args.ensemble_top_k = k if k >= 2 else 0
    if args.ensemble_top_k and not 2 <= args.ensemble_top_k <= cfg.tune.num_samples:
        raise ConfigError(f"--ensemble-top-k: expected 0 or an int in [2, tune.num_samples = "
                          f"{cfg.tune.num_samples}], got {args.ensemble_top_k}")
    check_storage(cfg, "data.root", "data.cache_dir", "train.storage_path")
    if cache_uri:  # --resume: the experiment's own cache
        init_ray(args.address)
        cache = open_cache(cache_uri)
    else:
        catalog = assign_splits(load_catalog(cfg.data.root), cfg.data)  # fail fast, before Ray
        for line in check_patient_leaks(catalog):
            print(f"[data] {line}", flush=True)
        init_ray(args.address)
        cache = prepare_cache(cfg, catalog)
    name = io.name(args.resume) if args.resume else (cfg.tune.name or run_name(cfg, "tune"))
    if args.resume:
        cfg = cfg.replace(**{"train.storage_path": io.parent(args.resume)})
    outcome = run_tune(cfg, cache.uri, name, resume=bool(args.resume), mlflow_uri=args.mlflow)
    print(f"[tune] {len(outcome.trials)} trials, {outcome.n_failed} failed; ranked by {cfg.tune_metric}:")
    print(format_trials(outcome.trials, cfg.tune_metric))
    if outcome.best_checkpoint is None:
        print("[tune] no trial produced a checkpoint", file=sys.stderr)
        return 1
    tta = fit_tta(outcome.best_checkpoint, cache, cfg)
    best = load_checkpoint(outcome.best_checkpoint)
    for line in format_decisions(tta, best.meta.get("metrics"), prefix="[tune] best trial, TTA"):
        print(line)
    ensemble = tune_ensemble(outcome.experiment_uri, args.ensemble_top_k, cache) if args.ensemble_top_k else None
    if sum(cache.split_counts("test")):
        report = io.join(outcome.experiment_uri, "best_test_report")
        metrics = evaluate_checkpoint(best, cfg.data.root, "test", report, cache_dir=cfg.data.cache_dir)
        print(format_table(metrics, f"[tune] best model on the test split (report: {report})"))
        if ensemble:
            report = io.join(outcome.experiment_uri, "ensemble_test_report")
            m = evaluate_checkpoint(load_checkpoint(ensemble), cfg.data.root, "test", report,
                                    cache_dir=cfg.data.cache_dir)
            print(f"[tune] ensemble on the test split: roc_auc {m['roc_auc']:.4f}, recall {m['recall']:.4f}, "
                  f"specificity {m['specificity']:.4f}, accuracy {m['accuracy']:.4f} at its threshold "
                  f"{m['threshold']:.4f} (report: {report})")
    shutdown_ray()
    print(f"[tune] experiment folder: {outcome.experiment_uri}")
    print(outcome.best_checkpoint)
    return 0


def tune_ensemble(experiment: str, k: int, cache: Any) -> str | None:
    """``<experiment>/ensemble-top<k>``: the ensemble of the experiment's ``k`` best trials
    (replaced on --resume); a search that cannot give one (too few checkpoints, members that
    differ in preprocessing) says why on stderr and keeps its best checkpoint."""
    from cxr_ray.data import io
    from cxr_ray.ensemble import EnsembleError, build_ensemble, format_ensemble, top_k_checkpoints

    out = io.join(experiment, f"ensemble-top{k}")
    try:
        ckpt = build_ensemble(top_k_checkpoints(experiment, k), out, cache=cache, replace=True)
    except EnsembleError as e:
        print(f"[tune] no ensemble: {e}", file=sys.stderr)
        return None
    for line in format_ensemble(ckpt):
        print(line.replace("[ensemble]", "[tune] ensemble"))
    print(f"[tune] ensemble of the top {k} trials: {out}")
    return out


def _tta_flag(p: argparse.ArgumentParser, default: str | None = "none") -> None:
    from cxr_ray.config import TTA_MODES

    p.add_argument("--tta", default=default, choices=TTA_MODES,
                   help="test-time augmentation: mean logit over the image and its mirror (hflip) or five "
                        "crops (crop5), with the temperature and threshold the checkpoint chose on validation "
                        "for that mode" + (" (default: score.tta, none)" if default is None else " (default none)"))


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="cxr-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-synthetic", help="write a synthetic dataset (for demos and tests)")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("prepare", help="decode every image once into the Parquet cache")
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model on Ray Train; last line: best checkpoint")
    _common(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its latest checkpoint (same config)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune search over unfreeze depth, dropout, lr (ASHA + Optuna)")
    _common(p)
    p.add_argument("--demo", action="store_true",
                   help="small real search on generated synthetic data: local Ray, no downloads")
    p.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue an interrupted experiment")
    p.add_argument("--mlflow", metavar="URI", help="also log trials to MLflow (needs the mlflow extra)")
    p.add_argument("--ensemble-top-k", type=int, default=None, metavar="K",
                   help="also write ensemble-topK/: one checkpoint averaging the K best trials' logits, "
                        "its threshold chosen on validation (K >= 2; default 0, 3 with --demo)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="metrics, predictions and plots of a checkpoint on a split")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (from train or tune)")
    p.add_argument("--data", help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--cache", help="cache folder (default: the checkpoint config's)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help="output folder or URI")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="model precision (default auto: the precision the checkpoint's threshold was "
                        "chosen in, where this CPU runs it fast)")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="also write a Grad-CAM gallery (explain/index.html) of the N most confident true "
                        "positives, false positives and false negatives (needs the explain extra)")
    p.add_argument("--prevalence", default="", metavar="P[,P...]",
                   help="also give PPV/NPV of each operating point at these shares of PNEUMONIA, e.g. 0.05,0.2")
    p.add_argument("--cue-strata", action="store_true",
                   help="also measure the audit's acquisition/framing cues of every image and report the "
                        "model's ROC-AUC within cue-matched strata (does it still separate the classes "
                        "where the cues cannot?); needs >= 5 patients per class")
    _tta_flag(p)
    _config_and_address(p)  # only the config's storage: section applies (the model brings its own)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score image folders/globs/manifests to Parquet (Ray Data)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (from train or tune)")
    p.add_argument("--input", action="append", required=True, metavar="PATH_OR_URI",
                   help="folder (recursive), glob, or CSV/Parquet manifest with a 'path' column; "
                        "local or s3:// / gs:// (repeatable)")
    p.add_argument("--output", required=True, help="output folder or URI for the Parquet dataset")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted job: score only files not yet in --output")
    p.add_argument("--with-labels", action="store_true",
                   help="add the true label from NORMAL/PNEUMONIA folders and print metrics")
    p.add_argument("--explain-dir", metavar="DIR",
                   help="also write Grad-CAM overlays of the positive predictions and an index.html there "
                        "(Ray Data actors, after scoring; needs the explain extra)")
    p.add_argument("--explain-top", type=int, default=0, metavar="K",
                   help="with --explain-dir: the K highest probabilities instead of every positive")
    _tta_flag(p, default=None)
    _config_and_address(p)  # the config's score: section sets the scale
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("explain", help="Grad-CAM overlays (where the model looked) and an index.html gallery")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (from train or tune)")
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="image file, folder (recursive), glob or CSV/Parquet manifest (repeatable)")
    p.add_argument("--out", required=True, help="output folder: one overlay PNG per image and index.html")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="export a checkpoint as ONNX or TorchScript with its JSON contract")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (from train or tune)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"],
                   help="onnx (needs the onnx extra) or torchscript")
    p.add_argument("--out", required=True, help="output folder or URI (model file + model.json)")
    _config_and_address(p)  # only the config's storage: section applies
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("fit-tta", help="choose TTA modes' temperature and threshold on a checkpoint's validation split")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (it is updated in place)")
    p.add_argument("--tta", required=True, metavar="MODE[,MODE]", help="hflip, crop5 or hflip,crop5")
    p.add_argument("--data", help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--cache", help="cache folder (default: the checkpoint config's)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="model precision (default auto: the checkpoint threshold's own, where fast)")
    _config_and_address(p)
    p.set_defaults(func=cmd_fit_tta)

    p = sub.add_parser("audit", help="acquisition/framing cues by class and split, and a cue-only classifier "
                                     "(could a network separate the classes without the lungs?)")
    _common(p)
    p.add_argument("--out", help="report folder (default ./audit): cues.parquet, compare.csv, cues.png, summary.json")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("calibrate", help="refit a checkpoint's calibration and threshold on a new site's "
                                         "labelled sample; last line: the new checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (from train, tune or ensemble)")
    p.add_argument("--data", required=True,
                   help="the site's labelled sample: SITE/{NORMAL,PNEUMONIA}/*, a root with split folders "
                        "(all its images), or a CSV/Parquet manifest with path,label[,patient]")
    p.add_argument("--out", required=True, help="new folder or URI for the calibrated checkpoint")
    p.add_argument("--cache", help="cache folder (default: the checkpoint config's)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="model precision (default auto: the checkpoint threshold's own, where fast)")
    _config_and_address(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("ensemble", help="one checkpoint averaging the logits of a tune run's top trials")
    p.add_argument("--from", dest="from_experiment", metavar="EXPERIMENT",
                   help="tune experiment folder (runs/<tune name>): its best trials by the tune metric")
    p.add_argument("--top-k", type=int, default=3, help="how many of its trials (default 3)")
    p.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="or: these checkpoints")
    p.add_argument("--out", required=True, help="new folder or URI for the ensemble checkpoint")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="precision of the validation pass (default auto: the first member's, where fast)")
    _config_and_address(p)
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("inspect", help="counts per split/class, patients, sizes, problems")
    _common(p)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-ray``; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from cxr_ray.checkpoint import CheckpointError
    from cxr_ray.data.catalog import DataError
    from cxr_ray.weights import WeightsError
    from cxr_ray.data.io import StorageError
    from cxr_ray.ensemble import EnsembleError
    from cxr_ray.explain import ExplainError
    from cxr_ray.export import ExportError
    from cxr_ray.runtime import ClusterError

    try:
        use_storage_from_args(args)
        return func(args)
    except (ConfigError, DataError, CheckpointError, WeightsError, ClusterError, StorageError,
            ExportError, ExplainError, EnsembleError) as e:
        print(f"cxr-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a Ray worker's failure, or a bug: one line + the log
        print(f"cxr-ray {args.command}: failed: {describe_failure(e)}\n"
              f"  full traceback: {write_failure_log(args.command, e)}", file=sys.stderr)
        return 1


def root_cause(e: BaseException) -> BaseException:
    """The exception that started it, unwrapped from Ray's wrappers: Train V2's
    ``WorkerGroupError.worker_failures`` / ``ControllerError.controller_failure``, a
    ``RayTaskError``'s ``cause`` (Ray Data tasks and actors), then ``__cause__`` chains."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None)
        inner = (failures[min(failures)] if failures else
                 getattr(e, "controller_failure", None) or getattr(e, "cause", None) or e.__cause__)
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def describe_failure(e: BaseException) -> str:
    """One line for the user: the root cause's type and first message line, and where it ran."""
    cause = root_cause(e)
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip() and not ln.startswith("Traceback")]
    where = " (in a Ray worker)" if cause is not e else ""
    text = lines[0] if lines else ""
    return f"{type(cause).__name__}: {text[:300]}{where}".rstrip(": ")


def write_failure_log(command: str, e: BaseException) -> str:
    """Write the whole traceback (Ray's remote tracebacks included) to a log file; its path."""
    import time
    import traceback

    from cxr_ray.config import DataConfig

    folder = os.path.join(DataConfig().resolved_cache_dir, "logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"cxr-ray-{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log")
    with open(path, "w") as f:
        f.write("".join(traceback.format_exception(e)))
        f.write("\nRay's own logs (local Ray): /tmp/ray/session_latest/logs\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
