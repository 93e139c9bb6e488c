"""Label-free drift report: do the images seen here look like the checkpoint's validation pass?

Training stores :func:`reference_summary` of its validation pass in the checkpoint (~2 KB of JSON,
+0.5 KB per acquisition statistic); ``evaluate`` and ``score`` pass the images' logits (and
acquisition statistics) to :func:`compare` and print :func:`format_drift`. Without labels
nothing can say what recall and specificity are at a new site, so a warning says what moved and
ends with the command that measures it on a labelled sample (``cxr-ray calibrate``). ``logits``
are raw (before temperature and bias) and computed as the reference's were: one summary per
model, TTA mode or ensemble.

- **Prevalence** (Saerens, Latinne & Decaestecker 2002): EM re-weights each image's posterior
  ``p(PNEUMONIA | logit)`` at validation's prevalence to the prevalence that best explains the
  new logits. The posteriors come from the class-conditional densities of the stored per-class
  logit quantiles (:func:`log_density`), not from the calibrated probabilities: they hold at
  validation's prevalence by construction, however the checkpoint was calibrated. At most
  EM_MAX_ITER steps; prevalence clipped to PREVALENCE_CLIP, posteriors to [1e-12, 1 - 1e-12].
- **Logits** (``ks_adjusted``): the Kolmogorov-Smirnov distance between the new logits and
  validation's re-weighted to EM's prevalence, ``(1 - pi) F_NORMAL + pi F_PNEUMONIA`` (CDFs
  through 41 quantiles). A prevalence change alone leaves it small; NORMAL films that score higher
  do not. ``ks_logits`` (validation's mix as it was) is reported too; it moves with prevalence.
- **Predicted-positive rate** (with ``probs``, at the summary's threshold) against ``pi * recall +
  (1 - pi) * (1 - specificity)`` from validation at EM's prevalence: a gap means the operating
  point moved.
- **Acquisition statistics** (:func:`acquisition_stats`: the audit's exposure, texture and body-field
  cues of :data:`ACQUISITION_STATS`, measured on the model-input images, i.e. after the
  checkpoint's own decode and resize, at most MAX_STAT_IMAGES per pass): KS against their stored
  quantiles, and the median's shift in reference IQRs. They say *what* moved at the site
  (exposure, sharpness, framing) where the logits say *that* the model sees something new.

Each check that fires adds a reason; any reason warns:

- Never below MIN_IMAGES (100): "too few images to judge". Below that only gross shifts clear the
  critical value and EM's prevalence is +-0.1 or worse.
- KS (adjusted logits, each acquisition statistic) above ``max(KS_FLOOR, c sqrt((n + m) / (n m))
  + step / 2)``: the two-sample critical value at ALPHA = 0.001 (``c = sqrt(-ln(ALPHA / 2) / 2)``;
  ``m`` the reference's size, its quantiles being a sample too; for the re-weighted logits the
  effective ``1 / ((1 - pi)^2 / n0 + pi^2 / n1)``), plus half the quantile step (the resolution of
  the stored CDF), never below KS_FLOOR = 0.1 so that a big batch does not warn on a negligible
  shift. ALPHA is small because the report runs on every job and makes several tests: one that
  cries wolf is ignored.
- The positive rate more than RATE_Z (3.5) standard errors *and* RATE_FLOOR (0.05) from the
  expected; the error is the delta method's over the new images (EM's estimate moving with them)
  plus validation's (recall, specificity, and as much again for EM's posteriors).
- The prevalence alone does **not** warn: recall and specificity hold under a pure prevalence
  change (PPV and NPV do not); the message states the estimate. It warns only where the caller
  gives ``prevalence_range`` and the estimate's 99.9% interval lies outside it.

Limit: label-free, films of one class that come to score like the other's are indistinguishable
from a change of prevalence; the estimate is then the only sign, hence it is always stated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from cxr_ray.analysis.cues import pixel_cues
from cxr_ray.analysis.metrics import decision_threshold, is_positive, sigmoid
from cxr_ray.data.catalog import CLASSES

SUMMARY_VERSION = 1
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 41)  # every 2.5%: the CDF known to within one step
MIN_IMAGES = 100  # below it: "too few images to judge", never a warning
ALPHA = 0.001  # per KS test; see the module doc
KS_FLOOR = 0.10  # the smallest KS distance worth a warning, however many images
RATE_Z, RATE_FLOOR = 3.5, 0.05  # predicted-positive rate vs expected: standard errors, and absolute
PREVALENCE_Z = 3.29  # two-sided 99.9%: the prevalence interval checked against prevalence_range
EM_MAX_ITER, EM_TOL = 1000, 1e-7
PREVALENCE_CLIP = (0.001, 0.999)
WHAT_TO_DO = ("Recall and specificity at the stored threshold may not hold here: label a sample of "
              "these images and run `cxr-ray calibrate --checkpoint {checkpoint} --data {data} --out DIR`")


# cues of cxr_ray.analysis.cues.pixel_cues that vary smoothly (no mass at one value, unlike the margins) and
# say what a site changed: exposure (grey percentiles), sharpness and noise, body field size
ACQUISITION_STATS = ("p5", "p50", "p95", "sharpness", "noise", "body_w", "body_h")
MAX_STAT_IMAGES = 1000  # ~3 ms an image at 128 px (lung proxy skipped): a few seconds per pass at most


def acquisition_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """:data:`ACQUISITION_STATS` of uint8 model-input images ``(B, 1, N, N)`` or ``(B, N, N)``,
    one float64 array per name (``cxr_ray.analysis.cues.pixel_cues``, as the audit measures them)."""
    arr = np.asarray(images)
    rows = [pixel_cues(a, lung=False) for a in arr.reshape(len(arr), arr.shape[-2], arr.shape[-1])]
    return {k: np.array([r[k] for r in rows], np.float64) for k in ACQUISITION_STATS}


class StatsCollector:
    """Measures :func:`acquisition_stats` of the first ``limit`` images that pass through
    :meth:`watch` (numpy batches with an ``image`` column, e.g. before a ``Collate``)."""

    def __init__(self, limit: int = MAX_STAT_IMAGES):
        self.limit = limit
        self.parts: list[dict[str, np.ndarray]] = []
        self.n = 0

    def watch(self, batches: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        """Yield every batch unchanged, measuring its images until ``limit`` are measured."""
        for batch in batches:
            if self.n < self.limit:
                images = np.asarray(batch["image"])[: self.limit - self.n]
                self.parts.append(acquisition_stats(images))
                self.n += len(images)
            yield batch

    def result(self) -> dict[str, np.ndarray] | None:
        """The statistics measured so far (None before any image)."""
        if not self.n:
            return None
        return {k: np.concatenate([p[k] for p in self.parts]) for k in ACQUISITION_STATS}


def reference_summary(logits: np.ndarray, labels: np.ndarray, probs: np.ndarray, threshold: float,
                      acquisition: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The JSON-able summary of a validation pass that :func:`compare` checks new images against.

    ``logits``: raw PNEUMONIA logits; ``labels``: 0 NORMAL / 1 PNEUMONIA; ``probs``: the
    calibrated probabilities the stored ``threshold`` applies to (:func:`cxr_ray.analysis.metrics.is_positive`);
    ``acquisition``: optional named per-image statistics (non-finite values are dropped). Keys:
    ``version``, ``n``, ``n_per_class``, ``prevalence``, ``threshold``, ``positive_rate``,
    ``recall``, ``specificity``, ``levels`` (how many quantile levels, evenly spaced from 0 to 1),
    ``quantiles`` (of the logits: ``all``, ``NORMAL``, ``PNEUMONIA``), ``acquisition`` (per
    name: ``n``, ``quantiles``).
    ``ValueError`` when a class is missing or the arrays disagree in length.
    """
    z, y, p = np.asarray(logits, np.float64), np.asarray(labels).astype(int), np.asarray(probs)
    if not len(z) == len(y) == len(p):
        raise ValueError(f"reference_summary: logits, labels and probs must have one entry per image, got "
                         f"{len(z)}, {len(y)}, {len(p)}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"reference_summary: labels must be 0 (NORMAL) or 1 (PNEUMONIA), "
                         f"got {sorted(set(y.tolist()))}")
    keep = np.isfinite(z)
    z, y, p = z[keep], y[keep], p[keep]
    counts = [int((y == c).sum()) for c in (0, 1)]
    if min(counts) == 0:
        raise ValueError(f"reference_summary needs both classes, got NORMAL={counts[0]}, PNEUMONIA={counts[1]}")
    pred = is_positive(p, threshold)
    return {
        "version": SUMMARY_VERSION, "n": len(z), "n_per_class": dict(zip(CLASSES, counts)),
        "prevalence": counts[1] / len(z), "threshold": float(threshold), "positive_rate": float(pred.mean()),
        "recall": float(pred[y == 1].mean()), "specificity": float(1 - pred[y == 0].mean()),
        "levels": len(QUANTILE_LEVELS),
        "quantiles": {"all": _quantiles(z), **{c: _quantiles(z[y == i]) for i, c in enumerate(CLASSES)}},
        "acquisition": {name: {"n": len(v), "quantiles": _quantiles(v)}
                        for name, v in _finite_stats(acquisition).items()},
    }


def compare(summary: dict[str, Any], logits: np.ndarray, acquisition: dict[str, np.ndarray] | None = None,
            probs: np.ndarray | None = None, threshold: float | None = None, *,
            prevalence_range: tuple[float, float] | None = None, checkpoint: str = "CHECKPOINT",
            data: str = "SITE") -> dict[str, Any]:
    """Compare new images' ``logits`` (and ``acquisition`` statistics, ``probs`` at ``threshold``,
    default the summary's) with a :func:`reference_summary`, without labels (see the module doc).

    Returns a JSON-able dict: ``n``, ``n_ref``, ``enough`` (n >= MIN_IMAGES), ``ks_logits``,
    ``ks_adjusted``, ``ks_critical``, ``direction`` (``up``/``down``), ``where`` (``NORMAL``- or
    ``PNEUMONIA``-like logits), ``prevalence_em``, ``prevalence_em_se``, ``em_iterations``, ``em_converged``,
    ``prevalence_ref``, ``positive_rate``, ``positive_rate_ref``, ``positive_rate_expected``,
    ``positive_rate_se``, ``acquisition`` (per name: ``ks``, ``ks_critical``, ``direction``,
    ``median_shift_iqr``, ``n``, ``drift``), ``acquisition_skipped``, ``warn``, ``reasons`` (one
    string each) and ``message`` (one line, with "drift"); unavailable numbers are None.
    ``prevalence_range``: (low, high) plausible here, or None (the prevalence alone never warns);
    ``checkpoint`` and ``data`` fill in the suggested command.
    """
    _check_summary(summary)
    if prevalence_range is not None and not 0.0 <= prevalence_range[0] <= prevalence_range[1] <= 1.0:
        raise ValueError(f"drift compare: prevalence_range must be (low, high) with 0 <= low <= high <= 1, "
                         f"got {prevalence_range!r}")
    z = np.asarray(logits, np.float64).ravel()
    p = None if probs is None else np.asarray(probs, np.float64).ravel()
    if p is not None and len(p) != len(z):
        raise ValueError(f"drift compare: probs must have one entry per logit, got {len(p)} and {len(z)}")
    keep = np.isfinite(z) if p is None else np.isfinite(z) & np.isfinite(p)
    z, p = z[keep], (None if p is None else p[keep])
    out: dict[str, Any] = {"n": len(z), "n_ref": int(summary["n"]), "enough": len(z) >= MIN_IMAGES,
                           "prevalence_ref": float(summary["prevalence"])}
    em = _em(summary, z) if len(z) else None
    out.update(_logit_report(summary, z, em))
    out.update(_rate_report(summary, p, threshold, em))
    out.update(_acquisition_report(summary, acquisition))
    reasons = _reasons(out, prevalence_range) if out["enough"] else []
    out.update(warn=bool(reasons), reasons=reasons, message=_message(out, reasons, checkpoint, data))
    return out


def format_drift(result: dict[str, Any]) -> list[str]:
    """The terminal lines of a :func:`compare` result: its message, then the numbers behind it."""
    lines = [("WARNING " if result["warn"] else "") + result["message"]]
    if not result["enough"]:
        return lines
    lines.append(f"  logits: KS {result['ks_adjusted']:.3f} against validation at the estimated prevalence "
                 f"(critical {result['ks_critical']:.3f}; {result['ks_logits']:.3f} at validation's), "
                 f"n {result['n']} vs {result['n_ref']}")
    lines.append(f"  prevalence (EM, label-free): {result['prevalence_em']:.2f} +- {result['prevalence_em_se']:.2f} "
                 f"(validation {result['prevalence_ref']:.2f})"
                 + ("" if result["em_converged"] else f"; EM stopped after {result['em_iterations']} steps"))
    if result["positive_rate"] is not None:
        lines.append(f"  predicted PNEUMONIA: {result['positive_rate']:.3f} (validation "
                     f"{_fmt(result['positive_rate_ref'])}; expected {_fmt(result['positive_rate_expected'])} "
                     f"at the estimated prevalence)")
    for name, a in result["acquisition"].items():
        lines.append(f"  {name}: KS {a['ks']:.3f} (critical {a['ks_critical']:.3f}), median "
                     f"{_fmt(a['median_shift_iqr'], '+.2f')} IQR, n {a['n']}" + (" <- drift" if a["drift"] else ""))
    if result["acquisition_skipped"]:
        lines.append(f"  not compared (not in both): {', '.join(result['acquisition_skipped'])}")
    return lines


def ks_critical(n: int, m: float, step: float = 0.0) -> float:
    """The KS distance that warns for ``n`` new against ``m`` reference values whose CDF is
    known to within ``step``: ``max(KS_FLOOR, c(ALPHA) sqrt((n + m) / (n m)) + step / 2)``."""
    c = np.sqrt(-np.log(ALPHA / 2) / 2)
    return float(max(KS_FLOOR, c * np.sqrt((n + m) / (n * m)) + step / 2))


class EMResult(NamedTuple):
    """What :func:`em_prevalence` found: the prevalence, its standard error (observed Fisher
    information; the new sample's noise only), the steps taken, whether it converged, each
    image's PNEUMONIA posterior at the prevalence and its score ``d log L / d pi``."""
    prevalence: float
    se: float
    iterations: int
    converged: bool
    posteriors: np.ndarray
    scores: np.ndarray


def em_prevalence(posteriors: np.ndarray, prior: float) -> EMResult:
    """Saerens-Latinne-Decaestecker EM for images whose PNEUMONIA ``posteriors`` hold at
    prevalence ``prior``: each step re-weights them by ``pi / prior`` and ``(1 - pi) / (1 - prior)``
    and takes their mean as the new ``pi``, until it moves less than EM_TOL (at most EM_MAX_ITER
    steps; ``pi`` within PREVALENCE_CLIP)."""
    post = np.clip(np.asarray(posteriors, np.float64), 1e-12, 1 - 1e-12)

    def at(pi: float) -> np.ndarray:  # the posteriors at prevalence pi
        a, b = pi / prior * post, (1 - pi) / (1 - prior) * (1 - post)
        return a / (a + b)

    pi, converged, it = prior, False, 0
    for it in range(1, EM_MAX_ITER + 1):
        new = float(np.clip(at(pi).mean(), *PREVALENCE_CLIP))
        converged, pi = abs(new - pi) < EM_TOL, new
        if converged:
            break
    w = at(pi)
    scores = w / pi - (1 - w) / (1 - pi)  # (f1 - f0) / mixture, per image
    info = float((scores ** 2).sum())
    return EMResult(pi, 1.0 / np.sqrt(info) if info > 0 else 0.5, it, converged, w, scores)


def log_density(levels: np.ndarray, quantiles: Any, n: int) -> Callable[[np.ndarray], np.ndarray]:
    """The log density of a class's logits from its stored quantiles: each step between two
    quantiles holds its share of the mass spread evenly, and beyond the smallest and largest a
    new value has the chance ``1 / (n + 1)`` each (of ``n`` reference values), as an exponential
    tail continuing the outermost step's density (so no logit is impossible for either class)."""
    q = np.asarray(quantiles, np.float64)
    tail = 1.0 / (n + 1)
    width = np.maximum(np.diff(q), max(1e-9, 1e-6 * (q[-1] - q[0])))  # tied quantiles: a narrow step
    dens = np.diff(levels) * (1 - 2 * tail) / width
    scale_lo, scale_hi = tail / dens[0], tail / dens[-1]  # each tail's mass is `tail`

    def logf(x: np.ndarray) -> np.ndarray:
        inside = np.log(dens[np.clip(np.searchsorted(q, x, side="right") - 1, 0, len(dens) - 1)])
        below = np.log(dens[0]) - (q[0] - x) / scale_lo
        above = np.log(dens[-1]) - (x - q[-1]) / scale_hi
        return np.where(x < q[0], below, np.where(x > q[-1], above, inside))

    return logf


def _em(summary: dict[str, Any], z: np.ndarray) -> EMResult:
    """EM's prevalence for logits ``z``, from the posteriors at validation's prevalence that the
    per-class quantiles' densities (:func:`log_density`) give."""
    levels, q, prior = _levels(summary), summary["quantiles"], float(summary["prevalence"])
    n0, n1 = (int(summary["n_per_class"][c]) for c in CLASSES)
    # beyond validation's extremes the posterior stays the extreme's: the tails' scales differ, and
    # the wider one would otherwise call a logit far above every PNEUMONIA one NORMAL
    z = np.clip(z, q["all"][0], q["all"][-1])
    log_ratio = log_density(levels, q[CLASSES[1]], n1)(z) - log_density(levels, q[CLASSES[0]], n0)(z)
    return em_prevalence(sigmoid(log_ratio + np.log(prior / (1 - prior))), prior)


def _logit_report(summary: dict[str, Any], z: np.ndarray, em: EMResult | None) -> dict[str, Any]:
    """EM's prevalence, the raw and the prevalence-adjusted KS of the logits, and where they moved."""
    if em is None:
        return dict.fromkeys(("ks_logits", "ks_adjusted", "ks_critical", "direction", "where", "prevalence_em",
                              "prevalence_em_se", "em_iterations", "em_converged"))
    levels, q, pi = _levels(summary), summary["quantiles"], em.prevalence
    n0, n1 = (int(summary["n_per_class"][c]) for c in CLASSES)
    f0, f1 = (_quantile_cdf(levels, q[c]) for c in CLASSES)
    raw, _, _ = _ks(z, _quantile_cdf(levels, q["all"]))
    adjusted, direction, x = _ks(z, lambda v, left: (1 - pi) * f0(v, left) + pi * f1(v, left))
    m_eff = 1.0 / ((1 - pi) ** 2 / n0 + pi ** 2 / n1)  # the re-weighted reference's effective size
    mid = (np.interp(0.5, levels, q[CLASSES[0]]) + np.interp(0.5, levels, q[CLASSES[1]])) / 2
    return {"ks_logits": raw, "ks_adjusted": adjusted, "ks_critical": ks_critical(len(z), m_eff, _step(levels)),
            "direction": direction, "where": CLASSES[int(x >= mid)], "prevalence_em": pi,
            # the reference quantiles are a sample too: their noise adds n / n_ref of the new sample's
            "prevalence_em_se": float(em.se * np.sqrt(1 + len(z) / summary["n"])),
            "em_iterations": em.iterations, "em_converged": em.converged}


def _rate_report(summary: dict[str, Any], p: np.ndarray | None, threshold: float | None,
                 em: EMResult | None) -> dict[str, Any]:
    """The predicted-positive rate, validation's, and the rate validation's recall and
    specificity give at EM's prevalence (only at the summary's threshold), with the standard
    error of the gap: the new images' (delta method, EM's estimate moving with them) and
    validation's (its recall, specificity and quantiles)."""
    out = dict.fromkeys(("positive_rate", "positive_rate_ref", "positive_rate_expected", "positive_rate_se"))
    if p is None or not len(p):
        return out
    t = summary["threshold"] if threshold is None else threshold
    d = is_positive(p, t).astype(np.float64)
    out["positive_rate"] = float(d.mean())
    if em is None or decision_threshold(t) != decision_threshold(summary["threshold"]):
        return out  # validation's rates belong to the summary's threshold only
    pi, tpr, fpr = em.prevalence, summary["recall"], 1 - summary["specificity"]
    n0, n1 = (int(summary["n_per_class"][c]) for c in CLASSES)
    info = float(np.mean(em.scores ** 2)) or 1.0
    gap = d - (tpr - fpr) * em.scores / info  # each image's influence on rate - expected rate
    tpr_s, fpr_s = (tpr * n1 + 0.5) / (n1 + 1), (fpr * n0 + 0.5) / (n0 + 1)  # never a zero variance
    # validation's share: its recall and specificity, and as much again for EM's posteriors (their
    # noise moves the estimate as much as recall's and specificity's move the prevalence that
    # "adjusted classify and count" would give, (rate - fpr) / (tpr - fpr))
    var = gap.var() / len(p) + 2 * ((1 - pi) ** 2 * fpr_s * (1 - fpr_s) / n0 + pi ** 2 * tpr_s * (1 - tpr_s) / n1)
    out.update(positive_rate_ref=float(summary["positive_rate"]), positive_rate_se=float(np.sqrt(var)),
               positive_rate_expected=float(pi * tpr + (1 - pi) * fpr))
    return out


def _acquisition_report(summary: dict[str, Any], acquisition: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """Per acquisition statistic in both: KS against its stored quantiles, which way it moved,
    and the median's shift in reference IQR units (None when the IQR is 0); the names in only
    one of them are ``acquisition_skipped``."""
    ref, new = summary.get("acquisition", {}), _finite_stats(acquisition)
    levels, report = _levels(summary), {}
    for name in sorted(set(ref) & set(new)):
        q, v = np.asarray(ref[name]["quantiles"], np.float64), new[name]
        ks, direction, _ = _ks(v, _quantile_cdf(levels, q))
        crit = ks_critical(len(v), ref[name]["n"], _step(levels))
        iqr = np.interp(0.75, levels, q) - np.interp(0.25, levels, q)
        shift = float((np.median(v) - np.interp(0.5, levels, q)) / iqr) if iqr > 0 else None
        report[name] = {"ks": ks, "ks_critical": crit, "direction": direction, "median_shift_iqr": shift,
                        "n": len(v), "drift": bool(len(v) >= MIN_IMAGES and ks > crit)}
    return {"acquisition": report, "acquisition_skipped": sorted(set(ref) ^ set(new))}


def _reasons(r: dict[str, Any], prevalence_range: tuple[float, float] | None) -> list[str]:
    """One sentence per check that warns (see the module doc)."""
    reasons = []
    if r["ks_adjusted"] is not None and r["ks_adjusted"] > r["ks_critical"]:
        what = {("NORMAL", "up"): "NORMAL-like films score higher: more false positives",
                ("NORMAL", "down"): "NORMAL-like films score lower",
                ("PNEUMONIA", "up"): "PNEUMONIA-like films score higher",
                ("PNEUMONIA", "down"): "PNEUMONIA-like films score lower: more missed pneumonia"}
        reasons.append(f"logits shifted {r['direction']}: KS {r['ks_adjusted']:.2f} > {r['ks_critical']:.2f} "
                       f"(not a prevalence change); {what[(r['where'], r['direction'])]}")
    if r["positive_rate_se"] is not None:
        gap = r["positive_rate"] - r["positive_rate_expected"]
        if abs(gap) > max(RATE_FLOOR, RATE_Z * r["positive_rate_se"]):
            risk = "specificity" if gap > 0 else "recall"
            reasons.append(f"{r['positive_rate']:.2f} called PNEUMONIA, {r['positive_rate_expected']:.2f} expected at "
                           f"the estimated prevalence: {risk} has likely dropped")
    if prevalence_range is not None and r["prevalence_em"] is not None:
        lo, hi = prevalence_range
        half = PREVALENCE_Z * r["prevalence_em_se"]
        if r["prevalence_em"] + half < lo or r["prevalence_em"] - half > hi:
            which = CLASSES[0] if r["prevalence_em"] > hi else CLASSES[1]
            reasons.append(f"the estimated prevalence is outside the plausible {lo:.2f}-{hi:.2f}: "
                           f"{which} films may score like the other class")
    for name, a in r["acquisition"].items():
        if a["drift"]:
            shift = a["median_shift_iqr"]
            moved = f"median {shift:+.1f} IQR, " if shift is not None else ""
            reasons.append(f"{name} moved {a['direction']} ({moved}KS {a['ks']:.2f} > {a['ks_critical']:.2f}): "
                           f"check the site's acquisition and export (exposure, windowing, bit depth)")
    return reasons


def _message(r: dict[str, Any], reasons: list[str], checkpoint: str, data: str) -> str:
    """The one line the terminal shows first; it always contains "drift"."""
    if not r["enough"]:
        return f"drift check: too few images to judge ({r['n']} < {MIN_IMAGES}); nothing compared"
    prevalence = f"estimated prevalence {r['prevalence_em']:.2f} (validation {r['prevalence_ref']:.2f})"
    if reasons:
        return (f"drift from the validation pass: {'; '.join(reasons)}; {prevalence}. "
                + WHAT_TO_DO.format(checkpoint=checkpoint, data=data))
    line = (f"drift check: no drift from the validation pass (logits KS {r['ks_adjusted']:.2f} <= "
            f"{r['ks_critical']:.2f}); ")
    if not _prevalence_moved(r):
        return line + prevalence
    return (line + f"{prevalence}: a prevalence change alone keeps recall and specificity (not PPV/NPV); if "
            f"{r['prevalence_em']:.2f} is implausible at this site, its films have changed: check a labelled sample")


def _prevalence_moved(r: dict[str, Any]) -> bool:
    """EM's prevalence is PREVALENCE_Z standard errors from validation's."""
    return abs(r["prevalence_em"] - r["prevalence_ref"]) > PREVALENCE_Z * r["prevalence_em_se"]


def _ks(x: np.ndarray, cdf: Callable[[np.ndarray, bool], np.ndarray]) -> tuple[float, str, float]:
    """``(KS distance, "up"/"down", where)`` of sample ``x`` against ``cdf(values, left)``
    (``left``: the left limit, for CDFs with jumps). "up": the sample lies above the reference."""
    xs = np.sort(x)
    m = len(xs)
    below = np.arange(1, m + 1) / m - cdf(xs, False)  # sample CDF above the reference: lower values
    above = cdf(xs, True) - np.arange(m) / m  # reference above the sample CDF: higher values
    i, j = int(np.argmax(below)), int(np.argmax(above))
    if above[j] >= below[i]:
        return float(above[j]), "up", float(xs[j])
    return float(below[i]), "down", float(xs[i])


def _quantile_cdf(levels: np.ndarray, quantiles: Any) -> Callable[[np.ndarray, bool], np.ndarray]:
    """The CDF through ``(quantiles, levels)``: linear between distinct quantiles, a jump where
    several levels share a value (a discrete statistic), 0 below the first and 1 above the last."""
    q = np.asarray(quantiles, np.float64)
    values, first = np.unique(q, return_index=True)
    last = np.r_[first[1:] - 1, len(q) - 1]
    lo, hi = levels[first], levels[last]  # the CDF's left limit and value at each distinct quantile

    if len(values) == 1:  # one value: a single jump
        return lambda x, left: np.where((x > values[0]) | ((x == values[0]) & (not left)), 1.0, 0.0)

    def cdf(x: np.ndarray, left: bool) -> np.ndarray:
        i = np.searchsorted(values, x, side="right") - 1  # the last quantile <= x
        k = np.clip(i, 0, len(values) - 2)
        f = hi[k] + (x - values[k]) / (values[k + 1] - values[k]) * (lo[k + 1] - hi[k])
        f = np.where(i < 0, 0.0, np.where(i >= len(values) - 1, 1.0, f))
        if left:  # at a quantile itself: the level below its jump
            at = np.maximum(i, 0)
            f = np.where((i >= 0) & (x == values[at]), lo[at], f)
        return f

    return cdf


def _check_summary(summary: Any) -> None:
    """``ValueError`` naming what is missing unless ``summary`` is a :func:`reference_summary`."""
    need = ("version", "n", "n_per_class", "prevalence", "threshold", "quantiles")
    if not isinstance(summary, dict) or any(k not in summary for k in need):
        found = sorted(summary) if isinstance(summary, dict) else type(summary).__name__
        raise ValueError(f"drift reference: expected a reference_summary with {list(need)}, got {found}")
    if summary["version"] != SUMMARY_VERSION:
        raise ValueError(f"drift reference: version {summary['version']!r}; this cxr_ray reads {SUMMARY_VERSION}")


def _levels(summary: dict[str, Any]) -> np.ndarray:
    return np.linspace(0.0, 1.0, int(summary.get("levels", len(QUANTILE_LEVELS))))


def _step(levels: np.ndarray) -> float:
    return 1.0 / (len(levels) - 1)


def _finite_stats(acquisition: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Each named statistic as float64 without its non-finite values (empty ones dropped)."""
    out = {}
    for name, values in (acquisition or {}).items():
        v = np.asarray(values, np.float64).ravel()
        out[str(name)] = v[np.isfinite(v)]
    return {k: v for k, v in out.items() if len(v)}


def _quantiles(values: np.ndarray) -> list[float]:
    return _round(np.quantile(np.asarray(values, np.float64), QUANTILE_LEVELS))


def _round(values: np.ndarray) -> list[float]:
    """6 significant digits: the summary stays a few KB and rounding keeps quantiles in order."""
    return [float(f"{v:.6g}") for v in np.asarray(values, np.float64)]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
