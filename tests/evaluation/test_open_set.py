"""rcdet.evaluation.open_set: OpenDet2's A-OSE and Wilderness Impact, hand-computed."""

import pytest

from rcdet.evaluation.open_set import absolute_open_set_error, wilderness_impact


def _open_set_case():
    # Two known classes; image A has known objects of both and one held-out object U1, image B a
    # class-0 object and a held-out object U2.
    a = {
        "gt_boxes": [[0, 0, 10, 10], [20, 0, 30, 10]],
        "gt_classes": [0, 1],
        "unknown_boxes": [[40, 0, 50, 10]],
        "boxes": [
            [0, 0, 10, 10],
            [40, 0, 50, 10],
            [41, 0, 51, 10],
            [20, 0, 30, 10],
            [45, 0, 55, 10],
        ],
        "scores": [0.9, 0.8, 0.4, 0.7, 0.3],
        "classes": [0, 0, 1, 1, 0],
    }
    b = {
        "gt_boxes": [[0, 0, 10, 10]],
        "gt_classes": [0],
        "unknown_boxes": [[20, 0, 30, 10]],
        "boxes": [[0, 0, 10, 10], [20, 0, 30, 10]],
        "scores": [0.6, 0.95],
        "classes": [0, 0],
    }
    return [a, b]


def test_a_ose_counts_known_class_detections_on_unknown_objects():
    images = _open_set_case()
    # On an unknown object at IoU > 0.5: A's [40..50] (IoU 1) and [41..51] (90/110), B's [20..30]
    # (IoU 1); A's [45..55] has IoU 5/15 with U1, below 0.5.
    assert absolute_open_set_error(images) == 3
    assert absolute_open_set_error(images, score_threshold=0.5) == 2  # [41..51] scores 0.4
    # Strictly greater than 0.5, as OpenDet2's ``ovmax > ovthresh``: IoU exactly 0.5 is no error.
    half = [{"boxes": [[0, 0, 10, 10]], "scores": [1.0], "unknown_boxes": [[0, 0, 10, 5]]}]
    assert absolute_open_set_error(half) == 0


def test_wilderness_impact_hand_computed():
    # Class 0, by score: B[20..30] .95 (FP, unknown), A[0..10] .9 (TP), A[40..50] .8 (FP, unknown),
    # B[0..10] .6 (TP), A[45..55] .3 (FP). 2 objects: recall 0, .5, .5, 1, 1; |recall - 0.8| is
    # smallest (0.2) first at rank 4 -> tp+fp = 4, open-set FPs among them = 2.
    # Class 1: A[20..30] .7 (TP), A[41..51] .4 (FP, unknown). 1 object: recall 1, 1 -> rank 1:
    # tp+fp = 1, open-set FPs 0.
    # WI = mean(2, 0) / mean(4, 1) = 1 / 2.5.
    wi = wilderness_impact(_open_set_case(), num_known=2)
    assert wi == {"wi": pytest.approx(0.4), "fp_open": 1.0, "tp_plus_fp": 2.5, "classes": 2}
    # A class without ground truth is left out; no class at all: undefined.
    assert wilderness_impact(_open_set_case(), num_known=3)["classes"] == 2
    assert wilderness_impact([], num_known=2)["wi"] is None
