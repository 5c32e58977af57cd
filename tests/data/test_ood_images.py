"""rcdet.data.ood_images: the built-in OOD image set shows only held-out classes, is generated
deterministically and registered once; an unwritable dataset root is one clear error."""

import os

import pytest
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from rcdet.data import ood_images
from rcdet.data.datasets import DatasetError
from rcdet.data.ood_images import OOD_IMAGES, builtin_ood_dataset, generate_ood_images


def test_builtin_ood_image_set_is_deterministic_and_held_out_only(tiny_shapes, tmp_path):
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml")
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
        assert (
            open(os.path.join(one, sub), "rb").read() == open(os.path.join(two, sub), "rb").read()
        )


def test_unwritable_dataset_root_is_one_clear_error(monkeypatch, tmp_path):
    def refuse(folder, *a, **kw):
        raise PermissionError(13, "Permission denied", folder)

    monkeypatch.setattr(ood_images, "generate_ood_images", refuse)
    with pytest.raises(
        DatasetError, match=r"cannot write the built-in OOD image set there .*--ood-dataset none"
    ):
        ood_images.register_shapes_ood_images(str(tmp_path), ["ring"])
