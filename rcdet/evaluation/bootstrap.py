"""
Bootstrap confidence intervals over test images for the OOD metrics (AUROC, FPR95, AUPR-In,
AUPR-Out), and the paired bootstrap that compares two scores (or two models' family accuracy) on
the same images.

The resampling unit is the **test image**, not the detection: detections of one image share
its content, so resampling them independently would understate the spread. Each replicate
draws the test images with replacement (all of them, also those without a scored detection),
and every detection is weighted by how often its image was drawn: the cluster bootstrap of
Field & Welsh, "Bootstrapping clustered data", JRSS-B 69(3), 2007. The interval is the
percentile interval of Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 13.
With ``strata`` (the image-level protocol: ID images and OOD images), each stratum is resampled
on its own, so every replicate keeps the two set sizes.

The metrics of a replicate are the weighted forms of rcdet.evaluation.metrics' definitions
(scikit-learn's ``roc_auc_score`` and ``average_precision_score``, and ``fpr_at_recall``):
integer weights equal repeating a detection, so a replicate's value is exactly what those give
on the resampled detections (tests/evaluation/test_bootstrap.py checks this). They are computed
for all replicates at once from one sort: 1000 replicates of six scores over about 1000
detections take about a second on two CPU cores.
"""

from typing import Callable, Dict, Optional, Sequence

import numpy as np

from .metrics import RECALL_LEVEL

__all__ = [
    "METRICS",
    "resample_counts",
    "weighted_metrics",
    "bootstrap_intervals",
    "paired_bootstrap",
    "family_accuracy",
    "paired_bootstrap_family_accuracy",
    "paired_bootstrap_statistic",
]

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
# Replicates are processed in chunks of at most this many (replicate x detection) weights.
_CHUNK_ELEMENTS = 4_000_000


def resample_counts(
    num_images: int, replicates: int, seed: int, strata: Optional[np.ndarray] = None
) -> np.ndarray:
    """
    (replicates, num_images) draw counts: images resampled with replacement, within each stratum.
    """
    rng = np.random.default_rng(seed)
    counts = np.zeros((replicates, num_images), dtype=np.int64)
    if num_images == 0:
        return counts
    strata = np.zeros(num_images, dtype=np.int64) if strata is None else np.asarray(strata)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        counts[:, members] = rng.multinomial(
            len(members), np.full(len(members), 1.0 / len(members)), size=replicates
        )
    return counts


def _curves(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray):
    """Weighted cumulative positives/negatives at each distinct threshold, highest score first."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tied block
    w = weights[:, order]
    pos = positive[order]
    tp = np.cumsum(w * pos, axis=1)[:, last]
    fp = np.cumsum(w * ~pos, axis=1)[:, last]
    return tp, fp


def _safe_div(a, b):
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _average_precision(tp, fp):
    p = tp[:, -1:]
    recall = _safe_div(tp, p)
    precision = _safe_div(tp, tp + fp)
    steps = np.diff(np.concatenate([np.zeros((tp.shape[0], 1)), recall], axis=1), axis=1)
    return (steps * precision).sum(axis=1)


def _fpr_at_recall(tp, fp, p, n):
    """rcdet.evaluation.metrics.fpr_at_recall's rule on each row of weighted curves."""
    recall = tp / p[:, None]
    cols = np.arange(tp.shape[1])
    # Only thresholds up to the first that accepts all the ID weight compete.
    last = np.argmax(tp >= p[:, None], axis=1)
    distance = np.where(cols <= last[:, None], np.abs(recall - RECALL_LEVEL), np.inf)
    # The last of the closest (the lowest threshold, highest FPR): argmin of the reversed row.
    cutoff = tp.shape[1] - 1 - np.argmin(distance[:, ::-1], axis=1)
    return fp[np.arange(len(p)), cutoff] / n


def weighted_metrics(scores, is_id, weights) -> Dict[str, np.ndarray]:
    """
    AUROC, FPR95 (ID positive, higher score = ID), AUPR-In and AUPR-Out of each row of
    ``weights`` (replicates, n): arrays of shape (replicates,), NaN where a row has no ID or no
    OOD weight.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_id = np.asarray(is_id, dtype=bool).reshape(-1)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    b = weights.shape[0]
    out = {k: np.full(b, np.nan) for k in METRICS}
    if scores.size == 0:
        return out
    tp, fp = _curves(scores, is_id, weights)
    p, n = tp[:, -1], fp[:, -1]
    ok = (p > 0) & (n > 0)
    if not ok.any():
        return out
    tp, fp, p, n = tp[ok], fp[ok], p[ok], n[ok]
    tpr = np.concatenate([np.zeros((len(p), 1)), tp / p[:, None]], axis=1)
    fpr = np.concatenate([np.zeros((len(p), 1)), fp / n[:, None]], axis=1)
    out["auroc"][ok] = (np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2).sum(axis=1)
    out["fpr95"][ok] = _fpr_at_recall(tp, fp, p, n)
    out["aupr_in"][ok] = _average_precision(tp, fp)
    tp_o, fp_o = _curves(-scores, ~is_id, weights[ok])
    out["aupr_out"][ok] = _average_precision(tp_o, fp_o)
    return out


def _chunked(scores, is_id, groups, counts):
    groups = np.asarray(groups, dtype=np.int64).reshape(-1)
    step = max(1, _CHUNK_ELEMENTS // max(len(groups), 1))
    parts = [
        weighted_metrics(scores, is_id, counts[i : i + step][:, groups])
        for i in range(0, len(counts), step)
    ]
    return {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in METRICS}


def _interval(values: np.ndarray, level: float):
    v = values[~np.isnan(values)]
    # Fewer than half of the replicates defined: the interval would describe a different population.
    if v.size == 0 or v.size < 0.5 * values.size:
        return None
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def bootstrap_intervals(
    score_table: Dict[str, Optional[np.ndarray]],
    is_id,
    groups,
    num_images: int,
    replicates: int = 1000,
    seed: int = 0,
    strata: Optional[np.ndarray] = None,
    level: float = 0.95,
) -> Dict[str, Optional[Dict[str, Optional[list]]]]:
    """
    Percentile intervals ``{score: {"auroc_ci": [lo, hi], "fpr95_ci": ..., ...}}`` over image
    resamples. ``groups``: the image index (0 .. num_images-1) of each detection; every score sees
    the same resamples. Unavailable scores (None) stay None; an interval is None when fewer
    than half of the replicates have both ID and OOD detections.
    """
    counts = resample_counts(num_images, replicates, seed, strata)
    out = {}
    for name, values in score_table.items():
        if values is None:
            out[name] = None
            continue
        reps = (
            _chunked(values, is_id, groups, counts)
            if replicates
            else {k: np.zeros(0) for k in METRICS}
        )
        out[name] = {f"{k}_ci": _interval(reps[k], level) if replicates else None for k in METRICS}
    return out


def paired_bootstrap(
    runs_a: Sequence[tuple],
    runs_b: Sequence[tuple],
    num_images: int,
    metric: str = "auroc",
    replicates: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Dict[str, Optional[float]]:
    """
    Paired bootstrap of ``mean_a(metric) - mean_b(metric)``. Each run is ``(scores, is_id, groups)``
    on the same ``num_images`` test images; every replicate resamples those images once and
    evaluates every run on that resample, so the two sides are paired by image (and, when the
    runs are the same models' two scores, by detection). ``a`` and ``b`` may hold several runs
    (seeds): each side is their mean.

    Returns the observed difference, its percentile interval and a two-sided p-value,
    ``2 * min(P(d* <= 0), P(d* >= 0))`` over the replicates (clipped to 1): how often the
    resampled difference falls on the other side of zero. This reflects the test images'
    sampling only, not the training seeds' spread.
    """

    def statistic(run, counts):
        return _chunked(*run, counts)[metric]

    return paired_bootstrap_statistic(
        statistic, runs_a, runs_b, num_images, replicates, seed, level
    )


def family_accuracy(held_out_labels, in_family, groups, weights: np.ndarray) -> np.ndarray:
    """
    The mean over held-out classes of each class's family accuracy (the weighted fraction of its
    claimed objects placed in its family), for each row of ``weights`` (B, num_images): a
    class without a drawn object in a row is left out of that row's mean (NaN if none is left).

    Args:
        held_out_labels: (N,) held-out class of each claimed object whose family is defined.
        in_family: (N,) whether its nearest known class lies in that family.
        groups: (N,) its test image.
    """
    labels = np.asarray(held_out_labels, dtype=np.int64).reshape(-1)
    hits = np.asarray(in_family, dtype=np.float64).reshape(-1)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))[:, np.asarray(groups, dtype=np.int64)]
    per_class = []
    for h in np.unique(labels):
        m = labels == h
        total = w[:, m].sum(axis=1)
        hit = (w[:, m] * hits[m]).sum(axis=1)
        per_class.append(np.divide(hit, total, out=np.full_like(total, np.nan), where=total > 0))
    if not per_class:
        return np.full(w.shape[0], np.nan)
    stacked = np.stack(per_class)
    defined = ~np.isnan(stacked)
    return np.where(
        defined.any(axis=0), np.nansum(stacked, axis=0) / np.maximum(defined.sum(axis=0), 1), np.nan
    )


def paired_bootstrap_family_accuracy(
    runs_a: Sequence[tuple], runs_b: Sequence[tuple], num_images: int, **options
) -> Dict[str, Optional[float]]:
    """
    :func:`paired_bootstrap` of the mean family accuracy (:func:`family_accuracy`); each run is
    ``(held_out_labels, in_family, groups)`` of its claimed held-out objects. The two sides may
    claim different objects of the same images: the pairing is by image. ``options``:
    ``replicates``, ``seed`` and ``level``, as for :func:`paired_bootstrap_statistic`.
    """

    def statistic(run, counts):
        return family_accuracy(*run, counts)

    return paired_bootstrap_statistic(statistic, runs_a, runs_b, num_images, **options)


def paired_bootstrap_statistic(
    statistic: Callable[[tuple, np.ndarray], np.ndarray],
    runs_a: Sequence[tuple],
    runs_b: Sequence[tuple],
    num_images: int,
    replicates: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Dict[str, Optional[float]]:
    """
    The paired bootstrap of :func:`paired_bootstrap` for any ``statistic(run, counts)`` that
    evaluates one run on each row of (B, num_images) image draw counts. ``per_run``: the
    observed difference of each pair of runs (``runs_a[i]`` against ``runs_b[i]``, the same
    seed), None where undefined: the interval covers the test images' sampling only, and
    whether a difference holds seed after seed is what shows the trainings' spread.
    """
    counts = resample_counts(num_images, replicates, seed)
    ones = np.ones((1, num_images), dtype=np.int64)

    def side(runs, c):
        return np.mean([statistic(run, c) for run in runs], axis=0)

    per_run = [float(statistic(a, ones)[0] - statistic(b, ones)[0]) for a, b in zip(runs_a, runs_b)]
    per_run = [None if np.isnan(v) else v for v in per_run]
    observed = float(side(runs_a, ones)[0] - side(runs_b, ones)[0])
    d = side(runs_a, counts) - side(runs_b, counts)
    d = d[~np.isnan(d)]
    if np.isnan(observed) or d.size < 0.5 * replicates or d.size == 0:
        return {
            "difference": None if np.isnan(observed) else observed,
            "ci": None,
            "p_value": None,
            "replicates": int(d.size),
            "per_run": per_run,
        }
    lo, hi = np.percentile(d, [50 * (1 - level), 50 * (1 + level)])
    p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))
    return {
        "difference": observed,
        "ci": [float(lo), float(hi)],
        "p_value": float(p),
        "replicates": int(d.size),
        "per_run": per_run,
    }
