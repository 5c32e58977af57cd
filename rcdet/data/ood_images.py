"""
The built-in OOD image set for the image-level protocol of VOS (Du et al., ICLR 2022) and SIREN
(Du et al., NeurIPS 2022): images that show **only held-out-class objects**, so that every
detection on them is out of distribution, as COCO images without VOC classes are for a VOC model.

The set is generated deterministically from the built-in dataset's renderer (same image sizes,
backgrounds, clutter and object sizes as the test split; 1 to 6 objects per image, each of a
held-out class) under its own seed, written in VOC layout under
``<dataset root>/ood_images/<a>+<b>/`` the first time it is needed, and registered as
``rcdet_shapes_ood_images__<a>+<b>``.
"""

import os
import shutil
import tempfile
from typing import Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..file_io import _current_umask
from .datasets import SHAPES_HINT, DatasetError, register_voc_dataset
from .shapes import CLASS_NAMES, _write_one

__all__ = [
    "OOD_IMAGES",
    "OOD_SEED",
    "generate_ood_images",
    "register_shapes_ood_images",
    "builtin_ood_dataset",
]

# Size of the built-in OOD image set: enough images for a stable image-level AUROC.
OOD_IMAGES = 200
# Seed of the OOD images' renderer streams; the built-in splits use seed 0, so no image repeats.
OOD_SEED = 7919


def _complete(folder: str, num_images: int) -> bool:
    split = os.path.join(folder, "ImageSets", "Main", "test.txt")
    if not os.path.isfile(split):
        return False
    with open(split) as f:
        return sum(1 for line in f if line.strip()) == num_images


def generate_ood_images(
    folder: str, classes: Sequence[str], num_images: int = OOD_IMAGES, seed: int = OOD_SEED
) -> str:
    """
    Write ``num_images`` images whose objects are all of ``classes`` to ``folder`` (VOC layout,
    split ``test``). Written into a temporary folder and renamed, so an interrupted or concurrent
    run never leaves a partial set; an existing complete set is kept.
    """
    unknown = [c for c in classes if c not in CLASS_NAMES]
    if unknown or not classes:
        raise ValueError(
            f"OOD image classes {list(classes)}: each must be one of {list(CLASS_NAMES)}."
        )
    if _complete(folder, num_images):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ood_images_", dir=parent)
    try:
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
        ids = [_write_one((tmp, seed, i, tuple(classes))) for i in range(num_images)]
        with open(os.path.join(tmp, "ImageSets", "Main", "test.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it 0700
        if os.path.isdir(folder):  # an incomplete leftover; a complete one returned above
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _complete(
                folder, num_images
            ):  # another process won the race only if it is complete
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return folder


def register_shapes_ood_images(
    root: str, held_out: Sequence[str], num_images: int = OOD_IMAGES
) -> str:
    """
    Generate (once) and register the OOD image set of ``held_out`` under ``root``; returns its name.
    """
    tag = "+".join(held_out)
    name = f"rcdet_shapes_ood_images__{tag}" + (
        "" if num_images == OOD_IMAGES else f"_{num_images}"
    )
    folder = os.path.join(
        root, "ood_images", tag + ("" if num_images == OOD_IMAGES else f"_{num_images}")
    )
    try:
        generate_ood_images(folder, list(held_out), num_images)
    except OSError as e:
        raise DatasetError(
            f"{folder}: cannot write the built-in OOD image set there ({e}). Make the dataset root "
            "writable, or pass --ood-dataset none (or another registered dataset)."
        ) from None
    if name in DatasetCatalog.list():
        if MetadataCatalog.get(name).get("dirname") == folder:
            return name
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    # All nine class names, so that a known-class object in the set would be recognised as one.
    register_voc_dataset(name, folder, "test", 2007, CLASS_NAMES, SHAPES_HINT)
    MetadataCatalog.get(name).set(ood_image_set_of=list(held_out))
    return name


def builtin_ood_dataset(test_name: str) -> Optional[str]:
    """The built-in OOD image set for a held-out test split of the built-in dataset, else None."""
    meta = MetadataCatalog.get(test_name)
    base = meta.get("base_dataset", test_name)
    held = list(meta.get("held_out_classes", []))
    if not base.startswith("rcdet_shapes_") or not held:
        return None
    return register_shapes_ood_images(MetadataCatalog.get(base).dirname, held)
