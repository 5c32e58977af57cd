"""
The OOD figures: one matplotlib setup (headless), ROC curves, score histograms and the placement
bars, shared by the benchmark, the run comparison, the study (rcdet.study) and the embedding
analysis (rcdet.analysis).
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn import metrics as skm

from ..file_io import save_figure_atomic
from .placement import PLACEMENT_METHODS
from .scores import ALL_SCORES

__all__ = [
    "pyplot",
    "ROC_XLABEL",
    "ROC_YLABEL",
    "plot_roc",
    "roc_figure",
    "GROUP_MARKERS",
    "HELD_OUT_MARKERS",
    "scatter_classes",
    "tsne_panel_figure",
    "histogram_figure",
    "comparison_roc_figure",
    "placement_figure",
    "save_figure",
]


def pyplot():
    """matplotlib's pyplot on the headless Agg backend: rcdet's figures are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ROC_XLABEL = "false positive rate (OOD accepted as ID)"
ROC_YLABEL = "true positive rate (ID accepted)"


def plot_roc(ax, values, is_id, label: str, auroc_format: str = "({:.3f})", **style) -> float:
    """Draw the ROC curve of ``values`` on ``ax``, its AUROC after ``label``; returns the AUROC."""
    fpr, tpr, _ = skm.roc_curve(is_id, values)
    auroc = float(skm.roc_auc_score(is_id, values))
    ax.plot(fpr, tpr, label=f"{label} {auroc_format.format(auroc)}", **style)
    return auroc


def roc_figure(curves: List[tuple], title: str, styles: Optional[Sequence[Dict]] = None):
    """
    One ROC panel: a curve per ``(label, values, is_id)``, AUROC in the legend; ``styles``: the
    line style of each curve (default: one tab10 colour each).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    styles = styles or [{"color": f"C{i % 10}"} for i in range(len(curves))]
    for (label, values, is_id), style in zip(curves, styles, strict=True):
        plot_roc(ax, values, is_id, label, "(AUROC {:.3f})", **style)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
    ax.set_xlabel(ROC_XLABEL)
    ax.set_ylabel(ROC_YLABEL)
    ax.set_title(title, fontsize=9)
    if curves:
        ax.legend(fontsize=6 if len(curves) > 8 else 7, loc="lower right")
    fig.tight_layout()
    return fig


# t-SNE points: a known class has its group's filled marker; a held-out class is black, with a
# line marker of its own, unlike any known class's.
GROUP_MARKERS = "osD^vP*Xhp<>"
HELD_OUT_MARKERS = "x+1234"


def scatter_classes(
    ax,
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[str],
    held_out: Sequence[str] = (),
    by_group: bool = False,
    size: float = 9.0,
    palette: str = "tab20",
    alpha: Optional[float] = None,
):
    """
    Scatter the 2-D ``points`` of each class present in ``labels``: a known class in its colour
    (its group's, ``by_group``) with its group's marker, labelled "name [group]" (the group,
    ``by_group``); a held-out class in black with its own line marker, labelled "name (held out)".
    """
    cmap = pyplot().get_cmap(palette)
    group_names = sorted(set(groups))
    held_out = list(held_out)
    for c, name in enumerate(class_names):
        sel = labels == c
        if not sel.any():
            continue
        g = group_names.index(groups[c])
        x, y = points[sel, 0], points[sel, 1]
        if name in held_out:
            marker = HELD_OUT_MARKERS[held_out.index(name) % len(HELD_OUT_MARKERS)]
            ax.scatter(
                x,
                y,
                s=3 * size,
                marker=marker,
                c="black",
                linewidths=0.8,
                label=f"{name} (held out)",
            )
        else:
            ax.scatter(
                x,
                y,
                s=size,
                marker=GROUP_MARKERS[g % len(GROUP_MARKERS)],
                color=cmap((g if by_group else c) % cmap.N),
                alpha=alpha,
                label=groups[c] if by_group else f"{name} [{groups[c]}]",
            )


def tsne_panel_figure(panels: Sequence[tuple], title: str):
    """
    One t-SNE panel per ``(panel title, points, labels, class names, groups, held-out classes)``,
    sharing one class legend (every panel draws a class in the same style).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), squeeze=False)
    for ax, (name, points, labels, class_names, groups, held_out) in zip(axes[0], panels):
        scatter_classes(ax, points, labels, class_names, groups, held_out, size=4, palette="tab10")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(
            list(legend.values()),
            list(legend.keys()),
            fontsize=6,
            markerscale=2,
            loc="lower center",
            ncol=min(len(legend), 9),
            frameon=False,
            title="class [family]",
            title_fontsize=6,
        )
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.14 if legend else 0, 1, 1))
    return fig


def save_figure(fig, path: str, dpi: int = 110):
    """Write ``fig`` to ``path`` atomically, then close it."""
    save_figure_atomic(path, fig, dpi=dpi)
    pyplot().close(fig)


def histogram_figure(score_table, is_id, title: str):
    """One panel per available score: ID and OOD distributions, with axes and a title."""
    plt = pyplot()
    available = [n for n in ALL_SCORES if score_table.get(n) is not None]
    defined = bool(is_id.any() and (~is_id).any())
    fig, axes = plt.subplots(
        1, max(len(available), 1), figsize=(3.2 * max(len(available), 1), 3.1), squeeze=False
    )
    for ax, name in zip(axes[0], available):
        v = np.asarray(score_table[name])
        if v.size:
            bins = np.histogram_bin_edges(v, bins=30)
            ax.hist(
                v[is_id], bins=bins, alpha=0.6, density=defined, label=f"ID ({int(is_id.sum())})"
            )
            ax.hist(
                v[~is_id],
                bins=bins,
                alpha=0.6,
                density=defined,
                label=f"OOD ({int((~is_id).sum())})",
            )
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no scored detections", ha="center", va="center", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"{name} (higher = more in-distribution)", fontsize=8)
        ax.set_ylabel("density" if defined else "detections", fontsize=8)
    if not available:
        axes[0][0].set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def comparison_roc_figure(runs: Sequence[tuple]):
    """
    One panel per score, one colour per run (the same in every panel), for ``(name, RocSet or
    None)`` pairs; None when no run has a defined ROC set.
    """
    per_score: Dict[str, list] = {}
    for i, (name, roc) in enumerate(runs):
        if roc is None or not roc.defined:
            continue
        for score, values in roc.scores.items():
            per_score.setdefault(score, []).append((i, name, values, roc.is_id))
    if not per_score:
        return None
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    names = [s for s in ALL_SCORES if s in per_score]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax, score in zip(axes.flat, names):
        for i, name, values, is_id in per_score[score]:
            plot_roc(ax, values, is_id, name, color=cmap(i % cmap.N))
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        ax.set_title(score, fontsize=9)
        ax.set_xlabel(ROC_XLABEL, fontsize=8)
        ax.set_ylabel(ROC_YLABEL, fontsize=8)
        ax.legend(fontsize=6, loc="lower right", title="run (AUROC)", title_fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_axis_off()
    fig.suptitle("OOD detection ROC per score, all runs (object level)", fontsize=10)
    fig.tight_layout()
    return fig


PLACEMENT_LABELS = {
    "prototype": "prototype (cosine)",
    "knn": "kNN majority",
    "argmax": "argmax class",
}


def placement_figure(placement: Dict, title: str):
    """
    One bar group per held-out class of a report's ``placement`` section: the family accuracy of
    each computed method (prototype, kNN, argmax), the chance rate marked across the group, and
    "undefined" where the class has no known family member or no claimed object.
    """
    plt = pyplot()
    classes = list(placement["classes"])
    methods = [m for m in PLACEMENT_METHODS if m in placement["methods"]]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(classes) + 1.5), 3.8))
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        xs, heights = [], []
        for i, name in enumerate(classes):
            v = placement["classes"][name]["family_accuracy"][m]
            if v is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                heights.append(v)
        bars = ax.bar(xs, heights, width, label=PLACEMENT_LABELS[m], color=cmap(j))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    chance_label = "chance"  # one legend entry for every group's line
    for i, name in enumerate(classes):
        entry = placement["classes"][name]
        if entry["chance"] is not None:
            ax.hlines(
                entry["chance"], i - 0.45, i + 0.45, colors="k", linestyles="--", label=chance_label
            )
            chance_label = None
            ax.text(i + 0.45, entry["chance"], f" {entry['chance']:.2f}", va="center", fontsize=7)
        if all(entry["family_accuracy"][m] is None for m in methods):
            why = "no known family member" if not entry["family"] else "no claimed object"
            ax.text(i, 0.5, f"undefined:\n{why}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(
        [f"{c}\n({placement['classes'][c]['objects']} claimed)" for c in classes], fontsize=8
    )
    ax.set_xlim(-0.6, len(classes) - 0.4)
    ax.set_ylim(0, 1.38)  # room above 1 for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("family accuracy", fontsize=8)
    ax.set_xlabel("held-out class", fontsize=8)
    ax.set_title(title, fontsize=9)
    if methods:
        ax.legend(fontsize=7, loc="upper center", ncol=2, framealpha=0.9)
    fig.tight_layout()
    return fig
