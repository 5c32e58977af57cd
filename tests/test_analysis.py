"""rcdet.analysis: outliers, retrieval and ranking fidelity of embeddings against independent
references, and the centroid-similarity plot's colour bar."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure
import numpy as np
import pytest

from rcdet.analysis import (
    nearest_centroid_outliers,
    plot_centroid_similarity,
    ranking_fidelity,
    retrieval_at_1,
)
from rcdet.ranking import NEGATIVE_RANK

N = NEGATIVE_RANK


def _clusters(per_class=40, noise=0.02, seed=0):
    """Six classes in three groups: each group a direction, classes slightly apart inside it."""
    rng = np.random.default_rng(seed)
    centres = []
    for g in range(3):
        base = np.zeros(10)
        base[g] = 1.0
        for j in range(2):
            c = base.copy()
            c[3 + 2 * g + j] = 0.5
            centres.append(c / np.linalg.norm(c))
    x = np.concatenate([c + noise * rng.standard_normal((per_class, 10)) for c in centres])
    y = np.repeat(np.arange(6), per_class)
    groups = ["g0", "g0", "g1", "g1", "g2", "g2"]
    return x, y, groups


def test_perfect_clusters_have_no_outliers_and_perfect_retrieval():
    x, y, groups = _clusters()
    out = nearest_centroid_outliers(x, y, 6, [groups])
    assert out["class"] == {"count": 0, "fraction": 0.0}
    assert out["group_level1"] == {"count": 0, "fraction": 0.0}
    r1 = retrieval_at_1(x, y, [groups])
    assert r1 == {"class": 1.0, "group_level1": 1.0}


def test_shuffled_labels_give_chance_level():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 16))
    y = rng.integers(0, 6, 3000)
    groups = ["a", "a", "b", "b", "c", "c"]
    r1 = retrieval_at_1(x, y, [groups])
    assert r1["class"] == pytest.approx(1 / 6, abs=0.03)
    assert r1["group_level1"] == pytest.approx(1 / 3, abs=0.04)
    out = nearest_centroid_outliers(x, y, 6, [groups])
    assert out["class"]["fraction"] > 0.6  # at best 1/6 are inliers by chance, plus centroid noise


def test_ranking_fidelity_orders_ranks_on_a_ranked_embedding():
    x, y, _ = _clusters()
    rank = np.full((6, 6), N)
    np.fill_diagonal(rank, 1)
    for a in range(6):
        rank[a, a ^ 1] = 2  # the sibling in the same group
    fid = ranking_fidelity(x, y, rank)
    m = fid["mean_similarity"]
    assert m["rank1"] > m["rank2"] > m["negative"]
    assert fid["ordered"]
    # Independent reference: unit class means, their cosine similarities, scipy's Spearman.
    from scipy.stats import spearmanr

    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cent = np.stack([unit[y == c].mean(0) for c in range(6)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    off = ~np.eye(6, dtype=bool)
    codes = np.where(rank == N, 3, rank)
    assert fid["spearman"] == pytest.approx(
        spearmanr(-codes[off], (cent @ cent.T)[off]).correlation, abs=1e-12
    )
    assert fid["spearman"] > 0.6  # ties cap it well below 1 here
    wrong = rank[np.ix_([0, 2, 4, 1, 3, 5], [0, 2, 4, 1, 3, 5])]  # siblings moved across groups
    bad = ranking_fidelity(x, y, wrong)
    assert bad["spearman"] < fid["spearman"] and bad["mean_similarity"]["rank2"] < m["rank2"]


@pytest.fixture
def saved_figures(monkeypatch):
    """Figures passed to Figure.savefig, kept open for inspection."""
    figs = []
    original = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        figs.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figs


def test_centroid_similarity_colour_bar_is_labelled(tmp_path, saved_figures):
    plot_centroid_similarity(np.eye(3), ["a", "b", "c"], ["g", "g", "h"], str(tmp_path / "c.png"))
    bar = saved_figures[0].axes[-1]
    assert bar.get_ylabel() == "cosine similarity of the class centroids"
