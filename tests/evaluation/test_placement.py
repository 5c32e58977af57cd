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


def test_ranking_scores_leave_classes_absent_from_training_out():
    protos = PROTOS.copy()
    protos[1] = np.nan  # b, a's only sibling, had no training box
    z = np.array([_unit(20)])
    # a's sibling is absent: the margin compares with the nearest other class present, c.
    expected = math.cos(math.radians(20)) - math.cos(math.radians(160))
    assert sibling_margin(z, protos, SIBLINGS) == pytest.approx([expected])
    # The family is a alone: T log exp(cos / T) = cos.
    assert family_energy(z, protos, SIBLINGS) == pytest.approx([math.cos(math.radians(20))])


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


# ------------------------------------------------- the placement section through build_report

# Training bank on the unit circle (degrees): a at 0, 0, 35; b at 60 x 3; c at 180, 180, 75.
BANK = {"a": [0, 0, 35], "b": [60, 60, 60], "c": [180, 180, 75]}
PROBE = "rcdet_placement_probe_test"
BOX = {
    "known": [0, 0, 10, 10],
    "x": [20, 20, 30, 30],
    "y": [40, 40, 50, 50],
    "x2": [60, 60, 70, 70],
}


def _probe_statistics():
    from rcdet.evaluation.scores import EmbeddingStatistics

    x = np.array([_unit(d) for c in KNOWN for d in BANK[c]])
    y = np.repeat([0, 1, 2], 3)
    return EmbeddingStatistics.fit(x, y, num_classes=3, knn_k=1)


def _probe_cfg(tmp_path, ranking_file=True):
    from detectron2.config import get_cfg

    from rcdet.config import add_rcdet_config

    ranking = tmp_path / "ranking.yaml"
    ranking.write_text("ranks:\n  a: [b, x]\n  b: [a, x]\n  c: []\n  x: [[a, b]]\n  y: []\n")
    cfg = get_cfg()
    add_rcdet_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.RCDET.RANKING_FILE = str(ranking) if ranking_file else ""
    cfg.MODEL.RCDET.OOD.HELD_OUT_CLASSES = ["x", "y"]
    cfg.TEST.OOD.OOD_DATASET = "none"
    cfg.TEST.OOD.BOOTSTRAP = 20
    cfg.OUTPUT_DIR = str(tmp_path / "probe")
    return cfg


def _register_probe():
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    def anno(box, c):
        return {"bbox": BOX[box], "bbox_mode": BoxMode.XYXY_ABS, "category_id": c}

    dicts = [
        {  # a known a, a held-out x and a held-out y
            "file_name": "0.png", "image_id": "0", "height": 80, "width": 80,
            "annotations": [anno("known", 0)], "ood_annotations": [anno("x", 0), anno("y", 1)],
        },
        {  # a known b and two held-out x
            "file_name": "1.png", "image_id": "1", "height": 80, "width": 80,
            "annotations": [anno("known", 1)], "ood_annotations": [anno("x", 0), anno("x2", 0)],
        },
    ]  # fmt: skip
    if PROBE not in DatasetCatalog.list():
        DatasetCatalog.register(PROBE, lambda: dicts)
        MetadataCatalog.get(PROBE).set(
            thing_classes=KNOWN, all_classes=KNOWN + ["x", "y"], held_out_classes=["x", "y"]
        )


def _logits(top, strength=4.0):
    """Logits over a, b, c and background whose known-class argmax is ``top``."""
    out = np.zeros(4)
    out[KNOWN.index(top)] = strength
    return out


def _record(image_id, detections):
    boxes, logits, emb = zip(
        *[(BOX[b], _logits(top, s), _unit(deg)) for b, top, s, deg in detections]
    )
    return {
        "image_id": image_id,
        "boxes": np.array(boxes, dtype=np.float64),
        "scores": np.full(len(boxes), 0.9),
        "classes": np.array([KNOWN.index(t) for _, t, _, _ in detections]),
        "logits": np.array(logits),
        "embeddings": np.array(emb),
    }


# (box, argmax class, logit strength, embedding angle). x at 38 degrees: prototype b, kNN a (the
# bank's 35); x at 73: prototype b, kNN c (the bank's 75); x at 170: c both ways; y at 5: a.
PROBE_RECORDS = [
    _record("0", [("known", "a", 4, 0), ("x", "c", 4, 38), ("y", "c", 4, 5)]),
    # The weaker detection on x is a duplicate: the object's claim is the stronger one.
    _record(
        "1", [("known", "b", 4, 60), ("x", "b", 4, 73), ("x", "a", 1, 170), ("x2", "a", 4, 170)]
    ),
]


def test_build_report_places_claimed_held_out_objects_by_hand(tmp_path):
    from rcdet.evaluation.evaluator import build_report

    _register_probe()
    report, arrays = build_report(_probe_cfg(tmp_path), PROBE, PROBE_RECORDS, _probe_statistics())
    assert report.counts["ood"] == 4 and report.counts["duplicates"] == 1
    p = report.placement
    assert p["methods"] == ["prototype", "knn", "argmax"] and p["knn_k"] == 1
    assert p["ranking"] == str(tmp_path / "ranking.yaml")
    x, y = p["classes"]["x"], p["classes"]["y"]
    assert x["objects"] == 3 and x["family"] == ["a", "b"] and x["chance"] == 2 / 3
    # x at 38, 73, 170: prototype b, b, c; kNN a, c, c; argmax c, b, a.
    assert x["confusion"] == {
        "prototype": {"a": 0, "b": 2, "c": 1},
        "knn": {"a": 1, "b": 0, "c": 2},
        "argmax": {"a": 1, "b": 1, "c": 1},
    }
    assert x["family_accuracy"] == {"prototype": 2 / 3, "knn": 1 / 3, "argmax": 2 / 3}
    # y has no rank-2 known class: counted and placed, its family accuracy left out with a warning.
    assert y["objects"] == 1 and y["family"] is None and y["chance"] is None
    assert y["family_accuracy"] == {"prototype": None, "knn": None, "argmax": None}
    assert y["confusion"]["prototype"] == {"a": 1, "b": 0, "c": 0}
    assert y["confusion"]["argmax"] == {"a": 0, "b": 0, "c": 1}
    (warning,) = p["warnings"]
    assert "held-out class 'y' has no rank-2 known class" in warning and warning in report.warnings
    assert report.defined  # a placement warning leaves the OOD metrics defined
    assert arrays["object"]["ood_class"].tolist() == [-1, 0, 1, -1, 0, 0, 0]
    # Each claimed held-out object's nearest known class in ood_scores.npz (-1: not claimed; the
    # duplicate on x is not the object's claim).
    assert arrays["object"]["placed_prototype"].tolist() == [-1, 1, 0, -1, 1, -1, 2]
    assert arrays["object"]["placed_knn"].tolist() == [-1, 0, 0, -1, 2, -1, 2]
    assert arrays["object"]["placed_argmax"].tolist() == [-1, 2, 2, -1, 1, -1, 0]
    flat = report.flat_metrics()
    assert flat["family_accuracy_knn_x"] == 1 / 3 and math.isnan(flat["family_accuracy_knn_y"])
    # The study reads them back: x's objects (y has no family), in family by prototype 2 of 3.
    from rcdet import study
    from rcdet.evaluation.report import write_report_files

    write_report_files(str(tmp_path / "run" / "ood"), report, arrays, figures=False)
    (labels, hits, images), ids = study.load_family_set(str(tmp_path / "run"), "prototype")
    assert labels.tolist() == [0, 0, 0] and hits.tolist() == [True, True, False]
    assert images.tolist() == [0, 1, 1] and ids == ("0", "1")

    # Without a projection (no statistics): argmax placement only.
    plain, plain_arrays = build_report(_probe_cfg(tmp_path), PROBE, PROBE_RECORDS, None)
    assert plain.placement["methods"] == ["argmax"] and plain.placement["knn_k"] is None
    assert plain.placement["classes"]["x"]["family_accuracy"] == {
        "prototype": None,
        "knn": None,
        "argmax": 2 / 3,
    }
    assert plain.placement["classes"]["x"]["confusion"]["prototype"] is None
    assert not plain.scores["sibling_margin"]["available"]
    placed = sorted(k for k in plain_arrays["object"] if k.startswith("placed_"))
    assert placed == ["placed_argmax"]


def test_ranking_scores_in_the_report_by_hand(tmp_path):
    from rcdet.evaluation.evaluator import build_report

    _register_probe()
    stats = _probe_statistics()
    report, arrays = build_report(_probe_cfg(tmp_path), PROBE, PROBE_RECORDS, stats)
    # The prototypes by hand: the normalised mean of each class's bank entries.
    angle = {
        c: math.degrees(math.atan2(*np.mean([_unit(d) for d in BANK[c]], axis=0)[::-1]))
        for c in KNOWN
    }
    np.testing.assert_allclose(stats.prototypes, [_unit(angle[c]) for c in KNOWN], atol=1e-12)
    assert angle["b"] == pytest.approx(60) and 11 < angle["a"] < 12 and 150 < angle["c"] < 152

    def cos(deg, c):
        return math.cos(math.radians(deg - angle[c]))

    # The claimed detections in order: a at 0 and b at 60 (ID); x at 38, y at 5, x at 73, x at 170.
    # Siblings among the known classes: a <-> b; c has none (compared with the nearest other).
    margin = {
        0: cos(0, "a") - cos(0, "b"),
        60: cos(60, "b") - cos(60, "a"),
        38: cos(38, "b") - cos(38, "a"),
        5: cos(5, "a") - cos(5, "b"),
        73: cos(73, "b") - cos(73, "a"),
        170: cos(170, "c") - cos(170, "b"),
    }
    t = 0.1

    def lse(*v):
        return t * math.log(sum(math.exp(s / t) for s in v))

    energy = {
        0: lse(cos(0, "a"), cos(0, "b")),
        60: lse(cos(60, "b"), cos(60, "a")),
        38: lse(cos(38, "b"), cos(38, "a")),
        5: lse(cos(5, "a"), cos(5, "b")),
        73: lse(cos(73, "b"), cos(73, "a")),
        170: cos(170, "c"),
    }
    order = [0, 38, 5, 60, 73, None, 170]  # None: the duplicate, not scored
    got = arrays["object"]
    for name, by_hand in (("sibling_margin", margin), ("family_energy", energy)):
        expected = [np.nan if d is None else by_hand[d] for d in order]
        np.testing.assert_allclose(got[name], expected, atol=1e-12)
        # AUROC by hand: the share of (ID, OOD) pairs the score orders correctly.
        ids, oods = [by_hand[0], by_hand[60]], [by_hand[d] for d in (38, 5, 73, 170)]
        pairs = [(i > o) + 0.5 * (i == o) for i in ids for o in oods]
        entry = report.scores[name]
        assert entry["available"] and entry["auroc"] == pytest.approx(np.mean(pairs))
        lo, hi = entry["auroc_ci"]  # bootstrap intervals like every other score
        assert 0 <= lo <= hi <= 1

    # Without a ranking file: no families, no ranking scores, argmax placement still counted.
    bare, _ = build_report(_probe_cfg(tmp_path, ranking_file=False), PROBE, PROBE_RECORDS, stats)
    assert not bare.scores["sibling_margin"]["available"] and bare.scores["knn"]["available"]
    assert bare.placement["ranking"] is None
    assert bare.placement["classes"]["x"]["family_accuracy"]["prototype"] is None
    assert bare.placement["classes"]["x"]["confusion"]["prototype"] == {"a": 0, "b": 2, "c": 1}
    assert any("MODEL.RCDET.RANKING_FILE is empty" in w for w in bare.warnings)
    # An unreadable ranking file: the same, with the file's error in the warning.
    cfg = _probe_cfg(tmp_path)
    cfg.MODEL.RCDET.RANKING_FILE = str(tmp_path / "missing.yaml")
    broken, _ = build_report(cfg, PROBE, PROBE_RECORDS, stats)
    assert broken.placement["ranking"] is None and not broken.scores["family_energy"]["available"]
    assert any(
        w.startswith(f"MODEL.RCDET.RANKING_FILE: {tmp_path}/missing.yaml: ranking file not found.")
        for w in broken.warnings
    )


def test_a_report_with_placement_writes_its_figure_and_reads_back_equal(tmp_path):
    from rcdet.evaluation.evaluator import build_report
    from rcdet.evaluation.report import OODReport, load_report, merge_reports, write_report_files

    _register_probe()
    report, arrays = build_report(_probe_cfg(tmp_path), PROBE, PROBE_RECORDS, _probe_statistics())
    out = tmp_path / "written"
    write_report_files(str(out), report, arrays)
    assert (out / "placement.png").stat().st_size > 0
    again = load_report(str(out))
    assert again == report and again.placement["classes"]["x"]["family_accuracy"]["knn"] == 1 / 3
    assert OODReport.from_dict(report.to_dict()) == report
    rows = (out / "ood_placement.csv").read_text().splitlines()
    assert rows[0] == "held_out_class,method,objects,family,chance,family_accuracy,a,b,c"
    assert rows[1:4] == [
        "x,prototype,3,a+b,0.6667,0.6667,0,2,1",
        "x,knn,3,a+b,0.6667,0.3333,1,0,2",
        "x,argmax,3,a+b,0.6667,0.6667,1,1,1",
    ]
    assert rows[4] == "y,prototype,1,,,,1,0,0"
    lines = report.summary_lines()
    assert (
        "  x: 3 claimed, family a+b, chance 0.667; family accuracy: prototype 0.667, knn 0.333,"
        " argmax 0.667"
    ) in lines
    assert "    prototype -> b 2, c 1" in lines
    assert (
        "  y: 1 claimed, no known family member; family accuracy: prototype undefined, knn"
        " undefined, argmax undefined"
    ) in lines

    # --compare: one placement row per run, "n/a" for a method the run could not compute.
    plain, plain_arrays = build_report(_probe_cfg(tmp_path), PROBE, PROBE_RECORDS, None)
    plain.name = "plain"
    write_report_files(str(tmp_path / "plain"), plain, plain_arrays, figures=False)
    md = merge_reports([str(out), str(tmp_path / "plain")], str(tmp_path / "cmp"))
    assert "| x objects | x chance | x prototype | x knn | x argmax |" in md
    assert "| 3 | 0.6667 | 0.667 | 0.333 | 0.667 | 1 | undefined | undefined | undefined |" in md
    assert "| plain |" in md and "| 3 | 0.6667 | n/a | n/a | 0.667 |" in md
