"""Site calibration: a labelled sample from a new hospital refits a checkpoint's calibration and
threshold, and says with honest figures what the model does there.

``cxr-ray calibrate --checkpoint CK --data SITE --out DIR``. ``SITE`` is any labelled folder
(``SITE/{NORMAL,PNEUMONIA}``, a root with split folders, whose images are all used, or a
manifest with ``path,label[,patient]``). The new temperature, bias and threshold are fitted on
the whole sample by the checkpoint's own ``metric`` settings (calibration map and threshold
rule); the figures printed for them are **cross-fitted**: the sample's patients are split into
folds, each fold is scored with a decision fitted on the other folds, so no figure is measured
on the images that set its threshold. The new checkpoint is the old weights with the new
decision, its ``site_calibration`` provenance (sample fingerprint, counts, date, source) inside
the digest; its TTA decisions are dropped (they were fitted on the training site's validation).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_ray.analysis.calibration import fit_decision
from cxr_ray.analysis.metrics import binary_metrics, bootstrap_ci
from cxr_ray.checkpoint import LoadedCheckpoint, checkpoint_files, read_meta, write_meta
from cxr_ray.data.catalog import CLASSES, load_catalog
from cxr_ray.engine.loop import probabilities
from cxr_ray.errors import CheckpointError, DataError
from cxr_ray.storage import uri as store

# The smallest sample that can say anything: with 30 NORMAL images a specificity of 0.90 has a
# 95% CI of about +-0.11 (Wilson: 0.74-0.97) and one image moves it by 0.033; fewer, and the
# threshold would follow single films. The same holds for recall on PNEUMONIA images. Folds
# need both classes, so patients count too.
MIN_PER_CLASS = 30
MIN_PATIENTS_PER_CLASS = 10
FOLDS = 5


def sample_catalog(root: str) -> pd.DataFrame:
    """Every labelled image of ``root`` as the ``test`` split of a catalog (a site sample has no
    training split). Refused when it is too small (see :data:`MIN_PER_CLASS`)."""
    cat = load_catalog(root).assign(split="test")
    check_sample_size(cat, root)
    return cat


def check_sample_size(cat: pd.DataFrame, root: str) -> None:
    """:class:`DataError` unless each class has :data:`MIN_PER_CLASS` images of
    :data:`MIN_PATIENTS_PER_CLASS` patients, naming the counts."""
    counts = {c: int((cat["label"] == i).sum()) for i, c in enumerate(CLASSES)}
    patients = {c: int(cat.loc[cat["label"] == i, "patient"].nunique()) for i, c in enumerate(CLASSES)}
    short = [c for c in CLASSES if counts[c] < MIN_PER_CLASS or patients[c] < MIN_PATIENTS_PER_CLASS]
    if short:
        raise DataError(
            f"{root}: a calibration sample needs >= {MIN_PER_CLASS} images of >= {MIN_PATIENTS_PER_CLASS} patients "
            f"per class (fewer, and the threshold follows single films: at 30 NORMAL images a specificity of 0.90 "
            f"is +-0.11); found " + ", ".join(f"{c} {counts[c]} images / {patients[c]} patients" for c in CLASSES))


def sample_fingerprint(cat: pd.DataFrame) -> str:
    """``sha256:`` of the sample's paths, sizes, mtimes and labels (what the calibration saw)."""
    h = hashlib.sha256()
    for row in cat.sort_values("path")[["path", "size_bytes", "mtime_ns", "label"]].itertuples(index=False):
        h.update(("|".join(map(str, row)) + "\n").encode())
    return "sha256:" + h.hexdigest()


def patient_folds(patients: np.ndarray, labels: np.ndarray, k: int = FOLDS, seed: int = 0) -> np.ndarray:
    """A fold number per image: whole patients per fold, each class's patients dealt round-robin
    in a seeded order (so every fold has both classes)."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(patients), dtype=int)
    frame = pd.DataFrame({"patient": patients.astype(str), "label": labels})
    by_patient = frame.groupby("patient")["label"].max()  # a patient with any PNEUMONIA film counts there
    for label in (0, 1):
        ids = np.array(sorted(by_patient.index[by_patient == label]))
        for i, pid in enumerate(rng.permutation(ids)):
            fold[frame["patient"].to_numpy() == pid] = i % k
    return fold


def cross_fitted(logits: np.ndarray, labels: np.ndarray, patients: np.ndarray, metric: Any) -> np.ndarray:
    """Out-of-fold probabilities and decisions: each fold calibrated and thresholded on the others.
    Returns an array of ``(probability, threshold)`` per image."""
    out = np.zeros((len(logits), 2))
    folds = patient_folds(patients, labels)
    for f in np.unique(folds):
        held, fit = folds == f, folds != f
        d = fit_decision(logits[fit], labels[fit], patients[fit], metric)
        out[held, 0] = probabilities(logits[held], d["temperature"], d["logit_bias"])
        out[held, 1] = d["threshold"]
    return out


def figures(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, patients: np.ndarray) -> dict[str, Any]:
    """Recall, specificity, accuracy and ROC-AUC of per-image decisions with 95% patient CIs."""
    positive = (probs.astype(np.float32) >= thresholds.astype(np.float32)).astype(float)
    # binary_metrics at 0.5 on the decisions themselves: each image was decided by its own fold's threshold
    m = binary_metrics(labels, positive, 0.5)
    ranked = binary_metrics(labels, probs, 0.5)
    m.update(roc_auc=ranked["roc_auc"], pr_auc=ranked["pr_auc"])
    del m["threshold"]  # each image was decided at its own fold's threshold: there is no one threshold
    ci = bootstrap_ci(labels, positive, 0.5, groups=patients)
    ci["roc_auc"] = bootstrap_ci(labels, probs, 0.5, groups=patients)["roc_auc"]
    m["ci"] = {k: list(v) for k, v in ci.items()}
    return m


def calibrate_on_sample(ckpt: LoadedCheckpoint, preds: pd.DataFrame,
                        acquisition: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """What a site sample says: the checkpoint's own decision there (``before``), the cross-fitted
    figures of a decision refitted on the site (``after``), and that decision fitted on the whole
    sample (``decision``: temperature, bias, threshold). ``preds``: ``evaluate.predict_split``'s
    columns (``logit``, ``label``, ``patient``, ``probability``); ``acquisition``: the sample's
    acquisition statistics, stored in the new drift reference."""
    logits, labels = preds["logit"].to_numpy(np.float64), preds["label"].to_numpy()
    patients = preds["patient"].to_numpy().astype(str)
    before = figures(labels, preds["probability"].to_numpy(), np.full(len(preds), ckpt.threshold), patients)
    oof = cross_fitted(logits, labels, patients, ckpt.cfg.metric)
    after = figures(labels, oof[:, 0], oof[:, 1], patients)
    decision = fit_decision(logits, labels, patients, ckpt.cfg.metric, acquisition=acquisition)
    return {"before": before, "after": after, "decision": decision}


def write_calibrated(ckpt: LoadedCheckpoint, result: dict[str, Any], provenance: dict[str, Any], out: str,
                     precision: str) -> str:
    """A new checkpoint at ``out`` (folder or URI, must not exist): ``ckpt``'s weights with the
    site's temperature, bias and threshold (chosen in ``precision``), ``site_calibration``
    provenance and the cross-fitted figures as its metrics, sealed (format 2: all in the digest)."""
    if store.exists(out):
        raise CheckpointError(f"--out {out} exists; choose a new folder (a checkpoint is never written over)")
    source = Path(ckpt.path) if not store.is_uri(str(ckpt.path)) else None
    d = result["decision"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "calibrated"
        for name in checkpoint_files(ckpt.meta):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            if source is not None:
                shutil.copyfile(source / name, folder / name)
            else:
                (folder / name).write_bytes(store.read_bytes(store.join(str(ckpt.path), name)))
        meta = {k: v for k, v in ckpt.meta.items() if k not in ("tta", "files")}
        meta.update(preprocessing=ckpt.preprocessing.to_dict(), val_precision=precision,
                    threshold=float(d["threshold"]), temperature=float(d["temperature"]),
                    logit_bias=float(d["logit_bias"]), threshold_rule=d["threshold_rule"],
                    drift_reference=d.get("drift_reference"),  # the site is the new reference
                    metrics={k: v for k, v in result["after"].items() if k != "ci"} | {"ci": result["after"]["ci"]},
                    site_calibration={**provenance, "before": _short(result["before"]),
                                      "after": _short(result["after"])})
        write_meta(folder, meta)
        store.copy_tree(str(folder), out)
    return out


def _short(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("recall", "specificity", "accuracy", "roc_auc", "n")} | {"ci": m["ci"]}


def provenance(cat: pd.DataFrame, root: str, ckpt: LoadedCheckpoint) -> dict[str, Any]:
    """The sample's identity for the new checkpoint: fingerprint, counts, date, where from."""
    return {"sample": root, "fingerprint": sample_fingerprint(cat),
            "counts": {c: int((cat["label"] == i).sum()) for i, c in enumerate(CLASSES)},
            "patients": int(cat["patient"].nunique()), "folds": FOLDS,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_checkpoint": str(ckpt.path), "source_digest": ckpt.digest}


def format_calibration(result: dict[str, Any], prefix: str = "[calibrate]") -> list[str]:
    """Terminal lines: the checkpoint as is on the sample, then the site-calibrated decision
    (cross-fitted figures with patient CIs)."""
    def line(name: str, m: dict[str, Any]) -> str:
        return f"{prefix} {name}: " + ", ".join(
            f"{k} {m[k]:.3f} ({m['ci'][k][0]:.3f}-{m['ci'][k][1]:.3f})" for k in ("recall", "specificity", "roc_auc"))
    d = result["decision"]
    return [line("as trained (its own threshold) on this sample", result["before"]),
            line(f"site-calibrated, cross-fitted over {FOLDS} patient folds", result["after"]),
            f"{prefix} new decision (fitted on the whole sample): threshold {d['threshold']:.4f} "
            f"({d['threshold_rule']}), temperature {d['temperature']:.3f}, bias {d['logit_bias']:+.3f}"]


def read_provenance(path: str) -> dict[str, Any] | None:
    """The ``site_calibration`` record of a checkpoint folder or URI (None when it has none)."""
    return read_meta(path).get("site_calibration")
