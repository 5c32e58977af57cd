"""rcdet.evaluation.bootstrap: weighted metrics equal the metrics of the resampled detections, and
the intervals over test images contain the estimate, are deterministic and narrow with more images;
the paired test of two runs."""

import numpy as np
import pytest

from rcdet.evaluation.bootstrap import bootstrap_intervals, paired_bootstrap, weighted_metrics
from rcdet.evaluation.metrics import ood_metrics


def _sample(num_images, seed=0, tied=True):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(num_images), 3)
    is_id = rng.random(len(groups)) < 0.7
    scores = rng.normal(size=len(groups)) + 1.2 * is_id
    return (np.round(scores, 1) if tied else scores), is_id, groups


@pytest.mark.parametrize("tied", [True, False])
def test_weighted_metrics_equal_the_metrics_of_the_repeated_sample(tied):
    scores, is_id, _ = _sample(60, tied=tied)
    weights = np.random.default_rng(1).integers(0, 3, size=(4, len(scores)))
    m = weighted_metrics(scores, is_id, weights)
    for b in range(4):
        rep = np.repeat(np.arange(len(scores)), weights[b])
        ref = ood_metrics(scores[rep], is_id[rep])
        for k, v in ref.items():
            assert m[k][b] == pytest.approx(v, abs=1e-12), k


def test_bootstrap_interval_contains_estimate_is_deterministic_and_narrows():
    widths = []
    for n in (20, 400):
        scores, is_id, groups = _sample(n)
        point = ood_metrics(scores, is_id)
        ci = bootstrap_intervals({"s": scores}, is_id, groups, n, replicates=400, seed=3)["s"]
        for k in ("auroc", "fpr95", "aupr_in", "aupr_out"):
            lo, hi = ci[f"{k}_ci"]
            assert lo <= point[k] <= hi, k
        assert (
            bootstrap_intervals({"s": scores}, is_id, groups, n, replicates=400, seed=3)["s"] == ci
        )
        assert (
            bootstrap_intervals({"s": scores}, is_id, groups, n, replicates=400, seed=4)["s"] != ci
        )
        widths.append(ci["auroc_ci"][1] - ci["auroc_ci"][0])
    assert widths[1] < widths[0] / 2  # 20x the images: about 1/sqrt(20) the width
    assert bootstrap_intervals({"s": None}, is_id, groups, 400, replicates=10) == {"s": None}


def test_paired_bootstrap():
    scores, is_id, groups = _sample(200)
    same = paired_bootstrap(
        [(scores, is_id, groups)], [(scores, is_id, groups)], 200, replicates=200
    )
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0
    better = np.where(is_id, scores + 1.0, scores)  # the same detections, better separated
    d = paired_bootstrap([(better, is_id, groups)], [(scores, is_id, groups)], 200, replicates=200)
    assert d["difference"] == pytest.approx(
        ood_metrics(better, is_id)["auroc"] - ood_metrics(scores, is_id)["auroc"]
    )
    assert d["ci"][0] > 0 and d["p_value"] == 0.0


def test_family_accuracy_per_replicate_by_hand():
    from rcdet.evaluation.bootstrap import family_accuracy

    # Class 0: objects on images 0 (in family) and 1 (not); class 1: one object on image 2 (in).
    labels, hits, images = [0, 0, 1], [True, False, True], [0, 1, 2]
    weights = np.array([[1, 1, 1], [2, 0, 1], [0, 0, 3], [0, 1, 0], [0, 0, 0]])
    # Row 1: (1/2 + 1) / 2; row 2: (2/2 + 1) / 2; row 3: class 0 not drawn, left out; row 4:
    # class 1 not drawn; row 5: nothing drawn.
    out = family_accuracy(labels, hits, images, weights)
    assert out[:4].tolist() == [0.75, 1.0, 1.0, 0.0] and np.isnan(out[4])


def test_paired_family_accuracy_of_a_run_against_itself_is_zero_with_p_one():
    from rcdet.evaluation.bootstrap import paired_bootstrap_family_accuracy

    run = (np.array([0, 0, 1, 1]), np.array([True, False, True, True]), np.array([0, 1, 2, 3]))
    test = paired_bootstrap_family_accuracy([run], [run], num_images=4, replicates=100)
    assert test["difference"] == 0.0 and test["ci"] == [0.0, 0.0] and test["p_value"] == 1.0
