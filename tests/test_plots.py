"""The plots' labels: score histogram axes and title, the centroid-similarity colour bar and the
comparison ROC (one panel per score, one colour per run). The study's figures: tests/test_study.py."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import matplotlib.figure
import numpy as np
import pytest

from rcdet.analysis import plot_centroid_similarity
from rcdet.evaluation.ood import _comparison_roc, _histogram_figure


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


def test_score_histogram_has_axes_labels_and_title():
    is_id = np.array([True, True, False])
    fig = _histogram_figure({"msp": np.array([0.9, 0.8, 0.2]), "knn": np.array([-1.0, -2.0, -5.0]), "cosine": None},
                            is_id, "demo: OOD scores")
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["msp", "knn"]
    assert axes[0].get_xlabel() == "msp (higher = more in-distribution)" and axes[0].get_ylabel() == "density"
    assert fig._suptitle.get_text() == "demo: OOD scores"


def test_centroid_similarity_colour_bar_is_labelled(tmp_path, saved_figures):
    plot_centroid_similarity(np.eye(3), ["a", "b", "c"], ["g", "g", "h"], str(tmp_path / "c.png"))
    bar = saved_figures[0].axes[-1]
    assert bar.get_ylabel() == "cosine similarity of the class centroids"


def _npz_run(folder, rng, scores=("msp", "max_logit", "knn")):
    os.makedirs(folder, exist_ok=True)
    status = np.where(rng.random(40) < 0.6, 1, 0)
    np.savez(os.path.join(folder, "ood_scores.npz"), status=status, **{s: rng.normal(size=40) + status for s in scores})


def test_comparison_roc_one_panel_per_score_and_one_colour_per_run(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for name in ("softmax", "supcon", "rince"):
        _npz_run(str(tmp_path / name), rng, ("msp", "max_logit") if name == "softmax" else ("msp", "max_logit", "knn"))
        runs.append((name, str(tmp_path / name)))
    fig = _comparison_roc(runs)
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["msp", "max_logit", "knn"]
    colours = {}
    for ax in panels:
        curves = [l for l in ax.get_lines() if l.get_label() and not l.get_label().startswith("_")]
        within = [mcolors.to_hex(l.get_color()) for l in curves]
        assert len(set(within)) == len(within)  # distinct colours in a panel
        for l in curves:
            colours.setdefault(l.get_label().split(" (")[0], set()).add(mcolors.to_hex(l.get_color()))
        assert ax.get_xlabel().startswith("false positive rate")
    assert all(len(c) == 1 for c in colours.values()) and len(colours) == 3  # a run keeps its colour
