"""
VOS's detection confidence threshold for the image-level OOD protocol: the score at which each
class's F1 is best, averaged over the classes, computed with pycocotools' COCOeval as
``detection/offline_evaluation/compute_average_precision.py`` of github.com/deeplearning-wisc/vos
(commit 6dd9c27) does, and read back, rounded to 4 decimals, by its
``compute_ood_probabilistic_metrics.py``.
"""

import contextlib
import io
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.structures import BoxMode

__all__ = ["f1_optimal_threshold"]


def _xywh(box, mode) -> List[float]:
    return [float(v) for v in BoxMode.convert(list(box), mode, BoxMode.XYWH_ABS)]


def f1_optimal_threshold(
    dicts: Sequence[Dict], records: Sequence[Dict], num_classes: int
) -> Optional[float]:
    """
    The F1-optimal detection score of ``records`` (per image: ``image_id``, XYXY ``boxes``,
    ``scores``, ``classes``) on the known-class ground truth of ``dicts`` (detectron2 dataset
    dicts). COCOeval's precision at each of its 101 recall thresholds is averaged over the IoU
    thresholds 0.5:0.95 (all areas, 100 detections per image); F1 = 2PR / (P + R); each class
    takes the score at its best-F1 recall; the result is the mean over classes of the nonzero
    ones. Classes without ground truth in ``dicts`` are left out (VOS would average COCOeval's
    -1 for them in). None when no class has a nonzero score.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    position = {d["image_id"]: i for i, d in enumerate(dicts)}
    images, annotations = [], []
    for i, d in enumerate(dicts):
        images.append({"id": i, "height": d["height"], "width": d["width"]})
        for a in d.get("annotations", []):
            box = _xywh(a["bbox"], a.get("bbox_mode", BoxMode.XYXY_ABS))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(a["category_id"]),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    detections = [
        {
            "image_id": position[r["image_id"]],
            "category_id": int(c),
            "bbox": _xywh(b, BoxMode.XYXY_ABS),
            "score": float(s),
        }
        for r in records
        for b, s, c in zip(r["boxes"], r["scores"], r["classes"])
    ]
    if not detections or not annotations:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c} for c in range(num_classes)],
        }
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluation.params.catIds = list(range(num_classes))
        evaluation.evaluate()
        evaluation.accumulate()
    # [T, R, K, A, M] -> mean over the IoU thresholds, area "all", 100 detections: [R, K].
    precision = evaluation.eval["precision"].mean(0)[:, :, 0, 2]
    scores = evaluation.eval["scores"].mean(0)[:, :, 0, 2]
    has_gt = (evaluation.eval["precision"][:, :, :, 0, 2] >= 0).all(axis=(0, 1))
    recall = np.expand_dims(evaluation.params.recThrs, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * (precision * recall) / (precision + recall)
    # np.argmax, as VOS: a NaN F1 (precision and recall 0) counts as the largest.
    best = f1.argmax(0)
    per_class = np.array([scores[best[k], k] for k in range(num_classes)])[has_gt]
    per_class = per_class[per_class != 0]
    if per_class.size == 0:
        return None
    return round(float(per_class.mean()), 4)
