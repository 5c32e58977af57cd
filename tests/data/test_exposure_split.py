"""
rcdet.data.held_out with exposed classes (MODEL.RCDET.OOD.EXPOSED_CLASSES): the exposed boxes
stay in training with their own labels, the test unknowns leave it, the test split shows no
exposed object; REFERENCE removed removes them from training instead; the VOC evaluator counts
only the images the split holds; bad exposure configs are ConfigErrors naming the key.
"""

import pytest
import torch
from conftest import tiny_cfg, voc_object_names
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from rcdet.config import ConfigError
from rcdet.data.datasets import CheckedDatasetMapper
from rcdet.data.held_out import (
    exposure_training_dicts,
    parse_held_out_split,
    register_split_by_name,
    voc_evaluator,
)
from rcdet.data.shapes import CLASS_NAMES

CONFIG = "configs/shapes_rince_exposure_ood.yaml"
HELD = ["ring", "triangle"]
EXPOSED = ["frame", "tri_split"]
KNOWN = [c for c in CLASS_NAMES if c not in HELD + EXPOSED]
TRAIN = "rcdet_shapes_trainval__minus_ring+triangle_exposed_frame+tri_split_drop_images"
TEST = "rcdet_shapes_test__minus_ring+triangle_exposed_frame+tri_split_ood_test"


def _ids(name):
    return [d["image_id"] for d in DatasetCatalog.get(name)]


def test_exposed_boxes_stay_in_training_and_leave_the_test_split(tiny_shapes):
    cfg = tiny_cfg(CONFIG)
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == ((TRAIN,), (TEST,))
    assert (
        MetadataCatalog.get(TRAIN).thing_classes == KNOWN == MetadataCatalog.get(TEST).thing_classes
    )
    assert MetadataCatalog.get(TEST).held_out_classes == HELD
    assert MetadataCatalog.get(TEST).exposed_classes == EXPOSED

    names = {
        d["image_id"]: voc_object_names(tiny_shapes, d["image_id"])
        for split in ("rcdet_shapes_trainval", "rcdet_shapes_test")
        for d in DatasetCatalog.get(split)
    }
    train = DatasetCatalog.get(TRAIN)
    # No test-unknown object in the training split (drop_images: not in its images either).
    assert all(not set(names[d["image_id"]]) & set(HELD) for d in train)
    assert set(_ids(TRAIN)) == {
        d["image_id"]
        for d in DatasetCatalog.get("rcdet_shapes_trainval")
        if not set(names[d["image_id"]]) & set(HELD)
    }
    # Every exposed box of those images is there, with its exposed-class index, the known boxes
    # with their known-class index.
    exposed_boxes = 0
    for d in train:
        objects = names[d["image_id"]]
        assert [KNOWN[a["category_id"]] for a in d["annotations"]] == [
            n for n in objects if n in KNOWN
        ]
        assert [EXPOSED[a["category_id"]] for a in d["exposed_annotations"]] == [
            n for n in objects if n in EXPOSED
        ]
        exposed_boxes += len(d["exposed_annotations"])
    assert exposed_boxes > 0 and {
        EXPOSED[a["category_id"]] for d in train for a in d["exposed_annotations"]
    } == set(EXPOSED)

    test = DatasetCatalog.get(TEST)
    # No exposed class among the test split's objects: its images with one are dropped.
    assert _ids(TEST) == [
        d["image_id"]
        for d in DatasetCatalog.get("rcdet_shapes_test")
        if not set(names[d["image_id"]]) & set(EXPOSED)
    ]
    assert len(test) < len(DatasetCatalog.get("rcdet_shapes_test"))
    for d in test:
        objects = names[d["image_id"]]
        assert [KNOWN[a["category_id"]] for a in d["annotations"]] == [
            n for n in objects if n in KNOWN
        ]
        assert [HELD[a["category_id"]] for a in d["ood_annotations"]] == [
            n for n in objects if n in HELD
        ]
        assert "exposed_annotations" not in d
    assert any(d["ood_annotations"] for d in test) and any(d["annotations"] for d in test)


def test_the_training_mapper_labels_exposed_boxes_above_background(tiny_shapes):
    cfg = tiny_cfg(CONFIG)
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    train = DatasetCatalog.get(TRAIN)
    mapper = CheckedDatasetMapper(cfg, True)
    assert mapper.exposed_label == k + 1 == 6
    record = max(train, key=lambda d: len(d["exposed_annotations"]) + len(d["annotations"]))
    assert record["annotations"] and record["exposed_annotations"]
    labels = mapper(record)["instances"].gt_classes.tolist()
    assert sorted(labels) == sorted(
        [a["category_id"] for a in record["annotations"]]
        + [k + 1 + a["category_id"] for a in record["exposed_annotations"]]
    )
    # At test time, and for the baselines without exposed boxes, nothing is added.
    assert CheckedDatasetMapper(cfg, False).exposed_label is None
    removed = tiny_cfg(CONFIG, "MODEL.RCDET.OOD.REFERENCE", "removed")
    assert CheckedDatasetMapper(removed, True).exposed_label is None
    assert (
        CheckedDatasetMapper(tiny_cfg("configs/shapes_rince_ood.yaml"), True).exposed_label is None
    )

    # An image whose only boxes are exposed ones is trained on (detectron2's empty-image filter
    # would drop it: its known annotations are empty).
    only_exposed = [d["image_id"] for d in train if not d["annotations"]]
    assert only_exposed and all(
        d["exposed_annotations"] for d in train if d["image_id"] in only_exposed
    )
    assert [d["image_id"] for d in exposure_training_dicts(cfg)] == _ids(TRAIN)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    assert [d["image_id"] for d in exposure_training_dicts(cfg)] == _ids(TRAIN)


def test_removed_exposed_classes_leave_training_as_held_out_ones(tiny_shapes):
    cfg = tiny_cfg("configs/shapes_rince_expsplit_ood.yaml")
    train_name = "rcdet_shapes_trainval__minus_ring+triangle_removed_frame+tri_split_drop_images"
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == ((train_name,), (TEST,))
    train = DatasetCatalog.get(train_name)
    for d in train:
        assert not set(voc_object_names(tiny_shapes, d["image_id"])) & set(HELD + EXPOSED)
        assert "exposed_annotations" not in d
    # The same images as four held-out classes give, and the same test split as the exposure.
    four = tiny_cfg(
        "configs/shapes_rince_ood.yaml",
        "MODEL.RCDET.OOD.HELD_OUT_CLASSES",
        str(HELD + EXPOSED),
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "5",
    )
    assert train == DatasetCatalog.get(four.DATASETS.TRAIN[0])
    assert MetadataCatalog.get(train_name).thing_classes == KNOWN
    drop_annotations = tiny_cfg(
        "configs/shapes_rince_expsplit_ood.yaml",
        "MODEL.RCDET.OOD.HOLD_OUT_MODE",
        "drop_annotations",
    )
    kept = DatasetCatalog.get(drop_annotations.DATASETS.TRAIN[0])
    assert [d["image_id"] for d in kept] == _ids("rcdet_shapes_trainval")
    assert sum(len(d["annotations"]) for d in kept) == sum(
        n in KNOWN for d in kept for n in voc_object_names(tiny_shapes, d["image_id"])
    )


def test_exposure_split_names_round_trip_and_are_registered_again(tiny_shapes):
    tiny_cfg(CONFIG)
    parsed = parse_held_out_split(TRAIN)
    assert parsed == ("rcdet_shapes_trainval", HELD, "drop_images", "train", EXPOSED, True)
    assert parse_held_out_split(TEST).exposed == EXPOSED and parse_held_out_split(TEST).mode is None
    removed = "rcdet_shapes_trainval__minus_tri_frame_removed_tri_split_drop_annotations"
    assert parse_held_out_split(removed) == (
        "rcdet_shapes_trainval",
        ["tri_frame"],
        "drop_annotations",
        "train",
        ["tri_split"],
        False,
    )
    plain = parse_held_out_split("rcdet_shapes_trainval__minus_tri_frame_drop_images")
    assert plain.held_out == ["tri_frame"] and plain.exposed == []
    expected = {name: DatasetCatalog.get(name) for name in (TRAIN, TEST)}
    for name in (TRAIN, TEST):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    # A saved config names the derived splits; a new process derives them again.
    again = tiny_cfg(CONFIG, "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", f"('{TEST}',)")
    assert (again.DATASETS.TRAIN, again.DATASETS.TEST) == ((TRAIN,), (TEST,))
    for name in (TRAIN, TEST):
        assert DatasetCatalog.get(name) == expected[name]
    assert register_split_by_name(TEST) == TEST and register_split_by_name("voc_2007_test") is None
    # A derived split whose exposure contradicts the config's.
    with pytest.raises(ConfigError) as e:
        tiny_cfg(CONFIG, "MODEL.RCDET.OOD.REFERENCE", "removed", "DATASETS.TRAIN", f"('{TRAIN}',)")
    msg = str(e.value)
    assert msg.startswith(f"DATASETS.TRAIN '{TRAIN}' is 'rcdet_shapes_trainval' with ring+triangle")
    assert "frame+tri_split exposed" in msg and "(REFERENCE removed)" in msg
    with pytest.raises(ConfigError, match="DATASETS.TEST"):
        tiny_cfg(
            "configs/shapes_rince_ood.yaml",
            "DATASETS.TEST",
            f"('{TEST}',)",
        )


def _perfect_outputs(dicts):
    """Each image's known boxes as its detections (score 1): a perfect detector's output."""
    inputs, outputs = [], []
    for d in dicts:
        inst = Instances((d["height"], d["width"]))
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]
        ]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor(
            [a["category_id"] for a in d["annotations"]], dtype=torch.int64
        )
        inputs.append({"image_id": d["image_id"]})
        outputs.append({"instances": inst})
    return inputs, outputs


def test_voc_evaluation_counts_only_the_images_of_the_split(tiny_shapes):
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    tiny_cfg(CONFIG)
    test = DatasetCatalog.get(TEST)
    inputs, outputs = _perfect_outputs(test)
    subset = voc_evaluator(TEST)
    subset.reset()
    subset.process(inputs, outputs)
    # AP 100 for every known class with a test object (VOC boxes are 1-based: the loader's
    # minus one and the evaluator's plus one cancel), 0 for one without (the evaluator's rule).
    present = {a["category_id"] for d in test for a in d["annotations"]}
    expected = 100.0 * len(present) / len(KNOWN)
    assert 0 < expected and subset.evaluate()["bbox"]["AP50"] == pytest.approx(expected)
    # detectron2's evaluator reads the image-set file, whose dropped images' objects it misses.
    full = PascalVOCDetectionEvaluator(TEST)
    full.reset()
    full.process(inputs, outputs)
    assert full.evaluate()["bbox"]["AP50"] < expected - 1
    assert type(voc_evaluator("rcdet_shapes_test")) is PascalVOCDetectionEvaluator


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ("MODEL.RCDET.OOD.EXPOSED_CLASSES", "['frame', 'ring']"),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES ['ring'] are also in MODEL.RCDET.OOD.HELD_OUT_CLASSES",
        ),
        (
            ("MODEL.RCDET.OOD.EXPOSED_CLASSES", "['frame', 'tri_splt']"),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES: 'tri_splt' (did you mean 'tri_split'?) not in the"
            " dataset classes",
        ),
        (
            ("MODEL.RCDET.OOD.EXPOSED_CLASSES", "['frame', 'frame']"),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES lists a class twice",
        ),
        (
            ("MODEL.RCDET.LOSS", "none"),
            "MODEL.RCDET.OOD.REFERENCE = 'fixed' trains the exposed boxes towards f with the"
            " contrastive loss, but MODEL.RCDET.LOSS is none",
        ),
        (
            ("MODEL.RCDET.LOSS", "none", "MODEL.RCDET.VOS.ENABLED", "True"),
            "but MODEL.RCDET.LOSS is none",
        ),
        (
            ("MODEL.ROI_HEADS.NAME", "StandardROIHeads"),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES with MODEL.ROI_HEADS.NAME StandardROIHeads",
        ),
        (
            ("MODEL.RCDET.OOD.HELD_OUT_CLASSES", "[]", "MODEL.ROI_HEADS.NUM_CLASSES", "7"),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES needs test unknowns",
        ),
        (
            ("MODEL.RCDET.OOD.REFERENCE", "random"),
            "MODEL.RCDET.OOD.REFERENCE = 'random'; allowed: one of fixed, learned, background,"
            " removed.",
        ),
    ],
    ids=[
        "also-held-out",
        "not-in-dataset",
        "twice",
        "loss-none",
        "vos-only",
        "standard-head",
        "no-test-unknowns",
        "reference-value",
    ],
)
def test_bad_exposure_configs_name_the_key(tiny_shapes, opts, message):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(CONFIG, *opts)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_baselines_without_f_are_valid_configs(tiny_shapes):
    from detectron2.modeling import build_model

    from rcdet.config import check_rcdet_config

    # Softmax outlier exposure: LOSS none with the exposed boxes as background.
    softmax = tiny_cfg("configs/shapes_softmax_exposure_ood.yaml")
    check_rcdet_config(softmax)
    head = build_model(softmax).roi_heads
    assert head.num_exposed == 2 and head.reference is None and head.contrast is None
    # Without exposure any head may train: the exposed boxes never reach it.
    standard = tiny_cfg(
        "configs/shapes_rince_expsplit_ood.yaml", "MODEL.ROI_HEADS.NAME", "StandardROIHeads"
    )
    assert standard.DATASETS.TRAIN[0].endswith("_removed_frame+tri_split_drop_images")
    removed = build_model(tiny_cfg("configs/shapes_rince_expsplit_ood.yaml")).roi_heads
    assert removed.num_exposed == 0 and removed.reference is None
    assert removed.contrast.loss.num_classes == 5
