"""
Registration of VOC-layout datasets through detectron2's own loader, with a validation pass
first, so that a missing folder, an empty split file, a corrupt XML, an unknown class name or a
missing image is reported with the file and the fix instead of a deep traceback. Images are
only decoded by the data loader; CheckedDatasetMapper names one that cannot be, or whose size
differs from its annotation's.

detectron2's training mapper silently drops every box that has no area once clipped to its
image, so a split whose boxes all lie outside their images trains on nothing at losses of 0.
The loader counts those boxes (count_box_drops): it warns with the counts when some are dropped
and fails when none is left.
"""

import collections
import difflib
import logging
import os
import signal
import sys
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence
from xml.etree import ElementTree as ET

import torch.utils.data
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data.datasets.pascal_voc import load_voc_instances, register_pascal_voc
from detectron2.structures import BoxMode

from .shapes import CLASS_NAMES as SHAPES_CLASSES
from .shapes import default_root as shapes_default_root

__all__ = [
    "DatasetError",
    "CheckedDatasetMapper",
    "BoxDrops",
    "count_box_drops",
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


logger = logging.getLogger(__name__)

# detectron2.data.detection_utils.filter_empty_instances' default: a box must be wider and
# taller than this (after clipping to the image) to be kept.
_BOX_THRESHOLD = 1e-5
# reason -> (what one box does, what several do)
_DROP_REASONS = {
    "crowd": ("is marked iscrowd", "are marked iscrowd"),
    "no_area": ("has xmax <= xmin or ymax <= ymin", "have xmax <= xmin or ymax <= ymin"),
    "outside": ("lies outside its image", "lie outside their image"),
}


class DatasetError(RuntimeError):
    """A dataset on disk is missing or malformed; the message names the file and the fix."""


class BoxDrops(NamedTuple):
    """What detectron2's training loader keeps of a list of dataset dicts."""

    images: int
    boxes: int
    usable: int
    # reason ("crowd", "no_area", "outside") -> number of boxes dropped for it
    dropped: "collections.Counter"
    # (record, annotation index, reason) of the first dropped box, or None
    example: Optional[tuple]

    def describe(self, name_box: Callable = None) -> str:
        """'3 lie outside their image, 1 has ... (e.g. <name_box(record, index)>)'."""
        parts = [f"{n} {_DROP_REASONS[r][n != 1]}" for r, n in sorted(self.dropped.items())]
        if self.example is None:
            return ", ".join(parts)
        record, index, _ = self.example
        box = (name_box or _name_box)(record, index)
        size = f"{record.get('width', '?')}x{record.get('height', '?')}"
        return f"{', '.join(parts)} (e.g. {box}, in a {size} image)"


def _name_box(record, index):
    bbox = ", ".join(f"{v:g}" for v in record["annotations"][index]["bbox"])
    return f"box {index} ({bbox}) of {record['file_name']}"


def count_box_drops(records: Sequence[dict]) -> BoxDrops:
    """
    Count the boxes that detectron2's training DatasetMapper drops: crowd boxes, and boxes with
    no area once clipped to the image (annotations_to_instances clips, filter_empty_instances
    drops). Resizing and flipping keep the others; a random crop may drop more.
    """
    dropped = collections.Counter()
    boxes, example = 0, None
    for record in records:
        width, height = record.get("width"), record.get("height")
        for index, anno in enumerate(record.get("annotations", [])):
            boxes += 1
            x1, y1, x2, y2 = BoxMode.convert(
                list(anno["bbox"]), anno["bbox_mode"], BoxMode.XYXY_ABS
            )
            if anno.get("iscrowd", 0):
                reason = "crowd"
            elif x2 - x1 <= _BOX_THRESHOLD or y2 - y1 <= _BOX_THRESHOLD:
                reason = "no_area"
            elif (
                width is not None
                and height is not None
                and (
                    min(x2, width) - max(x1, 0) <= _BOX_THRESHOLD
                    or min(y2, height) - max(y1, 0) <= _BOX_THRESHOLD
                )
            ):
                reason = "outside"
            else:
                continue
            dropped[reason] += 1
            if example is None:
                example = (record, index, reason)
    return BoxDrops(len(records), boxes, boxes - sum(dropped.values()), dropped, example)


def _voc_annotation(record) -> str:
    """The VOC-layout annotation file of a dataset dict: dirname/Annotations/<image_id>.xml."""
    root = os.path.dirname(os.path.dirname(record["file_name"]))
    return os.path.join(root, "Annotations", f"{record.get('image_id', '')}.xml")


def _name_voc_box(record, index):
    # load_voc_instances turns VOC's 1-based xmin, ymin into 0-based coordinates.
    x1, y1, x2, y2 = record["annotations"][index]["bbox"]
    bndbox = f"{x1 + 1:g},{y1 + 1:g},{x2:g},{y2:g}"
    return f"object {index} of {_voc_annotation(record)}, bndbox {bndbox}"


def leave_interrupts_to_the_main_process():
    """
    Called once in each DataLoader worker. Ctrl-C reaches the whole process group: the main
    process handles it (one line, exit 130) and stops its workers, so a worker ignores SIGINT
    instead of printing a traceback. A worker also stays quiet when the main process stops in the
    middle of fetching a batch: multiprocessing's file-descriptor sharing thread then loses its
    connection (ConnectionError, or EOFError if the main process closed it cleanly) and would
    report it through ``sys.excepthook`` as a traceback.
    Other exceptions still reach the previous hook (a worker's dataset errors never go through it:
    torch sends them to the main process).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, traceback)

    sys.excepthook = excepthook


class CheckedDatasetMapper(DatasetMapper):
    """DatasetMapper for which an image that cannot be decoded (zero bytes, truncated, not an
    image) is a DatasetError naming the file, not a PIL error from inside the data loader.

    In training with MODEL.RCDET.OOD.EXPOSED_CLASSES, a record's ``exposed_annotations`` (see
    rcdet.data.held_out) join its boxes with ``gt_classes`` K + 1 + j for exposed class j, K the
    known classes: above detectron2's background label K, so that the sampler keeps them as
    objects and RankedContrastiveROIHeads can tell them apart."""

    _worker_ignores_sigint = False

    @configurable
    def __init__(self, is_train: bool, *, exposed_label: Optional[int] = None, **kwargs):
        super().__init__(is_train, **kwargs)
        # The label of exposed class 0 (K + 1), or None: the exposed boxes are not read.
        self.exposed_label = exposed_label

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ood = cfg.MODEL.RCDET.OOD if "RCDET" in cfg.MODEL else None
        if is_train and ood is not None and ood.EXPOSED_CLASSES and ood.REFERENCE != "removed":
            ret["exposed_label"] = cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1
        return ret

    def __call__(self, dataset_dict):
        if not self._worker_ignores_sigint and torch.utils.data.get_worker_info() is not None:
            leave_interrupts_to_the_main_process()
            self._worker_ignores_sigint = True
        if self.exposed_label is not None and dataset_dict.get("exposed_annotations"):
            exposed = [
                dict(a, category_id=self.exposed_label + a["category_id"])
                for a in dataset_dict["exposed_annotations"]
            ]
            dataset_dict = dict(
                dataset_dict, annotations=list(dataset_dict.get("annotations", [])) + exposed
            )
        try:
            return super().__call__(dataset_dict)
        except utils.SizeMismatchError:
            raise DatasetError(self._size_mismatch(dataset_dict)) from None
        except (OSError, SyntaxError) as e:  # PIL's errors for a broken or unknown image file
            raise DatasetError(
                f"{dataset_dict['file_name']}: cannot read the image ({e}). The file is empty,"
                " truncated or not an image: replace it (for the built-in dataset, delete its"
                " folder and run `make data`)."
            ) from None

    def _size_mismatch(self, dataset_dict) -> str:
        file_name = dataset_dict["file_name"]
        image = utils.read_image(file_name, format=self.image_format)
        xml = _voc_annotation(dataset_dict)
        where = xml if os.path.isfile(xml) else "its dataset annotation"
        return (
            f"{file_name}: the image is {image.shape[1]}x{image.shape[0]} pixels (width x"
            f" height), but {where} gives its size as {dataset_dict.get('width')}x"
            f"{dataset_dict.get('height')}. Fix the annotation's size/width and size/height (its"
            " boxes must be in the image's pixels), or replace the image."
        )


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


def check_voc_boxes(dirname: str, split: str, records: Sequence[dict]) -> BoxDrops:
    """Warn with the counts if detectron2's training loader drops some of the split's boxes;
    a DatasetError if it has boxes but drops them all."""
    drops = count_box_drops(records)
    if drops.usable == drops.boxes:
        return drops
    split_file = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    why = drops.describe(_name_voc_box)
    if drops.usable == 0:
        raise DatasetError(
            f"{split_file}: none of the {drops.boxes} boxes of its {drops.images} images is"
            f" usable: {why}, and detectron2's training loader drops every box that has no area"
            " once clipped to its image, so training would see no object. Fix the bndbox or size"
            " fields of the annotations."
        )
    logger.warning(
        f"{split_file}: detectron2's training loader drops {drops.boxes - drops.usable} of its"
        f" {drops.boxes} boxes, which have no area once clipped to their image: {why}."
    )
    return drops


def load_checked_voc_instances(
    dirname: str, split: str, class_names: Sequence[str], hint: str = ""
):
    check_voc_split(dirname, split, class_names, hint)
    records = load_voc_instances(dirname, split, list(class_names))
    check_voc_boxes(dirname, split, records)
    return records


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
