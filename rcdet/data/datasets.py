"""
Registration of VOC-layout datasets through detectron2's own loader, with a validation pass
first, so that a missing folder, an empty split file, a corrupt XML, an unknown class name or a
missing image is reported with the file and the fix instead of a deep traceback. Images are
only decoded by the data loader; CheckedDatasetMapper names one that cannot be.
"""

import difflib
import os
import signal
from typing import Iterable, List, Sequence
from xml.etree import ElementTree as ET

import torch.utils.data
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances, register_pascal_voc

from .shapes import CLASS_NAMES as SHAPES_CLASSES
from .shapes import default_root as shapes_default_root

__all__ = [
    "DatasetError",
    "CheckedDatasetMapper",
    "check_voc_split",
    "load_checked_voc_instances",
    "register_voc_dataset",
    "register_rcdet_shapes",
    "SHAPES_SPLITS",
    "SHAPES_HINT",
]

SHAPES_SPLITS = ("train", "val", "trainval", "test")
_VOC_HINT = (
    "Put VOCdevkit's VOC2007 folder there, or set $DETECTRON2_DATASETS to the folder that "
    "contains VOC2007 (see datasets/README.md)."
)
SHAPES_HINT = (
    "The built-in dataset's root is $RCDET_SHAPES_ROOT, else $DETECTRON2_DATASETS/rcdet_shapes,"
    " else datasets/rcdet_shapes; `make data` (or `python datasets/generate_shapes.py`) generates"
    " it there. Or set $RCDET_SHAPES_ROOT to where it is."
)


class DatasetError(RuntimeError):
    """A dataset on disk is missing or malformed; the message names the file and the fix."""


class CheckedDatasetMapper(DatasetMapper):
    """DatasetMapper for which an image that cannot be decoded (zero bytes, truncated, not an
    image) is a DatasetError naming the file, not a PIL error from inside the data loader."""

    _worker_ignores_sigint = False

    def __call__(self, dataset_dict):
        if not self._worker_ignores_sigint and torch.utils.data.get_worker_info() is not None:
            # Ctrl-C reaches the whole process group: let the main process handle it (one line,
            # exit 130) and stop its workers, instead of every worker printing a traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self._worker_ignores_sigint = True
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as e:  # PIL's errors for a broken or unknown image file
            raise DatasetError(
                f"{dataset_dict['file_name']}: cannot read the image ({e}). The file is empty,"
                " truncated or not an image: replace it (for the built-in dataset, delete its"
                " folder and run `make data`)."
            ) from None


def check_voc_split(
    dirname: str, split: str, class_names: Sequence[str], hint: str = ""
) -> List[str]:
    """Validate a VOC-layout split and return its image ids."""
    if not os.path.isdir(dirname):
        raise DatasetError(
            f"Dataset folder {os.path.abspath(dirname)} does not exist. {hint}".strip()
        )
    split_file = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(split_file):
        raise DatasetError(f"{split_file}: split file is missing. {hint}".strip())
    with open(split_file) as f:
        ids = [line.strip().split()[0] for line in f if line.strip()]
    if not ids:
        raise DatasetError(f"{split_file}: split file is empty; list one image id per line.")
    known = set(class_names)
    for fileid in ids:
        xml = os.path.join(dirname, "Annotations", f"{fileid}.xml")
        if not os.path.isfile(xml):
            raise DatasetError(
                f"{xml}: annotation file is missing (image id '{fileid}' from {split_file})."
            )
        try:
            tree = ET.parse(xml)
        except ET.ParseError as e:
            raise DatasetError(f"{xml}: not valid XML ({e}). Fix or regenerate the file.") from None
        for tag in ("width", "height"):
            node = tree.find(f"./size/{tag}")
            if node is None or not (node.text or "").strip().isdigit():
                raise DatasetError(f"{xml}: field size/{tag} is missing or not an integer.")
        for n, obj in enumerate(tree.findall("object")):
            name_node = obj.find("name")
            name = (name_node.text or "").strip() if name_node is not None else ""
            if name not in known:
                match = difflib.get_close_matches(name, list(class_names), n=1)
                suggestion = f" Did you mean '{match[0]}'?" if match else ""
                raise DatasetError(
                    f"{xml}: object {n} has class name '{name}', which this dataset does not have."
                    f"{suggestion} Known classes: {', '.join(class_names)}."
                )
            box = obj.find("bndbox")
            try:
                [float(box.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                raise DatasetError(
                    f"{xml}: object {n} ('{name}') has a missing or non-numeric bndbox."
                ) from None
        jpg = os.path.join(dirname, "JPEGImages", f"{fileid}.jpg")
        if not os.path.isfile(jpg):
            raise DatasetError(f"{jpg}: image is missing (annotated in {xml}).")
    return ids


def load_checked_voc_instances(
    dirname: str, split: str, class_names: Sequence[str], hint: str = ""
):
    check_voc_split(dirname, split, class_names, hint)
    return load_voc_instances(dirname, split, list(class_names))


def register_voc_dataset(
    name: str, dirname: str, split: str, year: int, class_names: Sequence[str], hint: str = ""
):
    """``register_pascal_voc`` (metadata, evaluator year), with the validated loader."""
    register_pascal_voc(name, dirname, split, year, list(class_names))
    DatasetCatalog.remove(name)
    DatasetCatalog.register(
        name,
        lambda d=dirname, s=split, c=tuple(class_names), h=hint: load_checked_voc_instances(
            d, s, c, h
        ),
    )
    MetadataCatalog.get(name).evaluator_type = "pascal_voc"


def _wrap_builtin_voc(names: Iterable[str]):
    """detectron2 registers voc_20xx_* at import; give them the validated loader too."""
    for name in names:
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        DatasetCatalog.remove(name)
        DatasetCatalog.register(
            name,
            lambda d=meta.dirname, s=meta.split, c=tuple(
                meta.thing_classes
            ): load_checked_voc_instances(d, s, c, _VOC_HINT),
        )


def register_rcdet_shapes(root: str = None):
    """Register ``rcdet_shapes_{train,val,trainval,test}`` (VOC layout, 2007 metric)."""
    root = root or shapes_default_root()
    for split in SHAPES_SPLITS:
        name = f"rcdet_shapes_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_voc_dataset(name, root, split, 2007, SHAPES_CLASSES, SHAPES_HINT)


register_rcdet_shapes()
_wrap_builtin_voc(
    [f"voc_{y}_{s}" for y in (2007, 2012) for s in ("trainval", "train", "val", "test")]
)
