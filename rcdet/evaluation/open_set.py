"""
The open-set detection metrics of OpenDet2 (Han et al., "Expanding Low-Density Latent Regions
for Open-Set Object Detection", CVPR 2022), computed as its evaluator does:
``opendet2/evaluation/pascal_voc_evaluation.py`` of github.com/csuhan/opendet2 (commit 18b8077),
which takes them from ORE (github.com/JosephKJ/OWOD).

- **A-OSE** (absolute open-set error): the number of known-class detections whose IoU with an
  unknown (here: held-out) object is **> 0.5**. It counts detections, not objects: two
  detections on one held-out object are two errors (``is_unk_sum`` in ``voc_eval``).
- **Wilderness impact** (Dhamija et al., "The Overlooked Elephant of Object Detection: Open Set",
  WACV 2020): ``WI = P_K / P_{K u U} - 1``, the relative drop of known-class precision caused by
  the unknown objects, ``FP_open / (TP + FP_closed)``. OpenDet2 evaluates it at known-class
  recall 0.8 (``compute_WI_at_a_recall_level``): for each known class, with its detections sorted
  by score and matched VOC-style at IoU > 0.5, take the first detection rank whose recall is
  closest to 0.8; ``tp_plus_fp`` is the number of detections up to it and ``fp_open`` the number
  of them that overlap an unknown object at IoU > 0.5; ``WI = mean(fp_open) / mean(tp_plus_fp)``
  over the classes that have detections. OpenDet2 prints WI x 100; rcdet reports the fraction.

Boxes are in detectron2's coordinates (VOC ``xmin - 1, ymin - 1, xmax, ymax``); their continuous
IoU equals the ``+ 1``-pixel IoU that OpenDet2 computes on the 1-based VOC boxes. Differences from
OpenDet2, all irrelevant to the built-in dataset: VOC's "difficult" flag is not used
(detectron2's loader keeps difficult objects without it, so they count as ordinary objects);
tied scores keep the detector's order (a stable sort; numpy's default sort is not stable);
a class without ground truth in the test set is left out of WI (OpenDet2 divides by zero).
"""

from typing import Dict, List, Optional

import numpy as np

__all__ = [
    "OPEN_SET_IOU",
    "WI_RECALL_LEVEL",
    "pairwise_iou",
    "absolute_open_set_error",
    "wilderness_impact",
]

# OpenDet2's ``ovthresh`` for both A-OSE and WI; the comparison is strict (IoU > 0.5).
OPEN_SET_IOU = 0.5
# OpenDet2 reports WI at this known-class recall (``compute_WI_at_many_recall_level``: r = 8 / 10).
WI_RECALL_LEVEL = 0.8


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between XYXY boxes a (N, 4) and b (M, 4); 0 for empty boxes."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(
        -1, 4
    )
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _overlaps_unknown(boxes, unknown_boxes, iou: float) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    unknown_boxes = np.asarray(unknown_boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0 or len(unknown_boxes) == 0:
        return np.zeros(len(boxes), dtype=bool)
    return pairwise_iou(boxes, unknown_boxes).max(axis=1) > iou


def absolute_open_set_error(
    images: List[Dict], score_threshold: float = 0.0, iou: float = OPEN_SET_IOU
) -> int:
    """
    A-OSE over ``images``: dicts with ``boxes`` (N, 4), ``scores`` (N,) of the known-class
    detections and ``unknown_boxes`` (M, 4) of the held-out objects. Counts detections with score
    >= ``score_threshold`` whose IoU with some unknown object is > ``iou``.
    """
    total = 0
    for im in images:
        keep = np.asarray(im["scores"], dtype=np.float64).reshape(-1) >= score_threshold
        total += int(
            _overlaps_unknown(
                np.asarray(im["boxes"]).reshape(-1, 4)[keep], im["unknown_boxes"], iou
            ).sum()
        )
    return total


def wilderness_impact(
    images: List[Dict],
    num_known: int,
    recall_level: float = WI_RECALL_LEVEL,
    iou: float = OPEN_SET_IOU,
    score_threshold: float = 0.0,
) -> Dict[str, Optional[float]]:
    """
    Wilderness impact at ``recall_level`` as OpenDet2 computes it. ``images``: dicts with the
    detections' ``boxes``, ``scores`` and ``classes`` (known-class index), the known objects'
    ``gt_boxes`` and ``gt_classes``, and the held-out objects' ``unknown_boxes``.

    Returns ``{"wi", "fp_open", "tp_plus_fp", "classes"}``: WI (None when no known class has both
    detections and ground truth), the per-class means it divides, and how many classes entered.
    """
    # Per detection, computed once per image: the best-overlapping known object of its class
    # (first maximum in annotation order), that IoU, and whether it overlaps a held-out object.
    per_class = {c: {"img": [], "score": [], "order": [], "gt": [], "ov": [], "unk": []}
                 for c in range(num_known)}  # fmt: skip
    npos = np.zeros(num_known, dtype=np.int64)
    order = 0
    for i, im in enumerate(images):
        gt_classes = np.asarray(im["gt_classes"], dtype=np.int64).reshape(-1)
        npos += np.bincount(gt_classes, minlength=num_known)[:num_known]
        scores = np.asarray(im["scores"], dtype=np.float64).reshape(-1)
        boxes = np.asarray(im["boxes"], dtype=np.float64).reshape(-1, 4)
        classes = np.asarray(im["classes"], dtype=np.int64).reshape(-1)
        same = gt_classes[None, :] == classes[:, None]
        ious = np.where(same, pairwise_iou(boxes, im["gt_boxes"]), -1.0)
        best = ious.argmax(axis=1) if ious.shape[1] else np.zeros(len(boxes), dtype=np.int64)
        unknown = _overlaps_unknown(boxes, im["unknown_boxes"], iou)
        for j, c in enumerate(classes):
            if scores[j] < score_threshold:
                continue
            entry = per_class[int(c)]
            entry["img"].append(i)
            entry["score"].append(scores[j])
            entry["order"].append(order)
            entry["gt"].append(int(best[j]) if same[j].any() else -1)
            entry["ov"].append(float(ious[j, best[j]]) if same[j].any() else 0.0)
            entry["unk"].append(bool(unknown[j]))
            order += 1
    fp_open, tp_plus_fp = [], []
    for c in range(num_known):
        entry = per_class[c]
        if not entry["score"] or npos[c] == 0:
            continue
        # Highest score first; ties keep the detector's order.
        idx = sorted(
            range(len(entry["score"])), key=lambda k: (-entry["score"][k], entry["order"][k])
        )
        claimed = set()
        tp = np.zeros(len(idx))
        is_unk = np.zeros(len(idx))
        for rank, k in enumerate(idx):
            i, j = entry["img"][k], entry["gt"][k]
            # Else a false positive: a duplicate, a poor box, or no object of its class.
            if j >= 0 and entry["ov"][k] > iou and (i, j) not in claimed:
                claimed.add((i, j))
                tp[rank] = 1.0
            is_unk[rank] = float(entry["unk"][k])
        recall = np.cumsum(tp) / npos[c]
        at = int(np.argmin(np.abs(recall - recall_level)))  # the first rank closest to the level
        tp_plus_fp.append(at + 1)  # every detection is a TP or an FP (no "difficult" objects)
        fp_open.append(float(np.cumsum(is_unk)[at]))
    if not tp_plus_fp:
        return {"wi": None, "fp_open": None, "tp_plus_fp": None, "classes": 0}
    return {
        "wi": float(np.mean(fp_open) / np.mean(tp_plus_fp)),
        "fp_open": float(np.mean(fp_open)),
        "tp_plus_fp": float(np.mean(tp_plus_fp)),
        "classes": len(tp_plus_fp),
    }
