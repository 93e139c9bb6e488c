"""The ``cxr-ray`` command: one subcommand per job, all driven by one ExperimentConfig.

Every subcommand accepts ``--config FILE`` and repeated ``--set key=value`` overrides; the
config is loaded and validated before Ray starts. ``experiments/*.py`` are thin wrappers.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
import traceback
from typing import Callable, Sequence

import cxr_ray
from cxr_ray.config import PRECISIONS, ExperimentConfig, load_config, parse_override, parse_tta_modes
from cxr_ray.errors import ConfigError, CxrRayError


def _config_and_address(p: argparse.ArgumentParser, example: str = "train.epochs=5") -> None:
    p.add_argument("--config", help="YAML config file (see configs/; `cxr-ray config` prints every key)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {example} (repeatable; a key this command "
                        f"does not read is refused)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a cluster "
                   "running on this node, else a new local Ray)")


def _common(p: argparse.ArgumentParser, example: str = "data.val_fraction=0.1") -> None:
    _config_and_address(p, example)
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
    from cxr_ray.storage import uri as store

    if not hasattr(args, "set"):
        return
    storage_sets = [o for o in args.set if o.split("=", 1)[0].strip().startswith("storage.")]
    store.use_endpoint(load_config(args.config, storage_sets).storage.endpoint_url)


_TRAINING = ("data.", "model.", "train.", "augment.", "metric.", "storage.")
_CHECKPOINT = ("storage.",)
# The config keys (prefixes) each command reads, and why the others do nothing there: a --set of
# a key a command ignores is refused, never silently dropped.
COMMAND_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "train": (_TRAINING, "train does not search (tune.*) or score (score.*)"),
    "tune": (_TRAINING + ("tune.",), "tune does not score (score.*)"),
    "prepare": (("data.", "model.", "storage."), "prepare decodes the data (data.*) at the size the model "
                                                  "(model.*) needs"),
    "inspect": (("data.", "model.", "storage."), "inspect reads the data (data.*) at the size the model "
                                                  "(model.*) needs"),
    "audit": (("data.", "storage."), "audit measures the data (data.*)"),
    "score": (("score.", "storage.", "data.max_pixels", "data.read_timeout_s", "data.max_file_mb",
               "data.stall_timeout_s"),
              "score applies the checkpoint's own model and preprocessing; it reads score.*, storage.*, the "
              "file limits data.max_pixels, data.read_timeout_s, data.max_file_mb and data.stall_timeout_s"),
    **{c: (_CHECKPOINT, f"{c} uses the checkpoint's own config; only storage.* may be set")
       for c in ("evaluate", "export", "fit-tta", "calibrate", "ensemble")},
    "config": (("",), ""),
}


def check_set_keys(args: argparse.Namespace) -> None:
    """A :class:`ConfigError` naming each ``--set`` key the command does not read, and why."""
    allowed, why = COMMAND_KEYS.get(args.command, (("",), ""))
    bad = [o.split("=", 1)[0].strip() for o in getattr(args, "set", [])
           if not any(o.split("=", 1)[0].strip().startswith(a) for a in allowed)]
    if bad:
        raise ConfigError(f"--set {', '.join(bad)}: not read by {args.command} ({why})")


def shutdown_ray() -> None:
    """Stop (or leave) the Ray this command started (or joined), so no late worker logs follow
    our final output; a Ray session of a caller of :func:`main` stays up."""
    from cxr_ray.cluster import release_ray

    release_ray()


def say(line: str) -> None:
    """A progress line of a running command (the workflows' ``say``): on stderr, with the logs,
    so that stdout holds only results."""
    print(line, file=sys.stderr, flush=True)


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    """Write a synthetic dataset in the Kermany layout."""
    from cxr_ray.data.synthetic import make_synthetic_dataset
    from cxr_ray.storage import uri as store

    if store.is_uri(args.out):
        raise ConfigError(f"make-synthetic writes a local folder, not {args.out}; write it here, then "
                          f"upload it (aws s3 sync / gcloud storage cp -r)")
    root = make_synthetic_dataset(args.out, n=args.n, size=args.image_size, seed=args.seed)
    print(f"wrote a SYNTHETIC dataset (not medical images) to {root}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Decode every image once into the Parquet cache (reused when unchanged)."""
    from cxr_ray.apps import workflows
    from cxr_ray.data.cache import format_dataset_report

    cache = workflows.prepare(config_from_args(args), args.address, say=say)
    shutdown_ray()  # no worker log lines may arrive after the cache URI below
    print(format_dataset_report(cache.meta))
    print(cache.uri)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print counts, patients, sizes and problems (builds or reuses the cache)."""
    from cxr_ray.apps import workflows
    from cxr_ray.data.cache import format_dataset_report

    cache = workflows.prepare(config_from_args(args), args.address, say=say)
    shutdown_ray()
    print(format_dataset_report(cache.meta))
    return 0


def train_config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Config for ``train``; with ``--resume RUN_DIR``, the run's own config.yaml (plus any
    --config/--set given, which ``run_training`` then refuses if they change what is trained)."""
    from cxr_ray.config import apply_overrides
    from cxr_ray.storage import uri as store
    from cxr_ray.training.train import read_run_config

    if not args.resume:
        return config_from_args(args)
    run_dir = args.resume.rstrip("/")
    base = load_config(args.config) if args.config else read_run_config(run_dir)
    cfg = apply_overrides(base, dict(parse_override(o) for o in _overrides(args)))
    return cfg.replace(**{"train.storage_path": store.parent(run_dir), "train.name": store.name(run_dir)})


def cmd_train(args: argparse.Namespace) -> int:
    """Train on Ray Train, then fit the TTA decisions. Progress and the summary go to stderr; stdout
    is the best checkpoint's path only (RUN/best), so CKPT=$(cxr-ray train ...) captures it."""
    from cxr_ray.apps import workflows
    from cxr_ray.apps.tta import format_decisions

    out = workflows.train(train_config_from_args(args), args.address, resume=bool(args.resume), say=say)
    shutdown_ray()  # no worker log lines may arrive after the checkpoint path below
    if out.best_checkpoint is None:
        print("cxr-ray train: the run produced no checkpoint", file=sys.stderr)
        return 1
    b, cfg, selection = out.best_metrics, out.cfg, out.cfg.metric.selection
    say(f"[train] {out.epochs_run} epoch(s); best epoch {b['epoch'] + 1}: val roc_auc "
        f"{b['roc_auc']:.4f}, pAUC {b['pauc']:.4f} ({selection} {b[selection]:.4f}); recall "
        f"{b['recall']:.4f} and specificity {b['specificity']:.4f} (95% lower bound "
        f"{b['specificity_lower_bound']:.4f}) at threshold {b['threshold']:.4f}, chosen by "
        f"{cfg.metric.threshold_rule} on {b['n']} validation images")
    if cfg.metric.calibrate and "temperature" in b:  # (checkpoints of runs started before it: absent)
        say(f"[train] probabilities calibrated on validation ({cfg.metric.calibration}): temperature "
            f"{b['temperature']:.3f}, bias {b.get('logit_bias', 0.0):+.3f}, ECE {b['val_ece_before']:.4f} -> "
            f"{b['val_ece']:.4f}")
    for line in format_decisions(out.tta, prefix="[train] TTA"):
        say(line)
    say(f"[train] run folder: {out.run_dir}; the best epoch's checkpoint {out.source_checkpoint} is copied to")
    print(out.best_checkpoint)
    return 0


def cmd_fit_tta(args: argparse.Namespace) -> int:
    """Choose TTA modes' temperatures and thresholds on a checkpoint's validation split and store
    them in it; last line: the checkpoint."""
    from cxr_ray.apps import workflows
    from cxr_ray.apps.tta import format_decisions

    ckpt, decisions = workflows.fit_tta_on(args.checkpoint, parse_tta_modes(args.tta, "--tta"), args.data or "",
                                           args.cache or "", args.amp, args.address)
    shutdown_ray()
    for line in format_decisions(decisions, ckpt.info.metrics, prefix="[fit-tta]"):
        print(line)
    print(args.checkpoint)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Acquisition and framing cues by class and split, and how well they alone separate the
    classes (a shortcut a network could learn); last line: the report folder."""
    from cxr_ray.apps import workflows
    from cxr_ray.apps.audit import format_report

    out = args.out or os.path.join(os.getcwd(), "audit")
    summary = workflows.audit(config_from_args(args), out, args.address, say=say)
    shutdown_ray()
    for line in format_report(summary):
        print(f"[audit] {line}")
    print(out)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Refit a checkpoint's calibration and threshold on a labelled sample from a new site; prints
    cross-fitted figures; last line: the new checkpoint."""
    from cxr_ray.apps import workflows
    from cxr_ray.apps.calibrate import format_calibration

    out, result = workflows.calibrate(args.checkpoint, args.data, args.out, args.cache or "", args.amp, args.address)
    shutdown_ray()
    for line in format_calibration(result):
        print(line)
    print(out)
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Build an ensemble checkpoint from a tune experiment's top trials or named checkpoints;
    last line: the ensemble checkpoint."""
    from cxr_ray.apps import workflows
    from cxr_ray.apps.ensemble import format_ensemble

    ckpt = workflows.ensemble(args.out, args.from_experiment or "", args.top_k, args.checkpoints, args.amp,
                              args.address)
    shutdown_ray()
    for line in format_ensemble(ckpt):
        print(line)
    print(args.out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a split with its own config and stored threshold."""
    from cxr_ray.apps.evaluate import evaluate_checkpoint, format_table
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.cluster import init_ray
    from cxr_ray.storage import uri as store

    prevalences = parse_prevalences(args.prevalence)
    ckpt = load_checkpoint(args.checkpoint).with_tta(args.tta)  # a mode without a decision fails here
    root = args.data or ckpt.cfg.data.root
    store.check_location(args.out, "--out")
    if args.explain < 0:
        raise ConfigError(f"--explain: expected a count >= 0, got {args.explain}")
    init_ray(args.address)
    metrics = evaluate_checkpoint(ckpt, root, args.split, args.out, cache_dir=args.cache or "", amp=args.amp,
                                  prevalences=prevalences, explain=args.explain, cue_strata=args.cue_strata)
    shutdown_ray()  # no worker log lines may arrive after the report folder below
    print(format_table(metrics, f"[evaluate] {args.split} split of {root}"))
    if args.explain:
        print(f"[evaluate] Grad-CAM gallery: {store.join(args.out, 'explain', 'index.html')}")
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
    from cxr_ray.apps import workflows
    from cxr_ray.apps.evaluate import format_table
    from cxr_ray.apps.score.job import run_score
    from cxr_ray.apps.score.output import OutputFolder, check_output
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.cluster import init_ray
    from cxr_ray.data.listing import check_inputs
    from cxr_ray.storage import uri as store

    cfg = load_config(args.config, args.set + ([f"score.tta={args.tta}"] if args.tta else []))
    # a bad checkpoint, or a TTA mode it has no threshold for, fails here, before listing and Ray
    ckpt = load_checkpoint(args.checkpoint).with_tta(cfg.score.tta)
    store.check_location(args.out, "--out")
    check_inputs(args.input)  # fails fast on a missing input, before Ray (listed later, in a stream)
    check_output(OutputFolder(args.out), ckpt.model_id, args.with_labels, args.resume)  # before Ray
    explain_dir = check_explain_flags(args)
    init_ray(args.address)
    try:
        summary = run_score(ckpt, args.input, args.out, cfg.score,
                            resume=args.resume, with_labels=args.with_labels, limits=cfg.data)
    except KeyboardInterrupt:
        print(f"cxr-ray score: interrupted; finished rows are committed in {args.out}. "
              f"Re-run with --resume to score the rest.", file=sys.stderr)
        return 130
    explained = (workflows.explain_scoring_job(ckpt, args.out, explain_dir, args.explain_top, cfg.score, say=say)
                 if explain_dir else None)
    shutdown_ray()
    if summary.failed:
        print(f"[score] {summary.failed} file(s) could not be scored (their rows have the error column set):")
        for path, err in summary.failures[:20]:
            print(f"  - {path}: {err}")
        if summary.failed > 20:
            print(f"  ... and {summary.failed - 20} more: read them with error IS NOT NULL")
    if summary.metrics is not None:
        print(format_table(summary.metrics, f"[score] metrics over the labelled rows of {args.out}"))
    if summary.drift is not None:
        from cxr_ray.analysis.drift import format_drift

        for line in format_drift(summary.drift):
            print(f"[score] {line}")
    print(summary.format())
    if explained is not None:
        print(f"[score] Grad-CAM of {explained['what']}: {explained['explained']} overlay(s), "
              f"{len(explained['failed'])} could not be read; gallery: {explained['index']}")
    print(args.out)
    return 0


def check_explain_flags(args: argparse.Namespace) -> str:
    """``score --explain-dir/--explain-top``, checked before Ray: the folder (absolute, so every
    actor writes to the same place) or ""."""
    from cxr_ray.apps.explain import require_captum
    from cxr_ray.storage import uri as store

    if args.explain_top < 0:
        raise ConfigError(f"--explain-top: expected a count >= 0, got {args.explain_top}")
    if not args.explain_dir:
        if args.explain_top:
            raise ConfigError("--explain-top needs --explain-dir (where the overlays go)")
        return ""
    store.check_location(args.explain_dir, "--explain-dir")
    require_captum("--explain-dir: Grad-CAM")
    return store.absolute(args.explain_dir)


def cmd_explain(args: argparse.Namespace) -> int:
    """Grad-CAM overlays of images and an index.html gallery; last line: the output folder."""
    from cxr_ray.apps.explain import explain_files, summary, write_gallery
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.data.listing import list_inputs

    ckpt = load_checkpoint(args.checkpoint)
    listing = list_inputs(args.input)  # a missing input fails here, naming it
    paths, errors = listing["path"].tolist(), listing["error"].fillna("").tolist()
    say(f"[explain] {len(paths)} file(s), {ckpt.cfg.model.name}, {ckpt.preprocessing.describe()}")
    items = explain_files(ckpt, paths, errors, on_batch=lambda n: say(f"[explain] {n}/{len(paths)}")
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
    from cxr_ray.apps.export import FORMATS, SIDECAR, export_checkpoint
    from cxr_ray.checkpoint import load_checkpoint
    from cxr_ray.storage import uri as store

    ckpt = load_checkpoint(args.checkpoint)
    store.check_location(args.out, "--out")
    meta = export_checkpoint(ckpt, args.format, args.out)
    art, inp, dec = meta["artifacts"][args.format], meta["input"], meta["decision"]
    diff = art["parity_max_abs_logit_diff"]
    print(f"[export] {ckpt.model_id} -> {store.join(args.out, FORMATS[args.format])} ({art['exporter']})")
    shape = "(" + ", ".join(map(str, inp["shape"])) + ")"
    print(f"[export] input {inp['name']}: float32 {shape}, 8-bit gray / 255, "
          f"normalisation inside the model ({ckpt.preprocessing.describe()}); output {meta['output']['name']}: "
          f"PNEUMONIA logit; PNEUMONIA when {dec['probability']} >= {dec['threshold']:.6g}")
    print("[export] parity with the checkpoint (fp32, 3 random images): "
          + (f"max |logit difference| {diff:.2e}" if diff is not None else
             "not checked (onnxruntime is not installed: pip install 'cxr_ray[onnx]')"))
    print(f"[export] contract: {store.join(args.out, SIDECAR)}")
    print(args.out)
    return 0


def tune_config_from_args(args: argparse.Namespace) -> tuple[ExperimentConfig, str | None]:
    """Config for ``tune``: --resume reads the experiment's saved config; --demo sets small sizes."""
    from cxr_ray.apps.workflows import demo_config
    from cxr_ray.training.tune import read_experiment_config

    if args.resume:  # the experiment's own config: settings given now would be ignored, so they are refused
        given = [o for o in _overrides(args) if not o.startswith("storage.")] + (["--config"] if args.config else [])
        if given or args.demo:
            raise ConfigError(f"tune --resume continues the experiment with its own saved config; remove "
                              f"{given + (['--demo'] if args.demo else [])} (only --set storage.* applies)")
        cfg, cache_uri = read_experiment_config(args.resume)
        return cfg, cache_uri
    cfg = config_from_args(args)
    if args.demo:  # the user's --set and shortcut flags (--data, --cache, --size) win over the demo's sizes
        cfg = demo_config(cfg, dict(parse_override(o) for o in _overrides(args)), data_given=bool(args.data))
    return cfg, None


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune search, then TTA, an ensemble and the test reports; prints the ranked trials and,
    last, the best checkpoint's path."""
    from cxr_ray.apps import workflows
    from cxr_ray.apps.ensemble import format_ensemble
    from cxr_ray.apps.evaluate import format_table
    from cxr_ray.apps.tta import format_decisions
    from cxr_ray.training.tune import format_trials

    cfg, cache_uri = tune_config_from_args(args)
    k = args.ensemble_top_k
    if k is None:  # the demo shows an ensemble of its best 3 trials
        k = min(3, cfg.tune.num_samples) if args.demo and not args.resume else 0
        k = k if k >= 2 else 0
    out = workflows.tune(cfg, args.address, resume=args.resume or "", cache_uri=cache_uri or "",
                         mlflow_uri=args.mlflow, ensemble_top_k=k, say=say)
    shutdown_ray()  # no worker log lines may arrive after the paths below
    print(f"[tune] {len(out.trials)} trials, {out.n_failed} failed; ranked by {cfg.tune_metric}:")
    print(format_trials(out.trials))
    if out.best_checkpoint is None:
        print("[tune] no trial produced a checkpoint", file=sys.stderr)
        return 1
    for line in format_decisions(out.tta, out.best.info.metrics, prefix="[tune] best trial, TTA"):
        print(line)
    if out.ensemble_error:
        print(f"[tune] no ensemble: {out.ensemble_error}", file=sys.stderr)
    if out.ensemble is not None:
        for line in format_ensemble(out.ensemble):
            print(line.replace("[ensemble]", "[tune] ensemble"))
        print(f"[tune] ensemble of the top {k} trials: {out.ensemble.path}")
    if "best" in out.reports:
        print(format_table(out.reports["best"], f"[tune] best model on the test split "
                                                f"(report: {out.report_dirs['best']})"))
    if "ensemble" in out.reports:
        m = out.reports["ensemble"]
        print(f"[tune] ensemble on the test split: roc_auc {m['roc_auc']:.4f}, recall {m['recall']:.4f}, "
              f"specificity {m['specificity']:.4f}, accuracy {m['accuracy']:.4f} at its threshold "
              f"{m['threshold']:.4f} (report: {out.report_dirs['ensemble']})")
    print(f"[tune] experiment folder: {out.experiment}")
    print(out.best_checkpoint)
    return 0


def _tta_flag(p: argparse.ArgumentParser, default: str | None = "none") -> None:
    from cxr_ray.config import TTA_MODES

    p.add_argument("--tta", default=default, choices=TTA_MODES,
                   help="test-time augmentation: mean logit over the image and its mirror (hflip) or five "
                        "crops (crop5), with the temperature and threshold the checkpoint chose on validation "
                        "for that mode" + (" (default: score.tta, none)" if default is None else " (default none)"))


STORAGE_EXAMPLE = "storage.endpoint_url=http://minio:9000"
EXAMPLES = {
    "config": "cxr-ray config --config configs/scratch_cnn_cpu.yaml --set train.epochs=8 > my.yaml",
    "make-synthetic": "cxr-ray make-synthetic data/synthetic --n 400 --image-size 128",
    "prepare": "cxr-ray prepare --data ~/data/chest_xray",
    "inspect": "cxr-ray inspect --data ~/data/chest_xray",
    "train": "CKPT=$(cxr-ray train --config configs/scratch_cnn_cpu.yaml --data ~/data/chest_xray)",
    "tune": "cxr-ray tune --demo",
    "evaluate": "cxr-ray evaluate --checkpoint $CKPT --split test --out reports/test",
    "score": "cxr-ray score --checkpoint $CKPT --input ~/data/new_site --out predictions/",
    "explain": "cxr-ray explain --checkpoint $CKPT --input ~/data/chest_xray/test/PNEUMONIA --out gallery/",
    "export": "cxr-ray export --checkpoint $CKPT --format onnx --out exported/",
    "fit-tta": "cxr-ray fit-tta --checkpoint $CKPT --tta hflip,crop5",
    "audit": "cxr-ray audit --data ~/data/chest_xray --out audit/",
    "calibrate": "cxr-ray calibrate --checkpoint $CKPT --data ~/data/site_sample --out site_ckpt/",
    "ensemble": "cxr-ray ensemble --from runs/<tune experiment> --top-k 3 --out ensemble/",
}


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration (defaults, then --config, then each --set) as YAML: every
    key with its value, ready to save and pass back with --config."""
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.set).to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="cxr-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cxr-ray {cxr_ray.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved configuration, every key with its value (YAML)")
    p.add_argument("--config", help="YAML config file to start from (default: the built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.name=simple_cnn (repeatable)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("make-synthetic", help="write a synthetic dataset (for demos and tests)")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    p.add_argument("--image-size", "--size", dest="image_size", type=int, default=128,
                   help="side of the generated images in pixels (default 128; --size: the same)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("prepare", help="decode every image once into the Parquet cache")
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model on Ray Train; last line: best checkpoint")
    _common(p, "train.epochs=5")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its latest checkpoint (same config)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune search over unfreeze depth, dropout, lr (ASHA + Optuna)")
    _common(p, "tune.num_samples=8")
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
    p.add_argument("--amp", default="auto", choices=PRECISIONS,
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
    _config_and_address(p, STORAGE_EXAMPLE)  # only the config's storage: section applies (the model brings its own)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="score image folders/globs/manifests to Parquet (Ray Data)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (from train or tune)")
    p.add_argument("--input", action="append", required=True, metavar="PATH_OR_URI",
                   help="folder (recursive), glob, or CSV/Parquet manifest with a 'path' column; "
                        "local or s3:// / gs:// (repeatable)")
    p.add_argument("--out", "--output", dest="out", required=True,
                   help="output folder or URI for the Parquet dataset (--output: the same)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted job: score only files not yet in --out")
    p.add_argument("--with-labels", action="store_true",
                   help="add the true label from NORMAL/PNEUMONIA folders and print metrics")
    p.add_argument("--explain-dir", metavar="DIR",
                   help="also write Grad-CAM overlays of the positive predictions and an index.html there "
                        "(Ray Data actors, after scoring; needs the explain extra)")
    p.add_argument("--explain-top", type=int, default=0, metavar="K",
                   help="with --explain-dir: the K highest probabilities instead of every positive")
    _tta_flag(p, default=None)
    _config_and_address(p, "score.num_actors=4")  # the config's score: section sets the scale
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
    _config_and_address(p, STORAGE_EXAMPLE)  # only the config's storage: section applies
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("fit-tta", help="choose TTA modes' temperature and threshold on a checkpoint's validation split")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (it is updated in place)")
    p.add_argument("--tta", required=True, metavar="MODE[,MODE]", help="hflip, crop5 or hflip,crop5")
    p.add_argument("--data", help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--cache", help="cache folder (default: the checkpoint config's)")
    p.add_argument("--amp", default="auto", choices=PRECISIONS,
                   help="model precision (default auto: the checkpoint threshold's own, where fast)")
    _config_and_address(p, STORAGE_EXAMPLE)
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
    p.add_argument("--amp", default="auto", choices=PRECISIONS,
                   help="model precision (default auto: the checkpoint threshold's own, where fast)")
    _config_and_address(p, STORAGE_EXAMPLE)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("ensemble", help="one checkpoint averaging the logits of a tune run's top trials")
    p.add_argument("--from", dest="from_experiment", metavar="EXPERIMENT",
                   help="tune experiment folder (runs/<tune name>): its best trials by the tune metric")
    p.add_argument("--top-k", type=int, default=3, help="how many of its trials (default 3)")
    p.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="or: these checkpoints")
    p.add_argument("--out", required=True, help="new folder or URI for the ensemble checkpoint")
    p.add_argument("--amp", default="auto", choices=PRECISIONS,
                   help="precision of the validation pass (default auto: the first member's, where fast)")
    _config_and_address(p, STORAGE_EXAMPLE)
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("inspect", help="counts per split/class, patients, sizes, problems")
    _common(p)
    p.set_defaults(func=cmd_inspect)
    for name, example in EXAMPLES.items():  # every --help: what the command does, and an example
        command = sub.choices[name]
        command.description = inspect.cleandoc(command.get_default("func").__doc__)
        command.epilog = "example:\n  " + example
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-ray``; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        check_set_keys(args)
        use_storage_from_args(args)
        return func(args)
    except CxrRayError as e:  # the user can fix it: one line, exit code 2
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


def ray_logs() -> str:
    """Where this command's Ray wrote its logs (or would have: a local Ray's latest session)."""
    import ray

    if ray.is_initialized():
        from cxr_ray.cluster import ray_log_dir

        return ray_log_dir()
    return "/tmp/ray/session_latest/logs (a local Ray's; on a cluster, each node's own)"


def write_failure_log(command: str, e: BaseException) -> str:
    """Write the whole traceback (Ray's remote tracebacks included) to a log file; its path."""

    from cxr_ray.config import DataConfig

    folder = os.path.join(DataConfig().resolved_cache_dir, "logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"cxr-ray-{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log")
    with open(path, "w") as f:
        f.write("".join(traceback.format_exception(e)))
        f.write(f"\nRay's own logs (workers' output included): {ray_logs()}\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
