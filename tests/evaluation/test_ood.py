import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import tiny_cfg
from rcdet.config import ConfigError
from rcdet.data.held_out import register_held_out_split
from rcdet.data.shapes import CLASS_NAMES
from rcdet.evaluation.ood import EmbeddingStatistics, logit_scores, match_detections, ood_metrics, score_report

# ---------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    is_id = [1, 1, 0, 1, 0, 0]
    m = ood_metrics(scores, is_id)
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["fpr95"] == pytest.approx(1 / 3)  # accepting all 3 ID objects also accepts 0.7
    assert m["aupr_in"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4)
    assert m["aupr_out"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4)


def test_metrics_perfect_and_undefined():
    m = ood_metrics([3.0, 2.0, 1.0], [1, 1, 0])
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0
    assert ood_metrics([1.0, 2.0], [1, 1]) == {"auroc": None, "fpr95": None, "aupr_in": None, "aupr_out": None}
    rep = score_report({"msp": np.array([0.9, 0.1]), "cosine": None}, np.array([1, 0]))
    assert rep["msp"]["auroc"] == 1.0 and rep["msp"]["auroc_ci"] is None  # no bootstrap asked for
    assert rep["cosine"] == {"available": False, "auroc": None, "fpr95": None, "aupr_in": None, "aupr_out": None,
                             "auroc_ci": None, "fpr95_ci": None, "aupr_in_ci": None, "aupr_out_ci": None}


# ---------------------------------------------------------------- matching


def test_matching_all_hand_made_boxes():
    # The per-detection protocol (--matching all); one-per-object matching: tests/test_ood_protocol.py.
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [0, 0, 10, 10], [40, 40, 60, 60]], dtype=float)
    gt_ood = np.array([False, True, True, False])
    dets = np.array(
        [
            [3, 0, 13, 10],  # overlaps ID gt0 (0.54) and OOD gt1 (0.82): the higher IoU wins -> OOD
            [0, 0, 10, 10],  # tie between ID gt0 and OOD gt2: the first GT wins -> ID
            [4, 0, 14, 10],  # duplicate detections of gt1: both matched
            [4.5, 0, 14, 10],
            [100, 100, 120, 120],  # no overlap -> unmatched
            [40, 40, 52, 60],  # IoU 0.6 with gt3 -> ID
            [40, 40, 48, 60],  # IoU 0.4 -> unmatched
        ]
    )
    status, index = match_detections(dets, gt, gt_ood, matching="all")
    assert status.tolist() == [0, 1, 0, 0, -1, 1, -1]
    assert index.tolist() == [1, 0, 1, 1, -1, 3, -1]
    s, i = match_detections(dets[:2], np.zeros((0, 4)), np.zeros(0, dtype=bool), matching="all")
    assert s.tolist() == [-1, -1] and i.tolist() == [-1, -1]


# ---------------------------------------------------------------- scores


def test_logit_scores_direct():
    logits = np.array([[2.0, 0.0, -1.0, 5.0], [0.0, 0.0, 0.0, 0.0]])  # last column: background
    s = logit_scores(logits, num_known=3, energy_temperature=2.0)
    p = np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum()
    assert s["msp"].tolist() == pytest.approx([p.max(), 1 / 3])
    assert s["max_logit"].tolist() == [2.0, 0.0]
    assert s["energy"].tolist() == pytest.approx([2 * np.log(np.exp(1.0) + 1 + np.exp(-0.5)), 2 * np.log(3)])


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
    assert s["cosine"][0] > s["cosine"][1] and s["knn"][0] > s["knn"][1] and s["gaussian"][0] > s["gaussian"][1]


def test_gaussian_never_fails_on_singular_covariance():
    x = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # rank-deficient
    for per_class in (False, True):
        stats = EmbeddingStatistics.fit(x, np.array([0, 0, 1]), num_classes=3, knn_k=5, per_class_covariance=per_class)
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


# ---------------------------------------------------------------- splits


def _names_in(root, fileid):
    return [o.find("name").text for o in ET.parse(os.path.join(root, "Annotations", f"{fileid}.xml")).findall("object")]


@pytest.mark.parametrize("mode", ["drop_images", "drop_annotations"])
def test_held_out_splits(tiny_shapes, mode):
    held = ["ring", "triangle"]
    known = [c for c in CLASS_NAMES if c not in held]
    base = DatasetCatalog.get("rcdet_shapes_trainval")
    train = DatasetCatalog.get(register_held_out_split("rcdet_shapes_trainval", held, mode, "train"))
    meta = MetadataCatalog.get(register_held_out_split("rcdet_shapes_trainval", held, mode, "train"))
    assert meta.thing_classes == known and meta.all_classes == list(CLASS_NAMES)
    with_held = [d["image_id"] for d in base if set(_names_in(tiny_shapes, d["image_id"])) & set(held)]
    assert with_held, "the tiny split should contain held-out objects"
    ids = [d["image_id"] for d in train]
    if mode == "drop_images":
        assert set(ids) == {d["image_id"] for d in base} - set(with_held)
    else:
        assert ids == [d["image_id"] for d in base]
    for d in train:
        names = [n for n in _names_in(tiny_shapes, d["image_id"]) if n not in held]
        assert [known[a["category_id"]] for a in d["annotations"]] == names
    test = DatasetCatalog.get(register_held_out_split("rcdet_shapes_test", held, mode, "test"))
    assert [d["image_id"] for d in test] == [d["image_id"] for d in DatasetCatalog.get("rcdet_shapes_test")]
    for d in test:
        names = _names_in(tiny_shapes, d["image_id"])
        assert [known[a["category_id"]] for a in d["annotations"]] == [n for n in names if n not in held]
        assert [held[a["category_id"]] for a in d["ood_annotations"]] == [n for n in names if n in held]


def test_held_out_config_errors(tiny_shapes):
    with pytest.raises(ConfigError, match=r"'rign' \(did you mean 'ring'\?\)"):
        tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.RCDET.OOD.HELD_OUT_CLASSES", "['rign']")
    with pytest.raises(ConfigError, match="holds out every class"):
        tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.RCDET.OOD.HELD_OUT_CLASSES", str(list(CLASS_NAMES)))
    with pytest.raises(ConfigError, match="NUM_CLASSES 7"):
        tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "9")
    with pytest.raises(ConfigError, match="HOLD_OUT_MODE"):
        tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.RCDET.OOD.HOLD_OUT_MODE", "drop_everything")


# ---------------------------------------------------------------- end to end


def _bench(name, weights, out, *opts, **kw):
    from rcdet.evaluation.ood_benchmark import run_ood_benchmark

    cfg = tiny_cfg(f"configs/shapes_{name}_ood.yaml", "MODEL.WEIGHTS", weights, "MODEL.RCDET.EMBED_AT_TEST", "True", *opts)
    cfg.freeze()
    # Without an OOD image set unless asked for: the image level is tested in test_ood_protocol.py.
    kw.setdefault("ood_dataset", "none")
    kw.setdefault("bootstrap", 50)
    return run_ood_benchmark(cfg, str(out), **kw)


def test_end_to_end_report_files(tiny_models, tmp_path):
    # A 2-iteration model barely localises: a loose matching IoU gives both ID and OOD matches.
    _bench("rince", tiny_models["rince"], tmp_path / "rince", score_threshold=0.0, match_iou=0.1)
    for f in ("ood_report.json", "ood_report.csv", "roc.png", "score_hist.png"):
        assert (tmp_path / "rince" / f).is_file(), f
    with open(tmp_path / "rince" / "ood_report.json") as f:
        on_disk = json.load(f)
    assert on_disk["scores"].keys() == {"msp", "max_logit", "energy", "cosine", "knn", "gaussian"}
    assert set(on_disk["detection"]) == {"AP", "AP50", "AP75"}
    assert on_disk["counts"]["id"] > 0 and on_disk["counts"]["ood"] > 0
    assert all(0 <= e["auroc"] <= 1 for e in on_disk["scores"].values())
    assert on_disk["held_out_classes"] == ["ring", "triangle"] and isinstance(on_disk["open_set"]["a_ose"], int)
    counts = on_disk["counts"]
    assert counts["id"] <= counts["id_objects"] and counts["ood"] <= counts["ood_objects"]  # one detection per object
    assert counts["id"] + counts["ood"] + counts["duplicates"] + counts["background"] == counts["detections"]
    assert on_disk["protocol"]["matching"] == "one_per_object" and on_disk["protocol"]["version"] == 2
    for e in on_disk["scores"].values():  # (containment is tested on synthetic data: test_ood_protocol.py)
        lo, hi = e["auroc_ci"]
        assert 0 <= lo <= hi <= 1
    csv_lines = (tmp_path / "rince" / "ood_report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("protocol,score,available,auroc,auroc_ci_lo,auroc_ci_hi,fpr95") and len(csv_lines) == 7
    assert on_disk["image_level"] is None
    # The statistics are cached next to the weights, keyed by their checksum.
    assert any(n.startswith("ood_stats_") for n in os.listdir(os.path.dirname(tiny_models["rince"])))

    softmax = _bench("softmax", tiny_models["softmax"], tmp_path / "softmax", score_threshold=0.0, match_iou=0.1,
                     time_plain_inference=True)
    assert softmax["timing_seconds"]["plain_inference"] > 0 and "overhead_vs_plain_inference" in softmax
    for s in ("cosine", "knn", "gaussian"):
        assert softmax["scores"][s]["available"] is False and softmax["scores"][s]["auroc"] is None
    assert softmax["scores"]["msp"]["available"] is True

    from rcdet.evaluation.ood import merge_reports

    md = merge_reports([str(tmp_path / "rince"), str(tmp_path / "softmax")], str(tmp_path / "cmp"))
    assert "| rince |" in md and "n/a" in md
    lo, hi = on_disk["scores"]["msp"]["auroc_ci"]
    assert f"{on_disk['scores']['msp']['auroc']:.3f} [{lo:.3f}, {hi:.3f}]" in md  # the table shows the intervals
    assert (tmp_path / "cmp" / "ood_comparison.csv").is_file() and (tmp_path / "cmp" / "roc_comparison.png").is_file()


def test_bad_inputs(tiny_models, tmp_path):
    # Weights for a different class count: a clear error before any output is written.
    with pytest.raises(ConfigError, match="trained for 7 classes"):
        from rcdet.evaluation.ood_benchmark import run_ood_benchmark

        cfg = tiny_cfg("configs/shapes_rince.yaml", "MODEL.WEIGHTS", tiny_models["rince"], "MODEL.RCDET.EMBED_AT_TEST", "True")
        cfg.freeze()
        run_ood_benchmark(cfg, str(tmp_path / "wrong"))
    assert not (tmp_path / "wrong").exists()
    # An empty detection list: complete files, metrics marked undefined.
    empty = _bench("rince", tiny_models["rince"], tmp_path / "empty", score_threshold=1.01)
    assert empty["counts"]["detections"] == 0 and not empty["defined"]
    assert all(e["auroc"] is None for e in empty["scores"].values())
    for f in ("ood_report.json", "ood_report.csv", "roc.png", "score_hist.png"):
        assert (tmp_path / "empty" / f).is_file(), f


def test_no_held_out_objects_warns(tiny_models, tmp_path, tiny_shapes):
    # A test split without held-out objects: the known-only training split.
    from rcdet.evaluation.ood_benchmark import run_ood_benchmark

    name = "rcdet_test_no_ood"
    if name not in DatasetCatalog.list():
        base = "rcdet_shapes_trainval__minus_ring+triangle_drop_images"
        register_held_out_split("rcdet_shapes_trainval", ["ring", "triangle"], "drop_images", "train")
        DatasetCatalog.register(name, lambda: DatasetCatalog.get(base))
        MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get(base).as_dict().items() if k != "name"})
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.WEIGHTS", tiny_models["rince"], "MODEL.RCDET.EMBED_AT_TEST", "True")
    cfg.DATASETS.TEST = (name,)
    cfg.freeze()
    report = run_ood_benchmark(cfg, str(tmp_path / "none"), score_threshold=0.0, ood_dataset="none", bootstrap=0)
    assert report["counts"]["ood"] == 0 and not report["defined"]
    assert any("no held-out objects" in w for w in report["warnings"])
    assert report["scores"]["msp"]["auroc"] is None
