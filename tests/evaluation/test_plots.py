"""rcdet.evaluation.plots: the score histogram's labels, the ROC figures' panels, colours and
styles, and the t-SNE scatter's markers."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import numpy as np

from rcdet.evaluation.plots import (
    comparison_roc_figure,
    histogram_figure,
    pyplot,
    roc_figure,
    scatter_classes,
)
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


def test_scatter_classes_marks_held_out_classes_and_colours_by_class_or_group():
    plt = pyplot()
    names, groups = ["disc", "bullseye", "square", "ring"], ["round", "round", "box", "round"]
    points = np.arange(16, dtype=float).reshape(8, 2)
    labels = np.array([0, 0, 1, 1, 3, 3, 0, 1])  # no square
    for by_group in (False, True):
        fig, ax = plt.subplots()
        scatter_classes(ax, points, labels, names, groups, ["ring"], by_group=by_group, size=5)
        drawn = {c.get_label(): c for c in ax.collections}
        known = ["round", "round"] if by_group else ["disc [round]", "bullseye [round]"]
        assert [c.get_label() for c in ax.collections] == known + ["ring (held out)"]
        disc, bullseye = ax.collections[0], ax.collections[1]
        ring = drawn["ring (held out)"]
        assert mcolors.to_hex(ring.get_facecolor()[0]) == "#000000"
        assert ring.get_sizes()[0] == 15 and disc.get_sizes()[0] == 5
        same = mcolors.to_hex(disc.get_facecolor()[0]) == mcolors.to_hex(
            bullseye.get_facecolor()[0]
        )
        assert same == by_group  # one colour per group, or per class
        assert len(disc.get_offsets()) == 3 and len(ring.get_offsets()) == 2
        plt.close(fig)


def test_roc_figure_takes_a_style_per_curve():
    is_id = np.array([True, True, False, False])
    curves = [
        ("a", np.array([0.9, 0.8, 0.1, 0.2]), is_id),
        ("b", np.array([0.1, 0.9, 0.8, 0.2]), is_id),
    ]
    fig = roc_figure(curves, "t", [{"color": "C3", "linestyle": ":"}, {"color": "C3"}])
    lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["a (AUROC 1.000)", "b (AUROC 0.500)"]
    assert [line.get_linestyle() for line in lines] == [":", "-"]
    assert {mcolors.to_hex(line.get_color()) for line in lines} == {mcolors.to_hex("C3")}
