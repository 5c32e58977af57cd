"""
rcdet.data.datasets: the built-in dataset registers through detectron2's VOC loader; a broken
VOC folder (unknown class, missing image, corrupt XML, empty or missing split file) and a missing
dataset root are one clear error that names the file, or the folder and its variable.
"""

import os
import shutil
import xml.etree.ElementTree as ET

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances

from rcdet.data import DatasetError, register_voc_dataset
from rcdet.data.shapes import CLASS_NAMES


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
