"""
rcdet.data.held_out: the held-out splits drop the held-out classes from training and keep them as
OOD objects for testing; bad held-out configs are config errors. The config that training saves
names the derived splits, which a new process has not registered: the derivation recognises them
and registers them again instead of deriving from them a second time. A held-out training split
left without a usable box is an error that names the classes, their image and box counts, and
the other hold-out mode.
"""

import os
import shutil
import xml.etree.ElementTree as ET

import pytest
from conftest import run_in_process, tiny_cfg, voc_object_names
from detectron2.data import DatasetCatalog, MetadataCatalog

from rcdet.config import ConfigError
from rcdet.data.held_out import register_held_out_split
from rcdet.data.shapes import CLASS_NAMES

TRAIN_SPLIT = "rcdet_shapes_trainval__minus_ring+triangle_drop_images"
TEST_SPLIT = "rcdet_shapes_test__minus_ring+triangle_ood_test"


@pytest.mark.parametrize("mode", ["drop_images", "drop_annotations"])
def test_held_out_splits(tiny_shapes, mode):
    held = ["ring", "triangle"]
    known = [c for c in CLASS_NAMES if c not in held]
    base = DatasetCatalog.get("rcdet_shapes_trainval")
    train = DatasetCatalog.get(
        register_held_out_split("rcdet_shapes_trainval", held, mode, "train")
    )
    meta = MetadataCatalog.get(
        register_held_out_split("rcdet_shapes_trainval", held, mode, "train")
    )
    assert meta.thing_classes == known and meta.all_classes == list(CLASS_NAMES)
    with_held = [
        d["image_id"] for d in base if set(voc_object_names(tiny_shapes, d["image_id"])) & set(held)
    ]
    assert with_held, "the tiny split should contain held-out objects"
    ids = [d["image_id"] for d in train]
    if mode == "drop_images":
        assert set(ids) == {d["image_id"] for d in base} - set(with_held)
    else:
        assert ids == [d["image_id"] for d in base]
    for d in train:
        names = [n for n in voc_object_names(tiny_shapes, d["image_id"]) if n not in held]
        assert [known[a["category_id"]] for a in d["annotations"]] == names
    test = DatasetCatalog.get(register_held_out_split("rcdet_shapes_test", held, mode, "test"))
    assert [d["image_id"] for d in test] == [
        d["image_id"] for d in DatasetCatalog.get("rcdet_shapes_test")
    ]
    for d in test:
        names = voc_object_names(tiny_shapes, d["image_id"])
        assert [known[a["category_id"]] for a in d["annotations"]] == [
            n for n in names if n not in held
        ]
        assert [held[a["category_id"]] for a in d["ood_annotations"]] == [
            n for n in names if n in held
        ]


def test_held_out_config_errors(tiny_shapes):
    with pytest.raises(ConfigError, match=r"'rign' \(did you mean 'ring'\?\)"):
        tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.RCDET.OOD.HELD_OUT_CLASSES", "['rign']")
    with pytest.raises(ConfigError, match="holds out every class"):
        tiny_cfg(
            "configs/shapes_rince_ood.yaml",
            "MODEL.RCDET.OOD.HELD_OUT_CLASSES",
            str(list(CLASS_NAMES)),
        )
    with pytest.raises(ConfigError, match="NUM_CLASSES 7"):
        tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "9")
    with pytest.raises(ConfigError, match="HOLD_OUT_MODE"):
        tiny_cfg(
            "configs/shapes_rince_ood.yaml", "MODEL.RCDET.OOD.HOLD_OUT_MODE", "drop_everything"
        )


def test_num_classes_mismatch_is_a_config_error(tiny_shapes):
    with pytest.raises(ConfigError, match="MODEL.ROI_HEADS.NUM_CLASSES 9"):
        tiny_cfg("configs/shapes_rince.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "5")


# ---------------------------------------------------------------- derived split names


def _forget(*names):
    """What a new process sees: only the base splits are registered."""
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_derived_split_names_are_registered_again(tiny_shapes):
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml")
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == ((TRAIN_SPLIT,), (TEST_SPLIT,))
    expected = {name: DatasetCatalog.get(name) for name in (TRAIN_SPLIT, TEST_SPLIT)}
    _forget(TRAIN_SPLIT, TEST_SPLIT)

    again = tiny_cfg(
        "configs/shapes_rince_ood.yaml",
        "DATASETS.TRAIN",
        f"('{TRAIN_SPLIT}',)",
        "DATASETS.TEST",
        f"('{TEST_SPLIT}',)",
    )
    assert (again.DATASETS.TRAIN, again.DATASETS.TEST) == ((TRAIN_SPLIT,), (TEST_SPLIT,))
    for name in (TRAIN_SPLIT, TEST_SPLIT):
        assert DatasetCatalog.get(name) == expected[name]
        meta = MetadataCatalog.get(name)
        assert meta.held_out_classes == ["ring", "triangle"] and len(meta.thing_classes) == 7
        assert meta.base_dataset in ("rcdet_shapes_trainval", "rcdet_shapes_test")
    assert any(d["ood_annotations"] for d in expected[TEST_SPLIT])


def test_derived_split_that_contradicts_the_held_out_classes_is_an_error(tiny_shapes):
    other = "rcdet_shapes_trainval__minus_disc_drop_images"
    with pytest.raises(ConfigError) as e:
        tiny_cfg("configs/shapes_rince_ood.yaml", "DATASETS.TRAIN", f"('{other}',)")
    msg = str(e.value)
    assert f"DATASETS.TRAIN '{other}'" in msg and "MODEL.RCDET.OOD.HELD_OUT_CLASSES" in msg
    assert "'rcdet_shapes_trainval'" in msg


def test_derived_split_of_an_unregistered_base_is_an_error(tiny_shapes):
    with pytest.raises(ConfigError, match="'rcdet_shapes_nope' is not a registered dataset"):
        tiny_cfg(
            "configs/shapes_rince_ood.yaml",
            "DATASETS.TRAIN",
            "('rcdet_shapes_nope__minus_ring+triangle_drop_images',)",
        )


# ---------------------------------------------------------------- training splits left empty


def test_held_out_classes_that_remove_every_training_image_are_explained(tiny_shapes, capsys):
    base = DatasetCatalog.get("rcdet_shapes_trainval")
    names = {d["image_id"]: set(voc_object_names(tiny_shapes, d["image_id"])) for d in base}
    # A known class that no image shows alone: holding out all the others removes every image.
    keep = next(c for c in CLASS_NAMES if all(n - {c} for n in names.values()))
    held = [c for c in CLASS_NAMES if c != keep]
    argv = [
        "--config-file",
        "configs/shapes_softmax_ood.yaml",
        "MODEL.RCDET.OOD.HELD_OUT_CLASSES",
        str(held),
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "1",
        "DATASETS.TEST",
        "()",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
    ]
    code, err = run_in_process("train_net", argv, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    split = f"rcdet_shapes_trainval__minus_{'+'.join(held)}_drop_images"
    assert line.startswith(
        f"error: DATASETS.TRAIN '{split}': MODEL.RCDET.OOD.HELD_OUT_CLASSES {held} (HOLD_OUT_MODE"
        f" drop_images) removes all {len(base)} images of 'rcdet_shapes_trainval', so there is"
        " nothing to train on ("
    )
    for c in held:
        images = sum(c in n for n in names.values())
        boxes = sum(voc_object_names(tiny_shapes, i).count(c) for i in names)
        assert f"'{c}' is in {images} images ({boxes} boxes)" in line
    assert line.endswith(
        "Set MODEL.RCDET.OOD.HOLD_OUT_MODE drop_annotations (it keeps the images and removes only"
        " the held-out boxes), or hold out fewer classes."
    )


def test_drop_annotations_without_a_known_box_left_is_an_error(tiny_shapes, tmp_path):
    from rcdet.data import DatasetError, register_voc_dataset

    root = str(tmp_path / "only_held_out")
    shutil.copytree(tiny_shapes, root)
    folder = os.path.join(root, "Annotations")
    for name in os.listdir(folder):
        tree = ET.parse(os.path.join(folder, name))
        for n, node in enumerate(tree.findall("object/name")):
            node.text = ("ring", "triangle")[n % 2]
        tree.write(os.path.join(folder, name))
    base = "rcdet_test_only_held_out"
    _forget(base)
    register_voc_dataset(base, root, "train", 2007, CLASS_NAMES)
    images = len(DatasetCatalog.get(base))
    name = register_held_out_split(base, ["ring", "triangle"], "drop_annotations", "train")
    with pytest.raises(DatasetError) as e:
        DatasetCatalog.get(name)
    assert str(e.value).startswith(
        f"DATASETS.TRAIN '{name}': MODEL.RCDET.OOD.HELD_OUT_CLASSES ['ring', 'triangle']"
        f" (HOLD_OUT_MODE drop_annotations) leaves {images} of the {images} images of '{base}',"
        " with no known-class box, so there is nothing to train on"
    )
    assert str(e.value).endswith(
        "Hold out fewer classes, or train on a split with known-class objects."
    )
    _forget(base, name)
