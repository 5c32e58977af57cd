"""
Held-out-class splits for OOD detection: train on the known classes only, test on everything.

The training split keeps the known classes in the base order (``drop_images`` removes every
image with a held-out object, ``drop_annotations`` removes only those boxes). The test split is
the full test set: known objects stay in ``annotations`` with their known-class index, and
held-out objects go to ``ood_annotations`` (``category_id`` indexes ``held_out_classes``), a
field detectron2's loaders and evaluators never read, so known-class AP is unaffected.

Exposed classes (MODEL.RCDET.OOD.EXPOSED_CLASSES) are left out of the known classes too, but
their boxes stay in the training images, in ``exposed_annotations`` (``category_id`` indexes
``exposed_classes``); the training mapper gives them the labels K + 1 + j
(rcdet.data.datasets.CheckedDatasetMapper), which RankedContrastiveROIHeads turns into outliers.
With REFERENCE ``removed`` they are removed from training as HOLD_OUT_MODE removes the held-out
classes. The test split drops every image with an exposed object, as ``drop_images`` drops the
training images with a held-out one: the test images show known objects and test unknowns only.
"""

import difflib
import functools
import os
import re
import tempfile
from typing import List, NamedTuple, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator

from ..config import ConfigError
from .datasets import DatasetError, count_box_drops

__all__ = [
    "HOLD_OUT_MODES",
    "SplitName",
    "register_held_out_split",
    "register_split_by_name",
    "parse_held_out_split",
    "apply_held_out_config",
    "known_classes",
    "training_classes",
    "exposure_training_dicts",
    "voc_evaluator",
]

HOLD_OUT_MODES = ("drop_images", "drop_annotations")
# "<base>__minus_<a>+<b>_<mode>" (train role) or "<base>__minus_<a>+<b>_ood_test" (test role);
# with exposed classes <c>+<d>, "_exposed_<c>+<d>" (kept; always so for the test role) or
# "_removed_<c>+<d>" (REFERENCE removed) before the suffix.
_SPLIT_NAME = re.compile(
    r"^(?P<base>.+?)__minus_(?P<held>.+?)(?:_(?P<exposure>exposed|removed)_(?P<exposed>.+?))?"
    r"_(?P<suffix>drop_images|drop_annotations|ood_test)$"
)


class SplitName(NamedTuple):
    """What the name of a derived split says."""

    base: str
    held_out: List[str]
    mode: Optional[str]  # None for the test role, whose name does not record it
    role: str  # "train" or "test"
    exposed: List[str]
    keep_exposed: bool  # the exposed boxes stay in training (False: REFERENCE removed)


def _check_names(all_classes, names, key):
    unknown = [c for c in names if c not in all_classes]
    if unknown:
        hints = []
        for c in unknown:
            match = difflib.get_close_matches(c, list(all_classes), n=1)
            hints.append(f"'{c}'" + (f" (did you mean '{match[0]}'?)" if match else ""))
        raise ConfigError(
            f"{key}: {', '.join(hints)} not in the dataset classes {list(all_classes)}."
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} lists a class twice: {list(names)}.")


def known_classes(
    all_classes: Sequence[str], held_out: Sequence[str], exposed: Sequence[str] = ()
) -> List[str]:
    """The classes the model learns: all but the held-out and the exposed ones, in base order."""
    _check_names(all_classes, held_out, "MODEL.RCDET.OOD.HELD_OUT_CLASSES")
    _check_names(all_classes, exposed, "MODEL.RCDET.OOD.EXPOSED_CLASSES")
    both = [c for c in exposed if c in held_out]
    if both:
        raise ConfigError(
            f"MODEL.RCDET.OOD.EXPOSED_CLASSES {both} are also in MODEL.RCDET.OOD.HELD_OUT_CLASSES:"
            " a class is either exposed in training or a test unknown; remove it from one list."
        )
    known = [c for c in all_classes if c not in held_out and c not in exposed]
    if not known:
        key = "HELD_OUT_CLASSES" + (" with EXPOSED_CLASSES" if exposed else "")
        raise ConfigError(
            f"MODEL.RCDET.OOD.{key} holds out every class; keep at least one known class."
        )
    return known


def _load_split(
    base_name, all_classes, held_out, mode, role, name=None, exposed=(), keep_exposed=True
):
    known = known_classes(all_classes, held_out, exposed)
    remap = {all_classes.index(c): i for i, c in enumerate(known)}
    ood_index = {all_classes.index(c): j for j, c in enumerate(held_out)}
    exposed_index = {all_classes.index(c): j for j, c in enumerate(exposed)}
    # Classes removed from training as HOLD_OUT_MODE says: the held-out ones, and the exposed
    # ones of the no-exposure baseline.
    removed = set(ood_index) | (set() if keep_exposed else set(exposed_index))
    base = DatasetCatalog.get(base_name)
    out = []
    for record in base:
        annos = record.get("annotations", [])
        if role == "train" and mode == "drop_images":
            if any(a["category_id"] in removed for a in annos):
                continue
        if role == "test" and any(a["category_id"] in exposed_index for a in annos):
            continue
        known_annos = [
            dict(a, category_id=remap[a["category_id"]]) for a in annos if a["category_id"] in remap
        ]
        record = dict(record, annotations=known_annos)
        if role == "train" and exposed and keep_exposed:
            record["exposed_annotations"] = [
                dict(a, category_id=exposed_index[a["category_id"]])
                for a in annos
                if a["category_id"] in exposed_index
            ]
        if role == "test":
            record["ood_annotations"] = [
                dict(a, category_id=ood_index[a["category_id"]])
                for a in annos
                if a["category_id"] in ood_index
            ]
        out.append(record)
    if role == "train":
        _check_training_split(
            name or base_name,
            base_name,
            base,
            out,
            all_classes,
            held_out,
            mode,
            () if keep_exposed else exposed,
        )
    return out


def _check_training_split(
    name, base_name, base, out, all_classes, held_out, mode, removed_exposed=()
):
    """A DatasetError that says which held-out classes emptied the training split, and how."""
    drops = count_box_drops(out)
    if drops.usable:
        return
    per_class = []
    for c in list(held_out) + list(removed_exposed):
        index = all_classes.index(c)
        images = sum(any(a["category_id"] == index for a in r.get("annotations", [])) for r in base)
        boxes = sum(a["category_id"] == index for r in base for a in r.get("annotations", []))
        per_class.append(f"'{c}' is in {images} images ({boxes} boxes)")
    held = f"MODEL.RCDET.OOD.HELD_OUT_CLASSES {list(held_out)} (HOLD_OUT_MODE {mode})"
    if removed_exposed:
        held = (
            f"MODEL.RCDET.OOD.HELD_OUT_CLASSES {list(held_out)} and EXPOSED_CLASSES"
            f" {list(removed_exposed)} (REFERENCE removed, HOLD_OUT_MODE {mode})"
        )
    if not out:
        what = f"removes all {len(base)} images of '{base_name}'"
    elif drops.boxes:
        what = (
            f"leaves {len(out)} images whose {drops.boxes} known-class boxes are all unusable:"
            f" {drops.describe()}"
        )
    else:
        what = (
            f"leaves {len(out)} of the {len(base)} images of '{base_name}', with no known-class box"
        )
    fix = (
        "Set MODEL.RCDET.OOD.HOLD_OUT_MODE drop_annotations (it keeps the images and removes only"
        " the held-out boxes), or hold out fewer classes."
        if mode == "drop_images"
        else "Hold out fewer classes, or train on a split with known-class objects."
    )
    raise DatasetError(
        f"DATASETS.TRAIN '{name}': {held} {what}, so there is nothing to train on"
        f" ({'; '.join(per_class)}). {fix}"
    )


def register_held_out_split(
    base_name: str,
    held_out: Sequence[str],
    mode: str,
    role: str,
    exposed: Sequence[str] = (),
    keep_exposed: bool = True,
) -> str:
    """
    Register (once) and return the name of the held-out ``role`` ("train" or "test") split,
    with ``exposed`` classes kept in training (``keep_exposed``) or removed like held-out ones.
    """
    if mode not in HOLD_OUT_MODES:
        raise ConfigError(
            f"MODEL.RCDET.OOD.HOLD_OUT_MODE = '{mode}'; choose one of {HOLD_OUT_MODES}."
        )
    if role not in ("train", "test"):
        raise ValueError(role)
    if base_name not in DatasetCatalog.list():
        raise ConfigError(f"DATASETS: '{base_name}' is not a registered dataset.")
    base_meta = MetadataCatalog.get(base_name)
    all_classes = list(base_meta.get("all_classes", base_meta.thing_classes))
    known = known_classes(all_classes, held_out, exposed)
    keep_exposed = bool(keep_exposed) or role == "test"
    # The registered name (see _SPLIT_NAME): exposed classes kept or removed, and the mode.
    name = f"{base_name}__minus_{'+'.join(held_out)}"
    if exposed:
        name += f"_{'exposed' if keep_exposed else 'removed'}_{'+'.join(exposed)}"
    name += f"_{mode}" if role == "train" else "_ood_test"
    if name in DatasetCatalog.list():
        return name
    load = functools.partial(
        _load_split,
        base_name,
        all_classes,
        list(held_out),
        mode,
        role,
        name,
        list(exposed),
        keep_exposed,
    )
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=known,
        all_classes=all_classes,
        held_out_classes=list(held_out),
        hold_out_mode=mode,
        base_dataset=base_name,
        dirname=base_meta.dirname,
        split=base_meta.split,
        year=base_meta.year,
        evaluator_type=base_meta.get("evaluator_type", "pascal_voc"),
    )
    if exposed:
        MetadataCatalog.get(name).set(exposed_classes=list(exposed), keep_exposed=keep_exposed)
    return name


def parse_held_out_split(name: str) -> Optional[SplitName]:
    """What a name made by register_held_out_split says (a SplitName), else None."""
    m = _SPLIT_NAME.match(name)
    if m is None:
        return None
    suffix = m.group("suffix")
    role = "test" if suffix == "ood_test" else "train"
    exposed = m.group("exposed").split("+") if m.group("exposed") else []
    return SplitName(
        m.group("base"),
        m.group("held").split("+"),
        suffix if role == "train" else None,
        role,
        exposed,
        m.group("exposure") != "removed",
    )


def register_split_by_name(name: str, mode: str = "drop_images") -> Optional[str]:
    """
    Register the derived split ``name`` (as a saved config or report names it) from its base,
    with ``mode`` for a test split; returns the name, or None when it names no derived split.
    """
    parsed = parse_held_out_split(name)
    if parsed is None:
        return None
    return register_held_out_split(
        parsed.base,
        parsed.held_out,
        parsed.mode or mode,
        parsed.role,
        parsed.exposed,
        parsed.keep_exposed,
    )


def _held_out_split(name, held_out, mode, role, key, exposed, keep_exposed) -> str:
    parsed = parse_held_out_split(name)
    if parsed is None:
        if not held_out:
            return name
        return register_held_out_split(name, held_out, mode, role, exposed, keep_exposed)
    # The config that training saved (OUTPUT_DIR/config.yaml) already names the derived split.
    # A new process has only the base splits registered: derive it again from its base rather
    # than holding the classes out a second time from a name that does not exist yet.
    same_exposure = parsed.exposed == list(exposed) and (
        role == "test" or not exposed or parsed.keep_exposed == keep_exposed
    )
    if held_out and (
        parsed.held_out != held_out
        or (parsed.mode is not None and parsed.mode != mode)
        or not same_exposure
    ):
        what = "+".join(parsed.held_out) + " held out"
        if parsed.exposed:
            what += (
                f", {'+'.join(parsed.exposed)} {'exposed' if parsed.keep_exposed else 'removed'}"
            )
        exposure = (
            f", EXPOSED_CLASSES {list(exposed)} (REFERENCE"
            f" {'kept' if keep_exposed else 'removed'})"
            if exposed or parsed.exposed
            else ""
        )
        raise ConfigError(
            f"{key} '{name}' is '{parsed.base}' with {what}"
            + (f" ({parsed.mode})" if parsed.mode else "")
            + f", but MODEL.RCDET.OOD.HELD_OUT_CLASSES = {held_out} (HOLD_OUT_MODE '{mode}'"
            + f"{exposure}). Name the base split '{parsed.base}': the held-out split is derived"
            " from it."
        )
    return register_split_by_name(name, mode)


def apply_held_out_config(cfg):
    """Swap DATASETS.TRAIN/TEST for their held-out splits and check NUM_CLASSES; cfg must be
    unfrozen.

    Idempotent: names that already are held-out splits are registered and kept.
    """
    from ..config import check_exposure_config

    check_exposure_config(cfg)
    ood = cfg.MODEL.RCDET.OOD
    held_out, mode = list(ood.HELD_OUT_CLASSES), ood.HOLD_OUT_MODE
    exposed, keep = list(ood.EXPOSED_CLASSES), ood.REFERENCE != "removed"
    cfg.DATASETS.TRAIN = tuple(
        _held_out_split(n, held_out, mode, "train", "DATASETS.TRAIN", exposed, keep)
        for n in cfg.DATASETS.TRAIN
    )
    cfg.DATASETS.TEST = tuple(
        _held_out_split(n, held_out, mode, "test", "DATASETS.TEST", exposed, keep)
        for n in cfg.DATASETS.TEST
    )
    if cfg.DATASETS.TRAIN and cfg.DATASETS.TRAIN[0] in MetadataCatalog.list():
        classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
        if classes is not None and cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(classes):
            what = (
                f"the {len(classes)} known classes"
                if held_out
                else f"the {len(classes)} dataset classes"
            )
            raise ConfigError(
                f"MODEL.ROI_HEADS.NUM_CLASSES = {cfg.MODEL.ROI_HEADS.NUM_CLASSES}, but"
                f" DATASETS.TRAIN '{cfg.DATASETS.TRAIN[0]}' has {what}: set"
                f" MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}."
            )


def training_classes(cfg) -> Tuple[List[str], List[str]]:
    """
    ``(classes the model predicts, every class of the base dataset)`` from DATASETS.TRAIN[0]:
    the second list includes the held-out classes of a held-out split.
    """
    if not cfg.DATASETS.TRAIN:
        raise ConfigError(
            "DATASETS.TRAIN is empty; the contrastive branch needs the training classes."
        )
    name = cfg.DATASETS.TRAIN[0]
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes", None)
    if classes is None:
        raise ConfigError(f"DATASETS.TRAIN[0] = '{name}' has no thing_classes; is it registered?")
    if len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ConfigError(
            f"MODEL.ROI_HEADS.NUM_CLASSES = {cfg.MODEL.ROI_HEADS.NUM_CLASSES}, but "
            f"'{name}' has {len(classes)} classes: set it to {len(classes)}."
        )
    return list(classes), list(meta.get("all_classes", classes))


def exposure_training_dicts(cfg) -> List[dict]:
    """
    DATASETS.TRAIN's dicts as detectron2's training loader reads them, except that an image
    whose only boxes are exposed ones is kept: DATALOADER.FILTER_EMPTY_ANNOTATIONS drops the
    images without a (non-crowd) box, and the exposed boxes are not in ``annotations``.
    """
    from detectron2.data import get_detection_dataset_dicts

    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=False,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    if not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        return dicts
    return [
        d
        for d in dicts
        if any(not a.get("iscrowd", 0) for a in d["annotations"] + d.get("exposed_annotations", []))
    ]


class _SubsetPascalVOCDetectionEvaluator(PascalVOCDetectionEvaluator):
    """
    detectron2's VOC evaluator over the images of a split that leaves some of its image-set
    file's images out (the test split of an exposure experiment): the ground truth of the images
    left out would otherwise count as missed objects.
    """

    def evaluate(self):
        ids = [str(d["image_id"]) for d in DatasetCatalog.get(self._dataset_name)]
        with tempfile.TemporaryDirectory(prefix="rcdet_voc_images_") as tmp:
            path = os.path.join(tmp, "images.txt")
            with open(path, "w") as f:
                f.write("\n".join(ids) + "\n")
            before, self._image_set_path = self._image_set_path, path
            try:
                return super().evaluate()
            finally:
                self._image_set_path = before


def voc_evaluator(dataset_name: str) -> PascalVOCDetectionEvaluator:
    """The VOC detection evaluator of ``dataset_name``, over the images the split holds."""
    if MetadataCatalog.get(dataset_name).get("exposed_classes"):
        return _SubsetPascalVOCDetectionEvaluator(dataset_name)
    return PascalVOCDetectionEvaluator(dataset_name)
