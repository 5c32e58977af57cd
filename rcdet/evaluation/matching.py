"""
Matching one image's detections to its ground truth (known and held-out objects), as detection
evaluation does.
"""

import numpy as np

from .open_set import pairwise_iou

__all__ = ["ID", "OOD", "BACKGROUND", "DUPLICATE", "MATCHING_MODES", "match_detections"]

# Detection status after matching: ID / OOD (claimed a known / held-out object), BACKGROUND (no
# object at the matching IoU) and DUPLICATE (its object was claimed by a more confident detection).
ID, OOD, BACKGROUND, DUPLICATE = 1, 0, -1, -2
MATCHING_MODES = ("one_per_object", "all")


def match_detections(
    det_boxes,
    gt_boxes,
    gt_is_ood,
    iou_threshold: float = 0.5,
    confidence=None,
    matching: str = "one_per_object",
):
    """
    Match the detections of one image to its ground truth. Returns ``(status, gt_index)``.

    ``one_per_object`` (the default) is how detection evaluation matches (the VOC ``voc_eval`` and
    COCO evaluators): detections are visited by decreasing ``confidence`` (ties: the given order);
    each takes the GT box with the highest IoU (ties: the first GT in annotation order); if that
    IoU is >= ``iou_threshold`` and the object is unclaimed, the detection claims it (status ID or
    OOD by the object's kind); if the object is already claimed, the detection is a DUPLICATE; if
    the IoU is below the threshold (or there is no GT) it is BACKGROUND. Each object is claimed at
    most once. ``gt_index`` is the best GT for claimed detections and duplicates, -1 for background.

    ``all``: every detection whose best IoU is >=
    ``iou_threshold`` is ID or OOD, however many detections share the object; the rest are
    BACKGROUND. ``confidence`` is not used.
    """
    if matching not in MATCHING_MODES:
        raise ValueError(f"matching = {matching!r}; choose one of {MATCHING_MODES}.")
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    gt_is_ood = np.asarray(gt_is_ood, dtype=bool).reshape(-1)
    n = det_boxes.shape[0]
    status = np.full(n, BACKGROUND, dtype=np.int64)
    index = np.full(n, -1, dtype=np.int64)
    if n == 0 or gt_is_ood.size == 0:
        return status, index
    iou = pairwise_iou(det_boxes, gt_boxes)
    best = iou.argmax(axis=1)  # argmax returns the first maximum: ties go to the earlier GT
    ok = iou[np.arange(n), best] >= iou_threshold
    index[ok] = best[ok]
    kind = np.where(gt_is_ood[best], OOD, ID)
    if matching == "all":
        status[ok] = kind[ok]
        return status, index
    if confidence is None:
        raise ValueError("one_per_object matching needs each detection's confidence.")
    order = np.argsort(-np.asarray(confidence, dtype=np.float64).reshape(-1), kind="stable")
    claimed = np.zeros(gt_is_ood.size, dtype=bool)
    for d in order:
        if not ok[d]:
            continue
        if claimed[best[d]]:
            status[d] = DUPLICATE
        else:
            claimed[best[d]] = True
            status[d] = kind[d]
    return status, index
