import os
import shutil
import xml.etree.ElementTree as ET

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances

from conftest import TINY_SIZES, tiny_cfg
from rcdet.config import ConfigError
from rcdet.data import DatasetError, register_voc_dataset
from rcdet.data.shapes import CLASS_NAMES, FAMILIES, generate


def _read_tree(root):
    out = {}
    for sub in ("Annotations", os.path.join("ImageSets", "Main")):
        for name in sorted(os.listdir(os.path.join(root, sub))):
            with open(os.path.join(root, sub, name), "rb") as f:
                out[os.path.join(sub, name)] = f.read()
    return out


def test_generator_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    generate(a, seed=7, split_sizes={"train": 5, "val": 2, "test": 3}, workers=1)
    generate(b, seed=7, split_sizes={"train": 5, "val": 2, "test": 3}, workers=2)
    generate(c, seed=8, split_sizes={"train": 5, "val": 2, "test": 3}, workers=1)
    assert _read_tree(a) == _read_tree(b)
    assert _read_tree(a) != _read_tree(c)


def test_families_define_at_least_nine_classes_in_three_families():
    assert len(FAMILIES) >= 3 and len(CLASS_NAMES) >= 9
    assert all(len(m) >= 2 for m in FAMILIES.values())


def test_voc_files_are_valid(tiny_shapes):
    ids = {}
    for split in ("train", "val", "trainval", "test"):
        with open(os.path.join(tiny_shapes, "ImageSets", "Main", f"{split}.txt")) as f:
            ids[split] = f.read().split()
    assert len(ids["train"]) == TINY_SIZES["train"] and len(ids["test"]) == TINY_SIZES["test"]
    assert ids["trainval"] == ids["train"] + ids["val"]
    assert not set(ids["trainval"]) & set(ids["test"])
    for fileid in ids["trainval"] + ids["test"]:
        tree = ET.parse(os.path.join(tiny_shapes, "Annotations", f"{fileid}.xml"))
        w, h = int(tree.find("size/width").text), int(tree.find("size/height").text)
        assert 256 <= w <= 320 and 256 <= h <= 320
        assert os.path.isfile(os.path.join(tiny_shapes, "JPEGImages", f"{fileid}.jpg"))
        objects = tree.findall("object")
        assert 1 <= len(objects) <= 6
        for obj in objects:
            assert obj.find("name").text in CLASS_NAMES
            assert obj.find("difficult").text == "0"
            x0, y0, x1, y1 = (int(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x0 < x1 <= w and 1 <= y0 < y1 <= h


def test_registration_goes_through_detectron2_loader(tiny_shapes):
    dicts = DatasetCatalog.get("rcdet_shapes_trainval")
    assert dicts == load_voc_instances(tiny_shapes, "trainval", list(CLASS_NAMES))
    meta = MetadataCatalog.get("rcdet_shapes_test")
    assert meta.thing_classes == list(CLASS_NAMES)
    assert meta.year == 2007 and meta.evaluator_type == "pascal_voc" and meta.dirname == tiny_shapes


@pytest.fixture
def broken_copy(tiny_shapes, tmp_path):
    root = str(tmp_path / "broken")
    shutil.copytree(tiny_shapes, root)
    return root


def _register_and_load(root, name="rcdet_test_broken"):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_voc_dataset(name, root, "train", 2007, CLASS_NAMES)
    return DatasetCatalog.get(name)


def _first_id(root):
    with open(os.path.join(root, "ImageSets", "Main", "train.txt")) as f:
        return f.readline().strip()


def test_unknown_class_in_xml(broken_copy):
    xml = os.path.join(broken_copy, "Annotations", f"{_first_id(broken_copy)}.xml")
    tree = ET.parse(xml)
    tree.find("object/name").text = "squaer"
    tree.write(xml)
    with pytest.raises(DatasetError, match=r"class name 'squaer'.*Did you mean 'square'") as e:
        _register_and_load(broken_copy)
    assert xml in str(e.value)


def test_missing_image(broken_copy):
    jpg = os.path.join(broken_copy, "JPEGImages", f"{_first_id(broken_copy)}.jpg")
    os.remove(jpg)
    with pytest.raises(DatasetError, match="image is missing") as e:
        _register_and_load(broken_copy)
    assert jpg in str(e.value)


def test_corrupt_xml(broken_copy):
    xml = os.path.join(broken_copy, "Annotations", f"{_first_id(broken_copy)}.xml")
    with open(xml, "w") as f:
        f.write("<annotation><size>")
    with pytest.raises(DatasetError, match="not valid XML") as e:
        _register_and_load(broken_copy)
    assert xml in str(e.value)


def test_empty_and_missing_split_file(broken_copy):
    split = os.path.join(broken_copy, "ImageSets", "Main", "train.txt")
    open(split, "w").close()
    with pytest.raises(DatasetError, match="split file is empty") as e:
        _register_and_load(broken_copy)
    assert split in str(e.value)
    os.remove(split)
    with pytest.raises(DatasetError, match="split file is missing"):
        _register_and_load(broken_copy)


def test_missing_dataset_root_names_path_and_variable(tiny_shapes, tmp_path):
    from rcdet.data import register_rcdet_shapes
    from rcdet.engine import setup_cfg

    missing = str(tmp_path / "nowhere")
    register_rcdet_shapes(missing)
    try:
        with pytest.raises(DatasetError) as e:
            setup_cfg("configs/shapes_rince.yaml")
        assert os.path.abspath(missing) in str(e.value) and "RCDET_SHAPES_ROOT" in str(e.value)
    finally:
        register_rcdet_shapes(tiny_shapes)


def test_missing_voc_root_names_path_and_variable():
    voc_dir = MetadataCatalog.get("voc_2007_trainval").dirname
    if os.path.isdir(voc_dir):
        pytest.skip(f"VOC2007 is present at {voc_dir}")
    with pytest.raises(DatasetError) as e:
        DatasetCatalog.get("voc_2007_trainval")
    assert os.path.abspath(voc_dir) in str(e.value) and "DETECTRON2_DATASETS" in str(e.value)


def test_num_classes_mismatch_is_a_config_error(tiny_shapes):
    with pytest.raises(ConfigError, match="MODEL.ROI_HEADS.NUM_CLASSES 9"):
        tiny_cfg("configs/shapes_rince.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "5")
