"""rcdet.evaluation.metrics: AUROC, FPR95, AUPR and the per-score report section."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from rcdet.evaluation.metrics import ood_metrics, score_report


def test_metrics_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    is_id = [1, 1, 0, 1, 0, 0]
    m = ood_metrics(scores, is_id)
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["fpr95"] == pytest.approx(1 / 3)  # accepting all 3 ID objects also accepts 0.7
    assert m["aupr_in"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4)
    assert m["aupr_out"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4)


def test_metrics_perfect_and_undefined():
    m = ood_metrics([3.0, 2.0, 1.0], [1, 1, 0])
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0
    assert ood_metrics([1.0, 2.0], [1, 1]) == {
        "auroc": None,
        "fpr95": None,
        "aupr_in": None,
        "aupr_out": None,
    }
    rep = score_report({"msp": np.array([0.9, 0.1]), "cosine": None}, np.array([1, 0]))
    assert rep["msp"]["auroc"] == 1.0 and rep["msp"]["auroc_ci"] is None  # no bootstrap asked for
    assert rep["cosine"] == {
        "available": False,
        "auroc": None,
        "fpr95": None,
        "aupr_in": None,
        "aupr_out": None,
        "auroc_ci": None,
        "fpr95_ci": None,
        "aupr_in_ci": None,
        "aupr_out_ci": None,
    }


def test_ood_recall_at_95_id_hand_computed():
    id_scores = np.arange(1.0, 21.0)  # 20 ID detections
    ood_scores = np.array([0.5, 5.5, 25.0])  # 3 detected of 5 held-out objects
    m = ood_metrics(
        np.r_[id_scores, ood_scores], np.r_[np.ones(20), np.zeros(3)], num_ood_objects=5
    )
    # Accepting 95% of ID (19 of 20) means accepting scores >= 2: 5.5 and 25 are accepted, 0.5
    # flagged.
    assert m["fpr95"] == pytest.approx(2 / 3)
    assert m["ood_recall_at_95_id"] == pytest.approx(1 / 5)


def _hendrycks_fpr_at_recall(y_true, y_score, recall_level=0.95):
    """A transcription of the arithmetic of ``fpr_and_fdr_at_recall`` (metric_utils.py of
    github.com/deeplearning-wisc/vos, commit 6dd9c27; from Hendrycks et al.'s outlier-exposure
    code), binary labels with 1 positive."""
    y_true = y_true == 1
    desc_score_indices = np.argsort(y_score, kind="mergesort")[::-1]
    y_score = y_score[desc_score_indices]
    y_true = y_true[desc_score_indices]
    distinct_value_indices = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct_value_indices, y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return fps[cutoff] / (np.sum(np.logical_not(y_true)))


@pytest.mark.parametrize("tied", [False, True])
def test_fpr95_equals_the_fields_fpr_and_fdr_at_recall(tied):
    rng = np.random.default_rng(3 + tied)
    differ = 0
    for trial in range(200):
        n = int(rng.integers(5, 400))
        is_id = rng.random(n) < rng.uniform(0.2, 0.9)
        is_id[:2] = [True, False]
        scores = rng.normal(size=n) + rng.uniform(0, 2) * is_id
        if tied:
            scores = np.round(scores, 1)
        expected = _hendrycks_fpr_at_recall(is_id.astype(int), scores)
        assert ood_metrics(scores, is_id)["fpr95"] == expected, trial
        # The rule that was rcdet's before: the lowest FPR at TPR >= 0.95.
        fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
        differ += fpr[np.searchsorted(tpr, 0.95, side="left")] != expected
    assert differ > 20  # the two rules do differ: the test can tell them apart


def test_fpr95_takes_the_highest_fpr_at_the_closest_recall():
    # 20 ID, 5 OOD. Recall 19/20 = 0.95 is reached before the OOD detection at 0.5 and kept
    # after it: the field takes the FPR after it (1/5); the lowest FPR at TPR >= 0.95 is 0.
    scores = np.r_[np.arange(19, 0, -1) + 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    is_id = np.r_[np.ones(19, bool), False, True, np.zeros(4, bool)]
    assert ood_metrics(scores, is_id)["fpr95"] == pytest.approx(1 / 5)
    # 11 ID: recall 10/11 (0.909) is closer to 0.95 than 11/11, so the FPR below 0.95 is taken.
    scores = np.r_[np.arange(10, 0, -1) + 10.0, 5.0, 4.0, 3.0]
    is_id = np.r_[np.ones(10, bool), False, False, True]
    assert ood_metrics(scores, is_id)["fpr95"] == pytest.approx(1.0)
