"""
The one definition of the OOD metrics (AUROC, FPR95, AUPR-In, AUPR-Out) over scored detections,
and the per-score report section with bootstrap intervals (rcdet.evaluation.bootstrap).
"""

from typing import Dict, Optional

import numpy as np
from sklearn import metrics as skm

from .matching import ID, OOD
from .scores import ALL_SCORES

__all__ = ["ood_metrics", "score_report"]


def ood_metrics(scores, is_id, num_ood_objects: Optional[int] = None) -> Dict[str, Optional[float]]:
    """
    AUROC, FPR at 95% TPR (ID positive), AUPR-In and AUPR-Out (scikit-learn); None when undefined.

    FPR95 is the FPR at the highest threshold that accepts >= 95% of the ID detections (the ROC
    curve with every point kept). VOS's ``fpr_and_fdr_at_recall`` (``metric_utils.py`` of
    github.com/deeplearning-wisc/vos) takes the threshold whose TPR is *closest* to 0.95, which
    may lie just below it; the two differ by at most one ID detection's step of the curve. With
    ``num_ood_objects``, also ``ood_recall_at_95_id``: at that
    threshold, the fraction of all held-out objects whose detection scores below it, i.e. found
    and flagged as OOD; objects no detection reached count as missed.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_id = np.asarray(is_id, dtype=bool)
    n_id, n_ood = int(is_id.sum()), int((~is_id).sum())
    out = {"auroc": None, "fpr95": None, "aupr_in": None, "aupr_out": None}
    if num_ood_objects is not None:
        out["ood_recall_at_95_id"] = None
    if n_id == 0 or n_ood == 0:
        return out
    fpr, tpr, thresholds = skm.roc_curve(is_id, scores, drop_intermediate=False)
    at = int(np.searchsorted(tpr, 0.95, side="left"))
    out["auroc"] = float(skm.roc_auc_score(is_id, scores))
    out["fpr95"] = float(fpr[at])
    out["aupr_in"] = float(skm.average_precision_score(is_id, scores))
    out["aupr_out"] = float(skm.average_precision_score(~is_id, -scores))
    if num_ood_objects:
        out["ood_recall_at_95_id"] = float(
            np.sum(scores[~is_id] < thresholds[at]) / num_ood_objects
        )
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
    Metrics per score over the detections whose status is ID or OOD; unavailable scores stay
    marked as such. With ``bootstrap`` replicates, each metric gets a ``<metric>_ci`` percentile
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
