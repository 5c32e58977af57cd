"""
The one definition of the OOD metrics (AUROC, FPR95, AUPR-In, AUPR-Out) over scored detections,
and the per-score report section with bootstrap intervals (rcdet.evaluation.bootstrap).
"""

from typing import Dict, Optional

import numpy as np
from sklearn import metrics as skm

from .matching import ID, OOD
from .scores import ALL_SCORES

__all__ = ["RECALL_LEVEL", "fpr_at_recall", "ood_metrics", "score_report"]


# FPR95: the FPR at the recall (TPR, ID positive) closest to this.
RECALL_LEVEL = 0.95


def fpr_at_recall(scores, is_id, recall_level: float = RECALL_LEVEL):
    """
    ``(fpr, threshold)``: FPR95 as the OOD literature computes it, with ``fpr_and_fdr_at_recall``
    of Hendrycks et al.'s outlier-exposure code, which VOS copies (``metric_utils.py`` of
    github.com/deeplearning-wisc/vos, commit 6dd9c27), ID the positive class. Over the distinct
    score thresholds, highest first, up to the first that accepts every ID detection: the
    threshold whose recall is closest to ``recall_level`` (it may lie below it), and of those
    with that recall the lowest threshold, whose FPR is the highest. ``threshold`` is that score:
    detections scoring at least it are accepted as ID. Both ID and OOD detections must exist.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_id = np.asarray(is_id, dtype=bool).reshape(-1)
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], is_id[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # the last index of each tied block
    tps = np.cumsum(y, dtype=np.float64)[ends]
    fps = 1 + ends - tps
    recall = tps / tps[-1]
    last = int(tps.searchsorted(tps[-1]))
    # Reversed, so that argmin's first minimum is the lowest threshold among equally close ones.
    reverse = slice(last, None, -1)
    cutoff = int(np.argmin(np.abs(recall[reverse] - recall_level)))
    return float(fps[reverse][cutoff] / np.sum(~is_id)), float(s[ends][reverse][cutoff])


def ood_metrics(scores, is_id, num_ood_objects: Optional[int] = None) -> Dict[str, Optional[float]]:
    """
    AUROC, FPR95 (fpr_at_recall), AUPR-In and AUPR-Out (scikit-learn's ``roc_auc_score`` and
    ``average_precision_score``, ID positive for AUPR-In, OOD for AUPR-Out); None when there are
    no ID or no OOD detections. With ``num_ood_objects``, also ``ood_recall_at_95_id``: the
    fraction of all held-out objects whose detection scores below the FPR95 threshold, i.e.
    found and flagged as OOD; objects no detection reached count as missed.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_id = np.asarray(is_id, dtype=bool)
    n_id, n_ood = int(is_id.sum()), int((~is_id).sum())
    out = {"auroc": None, "fpr95": None, "aupr_in": None, "aupr_out": None}
    if num_ood_objects is not None:
        out["ood_recall_at_95_id"] = None
    if n_id == 0 or n_ood == 0:
        return out
    fpr95, threshold = fpr_at_recall(scores, is_id)
    out["auroc"] = float(skm.roc_auc_score(is_id, scores))
    out["fpr95"] = fpr95
    out["aupr_in"] = float(skm.average_precision_score(is_id, scores))
    out["aupr_out"] = float(skm.average_precision_score(~is_id, -scores))
    if num_ood_objects:
        out["ood_recall_at_95_id"] = float(np.sum(scores[~is_id] < threshold) / num_ood_objects)
    return out


def score_report(
    score_table: Dict[str, Optional[np.ndarray]],
    status: np.ndarray,
    groups: Optional[np.ndarray] = None,
    num_images: int = 0,
    bootstrap: int = 0,
    seed: int = 0,
    strata: Optional[np.ndarray] = None,
    num_ood_objects: Optional[int] = None,
) -> Dict[str, Dict]:
    """
    Metrics per score over the detections whose status is ID or OOD; unavailable scores (None)
    stay marked as such, and scores ``score_table`` lacks (``reference`` of a model without f)
    are left out. With ``bootstrap`` replicates, each metric gets a ``<metric>_ci`` percentile
    interval over resamples of the ``num_images`` test images (``groups``: each detection's
    image index; rcdet.evaluation.bootstrap), else the ``_ci`` keys are None.
    """
    from .bootstrap import METRICS, bootstrap_intervals

    status = np.asarray(status)
    scored = (status == ID) | (status == OOD)
    is_id = status[scored] == ID
    available = {
        n: np.asarray(score_table[n], dtype=np.float64)[scored]
        for n in ALL_SCORES
        if score_table.get(n) is not None
    }
    cis = {}
    if bootstrap and groups is not None:
        cis = bootstrap_intervals(
            available, is_id, np.asarray(groups)[scored], num_images, bootstrap, seed, strata
        )
    report = {}
    for name in ALL_SCORES:
        if name not in score_table:
            continue
        if name not in available:
            entry = {"available": False, **{k: None for k in METRICS}}
            if num_ood_objects is not None:
                entry["ood_recall_at_95_id"] = None
        else:
            entry = {"available": True, **ood_metrics(available[name], is_id, num_ood_objects)}
        for k in METRICS:
            entry[f"{k}_ci"] = (cis.get(name) or {}).get(f"{k}_ci")
        report[name] = entry
    return report
