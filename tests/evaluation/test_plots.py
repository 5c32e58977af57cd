"""rcdet.evaluation.plots: the score histogram's labels, the comparison ROC's panels and colours."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import numpy as np

from rcdet.evaluation.plots import comparison_roc_figure, histogram_figure
from rcdet.evaluation.report import load_roc_set


def test_score_histogram_has_axes_labels_and_title():
    is_id = np.array([True, True, False])
    fig = histogram_figure(
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
        image_index=np.arange(40) // 4,
        image_ids=np.array([str(i) for i in range(10)]),
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
    fig = comparison_roc_figure([(name, load_roc_set(run)) for name, run in runs])
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
