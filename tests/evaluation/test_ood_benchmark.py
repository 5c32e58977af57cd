"""
rcdet.evaluation.ood_benchmark end to end on the tiny split: the report files, one detection per
object, bootstrap intervals, merged reports, bad inputs, the image-level protocol on the built-in
OOD images, and warnings when the test split or the OOD images are not what they should be.
"""

import json
import os

import numpy as np
import pytest
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from rcdet.config import ConfigError
from rcdet.data.held_out import register_held_out_split
from rcdet.evaluation.ood_benchmark import (
    default_report_name,
    resolve_ood_dataset,
    run_ood_benchmark,
)
from rcdet.evaluation.report import PROTOCOL_VERSION, merge_reports
from rcdet.evaluation.scores import ALL_SCORES, REFERENCE_SCORES

# A model trained without exposed classes has no reference embedding f, so no `reference` score.
SCORES_WITHOUT_F = tuple(s for s in ALL_SCORES if s not in REFERENCE_SCORES)

OPTION_KEYS = {
    "score_threshold": "SCORE_THRESHOLD",
    "match_iou": "MATCH_IOU",
    "ood_dataset": "OOD_DATASET",
    "bootstrap": "BOOTSTRAP",
}


def _bench_cfg(weights, *opts, method="rince", **options):
    # Without an OOD image set unless asked for: the image-level tests below ask for one.
    options.setdefault("ood_dataset", "none")
    options.setdefault("bootstrap", 50)
    keys = [x for k, v in options.items() for x in (f"TEST.OOD.{OPTION_KEYS[k]}", str(v))]
    cfg = tiny_cfg(
        f"configs/shapes_{method}_ood.yaml",
        "MODEL.WEIGHTS",
        weights,
        "MODEL.RCDET.EMBED_AT_TEST",
        "True",
        *keys,
        *opts,
    )
    cfg.freeze()
    return cfg


def _bench(method, weights, out, *opts, time_plain_inference=False, **options):
    cfg = _bench_cfg(weights, *opts, method=method, **options)
    return run_ood_benchmark(cfg, str(out), time_plain_inference=time_plain_inference)


# ---------------------------------------------------------------- object level


def test_end_to_end_report_files(tiny_models, tmp_path):
    # A 2-iteration model barely localises: a loose matching IoU gives both ID and OOD matches.
    _bench("rince", tiny_models["rince"], tmp_path / "rince", score_threshold=0.0, match_iou=0.1)
    for f in ("ood_report.json", "ood_report.csv", "roc.png", "score_hist.png"):
        assert (tmp_path / "rince" / f).is_file(), f
    with open(tmp_path / "rince" / "ood_report.json") as f:
        on_disk = json.load(f)
    assert on_disk["scores"].keys() == set(SCORES_WITHOUT_F)
    assert on_disk["scores"]["sibling_margin"]["available"]  # the config names its ranking
    assert set(on_disk["detection"]) == {"AP", "AP50", "AP75"}
    assert on_disk["counts"]["id"] > 0 and on_disk["counts"]["ood"] > 0
    assert all(0 <= e["auroc"] <= 1 for e in on_disk["scores"].values())
    assert on_disk["held_out_classes"] == ["ring", "triangle"] and isinstance(
        on_disk["open_set"]["a_ose"], int
    )
    counts = on_disk["counts"]
    assert (
        counts["id"] <= counts["id_objects"] and counts["ood"] <= counts["ood_objects"]
    )  # one detection per object
    assert (
        counts["id"] + counts["ood"] + counts["duplicates"] + counts["background"]
        == counts["detections"]
    )
    assert (
        on_disk["protocol"]["matching"] == "one_per_object"
        and on_disk["protocol"]["version"] == PROTOCOL_VERSION
    )
    # Containment of the estimate is tested on synthetic data: test_bootstrap.py.
    for e in on_disk["scores"].values():
        lo, hi = e["auroc_ci"]
        assert 0 <= lo <= hi <= 1
    csv_lines = (tmp_path / "rince" / "ood_report.csv").read_text().splitlines()
    assert csv_lines[0].startswith(
        "protocol,score,available,auroc,auroc_ci_lo,auroc_ci_hi,fpr95"
    ) and len(csv_lines) == 1 + len(SCORES_WITHOUT_F)
    assert on_disk["image_level"] is None
    # The statistics are cached next to the weights, keyed by their checksum.
    assert any(
        n.startswith("ood_stats_") for n in os.listdir(os.path.dirname(tiny_models["rince"]))
    )

    softmax = _bench(
        "softmax",
        tiny_models["softmax"],
        tmp_path / "softmax",
        score_threshold=0.0,
        match_iou=0.1,
        time_plain_inference=True,
    )
    assert (
        softmax.timing_seconds["plain_inference"] > 0
        and "overhead_vs_plain_inference" in softmax.timing_seconds
    )
    for s in ("cosine", "knn", "gaussian", "sibling_margin", "family_energy"):
        assert softmax.scores[s]["available"] is False and softmax.scores[s]["auroc"] is None
    assert softmax.scores["msp"]["available"] is True

    md = merge_reports([str(tmp_path / "rince"), str(tmp_path / "softmax")], str(tmp_path / "cmp"))
    assert "| rince |" in md and "n/a" in md
    lo, hi = on_disk["scores"]["msp"]["auroc_ci"]
    assert (
        f"{on_disk['scores']['msp']['auroc']:.3f} [{lo:.3f}, {hi:.3f}]" in md
    )  # the table shows the intervals
    assert (tmp_path / "cmp" / "ood_comparison.csv").is_file() and (
        tmp_path / "cmp" / "roc_comparison.png"
    ).is_file()


def test_bad_inputs(tiny_models, tmp_path):
    # Weights for a different class count: a clear error before any output is written.
    with pytest.raises(ConfigError, match="trained for 7 classes"):
        cfg = tiny_cfg(
            "configs/shapes_rince.yaml",
            "MODEL.WEIGHTS",
            tiny_models["rince"],
            "MODEL.RCDET.EMBED_AT_TEST",
            "True",
        )
        cfg.freeze()
        run_ood_benchmark(cfg, str(tmp_path / "wrong"))
    assert not (tmp_path / "wrong").exists()
    # An empty detection list: complete files, metrics marked undefined.
    empty = _bench("rince", tiny_models["rince"], tmp_path / "empty", score_threshold=1.0)
    assert empty.counts["detections"] == 0 and not empty.defined
    assert all(e["auroc"] is None for e in empty.scores.values())
    for f in ("ood_report.json", "ood_report.csv", "roc.png", "score_hist.png"):
        assert (tmp_path / "empty" / f).is_file(), f


def test_no_held_out_objects_warns(tiny_models, tmp_path, tiny_shapes):
    # A test split without held-out objects: the known-only training split.
    name = "rcdet_test_no_ood"
    if name not in DatasetCatalog.list():
        base = "rcdet_shapes_trainval__minus_ring+triangle_drop_images"
        register_held_out_split(
            "rcdet_shapes_trainval", ["ring", "triangle"], "drop_images", "train"
        )
        DatasetCatalog.register(name, lambda: DatasetCatalog.get(base))
        MetadataCatalog.get(name).set(
            **{k: v for k, v in MetadataCatalog.get(base).as_dict().items() if k != "name"}
        )
    cfg = tiny_cfg(
        "configs/shapes_rince_ood.yaml",
        "MODEL.WEIGHTS",
        tiny_models["rince"],
        "MODEL.RCDET.EMBED_AT_TEST",
        "True",
    )
    cfg.DATASETS.TEST = (name,)
    cfg.TEST.OOD.SCORE_THRESHOLD, cfg.TEST.OOD.OOD_DATASET, cfg.TEST.OOD.BOOTSTRAP = 0.0, "none", 0
    cfg.freeze()
    report = run_ood_benchmark(cfg, str(tmp_path / "none"))
    assert report.counts["ood"] == 0 and not report.defined
    assert any("no held-out objects" in w for w in report.warnings)
    assert report.scores["msp"]["auroc"] is None


# ---------------------------------------------------------------- image level


def test_image_level_protocol_end_to_end(image_level_report, tmp_path):
    cfg, ood_name = image_level_report.cfg, image_level_report.ood_dataset
    report, out = image_level_report.report, image_level_report.folder
    il = report.image_level
    test = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    assert il["ood_dataset"] == ood_name and il["ood_images"] == 6
    assert il["id_images"] == sum(1 for d in test if not d["ood_annotations"])
    assert il["known_class_objects_in_ood_images"] == 0
    raw = np.load(out / "ood_image_level_scores.npz")
    assert il["counts"] == {"id": int(raw["is_id"].sum()), "ood": int((~raw["is_id"]).sum())}
    assert il["counts"]["id"] > 0 and il["counts"]["ood"] > 0
    assert (raw["msp"] >= 0).all() and set(il["scores"]) == set(SCORES_WITHOUT_F)
    assert np.isfinite(raw["sibling_margin"]).all()  # every kept detection scored, OOD images too
    for e in il["scores"].values():
        assert 0 <= e["auroc"] <= 1 and 0 <= e["auroc_ci"][0] <= e["auroc_ci"][1] <= 1
    # VOS's F1-optimal confidence by default, recorded with its rule.
    assert il["threshold_rule"] == "f1_optimal" and il["min_score_rule"].startswith("f1_optimal")
    assert report.protocol["options"]["TEST.OOD.IMAGE_THRESHOLD"] == "f1_optimal"
    assert (out / "roc_image_level.png").is_file()
    csv_rows = (out / "ood_report.csv").read_text().splitlines()
    assert sum(r.startswith("image,") for r in csv_rows) == len(SCORES_WITHOUT_F)
    assert sum(r.startswith("object,") for r in csv_rows) == len(SCORES_WITHOUT_F)
    # The report's default name comes from the config's OUTPUT_DIR for a generic .../ood folder.
    assert report.name == "il"
    assert default_report_name(cfg, str(tmp_path / "ood")) == os.path.basename(
        cfg.OUTPUT_DIR.rstrip("/")
    )


def test_ood_images_with_known_objects_are_dropped_and_counted(tiny_models, tmp_path):
    # The plain test split as "OOD images": its images that show a known-class object are left
    # out (as VOS's process_coco_ood.py leaves them out), and counted.
    cfg = _bench_cfg(
        tiny_models["rince"], score_threshold=0.0, ood_dataset="rcdet_shapes_test", bootstrap=0
    )
    known = set(MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes)
    classes = MetadataCatalog.get("rcdet_shapes_test").thing_classes
    dicts = DatasetCatalog.get("rcdet_shapes_test")
    per_image = [sum(classes[a["category_id"]] in known for a in d["annotations"]) for d in dicts]
    assert sum(per_image) > 0
    report = run_ood_benchmark(cfg, str(tmp_path / "w"))
    il = report.image_level
    assert il["known_class_objects_in_ood_images"] == sum(per_image)
    assert il["ood_images_dropped"] == sum(n > 0 for n in per_image)
    assert il["ood_images"] == sum(n == 0 for n in per_image)
    raw = np.load(tmp_path / "w" / "ood_image_level_scores.npz")
    assert il["counts"]["ood"] == int((~raw["is_id"]).sum())
    assert any(f"contain {sum(per_image)} known-class objects" in w for w in report.warnings)
    assert il["scores"]["msp"]["auroc_ci"] is None  # TEST.OOD.BOOTSTRAP 0


def test_builtin_ood_images_need_a_held_out_split_of_the_builtin_dataset():
    with pytest.raises(ConfigError, match="not a held-out split of the built-in dataset"):
        resolve_ood_dataset("voc_2007_test", "builtin")
    assert resolve_ood_dataset("voc_2007_test", "auto") is None
