"""OOD benchmark v2 (issue 13): one detection per object, OpenDet2's A-OSE and WI, the recall of
held-out objects at 95% ID, bootstrap intervals, the image-level protocol, --compare's checks and
the grid visualizer."""

import json
import os

import numpy as np
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import load_tool, tiny_cfg
from rcdet.config import ConfigError
from rcdet.evaluation.bootstrap import bootstrap_intervals, paired_bootstrap, weighted_metrics
from rcdet.evaluation.ood import (BACKGROUND, DUPLICATE, ID, OOD, ReportError, detector_confidence, match_detections,
                                  merge_reports, ood_metrics)
from rcdet.evaluation.open_set import absolute_open_set_error, wilderness_impact

# ---------------------------------------------------------------- matching


def test_one_per_object_matching_hand_made():
    gt = np.array([[0, 0, 10, 10],    # 0 ID
                   [20, 0, 30, 10],   # 1 OOD
                   [40, 0, 50, 10],   # 2 ID, no detection reaches it
                   [60, 0, 70, 10],   # 3 ID
                   [64, 0, 74, 10]],  # 4 OOD, overlapping 3
                  dtype=float)
    gt_ood = np.array([False, True, False, False, True])
    dets = np.array([
        [0, 0, 10, 10],        # d0 IoU 1 with gt0, but d1 is more confident -> duplicate
        [1, 0, 11, 10],        # d1 IoU 90/110 with gt0, confidence 0.9 -> claims gt0 (ID)
        [20, 0, 30, 10],       # d2 claims gt1 (OOD)
        [20, 0, 30, 10],       # d3 same confidence as d2: the earlier detection wins -> duplicate
        [63, 0, 73, 10],       # d4 between gt3 (70/130) and gt4 (90/110): the higher IoU, OOD
        [100, 100, 110, 110],  # d5 overlaps nothing: background
        [61, 0, 71, 10],       # d6 gt3 (90/110) over gt4 (70/130): claims gt3 (ID)
        [62, 0, 72, 10],       # d7 tie gt3/gt4 (80/120 each): the first GT, gt3, already claimed -> duplicate
    ], dtype=float)
    conf = np.array([0.6, 0.9, 0.5, 0.5, 0.7, 0.95, 0.3, 0.1])
    status, index = match_detections(dets, gt, gt_ood, 0.5, conf)
    assert status.tolist() == [DUPLICATE, ID, OOD, DUPLICATE, OOD, BACKGROUND, ID, DUPLICATE]
    assert index.tolist() == [0, 0, 1, 1, 4, -1, 3, 3]
    # Matched counts never exceed the objects: 2 of 3 ID objects, 2 of 2 OOD objects; gt2 missed.
    assert (status == ID).sum() == 2 and (status == OOD).sum() == 2 and 2 not in index
    # The per-detection protocol counts every matched detection.
    all_status, _ = match_detections(dets, gt, gt_ood, 0.5, matching="all")
    assert all_status.tolist() == [ID, ID, OOD, OOD, OOD, BACKGROUND, ID, ID]
    # Detector order decides only through the confidence: permuting the detections permutes the result.
    perm = np.array([7, 6, 5, 4, 1, 0, 2, 3])  # keeps d2 before d3 (their tie)
    s2, i2 = match_detections(dets[perm], gt, gt_ood, 0.5, conf[perm])
    assert s2.tolist() == status[perm].tolist() and i2.tolist() == index[perm].tolist()
    with pytest.raises(ValueError, match="confidence"):
        match_detections(dets, gt, gt_ood)
    with pytest.raises(ValueError, match="matching"):
        match_detections(dets, gt, gt_ood, 0.5, conf, matching="best")


def test_detector_confidence_is_the_max_known_class_probability():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])  # last column: background
    z = np.exp([2.0, 0.0, 1.0]).sum()
    assert detector_confidence(logits, 2) == pytest.approx([np.exp(2.0) / z, 1 / (2 + np.exp(3.0))])


def test_ood_recall_at_95_id_hand_computed():
    id_scores = np.arange(1.0, 21.0)  # 20 ID detections
    ood_scores = np.array([0.5, 5.5, 25.0])  # 3 detected of 5 held-out objects
    m = ood_metrics(np.r_[id_scores, ood_scores], np.r_[np.ones(20), np.zeros(3)], num_ood_objects=5)
    # Accepting 95% of ID (19 of 20) means accepting scores >= 2: 5.5 and 25 are accepted, 0.5 flagged.
    assert m["fpr95"] == pytest.approx(2 / 3)
    assert m["ood_recall_at_95_id"] == pytest.approx(1 / 5)


# ---------------------------------------------------------------- A-OSE and WI


def _open_set_case():
    # Two known classes; image A has known objects of both and one held-out object U1, image B a
    # class-0 object and a held-out object U2.
    a = {"gt_boxes": [[0, 0, 10, 10], [20, 0, 30, 10]], "gt_classes": [0, 1], "unknown_boxes": [[40, 0, 50, 10]],
         "boxes": [[0, 0, 10, 10], [40, 0, 50, 10], [41, 0, 51, 10], [20, 0, 30, 10], [45, 0, 55, 10]],
         "scores": [0.9, 0.8, 0.4, 0.7, 0.3], "classes": [0, 0, 1, 1, 0]}
    b = {"gt_boxes": [[0, 0, 10, 10]], "gt_classes": [0], "unknown_boxes": [[20, 0, 30, 10]],
         "boxes": [[0, 0, 10, 10], [20, 0, 30, 10]], "scores": [0.6, 0.95], "classes": [0, 0]}
    return [a, b]


def test_a_ose_counts_known_class_detections_on_unknown_objects():
    images = _open_set_case()
    # On an unknown object at IoU > 0.5: A's [40..50] (IoU 1) and [41..51] (90/110), B's [20..30]
    # (IoU 1); A's [45..55] has IoU 5/15 with U1, below 0.5.
    assert absolute_open_set_error(images) == 3
    assert absolute_open_set_error(images, score_threshold=0.5) == 2  # [41..51] scores 0.4
    # Strictly greater than 0.5, as OpenDet2's ``ovmax > ovthresh``: IoU exactly 0.5 is no error.
    half = [{"boxes": [[0, 0, 10, 10]], "scores": [1.0], "unknown_boxes": [[0, 0, 10, 5]]}]
    assert absolute_open_set_error(half) == 0


def test_wilderness_impact_hand_computed():
    # Class 0, by score: B[20..30] .95 (FP, unknown), A[0..10] .9 (TP), A[40..50] .8 (FP, unknown),
    # B[0..10] .6 (TP), A[45..55] .3 (FP). 2 objects: recall 0, .5, .5, 1, 1; |recall - 0.8| is
    # smallest (0.2) first at rank 4 -> tp+fp = 4, open-set FPs among them = 2.
    # Class 1: A[20..30] .7 (TP), A[41..51] .4 (FP, unknown). 1 object: recall 1, 1 -> rank 1:
    # tp+fp = 1, open-set FPs 0.
    # WI = mean(2, 0) / mean(4, 1) = 1 / 2.5.
    wi = wilderness_impact(_open_set_case(), num_known=2)
    assert wi == {"wi": pytest.approx(0.4), "fp_open": 1.0, "tp_plus_fp": 2.5, "classes": 2}
    # A class without ground truth is left out; no class at all: undefined.
    assert wilderness_impact(_open_set_case(), num_known=3)["classes"] == 2
    assert wilderness_impact([], num_known=2)["wi"] is None


# ---------------------------------------------------------------- bootstrap


def _sample(num_images, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(num_images), 3)
    is_id = rng.random(len(groups)) < 0.7
    scores = np.round(rng.normal(size=len(groups)) + 1.2 * is_id, 1)  # rounded: tied scores
    return scores, is_id, groups


def test_weighted_metrics_equal_sklearn_on_the_repeated_sample():
    scores, is_id, _ = _sample(60)
    weights = np.random.default_rng(1).integers(0, 3, size=(4, len(scores)))
    m = weighted_metrics(scores, is_id, weights)
    for b in range(4):
        rep = np.repeat(np.arange(len(scores)), weights[b])
        ref = ood_metrics(scores[rep], is_id[rep])
        for k, v in ref.items():
            assert m[k][b] == pytest.approx(v, abs=1e-12), k


def test_bootstrap_interval_contains_estimate_is_deterministic_and_narrows():
    widths = []
    for n in (20, 400):
        scores, is_id, groups = _sample(n)
        point = ood_metrics(scores, is_id)
        ci = bootstrap_intervals({"s": scores}, is_id, groups, n, replicates=400, seed=3)["s"]
        for k in ("auroc", "fpr95", "aupr_in", "aupr_out"):
            lo, hi = ci[f"{k}_ci"]
            assert lo <= point[k] <= hi, k
        assert bootstrap_intervals({"s": scores}, is_id, groups, n, replicates=400, seed=3)["s"] == ci
        assert bootstrap_intervals({"s": scores}, is_id, groups, n, replicates=400, seed=4)["s"] != ci
        widths.append(ci["auroc_ci"][1] - ci["auroc_ci"][0])
    assert widths[1] < widths[0] / 2  # 20x the images: about 1/sqrt(20) the width
    assert bootstrap_intervals({"s": None}, is_id, groups, 400, replicates=10) == {"s": None}


def test_paired_bootstrap():
    scores, is_id, groups = _sample(200)
    same = paired_bootstrap([(scores, is_id, groups)], [(scores, is_id, groups)], 200, replicates=200)
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0
    better = np.where(is_id, scores + 1.0, scores)  # the same detections, better separated
    d = paired_bootstrap([(better, is_id, groups)], [(scores, is_id, groups)], 200, replicates=200)
    assert d["difference"] == pytest.approx(ood_metrics(better, is_id)["auroc"] - ood_metrics(scores, is_id)["auroc"])
    assert d["ci"][0] > 0 and d["p_value"] == 0.0


# ---------------------------------------------------------------- --compare


def _fake_report(folder, matching="one_per_object", version=2):
    os.makedirs(folder, exist_ok=True)
    entry = {"available": True, "auroc": 0.7, "fpr95": 0.8, "aupr_in": 0.9, "aupr_out": 0.5,
             "auroc_ci": [0.6, 0.8], "fpr95_ci": [0.7, 0.9], "aupr_in_ci": None, "aupr_out_ci": None}
    rep = {"name": os.path.basename(folder), "detection": {}, "scores": {"msp": entry},
           "protocol": {"version": version, "matching": matching, "match_iou": 0.5, "score_threshold": 0.05}}
    with open(os.path.join(folder, "ood_report.json"), "w") as f:
        json.dump(rep, f)


def test_compare_refuses_mixed_protocols_and_malformed_reports(tmp_path, capsys):
    bench = load_tool("benchmark_ood")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_report(a)
    _fake_report(b, matching="all")
    with pytest.raises(ReportError, match=r"different protocols: .*matching 'one_per_object' vs 'all'"):
        merge_reports([a, b], str(tmp_path / "out"))
    assert bench.main(["--compare", a, b, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refusing to compare reports from different protocols") and "\n" not in err
    # A report from before issue 13 (no protocol section) is protocol version 1.
    with open(os.path.join(b, "ood_report.json")) as f:
        old = json.load(f)
    del old["protocol"]
    with open(os.path.join(b, "ood_report.json"), "w") as f:
        json.dump(old, f)
    with pytest.raises(ReportError, match="version 2 vs 1"):
        merge_reports([a, b], str(tmp_path / "out"))
    # Malformed files: one line naming the file.
    with open(os.path.join(b, "ood_report.json"), "w") as f:
        f.write('{"scores": {')
    assert bench.main(["--compare", a, b]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {b}/ood_report.json: not valid JSON") and "\n" not in err
    with open(os.path.join(b, "ood_report.json"), "w") as f:
        json.dump({"name": "b", "detection": {}}, f)
    assert bench.main(["--compare", a, b]) == 2
    assert f"{b}/ood_report.json: not an OOD report (no 'scores' section)" in capsys.readouterr().err
    # Same protocol: merged, with the intervals.
    _fake_report(b)
    md = merge_reports([a, b], str(tmp_path / "out"))
    assert "| a |" in md and "0.700 [0.600, 0.800]" in md


# ---------------------------------------------------------------- end to end on the tiny split


def _bench_cfg(weights, *opts):
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.WEIGHTS", weights, "MODEL.RCDET.EMBED_AT_TEST", "True", *opts)
    cfg.freeze()
    return cfg


def test_builtin_ood_image_set_is_deterministic_and_held_out_only(tiny_shapes, tmp_path):
    from rcdet.data.ood_images import OOD_IMAGES, builtin_ood_dataset, generate_ood_images

    cfg = _bench_cfg("unused.pth")
    name = builtin_ood_dataset(cfg.DATASETS.TEST[0])
    dicts = DatasetCatalog.get(name)
    classes = MetadataCatalog.get(name).thing_classes
    assert len(dicts) == OOD_IMAGES >= 200
    names = [classes[a["category_id"]] for d in dicts for a in d["annotations"]]
    assert set(names) == {"ring", "triangle"} and all(d["annotations"] for d in dicts)
    assert name == builtin_ood_dataset(cfg.DATASETS.TEST[0])  # registered once, not regenerated
    one = generate_ood_images(str(tmp_path / "one"), ["ring"], 3)
    two = generate_ood_images(str(tmp_path / "two"), ["ring"], 3)
    for sub in ("JPEGImages/000002.jpg", "Annotations/000002.xml"):
        assert open(os.path.join(one, sub), "rb").read() == open(os.path.join(two, sub), "rb").read()


def test_image_level_protocol_end_to_end(tiny_models, tmp_path):
    from rcdet.data.ood_images import register_shapes_ood_images
    from rcdet.evaluation.ood_benchmark import run_ood_benchmark

    cfg = _bench_cfg(tiny_models["rince"])
    root = MetadataCatalog.get("rcdet_shapes_test").dirname
    ood_name = register_shapes_ood_images(root, ["ring", "triangle"], num_images=6)
    out = tmp_path / "il"
    report = run_ood_benchmark(cfg, str(out), score_threshold=0.0, match_iou=0.1, ood_dataset=ood_name, bootstrap=40)
    il = report["image_level"]
    test = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    assert il["ood_dataset"] == ood_name and il["ood_images"] == 6
    assert il["id_images"] == sum(1 for d in test if not d["ood_annotations"])
    assert il["known_class_objects_in_ood_images"] == 0
    raw = np.load(out / "ood_image_level_scores.npz")
    assert il["counts"] == {"id": int(raw["is_id"].sum()), "ood": int((~raw["is_id"]).sum())}
    assert il["counts"]["id"] > 0 and il["counts"]["ood"] > 0
    assert (raw["msp"] >= 0).all() and set(il["scores"]) == {"msp", "max_logit", "energy", "cosine", "knn", "gaussian"}
    for e in il["scores"].values():
        assert 0 <= e["auroc"] <= 1 and 0 <= e["auroc_ci"][0] <= e["auroc_ci"][1] <= 1
    assert "the confidence that keeps 95%" in il["min_score_rule"] or "score threshold" in il["min_score_rule"]
    assert (out / "roc_image_level.png").is_file()
    csv_rows = (out / "ood_report.csv").read_text().splitlines()
    assert sum(r.startswith("image,") for r in csv_rows) == 6 and sum(r.startswith("object,") for r in csv_rows) == 6
    # The report's default name comes from the config's OUTPUT_DIR for a generic .../ood folder.
    assert report["name"] == "il"
    from rcdet.evaluation.ood_benchmark import default_report_name

    assert default_report_name(cfg, str(tmp_path / "ood")) == os.path.basename(cfg.OUTPUT_DIR.rstrip("/"))

    # The grid visualizer writes its PNG (tools/visualize_ood.py).
    vis = load_tool("visualize_ood")
    assert vis.main([str(out), "--num-images", "3", "--score", "knn", "--output", str(tmp_path / "grid.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_ood_image_set_with_known_objects_warns(tiny_models, tmp_path):
    from rcdet.evaluation.ood_benchmark import run_ood_benchmark

    # The plain test split as "OOD images": every known-class object in it is counted in the warning.
    cfg = _bench_cfg(tiny_models["rince"])
    known = set(MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes)
    classes = MetadataCatalog.get("rcdet_shapes_test").thing_classes
    n_known = sum(classes[a["category_id"]] in known for d in DatasetCatalog.get("rcdet_shapes_test") for a in d["annotations"])
    assert n_known > 0
    report = run_ood_benchmark(cfg, str(tmp_path / "w"), score_threshold=0.0, ood_dataset="rcdet_shapes_test", bootstrap=0)
    assert report["image_level"]["known_class_objects_in_ood_images"] == n_known
    assert any(f"contains {n_known} known-class objects" in w for w in report["warnings"])
    assert report["image_level"]["scores"]["msp"]["auroc_ci"] is None  # --bootstrap 0


def test_unregistered_ood_dataset_lists_the_registered_ones(tiny_shapes, capsys):
    bench = load_tool("benchmark_ood")
    from conftest import REPO

    rc = bench.main(["--config-file", os.path.join(REPO, "configs/shapes_rince_ood.yaml"), "--ood-dataset", "coco_no_voc",
                     "MODEL.WEIGHTS", "unused.pth"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("error: --ood-dataset 'coco_no_voc' is not a registered dataset. Registered datasets:")
    assert "rcdet_shapes_test" in err and "voc_2007_test" in err
    with pytest.raises(ConfigError, match="not a held-out split of the built-in dataset"):
        from rcdet.evaluation.ood_benchmark import resolve_ood_dataset

        resolve_ood_dataset("voc_2007_test", "builtin")
    assert resolve_ood_dataset("voc_2007_test", "auto") is None


def test_unwritable_dataset_root_is_one_clear_error(monkeypatch, tmp_path):
    from rcdet.data import ood_images
    from rcdet.data.datasets import DatasetError

    def refuse(folder, *a, **kw):
        raise PermissionError(13, "Permission denied", folder)

    monkeypatch.setattr(ood_images, "generate_ood_images", refuse)
    with pytest.raises(DatasetError, match=r"cannot write the built-in OOD image set there .*--ood-dataset none"):
        ood_images.register_shapes_ood_images(str(tmp_path), ["ring"])
