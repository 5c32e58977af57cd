"""
rcdet.evaluation.ood: the metrics, matching detections to objects (one per object or every
matched detection), the logit and embedding scores, merging reports of one protocol, and the
plots' labels (score histogram axes and title, the comparison ROC's panels and colours).
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import numpy as np
import pytest
from conftest import fake_ood_report
from scipy.stats import multivariate_normal

from rcdet.evaluation.ood import (
    BACKGROUND,
    DUPLICATE,
    ID,
    OOD,
    EmbeddingStatistics,
    ReportError,
    _comparison_roc,
    _histogram_figure,
    detector_confidence,
    logit_scores,
    match_detections,
    merge_reports,
    ood_metrics,
    score_report,
)

# ---------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------- matching


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


def test_detector_confidence_is_the_max_known_class_probability():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])  # last column: background
    z = np.exp([2.0, 0.0, 1.0]).sum()
    assert detector_confidence(logits, 2) == pytest.approx([np.exp(2.0) / z, 1 / (2 + np.exp(3.0))])


# ---------------------------------------------------------------- scores


def test_logit_scores_direct():
    logits = np.array([[2.0, 0.0, -1.0, 5.0], [0.0, 0.0, 0.0, 0.0]])  # last column: background
    s = logit_scores(logits, num_known=3, energy_temperature=2.0)
    p = np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum()
    assert s["msp"].tolist() == pytest.approx([p.max(), 1 / 3])
    assert s["max_logit"].tolist() == [2.0, 0.0]
    assert s["energy"].tolist() == pytest.approx(
        [2 * np.log(np.exp(1.0) + 1 + np.exp(-0.5)), 2 * np.log(3)]
    )


def _toy_embeddings():
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    x = np.concatenate([c + 0.1 * rng.standard_normal((20, 3)) for c in centres])
    y = np.repeat([0, 1], 20)
    return x, y


def test_embedding_scores_direct():
    x, y = _toy_embeddings()
    stats = EmbeddingStatistics.fit(x, y, num_classes=2, knn_k=3)
    q = np.array([[1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    s = stats.scores(q)
    means = np.stack([x[y == c].mean(0) for c in (0, 1)])
    protos = means / np.linalg.norm(means, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    assert s["cosine"] == pytest.approx((qn @ protos.T).max(1))
    dist = np.sqrt(((q[:, None] - x[None]) ** 2).sum(-1))
    assert s["knn"] == pytest.approx(-np.sort(dist, axis=1)[:, 2])
    centred = np.concatenate([x[y == c] - means[c] for c in (0, 1)])
    cov = centred.T @ centred / len(centred)
    cov = cov + 1e-3 * np.trace(cov) / 3 * np.eye(3) + 1e-9 * np.eye(3)
    ref = np.max([multivariate_normal(means[c], cov).logpdf(q) for c in (0, 1)], axis=0)
    assert s["gaussian"] == pytest.approx(ref, rel=1e-6)
    assert (
        s["cosine"][0] > s["cosine"][1]
        and s["knn"][0] > s["knn"][1]
        and s["gaussian"][0] > s["gaussian"][1]
    )


def test_gaussian_never_fails_on_singular_covariance():
    x = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # rank-deficient
    for per_class in (False, True):
        stats = EmbeddingStatistics.fit(
            x, np.array([0, 0, 1]), num_classes=3, knn_k=5, per_class_covariance=per_class
        )
        s = stats.scores(np.array([[0.5, 0.5, 0.0]]))
        assert all(np.isfinite(v).all() for v in s.values())


def test_statistics_cache_round_trip(tmp_path):
    x, y = _toy_embeddings()
    stats = EmbeddingStatistics.fit(x, y, 2, knn_k=4, per_class_covariance=True)
    stats.save(str(tmp_path / "s.npz"))
    loaded = EmbeddingStatistics.load(str(tmp_path / "s.npz"))
    q = np.array([[0.3, 0.7, 0.1]])
    for k, v in stats.scores(q).items():
        assert loaded.scores(q)[k] == pytest.approx(v)


# ---------------------------------------------------------------- merging reports


def test_merge_reports_refuses_mixed_protocols(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fake_ood_report(a)
    fake_ood_report(b, matching="all")
    with pytest.raises(
        ReportError, match=r"different protocols: .*matching 'one_per_object' vs 'all'"
    ):
        merge_reports([a, b], str(tmp_path / "out"))
    # A report without a protocol section is protocol version 1.
    with open(os.path.join(b, "ood_report.json")) as f:
        old = json.load(f)
    del old["protocol"]
    with open(os.path.join(b, "ood_report.json"), "w") as f:
        json.dump(old, f)
    with pytest.raises(ReportError, match="version 2 vs 1"):
        merge_reports([a, b], str(tmp_path / "out"))
    # Same protocol: merged, with the intervals.
    fake_ood_report(b)
    md = merge_reports([a, b], str(tmp_path / "out"))
    assert "| a |" in md and "0.700 [0.600, 0.800]" in md


# ---------------------------------------------------------------- plots


def test_score_histogram_has_axes_labels_and_title():
    is_id = np.array([True, True, False])
    fig = _histogram_figure(
        {"msp": np.array([0.9, 0.8, 0.2]), "knn": np.array([-1.0, -2.0, -5.0]), "cosine": None},
        is_id,
        "demo: OOD scores",
    )
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["msp", "knn"]
    assert (
        axes[0].get_xlabel() == "msp (higher = more in-distribution)"
        and axes[0].get_ylabel() == "density"
    )
    assert fig._suptitle.get_text() == "demo: OOD scores"


def _npz_run(folder, rng, scores=("msp", "max_logit", "knn")):
    os.makedirs(folder, exist_ok=True)
    status = np.where(rng.random(40) < 0.6, 1, 0)
    np.savez(
        os.path.join(folder, "ood_scores.npz"),
        status=status,
        **{s: rng.normal(size=40) + status for s in scores},
    )


def test_comparison_roc_one_panel_per_score_and_one_colour_per_run(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for name in ("softmax", "supcon", "rince"):
        _npz_run(
            str(tmp_path / name),
            rng,
            ("msp", "max_logit") if name == "softmax" else ("msp", "max_logit", "knn"),
        )
        runs.append((name, str(tmp_path / name)))
    fig = _comparison_roc(runs)
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["msp", "max_logit", "knn"]
    colours = {}
    for ax in panels:
        curves = [
            lab for lab in ax.get_lines() if lab.get_label() and not lab.get_label().startswith("_")
        ]
        within = [mcolors.to_hex(lab.get_color()) for lab in curves]
        assert len(set(within)) == len(within)  # distinct colours in a panel
        for lab in curves:
            colours.setdefault(lab.get_label().split(" (")[0], set()).add(
                mcolors.to_hex(lab.get_color())
            )
        assert ax.get_xlabel().startswith("false positive rate")
    assert (
        all(len(c) == 1 for c in colours.values()) and len(colours) == 3
    )  # a run keeps its colour
