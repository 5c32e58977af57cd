"""
Does the embedding have the structure the ranking asked for? Metrics on region embeddings:
nearest-centroid outliers per hierarchy level, leave-one-out retrieval R@1, ranking fidelity
(mean similarity to rank-1, rank-2, ..., negative centroids and its Spearman correlation with
the ranking), plus t-SNE and centroid-similarity plots. Cosine geometry throughout.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.stats import spearmanr

from .evaluation.plots import pyplot, scatter_classes
from .ranking import NEGATIVE_RANK

__all__ = [
    "class_centroids",
    "nearest_centroid_outliers",
    "retrieval_at_1",
    "ranking_fidelity",
    "plot_tsne",
    "plot_centroid_similarity",
]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def class_centroids(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, d) unit-norm class means; NaN rows for classes without samples."""
    e = _unit(embeddings)
    out = np.full((num_classes, e.shape[1]), np.nan)
    for c in range(num_classes):
        if np.any(labels == c):
            out[c] = e[labels == c].mean(axis=0)
    present = ~np.isnan(out[:, 0])
    out[present] = _unit(out[present])
    return out


def nearest_centroid_outliers(
    embeddings, labels, num_classes: int, group_levels: Sequence[Sequence] = ()
) -> Dict[str, Dict]:
    """
    Count embeddings whose nearest class centroid is another class ("class" level), or lies in
    another group (one entry per level in ``group_levels``, each a group id per class).
    """
    labels = np.asarray(labels)
    centroids = class_centroids(embeddings, labels, num_classes)
    present = np.flatnonzero(~np.isnan(centroids[:, 0]))
    sims = _unit(embeddings) @ centroids[present].T
    nearest = present[sims.argmax(axis=1)]
    n = len(labels)
    result = {
        "class": {
            "count": int((nearest != labels).sum()),
            "fraction": float((nearest != labels).mean()) if n else 0.0,
        }
    }
    for level, groups in enumerate(group_levels):
        groups = np.asarray(groups, dtype=object)
        wrong = groups[nearest] != groups[labels]
        result[f"group_level{level + 1}"] = {
            "count": int(wrong.sum()),
            "fraction": float(wrong.mean()) if n else 0.0,
        }
    return result


def retrieval_at_1(embeddings, labels, group_levels: Sequence[Sequence] = ()) -> Dict[str, float]:
    """Leave-one-out cosine nearest neighbour: is it the same class / the same group?"""
    e = _unit(embeddings)
    labels = np.asarray(labels)
    if len(labels) < 2:
        return {
            "class": float("nan"),
            **{f"group_level{i + 1}": float("nan") for i in range(len(group_levels))},
        }
    nn = np.empty(len(labels), dtype=np.int64)
    for start in range(0, len(labels), 1024):  # rows in chunks: never an n x n matrix
        block = e[start : start + 1024] @ e.T
        block[np.arange(block.shape[0]), np.arange(start, start + block.shape[0])] = -np.inf
        nn[start : start + block.shape[0]] = block.argmax(axis=1)
    out = {"class": float((labels[nn] == labels).mean())}
    for level, groups in enumerate(group_levels):
        groups = np.asarray(groups, dtype=object)
        out[f"group_level{level + 1}"] = float((groups[labels[nn]] == groups[labels]).mean())
    return out


def ranking_fidelity(embeddings, labels, rank_matrix: np.ndarray) -> Dict:
    """
    For each anchor class a: the mean cosine similarity of a's embeddings to the centroids of
    its rank-1 (itself), rank-2, ... and negative classes; averaged over classes; and the
    Spearman correlation between -rank and centroid similarity over class pairs (positive when
    the learned similarities follow the ranking).
    """
    rank_matrix = np.asarray(rank_matrix)
    k = rank_matrix.shape[0]
    labels = np.asarray(labels)
    centroids = class_centroids(embeddings, labels, k)
    present = ~np.isnan(centroids[:, 0])
    e = _unit(embeddings)
    r = int(rank_matrix.max())
    codes = np.where(rank_matrix == NEGATIVE_RANK, r + 1, rank_matrix)
    names = [f"rank{i}" for i in range(1, r + 1)] + ["negative"]
    per_class = {}
    for a in np.flatnonzero(present):
        to_centroids = (e[labels == a] @ np.nan_to_num(centroids).T).mean(axis=0)
        entry = {}
        for code, name in enumerate(names, start=1):
            targets = np.flatnonzero((codes[a] == code) & present)
            entry[name] = float(to_centroids[targets].mean()) if len(targets) else None
        per_class[int(a)] = entry
    mean = {}
    for name in names:
        values = [v[name] for v in per_class.values() if v[name] is not None]
        mean[name] = float(np.mean(values)) if values else None
    centroid_sim = np.nan_to_num(centroids) @ np.nan_to_num(centroids).T
    off = ~np.eye(k, dtype=bool) & present[:, None] & present[None, :]
    rho = None
    if off.sum() > 2 and len(np.unique(codes[off])) > 1:
        rho = float(spearmanr(-codes[off], centroid_sim[off]).correlation)
    ordered = [mean[n] for n in names if mean[n] is not None]
    return {
        "mean_similarity": mean,
        "per_class": per_class,
        "spearman": rho,
        "ordered": bool(all(x > y for x, y in zip(ordered, ordered[1:]))),
        "centroid_similarity": centroid_sim.tolist(),
    }


def plot_tsne(
    points_2d: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[str],
    path_class: str,
    path_group: str,
    held_out: Sequence[str] = (),
    title: str = "",
):
    """
    Two PNGs: colour by class with marker by group, and colour by group; held-out classes in black
    line markers.
    """
    plt = pyplot()
    for path, by_group in ((path_class, False), (path_group, True)):
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        scatter_classes(
            ax, points_2d, labels, class_names, groups, held_out, by_group=by_group, alpha=0.75
        )
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=6, markerscale=1.5, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(
            (title + " - " if title else "")
            + ("coloured by group" if by_group else "coloured by class, marker by group"),
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def plot_centroid_similarity(
    centroid_sim: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[str],
    path: str,
    title: str = "",
):
    plt = pyplot()
    order = sorted(range(len(class_names)), key=lambda i: (groups[i], i))
    m = np.asarray(centroid_sim)[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(0.45 * len(order) + 2.5, 0.45 * len(order) + 1.8))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(order)))
    ax.set_yticks(range(len(order)))
    ax.set_xticklabels([class_names[i] for i in order], rotation=90, fontsize=7)
    ax.set_yticklabels([f"{class_names[i]} [{groups[i]}]" for i in order], fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046).set_label(
        "cosine similarity of the class centroids", fontsize=8
    )
    ax.set_title(title or "class-centroid cosine similarity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tsne_2d(
    embeddings: np.ndarray,
    seed: int = 0,
    max_points: Optional[int] = None,
    labels: Optional[np.ndarray] = None,
):
    """sklearn t-SNE; subsamples to ``max_points`` (returns the kept indices too)."""
    from sklearn.manifold import TSNE

    n = len(embeddings)
    idx = np.arange(n)
    if max_points and n > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    x = _unit(embeddings[idx])
    perplexity = float(min(30, max(2, (len(idx) - 1) / 3)))
    pts = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine"
    ).fit_transform(x)
    return pts, idx


def analyse(
    embeddings,
    labels,
    class_names: List[str],
    rank_matrix: Optional[np.ndarray],
    group_levels: Sequence[Sequence],
) -> Dict:
    """All the numbers for one embedding space (known classes only: labels < len(class_names))."""
    labels = np.asarray(labels)
    keep = labels < len(class_names)
    e, y = np.asarray(embeddings)[keep], labels[keep]
    out = {
        "num_embeddings": int(len(y)),
        "outliers": nearest_centroid_outliers(e, y, len(class_names), group_levels),
        "retrieval_r1": retrieval_at_1(e, y, group_levels),
    }
    out["ranking_fidelity"] = (
        ranking_fidelity(e, y, rank_matrix) if rank_matrix is not None else None
    )
    return out
