"""Shortcut audit: can acquisition and framing alone tell NORMAL from PNEUMONIA?

Per image, :func:`image_cues` measures statistics that carry no diagnosis by design: the file
(size, format, compression), the framing (black margins, where the body sits in the frame) and
the exposure and texture of the film (also of its top and bottom rows alone, away from the
lungs). :func:`compare_cues` sets them side by side per class
and split; :func:`cue_only_auc` fits a classifier on the cues alone, cross-validated by patient.
When that classifier separates the classes, a network can learn the framing instead of the
lungs, and a new hospital that frames its films differently will see a different model.

Where each cue is measured:

- ``width``, ``height``, ``aspect``, ``bytes_per_pixel``, ``channels``, ``jpeg_quant``: the
  original file (header and size; nothing decoded).
- everything else: the file decoded at full resolution by :func:`cxr_ray.data.decode.decode_image`
  (its allowed formats, pixel and DICOM limits, 16-bit stretch, DICOM windowing), one channel,
  then one antialiased resize to ``AUDIT_SIZE x AUDIT_SIZE`` (224, aspect NOT kept, as the model
  and the shared 224 px copies see it). Sharpness and noise are therefore in grey levels *at
  224 x 224*; on the shared copies that is their own resolution.

Caveat: exposure and texture cues are not pure acquisition. Consolidation brightens the lungs
(raising grey-level percentiles) and blurs vessel and rib edges (lowering sharpness), so a class
difference in those cues is partly disease; ``sharpness_edge`` and ``noise_edge`` look only at
rows that rarely hold lung, to tell the two apart. The ``lung_*`` cues are moved by opacities directly
and are reported but left out of the classifier (:data:`CLASSIFIER_CUES`). A high cue-only AUC
says a shortcut is *available*; :func:`cue_strata` checks whether a model *uses* it.

Nothing here starts Ray or writes files: :func:`cues_batch` is the per-batch function to map over a
Ray Dataset; ``apps/audit.py`` runs it and writes the report.
"""

from __future__ import annotations

import io as _io
import logging
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage  # scipy and threadpoolctl: scikit-learn dependencies
from threadpoolctl import threadpool_limits

from cxr_ray.analysis.metrics import _cluster_resampler, rank_auc
from cxr_ray.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, allowed_formats, decode_image, is_dicom, read_file

log = logging.getLogger(__name__)

AUDIT_SIZE = 224  # every pixel cue is measured on this square grid (the model's input size)
DARK_LEVEL = 0.10  # "black": below p1 + 10% of the p1..p99 grey range
MARGIN_DARK_SHARE = 0.5  # a margin row/column is mostly black (a marker letter or a body corner does not end it)
BODY_SHARE = 0.5  # body field: rows/columns whose body (non-black) share is >= half its maximum
EDGE_BAND = 1 / 16  # width of the frame band edge_black looks at, share of the side
WARN_AUC = 0.75  # cue-only lower 95% bound above this: the cues are a usable shortcut

CUES: dict[str, str] = {
    "width": "original width in pixels",
    "height": "original height in pixels",
    "aspect": "original width / height",
    "bytes_per_pixel": "file size / (width * height): compression and detail",
    "channels": "bands of the stored image (1 grey, 3 RGB); NaN for DICOM",
    "jpeg_quant": "mean of the JPEG luminance quantisation table (higher = coarser); NaN if not JPEG",
    "margin_top": "share of rows from the top edge that are mostly (>= 50%) black",
    "margin_bottom": "share of rows from the bottom edge that are mostly black",
    "margin_left": "share of columns from the left edge that are mostly black",
    "margin_right": "share of columns from the right edge that are mostly black",
    "margin_area": "share of the frame outside the box the four margins leave",
    "edge_black": "black share of the frame's outer band (1/16 of each side)",
    "background": "share of the frame that is black and connected to its edge (air around the body, film border)",
    "body_cx": "centre x of the body field (columns whose non-black share is >= half its maximum), 0..1",
    "body_cy": "centre y of the body field (rows whose non-black share is >= half its maximum), 0..1",
    "body_w": "width of the body field, share of the frame (tight framing: near 1)",
    "body_h": "height of the body field, share of the frame (a narrow neck in view lowers it)",
    "p1": "1st percentile grey (0-255, at 224 px)",
    "p5": "5th percentile grey: the darkest 5%",
    "p50": "median grey",
    "p95": "95th percentile grey",
    "p99": "99th percentile grey",
    "sharpness": "mean |Laplacian| (4-neighbour) in grey levels at 224x224",
    "noise": "noise sigma in grey levels at 224x224 (Immerkaer's estimator on flat, unclipped pixels)",
    "sharpness_edge": "sharpness of the top and bottom 1/8 of rows only (neck, shoulders, abdomen: rarely lung)",
    "noise_edge": "noise of the top and bottom 1/8 of rows only (acquisition noise away from the lungs)",
    "lung_area": "share of the frame in the two largest enclosed dark regions (lung proxy; disease moves it)",
    "lung_top": "top of the lung proxy, share of the frame height (more neck in view: larger)",
    "lung_bottom": "bottom of the lung proxy, share of the frame height",
}
GROUPS: dict[str, tuple[str, ...]] = {
    "file": ("width", "height", "aspect", "bytes_per_pixel", "channels", "jpeg_quant"),
    "framing": ("margin_top", "margin_bottom", "margin_left", "margin_right", "margin_area", "edge_black",
                "background", "body_cx", "body_cy", "body_w", "body_h"),
    "exposure": ("p1", "p5", "p50", "p95", "p99"),
    "texture": ("sharpness", "noise", "sharpness_edge", "noise_edge"),
    "lung": ("lung_area", "lung_top", "lung_bottom"),
}
# the lung proxy is moved by opacities themselves: describe it, never let it vote
CLASSIFIER_CUES: tuple[str, ...] = tuple(c for g, names in GROUPS.items() if g != "lung" for c in names)
assert set(CUES) == {c for names in GROUPS.values() for c in names}


def _nan_cues(error: str) -> dict[str, Any]:
    return {**{c: float("nan") for c in CUES}, "error": error}


def image_cues(data: bytes, path: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Every cue of :data:`CUES` (floats) for one file's bytes, plus ``error`` ("" when fine).

    Never raises for a bad file: an unreadable or refused one (decode.py's checks) gets NaN
    cues and the reason in ``error``.
    """
    try:
        gray, width, height = decode_image(data, AUDIT_SIZE, path, draft=False, max_pixels=max_pixels)
        out = {**_file_cues(data, path, width, height), **pixel_cues(gray)}
        return {**{c: out[c] for c in CUES}, "error": ""}
    except ImageDecodeError as e:
        return _nan_cues(e.reason)
    except Exception as e:  # noqa: BLE001 - one odd file must not end an audit
        return _nan_cues(f"unexpected {type(e).__name__}: {e}")


def _file_cues(data: bytes, path: str, width: int, height: int) -> dict[str, float]:
    """Size, compression, bands and JPEG quantisation, from the header (decode_image already
    accepted the file, so re-opening it with the same allowed formats is safe)."""
    channels = quant = float("nan")
    if not is_dicom(data, path):
        with Image.open(_io.BytesIO(data), formats=allowed_formats(path)) as img:  # header only
            channels = float(len(img.getbands()))
            tables = getattr(img, "quantization", None) if img.format == "JPEG" else None
            if tables:
                quant = float(np.mean(tables[min(tables)]))  # table 0: luminance
    return {"width": float(width), "height": float(height), "aspect": width / height,
            "bytes_per_pixel": len(data) / (width * height), "channels": channels, "jpeg_quant": quant}


def pixel_cues(gray: np.ndarray, lung: bool = True) -> dict[str, float]:
    """Framing, exposure, texture and lung-proxy cues of one uint8 image (``AUDIT_SIZE`` square
    for the numbers to be comparable between images); ``lung=False`` skips the lung proxy (its
    region labelling is most of the cost; the drift report does not use it)."""
    a = gray.astype(np.float32)
    p1, p5, p50, p95, p99 = np.percentile(a, [1, 5, 50, 95, 99])
    span = max(p99 - p1, 1.0)
    out = {"p1": p1, "p5": p5, "p50": p50, "p95": p95, "p99": p99}
    dark = a < p1 + DARK_LEVEL * span
    out.update(_margins(dark))
    out.update(_body_field(~dark))
    out.update(_texture(a))
    if lung:
        out.update(_lung_proxy(a, a[~dark]))
    return {k: float(v) for k, v in out.items()}


def _leading(flags: np.ndarray) -> int:
    """How many ``flags`` are True from the start."""
    return len(flags) if flags.all() else int(np.argmin(flags))


def _margins(dark: np.ndarray) -> dict[str, float]:
    """Black margin per side (rows/columns from each edge that are >= MARGIN_DARK_SHARE black),
    the black share of the outer band, and the black area connected to the frame's edge."""
    rows, cols = dark.mean(axis=1) >= MARGIN_DARK_SHARE, dark.mean(axis=0) >= MARGIN_DARK_SHARE
    h, w = dark.shape
    m = {"margin_top": _leading(rows) / h, "margin_bottom": _leading(rows[::-1]) / h,
         "margin_left": _leading(cols) / w, "margin_right": _leading(cols[::-1]) / w}
    inner = max(0.0, 1 - m["margin_top"] - m["margin_bottom"]) * max(0.0, 1 - m["margin_left"] - m["margin_right"])
    band = np.ones_like(dark)
    bh, bw = max(1, round(h * EDGE_BAND)), max(1, round(w * EDGE_BAND))
    band[bh:-bh, bw:-bw] = False
    labels, _ = ndimage.label(dark)
    touching = np.setdiff1d(np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]]), [0])
    return {**m, "margin_area": 1.0 - inner, "edge_black": float(dark[band].mean()),
            "background": float(np.isin(labels, touching).mean())}


def _body_field(body: np.ndarray) -> dict[str, float]:
    """Bounding box, as fractions of the frame, of the rows and columns whose share of body
    (non-black) pixels is >= BODY_SHARE of the largest such share."""
    out = {}
    for axis, (centre, extent) in ((0, ("body_cx", "body_w")), (1, ("body_cy", "body_h"))):
        profile = body.mean(axis=axis)
        idx = np.flatnonzero(profile >= BODY_SHARE * profile.max()) if profile.max() > 0 else []
        n = body.shape[1 - axis]
        out[centre] = (idx[0] + idx[-1] + 1) / 2 / n if len(idx) else float("nan")
        out[extent] = (idx[-1] - idx[0] + 1) / n if len(idx) else float("nan")
    return out


EDGE_ROWS = 1 / 8  # the *_edge cues: rows above / below this share of the height (lung apices and bases lie inside)


def _texture(a: np.ndarray) -> dict[str, float]:
    """Sharpness (mean |4-neighbour Laplacian|) and noise (:func:`_noise_sigma`), over the
    whole image and over its top and bottom ``EDGE_ROWS`` only: consolidation blurs the lungs,
    so a class difference that persists away from them is acquisition, not disease."""
    lap = np.abs(4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:])
    k = max(2, round(a.shape[0] * EDGE_ROWS))
    edge = np.r_[0:k - 1, a.shape[0] - k - 1:a.shape[0] - 2]  # rows of the interior (lap) grid
    top, bottom = a[:k + 1], a[-k - 1:]
    return {"sharpness": float(lap.mean()), "noise": _noise_sigma([a]),
            "sharpness_edge": float(lap[edge].mean()), "noise_edge": _noise_sigma([top, bottom])}


def _noise_sigma(parts: list[np.ndarray]) -> float:
    """Immerkaer's (1996) noise estimate: the residual r of [[1,-2,1],[-2,4,-2],[1,-2,1]]
    (which cancels planes and ramps; white noise of sigma s gives sd(r) = 6s), as
    sqrt(pi/2) * mean|r| / 6, over the pixels of ``parts`` (image strips) with a
    below-median gradient (flat) and no clipping (grey 5..250), so edges and saturated film
    do not count as noise."""
    res, grads, values = [], [], []
    for a in parts:
        d2x = a[:, :-2] - 2 * a[:, 1:-1] + a[:, 2:]
        res.append((d2x[:-2] - 2 * d2x[1:-1] + d2x[2:]).ravel())
        grads.append(np.hypot(a[2:, 1:-1] - a[:-2, 1:-1], a[1:-1, 2:] - a[1:-1, :-2]).ravel())
        values.append(a[1:-1, 1:-1].ravel())
    r, grad, inner = np.concatenate(res), np.concatenate(grads), np.concatenate(values)
    flat = (grad <= np.median(grad)) & (inner > 5) & (inner < 250)
    return float(np.sqrt(np.pi / 2) * np.abs(r[flat]).mean() / 6) if flat.any() else float("nan")


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8-range ``values`` (maximises the between-class variance)."""
    hist = np.bincount(np.clip(values, 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * np.arange(256))
    w1 = w0[-1] - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * w0[-1]) ** 2 / (w0 * w1)
    return float(np.nanargmax(np.where(np.isfinite(between), between, np.nan)))


def _lung_proxy(a: np.ndarray, nonblack: np.ndarray) -> dict[str, float]:
    """Lungs as the dark regions *enclosed* by the body: below the Otsu threshold of the
    non-black pixels, opened to cut thin bridges, not touching the frame (air outside the
    body does), the two largest of >= 1% of the frame. Lungs that touch the frame, reach the
    outside air through the armpit, or are opacified are missed (area 0, top/bottom NaN),
    more often on PNEUMONIA films: the proxy is descriptive, never a classifier input."""
    if nonblack.size < 16:
        return {"lung_area": 0.0, "lung_top": float("nan"), "lung_bottom": float("nan")}
    mask = ndimage.binary_opening(a < _otsu(nonblack), iterations=2)
    labels, n = ndimage.label(mask)
    edge = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[edge] = 0
    sizes[0] = 0
    keep = [k for k in np.argsort(sizes)[::-1][:2] if sizes[k] >= 0.01 * a.size]
    if not keep:
        return {"lung_area": 0.0, "lung_top": float("nan"), "lung_bottom": float("nan")}
    rows = np.flatnonzero(np.isin(labels, keep).any(axis=1))
    return {"lung_area": float(sizes[keep].sum() / a.size), "lung_top": rows[0] / a.shape[0],
            "lung_bottom": (rows[-1] + 1) / a.shape[0]}


def _read_cues(path: str, read: Callable[[str], bytes]) -> dict[str, Any]:
    """:func:`image_cues` of the file ``read(path)`` returns; a failed read is the row's error."""
    try:
        data = read(path)
    except ImageDecodeError as e:
        return _nan_cues(e.reason)
    except Exception as e:  # noqa: BLE001
        return _nan_cues(f"cannot read ({type(e).__name__}: {e})")
    return image_cues(data, path)


def cues_batch(batch: pd.DataFrame) -> pd.DataFrame:
    """Cues of a pandas batch, for ``Dataset.map_batches(cues_batch, batch_format="pandas")``.

    In: ``path`` (str) and optionally ``bytes`` (the file's content, as
    ``ray.data.read_binary_files(include_paths=True)`` gives it; read from ``path`` when
    absent); any other columns (``label``, ``split``, ``patient``) pass through.
    Out: the input columns without ``bytes``, one float64 column per cue of :data:`CUES`, and
    ``error`` (str, "" when the image was measured).
    """
    if "bytes" in batch:
        rows = [image_cues(bytes(data), str(path)) for path, data in zip(batch["path"], batch["bytes"], strict=True)]
    else:
        rows = [_read_cues(str(path), read_file) for path in batch["path"]]
    cues = pd.DataFrame(rows, index=batch.index, columns=[*CUES, "error"])
    return pd.concat([batch.drop(columns=["bytes"], errors="ignore"), cues], axis=1)


def audit_table(paths: Sequence[str], labels: Sequence[int], splits: Sequence[str], patients: Sequence[str],
                read: Callable[[str], bytes] = read_file) -> pd.DataFrame:
    """One row per image: ``path``, ``label`` (0 NORMAL, 1 PNEUMONIA), ``split``, ``patient``,
    the cues and ``error``, measured in this process (a plain loop, no Ray)."""
    rows = []
    for i, path in enumerate(paths):
        rows.append(_read_cues(str(path), read))
        if (i + 1) % 500 == 0:
            log.info("[audit] measured %d/%d images", i + 1, len(paths))
    head = pd.DataFrame({"path": list(map(str, paths)), "label": np.asarray(labels, dtype=int),
                         "split": list(map(str, splits)), "patient": list(map(str, patients))})
    return pd.concat([head, pd.DataFrame(rows, columns=[*CUES, "error"])], axis=1)


fast_auc = rank_auc  # ROC-AUC by ranks (cxr_ray.analysis.metrics): the bootstrap's and permutations' workhorse


def _usable(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that were measured (no error)."""
    return df[df["error"].fillna("") == ""] if "error" in df else df


def _cue_stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Medians, means, Cohen's d (PNEUMONIA - NORMAL, pooled sd) and ROC-AUC of ``x`` for ``y``."""
    ok = np.isfinite(x)
    x, y = x[ok], y[ok]
    neg, pos = x[y == 0], x[y == 1]
    out = {"n_normal": len(neg), "n_pneumonia": len(pos), "median_normal": np.nan, "median_pneumonia": np.nan,
           "mean_normal": np.nan, "mean_pneumonia": np.nan, "cohens_d": np.nan, "auc": np.nan}
    if len(neg) < 2 or len(pos) < 2:
        return out
    pooled = np.sqrt(((len(neg) - 1) * neg.var(ddof=1) + (len(pos) - 1) * pos.var(ddof=1)) / (len(x) - 2))
    diff = pos.mean() - neg.mean()
    out.update(median_normal=np.median(neg), median_pneumonia=np.median(pos), mean_normal=neg.mean(),
               mean_pneumonia=pos.mean(), cohens_d=diff / pooled if pooled > 0 else (0.0 if diff == 0 else np.inf),
               auc=fast_auc(y, x))
    return out


def compare_cues(df: pd.DataFrame) -> pd.DataFrame:
    """NORMAL vs PNEUMONIA per cue, over all rows (``split="all"``) and per ``split``.

    Columns: ``split``, ``cue``, ``group``, ``n_normal``, ``n_pneumonia``, ``median_*``,
    ``mean_*``, ``cohens_d`` (PNEUMONIA minus NORMAL, in pooled sds), ``auc`` (the cue alone
    as a PNEUMONIA score) and ``separation`` = ``|auc - 0.5|``; ``all`` first, then each
    split, each sorted by ``separation``, highest first. Rows with an ``error`` are left out.
    """
    df = _usable(df)
    group_of = {c: g for g, names in GROUPS.items() for c in names}
    parts = [("all", df)] + ([(str(s), d) for s, d in df.groupby("split", sort=True)] if "split" in df else [])
    rows = []
    for split, part in parts:
        y = part["label"].to_numpy(int)
        for cue in CUES:
            stats = _cue_stats(part[cue].to_numpy(np.float64), y)
            rows.append({"split": split, "cue": cue, "group": group_of[cue], **stats})
    out = pd.DataFrame(rows)
    out["separation"] = (out["auc"] - 0.5).abs()
    out["_order"] = out["split"].map({s: i for i, (s, _) in enumerate(parts)})
    return (out.sort_values(["_order", "separation"], ascending=[True, False], na_position="last")
            .drop(columns="_order").reset_index(drop=True))


def _classifier(model: str, seed: int):
    """A NaN-tolerant cue classifier: gradient-boosted trees, or a standardised logistic regression.
    (imported here, where a classifier is fitted.)"""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "hgb":
        return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=8,
                                              l2_regularization=1.0, early_stopping=False, random_state=seed)
    if model == "logistic":
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=1000))
    raise ValueError(f"model {model!r}: expected 'hgb' or 'logistic'")


def cue_scores(df: pd.DataFrame, cues: Sequence[str] = CLASSIFIER_CUES, n_splits: int = 5, seed: int = 0,
               model: str = "hgb") -> tuple[pd.Series, pd.Series]:
    """Out-of-fold cue-only PNEUMONIA scores and per-cue permutation importance.

    Folds: ``StratifiedGroupKFold`` by ``patient`` (a patient's images are never on both
    sides). Scores are indexed like ``df`` (NaN for rows with an ``error``); importance is the
    mean drop in held-out ROC-AUC when one cue is shuffled (5 repeats per fold).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    missing = [c for c in ("label", "patient", *cues) if c not in df]
    if missing:
        raise ValueError(f"cue table lacks column(s) {missing}; found {list(df.columns)}")
    data = _usable(df)
    x, y, groups = data[list(cues)].to_numpy(np.float64), data["label"].to_numpy(int), data["patient"].astype(str)
    per_class = [groups[y == k].nunique() for k in (0, 1)]
    if min(per_class) < n_splits:
        raise ValueError(f"cue-only AUC with {n_splits} folds needs >= {n_splits} patients per class, "
                         f"got NORMAL={per_class[0]}, PNEUMONIA={per_class[1]}")
    scores = np.full(len(data), np.nan)
    importance = np.zeros(len(cues))
    rng = np.random.default_rng(seed)
    folds = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(x, y, groups)
    # a table of a few thousand rows: one thread is fast, and does not fight Ray or CI for cores
    with threadpool_limits(limits=1, user_api="openmp"):
        for train, test in folds:
            clf = _classifier(model, seed).fit(x[train], y[train])
            scores[test] = clf.predict_proba(x[test])[:, 1]
            if 0 < y[test].sum() < len(test):  # a one-class fold has no AUC to drop
                importance += _permutation_drop(clf, x[test], y[test], scores[test], rng) / n_splits
    return (pd.Series(scores, index=data.index).reindex(df.index),
            pd.Series(importance, index=list(cues)).sort_values(ascending=False))


def _permutation_drop(clf: Any, x: np.ndarray, y: np.ndarray, base: np.ndarray, rng: np.random.Generator,
                      repeats: int = 5) -> np.ndarray:
    """Mean drop of held-out ROC-AUC (from ``base`` scores) when each column of ``x`` is
    shuffled, ``repeats`` times; all shuffled copies are scored in one call."""
    n, k = x.shape
    copies = np.repeat(x[None], k * repeats, axis=0)
    for j in range(k):
        for r in range(repeats):
            copies[j * repeats + r, :, j] = rng.permutation(x[:, j])
    shuffled = clf.predict_proba(copies.reshape(-1, k))[:, 1].reshape(k, repeats, n)
    auc = fast_auc(y, base)
    return np.array([auc - np.mean([fast_auc(y, s) for s in shuffled[j]]) for j in range(k)])


def _rank_cues(df: pd.DataFrame, importance: pd.Series) -> pd.DataFrame:
    """``cue``, ``importance``, ``single_auc``, most important first. Redundant cues share the
    credit (shuffling one leaves its twins), so ties go to the cue that separates alone."""
    y = df["label"].to_numpy(int)
    single = [_cue_stats(df[c].to_numpy(np.float64), y)["auc"] for c in importance.index]
    ranked = pd.DataFrame({"cue": importance.index, "importance": importance.to_numpy(np.float64),
                           "single_auc": np.asarray(single, dtype=np.float64)})
    order = ranked.assign(rounded=ranked["importance"].round(4), separation=(ranked["single_auc"] - 0.5).abs())
    return ranked.loc[order.sort_values(["rounded", "separation"], ascending=False).index].reset_index(drop=True)


def summarize_cue_only(df: pd.DataFrame, scores: pd.Series, importance: pd.Series, n_boot: int = 1000,
                       seed: int = 0, warn_above: float = WARN_AUC, top: int = 5) -> dict[str, Any]:
    """ROC-AUC of out-of-fold cue ``scores`` with a 95% patient-cluster bootstrap CI, the ``top``
    cues by importance (with their single-cue AUC), and ``warning`` when the CI's lower end is
    above ``warn_above``. JSON-ready."""
    ok = scores.notna()
    y, p = df.loc[ok, "label"].to_numpy(int), scores[ok].to_numpy()
    auc = float(fast_auc(y, p))
    draw = _cluster_resampler(df.loc[ok, "patient"].to_numpy(), len(y), np.random.default_rng(seed))
    boots = [fast_auc(y[i], p[i]) for i in (draw() for _ in range(n_boot)) if 0 < y[i].sum() < len(i)]
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else [np.nan, np.nan]
    top_cues = _rank_cues(df.loc[ok], importance).head(top).to_dict("records")
    warn = ci[0] > warn_above
    message = (f"cues alone separate the classes (lower 95% bound {ci[0]:.3f} > {warn_above:.2f}): "
               f"a network can learn the framing instead of the lungs" if warn else "")
    return {"roc_auc": auc, "ci": ci, "n": int(ok.sum()), "n_normal": int((y == 0).sum()),
            "n_pneumonia": int((y == 1).sum()), "n_patients": int(df.loc[ok, "patient"].nunique()),
            "cues": list(importance.index), "top_cues": top_cues, "warning": bool(warn), "message": message}


def cue_only_auc(df: pd.DataFrame, n_splits: int = 5, seed: int = 0, cues: Sequence[str] = CLASSIFIER_CUES,
                 model: str = "hgb", n_boot: int = 1000, warn_above: float = WARN_AUC) -> dict[str, Any]:
    """Cue-only classifier, cross-validated by patient: :func:`cue_scores` then
    :func:`summarize_cue_only` (``roc_auc``, ``ci``, ``top_cues``, ``warning``, ``message`` ...)."""
    scores, importance = cue_scores(df, cues, n_splits, seed, model)
    return {**summarize_cue_only(df, scores, importance, n_boot, seed, warn_above), "model": model,
            "n_splits": n_splits}


def cue_strata(cues_df: pd.DataFrame, n_bins: int = 5, score: str = "cue_score", prob: str = "prob",
               label: str = "label") -> dict[str, Any]:
    """The model's ROC-AUC among images the cues cannot tell apart.

    ``cues_df`` holds, per image, the out-of-fold cue-only score (``score``, e.g. from
    :func:`cue_scores`: a propensity of "looks like a PNEUMONIA film"), the model's
    probability (``prob``) and ``label``. Images are cut into ``n_bins`` quantile strata of
    the cue score; within one, the cues predict about the same for every image, so they
    cannot explain the model's ranking there. A model that reads the lungs keeps its AUC
    inside the strata; one that reads the framing falls toward 0.5.

    Returns ``strata`` (DataFrame: ``stratum``, ``score_lo``, ``score_hi``, ``n``,
    ``n_normal``, ``n_pneumonia``, ``roc_auc``, NaN where one class is missing),
    ``weighted_auc`` (mean over strata with both classes, weighted by their NORMAL x
    PNEUMONIA pair counts: the share of within-stratum pairs ranked right),
    ``overall_auc`` and ``pairs_share`` (within-stratum pairs / all pairs: how much of the
    comparison is left once cues are matched; strata with extreme cue scores are one-class).
    """
    data = cues_df[[score, prob, label]].dropna()
    strata = pd.qcut(data[score].rank(method="first"), n_bins, labels=False)
    rows = []
    for k, part in data.groupby(strata, sort=True):
        y = part[label].to_numpy(int)
        both = 0 < y.sum() < len(y)
        rows.append({"stratum": int(k), "score_lo": float(part[score].min()), "score_hi": float(part[score].max()),
                     "n": len(y), "n_normal": int((y == 0).sum()), "n_pneumonia": int(y.sum()),
                     "roc_auc": float(fast_auc(y, part[prob])) if both else float("nan")})
    table = pd.DataFrame(rows)
    pairs = table["n_normal"] * table["n_pneumonia"]
    used = table["roc_auc"].notna()
    y_all = data[label].to_numpy(int)
    total_pairs = float((y_all == 0).sum() * (y_all == 1).sum())
    weighted = float(np.average(table.loc[used, "roc_auc"], weights=pairs[used])) if used.any() else float("nan")
    return {"strata": table, "weighted_auc": weighted, "overall_auc": fast_auc(y_all, data[prob].to_numpy()),
            "pairs_share": float(pairs[used].sum() / total_pairs) if total_pairs else float("nan")}


def fit_cue_model(df: pd.DataFrame, cues: Sequence[str] = CLASSIFIER_CUES, seed: int = 0,
                  model: str = "hgb") -> Any:
    """A cue-only classifier fitted on every measured row of ``df`` (e.g. the training split),
    to score other images with :func:`apply_cue_model`: how much each looks like a PNEUMONIA
    film *by its cues alone*, in the training data's terms."""
    data = _usable(df)
    y = data["label"].to_numpy(int)
    if not 0 < y.sum() < len(y):
        raise ValueError(f"a cue model needs both classes, got {len(y)} image(s) with {int(y.sum())} PNEUMONIA")
    with threadpool_limits(limits=1, user_api="openmp"):
        return _classifier(model, seed).fit(data[list(cues)].to_numpy(np.float64), y), tuple(cues)


def apply_cue_model(fitted: Any, df: pd.DataFrame) -> pd.Series:
    """Cue scores of ``df``'s rows from :func:`fit_cue_model`'s result (NaN where unmeasured)."""
    clf, cues = fitted
    data = _usable(df)
    with threadpool_limits(limits=1, user_api="openmp"):
        scores = clf.predict_proba(data[list(cues)].to_numpy(np.float64))[:, 1] if len(data) else np.empty(0)
    return pd.Series(scores, index=data.index).reindex(df.index)


def strata_report(cues_df: pd.DataFrame, scores: pd.Series, probs: Sequence[float], n_bins: int = 5,
                  source: str = "") -> dict[str, Any]:
    """JSON-ready :func:`cue_strata` of the model's ``probs`` against cue ``scores`` (both
    aligned with ``cues_df``'s rows), plus the cue-only ROC-AUC on these images and where the
    cue scores came from (``source``). ``weighted_auc`` near ``model_auc``: the model ranks
    the classes as well where the cues cannot; near 0.5: it reads the cues."""
    table = cues_df[["label"]].assign(cue_score=np.asarray(scores, np.float64), prob=np.asarray(probs, np.float64))
    s = cue_strata(table, n_bins=n_bins)
    ok = table["cue_score"].notna()
    y = table.loc[ok, "label"].to_numpy(int)
    cue_auc = float(rank_auc(y, table.loc[ok, "cue_score"].to_numpy())) if 0 < y.sum() < len(y) else float("nan")
    return _finite({"model_auc": s["overall_auc"], "weighted_auc": s["weighted_auc"],
                    "pairs_share": s["pairs_share"], "cue_only_auc": cue_auc, "n_bins": n_bins,
                    "n": int(ok.sum()), "cue_scores": source, "strata": s["strata"].to_dict("records")})


def model_within_cues(cues_df: pd.DataFrame, probs: Sequence[float], n_bins: int = 5, n_splits: int = 5,
                      seed: int = 0) -> dict[str, Any]:
    """:func:`strata_report` with cue scores cross-fitted on these images themselves
    (:func:`cue_scores`, folds by patient): for a labelled set with no training cues at hand
    (``cxr-ray evaluate --cue-strata``). ``ValueError`` with fewer than ``n_splits``
    patients per class."""
    scores, _ = cue_scores(cues_df, CLASSIFIER_CUES, n_splits, seed)
    return strata_report(cues_df, scores, probs, n_bins,
                         source=f"cue-only classifier cross-fitted on these images ({n_splits} patient folds)")


def format_strata(report: dict[str, Any]) -> str:
    """One line: the model's ROC-AUC overall and within cue-matched strata."""
    return (f"model ROC-AUC {_fmt3(report['model_auc'])} overall, {_fmt3(report['weighted_auc'])} within "
            f"{report['n_bins']} cue-matched strata ({_pct(report['pairs_share'])} of NORMAL/PNEUMONIA pairs "
            f"compared; cue-only ROC-AUC here {_fmt3(report['cue_only_auc'])})")


def _fmt3(value: Any) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _pct(value: Any) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.0f}%"


def _finite(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not np.isfinite(value) else value
