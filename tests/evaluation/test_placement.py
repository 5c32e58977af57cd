import logging
import math
import os

import numpy as np
import pytest
from conftest import REPO

from rcdet.data.shapes import CLASS_NAMES
from rcdet.evaluation.placement import (
    family_energy,
    held_out_families,
    nearest_by_knn,
    nearest_by_logits,
    nearest_by_prototype,
    placement,
    ranking_scores,
    sibling_indices,
    sibling_margin,
)
from rcdet.ranking import load_ranking, ranking_from_dict

# Three known classes on the unit circle: a at 0 degrees, b at 60 (a's sibling), c at 180.
ANGLES = {"a": 0.0, "b": 60.0, "c": 180.0}
KNOWN = ["a", "b", "c"]


def _unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


PROTOS = np.array([_unit(ANGLES[c]) for c in KNOWN])
SIBLINGS = [np.array([1]), np.array([0]), np.array([], dtype=np.int64)]


def test_nearest_known_class_by_prototype_knn_and_logits():
    emb = np.array([_unit(10), _unit(50), _unit(170), [2.0, 0.1]])  # norms do not matter
    assert nearest_by_prototype(emb, PROTOS).tolist() == [0, 1, 2, 0]
    protos = PROTOS.copy()
    protos[1] = np.nan  # a class absent from training is never the nearest
    assert nearest_by_prototype(emb, protos).tolist() == [0, 0, 2, 0]

    bank = np.array([_unit(0), _unit(5), _unit(55), _unit(65), _unit(70), _unit(180)])
    labels = np.array([0, 0, 1, 1, 1, 2])
    # k = 3 around 40 degrees: 55, 65 and 70 (all b) are nearer than 5 (a).
    assert nearest_by_knn(np.array([_unit(40)]), bank, labels, k=3).tolist() == [1]
    # k = 2 around 28 degrees: 5 (a, 23 away) and 55 (b, 27 away), one vote each: the tie goes
    # to the nearer a.
    assert nearest_by_knn(np.array([_unit(28)]), bank, labels, k=2).tolist() == [0]
    with pytest.raises(ValueError, match="k must be >= 1"):
        nearest_by_knn(emb, bank, labels, k=0)

    logits = np.array([[0.1, 2.0, 0.0, 9.0], [3.0, 1.0, 0.5, 0.0]])  # last column: background
    assert nearest_by_logits(logits, 3).tolist() == [1, 0]


def test_sibling_margin_and_family_energy_by_hand():
    z = np.array([_unit(20), _unit(120), _unit(175)])
    cos = np.cos(np.radians([[20, 40, 160], [120, 60, 60], [175, 115, 5]]))  # to a, b, c
    # z0: nearest a, sibling b.  z1: nearest b (60 away, tied with c; b comes first), sibling a.
    # z2: nearest c, no sibling: compared with the nearest other class, b.
    expected_margin = [cos[0, 0] - cos[0, 1], cos[1, 1] - cos[1, 0], cos[2, 2] - cos[2, 1]]
    np.testing.assert_allclose(sibling_margin(z, PROTOS, SIBLINGS), expected_margin, atol=1e-12)

    t = 0.1
    expected_energy = [
        t * math.log(math.exp(cos[0, 0] / t) + math.exp(cos[0, 1] / t)),
        t * math.log(math.exp(cos[1, 1] / t) + math.exp(cos[1, 0] / t)),
        cos[2, 2],  # a family of one: T log exp(s / T) = s
    ]
    np.testing.assert_allclose(family_energy(z, PROTOS, SIBLINGS, t), expected_energy, atol=1e-12)
    both = ranking_scores(z, PROTOS, SIBLINGS)
    assert set(both) == {"sibling_margin", "family_energy"}
    np.testing.assert_allclose(both["family_energy"], expected_energy, atol=1e-12)
    assert sibling_margin(np.zeros((0, 2)), PROTOS, SIBLINGS).shape == (0,)


def test_placement_family_accuracy_chance_and_undefined_family(caplog):
    full = ranking_from_dict(
        {"ranks": {"a": ["b", "x"], "b": ["a", "x"], "c": [], "x": [["a", "b"]], "y": []}},
        ["a", "b", "c", "x", "y"],
    )
    with caplog.at_level(logging.WARNING):
        families = held_out_families(full, ["x", "y"], KNOWN)
    assert families == {"x": ["a", "b"], "y": None}
    assert "'y' has no rank-2 known class" in caplog.text

    # Five claimed x objects placed on a, b, b, c, a; two y objects on c and a.
    labels = np.array([0, 0, 0, 0, 0, 1, 1])
    nearest = np.array([0, 1, 1, 2, 0, 2, 0])
    result = placement(labels, nearest, ["x", "y"], KNOWN, families)
    assert result["x"] == {
        "objects": 5,
        "confusion": {"a": 2, "b": 2, "c": 1},
        "family": ["a", "b"],
        "family_accuracy": 0.8,
        "chance": 2 / 3,
    }
    assert result["y"]["family_accuracy"] is None and result["y"]["chance"] is None
    assert result["y"]["confusion"] == {"a": 1, "b": 0, "c": 1}
    # No claimed object: undefined, not 0.
    assert placement([], [], ["x"], KNOWN, families)["x"]["family_accuracy"] is None


def test_shipped_family_ranking_gives_ring_its_round_siblings():
    ranking = load_ranking(os.path.join(REPO, "configs/rankings/shapes_families.yaml"), CLASS_NAMES)
    known = [c for c in CLASS_NAMES if c not in ("ring", "triangle")]
    families = held_out_families(ranking, ["ring", "triangle"], known)
    assert families == {"ring": ["disc", "bullseye"], "triangle": ["tri_frame", "tri_split"]}
    siblings = sibling_indices(ranking.subset(known))
    assert [known[i] for i in siblings[known.index("disc")]] == ["bullseye"]
