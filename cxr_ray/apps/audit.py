"""``cxr-ray audit``: the cues of every image of a dataset measured by Ray Data
(``analysis/cues.py``: what each cue is, the cue-only classifier), and the report folder:
``cues.parquet``, ``compare.csv``, ``cues.png``, ``summary.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray

from cxr_ray.analysis.cues import (
    AUDIT_SIZE,
    CLASSIFIER_CUES,
    CUES,
    GROUPS,
    _finite,
    _usable,
    compare_cues,
    cue_scores,
    cues_batch,
    summarize_cue_only,
)
from cxr_ray.cluster import watched
from cxr_ray.data.catalog import CLASSES


def write_report(df: pd.DataFrame, out_dir: str | os.PathLike, n_splits: int = 5, seed: int = 0,
                 n_boot: int = 1000) -> dict[str, Any]:
    """Write ``cues.parquet`` (``df`` plus ``cue_score``), ``compare.csv`` (:func:`compare_cues`),
    ``cues.png`` (class histograms of the 8 most separating cues) and ``summary.json``: the
    cue-only result (as :func:`cue_only_auc`), ``by_group`` (the same classifier on each cue
    group alone), counts and file names. Returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores, importance = cue_scores(df, CLASSIFIER_CUES, n_splits, seed)
    summary = {**summarize_cue_only(df, scores, importance, n_boot, seed), "model": "hgb", "n_splits": n_splits}
    summary["by_group"] = {}
    for group, names in GROUPS.items():
        if group != "lung":
            s = summarize_cue_only(df, *cue_scores(df, names, n_splits, seed), n_boot=n_boot, seed=seed)
            summary["by_group"][group] = {"roc_auc": s["roc_auc"], "ci": s["ci"]}
    table = compare_cues(df)
    errors = df["error"].fillna("") != ""
    summary.update(n_images=len(df), n_errors=int(errors.sum()), audit_size=AUDIT_SIZE,
                   files={"cues": "cues.parquet", "compare": "compare.csv", "plot": "cues.png"})
    df.assign(cue_score=scores).to_parquet(out / "cues.parquet", index=False)
    table.to_csv(out / "compare.csv", index=False)
    plot_cues(_usable(df), table[table["split"] == "all"].head(8), out / "cues.png")
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2))
    return summary


def plot_cues(df: pd.DataFrame, rows: pd.DataFrame, path: str | os.PathLike) -> None:
    """Per-class histograms (2 x 4 grid, PNG) of the cues of ``rows`` (a :func:`compare_cues`
    table, first 8 rows), each titled with its single-cue ROC-AUC."""
    from matplotlib.figure import Figure  # imported here: Ray workers mapping cues_batch never plot

    fig = Figure(figsize=(16, 7), layout="constrained")
    for ax, (cue, auc) in zip(fig.subplots(2, 4).ravel(), zip(rows["cue"], rows["auc"], strict=True), strict=False):
        values = df[cue].to_numpy(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        for k, name in enumerate(CLASSES):
            v = values[(df["label"].to_numpy() == k) & np.isfinite(values)]
            ax.hist(np.clip(v, lo, hi), bins=bins, density=True, alpha=0.5, label=f"{name} (n={len(v)})")
        note = " (moved by disease)" if cue in GROUPS["lung"] else ""
        ax.set_title(f"{cue}{note}: ROC-AUC {auc:.3f}", fontsize=10)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=80)


def format_report(summary: dict[str, Any]) -> list[str]:
    """Printable lines: ``cue-only ROC-AUC X.XXX (95% CI A.AAA-B.BBB)``, one line per top cue,
    the per-group AUCs when present, and a ``WARNING: ...`` line when the cues separate."""
    lo, hi = summary["ci"]
    lines = [f"cue-only ROC-AUC {summary['roc_auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})"]
    for c in summary["top_cues"]:
        lines.append(f"  {c['cue']}: permutation importance {c['importance']:.3f}, "
                     f"single-cue ROC-AUC {c['single_auc']:.3f} ({CUES[c['cue']]})")
    for group, g in summary.get("by_group", {}).items():
        lines.append(f"  {group} cues only: ROC-AUC {g['roc_auc']:.3f} (95% CI {g['ci'][0]:.3f}-{g['ci'][1]:.3f})")
    if summary["warning"]:
        lines.append(f"WARNING: {summary['message']}")
    return lines


def audit_catalog(catalog: pd.DataFrame, stall_s: float = 600.0) -> pd.DataFrame:
    """:func:`audit_table` of a catalog (``path``, ``label``, ``source_split`` or ``split``,
    ``patient``) with Ray Data: the images are read and measured by parallel tasks (Ray must be
    initialised); a stage without progress for ``stall_s`` fails (``cluster.watched``)."""
    split = "split" if "split" in catalog else "source_split"
    rows = catalog[["path", "label", split, "patient"]].rename(columns={split: "split"})
    rows = rows.astype({"path": str, "split": str, "patient": str})
    ds = ray.data.from_pandas(rows).map_batches(cues_batch, batch_format="pandas", batch_size=32)
    parts = list(watched(ds.iter_batches(batch_format="pandas", batch_size=None), "audit", stall_s))
    return pd.concat(parts, ignore_index=True).sort_values("path", ignore_index=True)

