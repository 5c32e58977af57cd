"""rcdet.evaluation.matching: one detection per object, or every matched detection."""

import numpy as np
import pytest

from rcdet.evaluation.matching import BACKGROUND, DUPLICATE, ID, OOD, match_detections


def test_matching_all_hand_made_boxes():
    # The per-detection protocol (--matching all); one detection per object: the next test.
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [0, 0, 10, 10], [40, 40, 60, 60]], dtype=float)
    gt_ood = np.array([False, True, True, False])
    dets = np.array(
        [
            [3, 0, 13, 10],  # overlaps ID gt0 (0.54) and OOD gt1 (0.82): the higher IoU wins -> OOD
            [0, 0, 10, 10],  # tie between ID gt0 and OOD gt2: the first GT wins -> ID
            [4, 0, 14, 10],  # duplicate detections of gt1: both matched
            [4.5, 0, 14, 10],
            [100, 100, 120, 120],  # no overlap -> unmatched
            [40, 40, 52, 60],  # IoU 0.6 with gt3 -> ID
            [40, 40, 48, 60],  # IoU 0.4 -> unmatched
        ]
    )
    status, index = match_detections(dets, gt, gt_ood, matching="all")
    assert status.tolist() == [0, 1, 0, 0, -1, 1, -1]
    assert index.tolist() == [1, 0, 1, 1, -1, 3, -1]
    s, i = match_detections(dets[:2], np.zeros((0, 4)), np.zeros(0, dtype=bool), matching="all")
    assert s.tolist() == [-1, -1] and i.tolist() == [-1, -1]


def test_one_per_object_matching_hand_made():
    gt = np.array(
        [
            [0, 0, 10, 10],  # 0 ID
            [20, 0, 30, 10],  # 1 OOD
            [40, 0, 50, 10],  # 2 ID, no detection reaches it
            [60, 0, 70, 10],  # 3 ID
            [64, 0, 74, 10],
        ],  # 4 OOD, overlapping 3
        dtype=float,
    )
    gt_ood = np.array([False, True, False, False, True])
    dets = np.array(
        [
            [0, 0, 10, 10],  # d0 IoU 1 with gt0, but d1 is more confident -> duplicate
            [1, 0, 11, 10],  # d1 IoU 90/110 with gt0, confidence 0.9 -> claims gt0 (ID)
            [20, 0, 30, 10],  # d2 claims gt1 (OOD)
            [20, 0, 30, 10],  # d3 same confidence as d2: the earlier detection wins -> duplicate
            [63, 0, 73, 10],  # d4 between gt3 (70/130) and gt4 (90/110): the higher IoU, OOD
            [100, 100, 110, 110],  # d5 overlaps nothing: background
            [61, 0, 71, 10],  # d6 gt3 (90/110) over gt4 (70/130): claims gt3 (ID)
            [
                62,
                0,
                72,
                10,
            ],  # d7 tie gt3/gt4 (80/120 each): the first GT, gt3, already claimed -> duplicate
        ],
        dtype=float,
    )
    conf = np.array([0.6, 0.9, 0.5, 0.5, 0.7, 0.95, 0.3, 0.1])
    status, index = match_detections(dets, gt, gt_ood, 0.5, conf)
    assert status.tolist() == [DUPLICATE, ID, OOD, DUPLICATE, OOD, BACKGROUND, ID, DUPLICATE]
    assert index.tolist() == [0, 0, 1, 1, 4, -1, 3, 3]
    # Matched counts never exceed the objects: 2 of 3 ID objects, 2 of 2 OOD objects; gt2 missed.
    assert (status == ID).sum() == 2 and (status == OOD).sum() == 2 and 2 not in index
    # The per-detection protocol counts every matched detection.
    all_status, _ = match_detections(dets, gt, gt_ood, 0.5, matching="all")
    assert all_status.tolist() == [ID, ID, OOD, OOD, OOD, BACKGROUND, ID, ID]
    # Detector order decides only through the confidence: permuting the detections permutes the
    # result.
    perm = np.array([7, 6, 5, 4, 1, 0, 2, 3])  # keeps d2 before d3 (their tie)
    s2, i2 = match_detections(dets[perm], gt, gt_ood, 0.5, conf[perm])
    assert s2.tolist() == status[perm].tolist() and i2.tolist() == index[perm].tolist()
    with pytest.raises(ValueError, match="confidence"):
        match_detections(dets, gt, gt_ood)
    with pytest.raises(ValueError, match="matching"):
        match_detections(dets, gt, gt_ood, 0.5, conf, matching="best")
