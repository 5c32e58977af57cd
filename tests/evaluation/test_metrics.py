"""rcdet.evaluation.metrics: AUROC, FPR95, AUPR and the per-score report section."""

import numpy as np
import pytest

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
