"""rcdet.evaluation.coco_threshold: VOS's F1-optimal confidence against a hand computation."""

import pytest
from detectron2.structures import BoxMode

from rcdet.evaluation.coco_threshold import f1_optimal_threshold


def _gt(image_id, boxes):
    anns = [{"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c} for c, b in boxes]
    return {"image_id": image_id, "height": 100, "width": 100, "annotations": anns}


def _dets(image_id, dets):
    return {
        "image_id": image_id,
        "boxes": [b for _, _, b in dets],
        "scores": [s for s, _, _ in dets],
        "classes": [c for _, c, _ in dets],
    }


A, B, C = [10, 10, 30, 30], [50, 50, 80, 90], [5, 60, 40, 95]


def test_f1_optimal_threshold_hand_computed():
    # Class 0: two objects; detections 0.9 (exact), 0.8 (on nothing), 0.6 (exact). The boxes are
    # exact, so every IoU threshold agrees. Keeping the top detection: P 1, R 1/2, F1 2/3;
    # keeping all three: P 2/3, R 1, F1 4/5, the best: the class's threshold is 0.6.
    # Class 1: one object, found at 0.7 with P = R = 1: its threshold is 0.7.
    # Class 2 has no ground truth and is left out. The mean: 0.65.
    dicts = [_gt("a", [(0, A), (0, B)]), _gt("b", [(1, C)])]
    records = [
        _dets("a", [(0.9, 0, A), (0.8, 0, [60, 5, 95, 40]), (0.6, 0, B)]),
        _dets("b", [(0.7, 1, C), (0.3, 2, A)]),
    ]
    assert f1_optimal_threshold(dicts, records, num_classes=3) == pytest.approx(0.65)


def test_partial_overlap_averages_precision_over_the_iou_thresholds():
    # One object, one detection at IoU 0.8 (x 10..30 vs 10..35 at full height): a true
    # positive at IoU 0.5 to 0.8 (7 of the 10 thresholds), a false positive at 0.85 to 0.95.
    # The mean precision at every recall above 0 is 0.7, so F1 peaks at recall 1. VOS averages
    # the scores over the IoU thresholds as well, and COCOeval records 0 where a threshold never
    # reaches that recall: the threshold is 0.7 * 0.42 = 0.294, not the detection's score.
    dicts = [_gt("a", [(0, [10, 10, 30, 30])])]
    records = [_dets("a", [(0.42, 0, [10, 10, 35, 30])])]
    assert f1_optimal_threshold(dicts, records, num_classes=1) == pytest.approx(0.294)
    assert f1_optimal_threshold(dicts, [_dets("a", [])], num_classes=1) is None
