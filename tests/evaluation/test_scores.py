"""rcdet.evaluation.scores: the logit and embedding scores and their statistics."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from rcdet.evaluation.scores import (
    EmbeddingStatistics,
    detector_confidence,
    kth_neighbour_distance,
    logit_scores,
)


def test_detector_confidence_is_the_max_known_class_probability():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])  # last column: background
    z = np.exp([2.0, 0.0, 1.0]).sum()
    assert detector_confidence(logits, 2) == pytest.approx([np.exp(2.0) / z, 1 / (2 + np.exp(3.0))])


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
    assert np.array_equal(loaded.bank_labels, y)  # the kNN placement's votes
    # A file saved before the bank's classes were kept loads without them.
    with np.load(tmp_path / "s.npz") as z:
        np.savez(tmp_path / "old.npz", **{k: z[k] for k in z.files if k != "bank_labels"})
    assert EmbeddingStatistics.load(str(tmp_path / "old.npz")).bank_labels is None


def test_reference_score_is_minus_the_cosine_to_f_and_only_with_f(tmp_path):
    x, y = _toy_embeddings()
    plain = EmbeddingStatistics.fit(x, y, 2, knn_k=3)
    assert plain.reference is None and set(plain.scores(x[:2])) == {"cosine", "knn", "gaussian"}
    # f given unnormalised: (0, 0, 2) is the unit (0, 0, 1).
    stats = EmbeddingStatistics.fit(x, y, 2, knn_k=3, reference=[0.0, 0.0, 2.0])
    q = np.array([[0.0, 0.0, 3.0], [3.0, 0.0, 4.0], [1.0, 0.0, 0.0]])
    s = stats.scores(q)
    # A detection along f looks like the exposed outliers: the lowest ID score, -1.
    assert s["reference"].tolist() == pytest.approx([-1.0, -0.8, 0.0])
    for k in ("cosine", "knn", "gaussian"):
        assert s[k] == pytest.approx(plain.scores(q)[k])
    assert stats.scores(np.zeros((0, 3)))["reference"].shape == (0,)
    stats.save(str(tmp_path / "f.npz"))
    loaded = EmbeddingStatistics.load(str(tmp_path / "f.npz"))
    assert loaded.reference.tolist() == [0.0, 0.0, 1.0]
    assert loaded.scores(q)["reference"].tolist() == pytest.approx([-1.0, -0.8, 0.0])
    plain.save(str(tmp_path / "plain.npz"))
    assert EmbeddingStatistics.load(str(tmp_path / "plain.npz")).reference is None


def test_score_report_leaves_out_scores_the_table_lacks():
    from rcdet.evaluation.metrics import score_report

    status = np.array([1, 1, 0])  # ID, ID, OOD (rcdet.evaluation.matching)
    without = score_report({"msp": np.array([0.9, 0.8, 0.1]), "cosine": None}, status)
    assert set(without) == {"msp", "cosine"} and without["cosine"]["available"] is False
    table = {"msp": np.array([0.9, 0.8, 0.1]), "reference": np.array([-0.1, -0.9, -0.5])}
    rep = score_report(table, status)
    assert rep["reference"]["available"] is True and rep["reference"]["auroc"] == 0.5


def _brute_force_kth(queries, bank, k):
    dist = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2))
    return np.sort(dist, axis=1)[:, k - 1]


@pytest.mark.parametrize("duplicates", [False, True])
def test_knn_search_with_faiss_equals_the_exact_search(duplicates):
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(5000, 32))
    if duplicates:  # tied distances: every entry twice, and queries on bank entries
        bank = np.concatenate([bank[:2500], bank[:2500]])
    queries = np.concatenate([rng.normal(size=(150, 32)), bank[:50] + 1e-9])
    for k in (1, 10):
        exact = _brute_force_kth(queries, bank, k)
        with_faiss = kth_neighbour_distance(queries, bank, k, use_faiss=True)
        dense = kth_neighbour_distance(queries, bank, k, use_faiss=False)
        assert np.array_equal(with_faiss, exact) and np.array_equal(dense, exact), k
    # k larger than the bank: the farthest entry.
    small = bank[:3]
    assert np.array_equal(
        kth_neighbour_distance(queries, small, 10), _brute_force_kth(queries, small, 3)
    )
