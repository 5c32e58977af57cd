"""
Held-out-class splits for OOD detection: train on the known classes only, test on everything.

The training split keeps the known classes in the base order (``drop_images`` removes every
image with a held-out object, ``drop_annotations`` removes only those boxes). The test split is
the full test set: known objects stay in ``annotations`` with their known-class index, and
held-out objects go to ``ood_annotations`` (``category_id`` indexes ``held_out_classes``), a
field detectron2's loaders and evaluators never read, so known-class AP is unaffected.
"""

import difflib
import re
from typing import List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import ConfigError
from .datasets import DatasetError, count_box_drops

__all__ = [
    "HOLD_OUT_MODES",
    "register_held_out_split",
    "parse_held_out_split",
    "apply_held_out_config",
    "known_classes",
    "training_classes",
]

HOLD_OUT_MODES = ("drop_images", "drop_annotations")
# "<base>__minus_<a>+<b>_<mode>" (train role) or "<base>__minus_<a>+<b>_ood_test" (test role).
_SPLIT_NAME = re.compile(
    r"^(?P<base>.+?)__minus_(?P<held>.+)_(?P<suffix>drop_images|drop_annotations|ood_test)$"
)


def known_classes(all_classes: Sequence[str], held_out: Sequence[str]) -> List[str]:
    unknown = [c for c in held_out if c not in all_classes]
    if unknown:
        hints = []
        for c in unknown:
            match = difflib.get_close_matches(c, list(all_classes), n=1)
            hints.append(f"'{c}'" + (f" (did you mean '{match[0]}'?)" if match else ""))
        raise ConfigError(
            f"MODEL.RCDET.OOD.HELD_OUT_CLASSES: {', '.join(hints)} not in the dataset classes "
            f"{list(all_classes)}."
        )
    if len(set(held_out)) != len(held_out):
        raise ConfigError(
            f"MODEL.RCDET.OOD.HELD_OUT_CLASSES lists a class twice: {list(held_out)}."
        )
    known = [c for c in all_classes if c not in held_out]
    if not known:
        raise ConfigError(
            "MODEL.RCDET.OOD.HELD_OUT_CLASSES holds out every class; keep at least one known class."
        )
    return known


def _load_split(base_name, all_classes, held_out, mode, role, name=None):
    known = [c for c in all_classes if c not in held_out]
    remap = {all_classes.index(c): i for i, c in enumerate(known)}
    ood_index = {all_classes.index(c): j for j, c in enumerate(held_out)}
    base = DatasetCatalog.get(base_name)
    out = []
    for record in base:
        annos = record.get("annotations", [])
        has_ood = any(a["category_id"] in ood_index for a in annos)
        if role == "train" and has_ood and mode == "drop_images":
            continue
        known_annos = [
            dict(a, category_id=remap[a["category_id"]])
            for a in annos
            if a["category_id"] not in ood_index
        ]
        record = dict(record, annotations=known_annos)
        if role == "test":
            record["ood_annotations"] = [
                dict(a, category_id=ood_index[a["category_id"]])
                for a in annos
                if a["category_id"] in ood_index
            ]
        out.append(record)
    if role == "train":
        _check_training_split(name or base_name, base_name, base, out, all_classes, held_out, mode)
    return out


def _check_training_split(name, base_name, base, out, all_classes, held_out, mode):
    """A DatasetError that says which held-out classes emptied the training split, and how."""
    drops = count_box_drops(out)
    if drops.usable:
        return
    per_class = []
    for c in held_out:
        index = all_classes.index(c)
        images = sum(any(a["category_id"] == index for a in r.get("annotations", [])) for r in base)
        boxes = sum(a["category_id"] == index for r in base for a in r.get("annotations", []))
        per_class.append(f"'{c}' is in {images} images ({boxes} boxes)")
    held = f"MODEL.RCDET.OOD.HELD_OUT_CLASSES {list(held_out)} (HOLD_OUT_MODE {mode})"
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


def register_held_out_split(base_name: str, held_out: Sequence[str], mode: str, role: str) -> str:
    """Register (once) and return the name of the held-out ``role`` ("train" or "test") split."""
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
    known = known_classes(all_classes, held_out)
    suffix = f"minus_{'+'.join(held_out)}" + (f"_{mode}" if role == "train" else "_ood_test")
    name = f"{base_name}__{suffix}"
    if name in DatasetCatalog.list():
        return name
    DatasetCatalog.register(
        name,
        lambda b=base_name, a=tuple(all_classes), h=tuple(held_out), m=mode, r=role, n=name: (
            _load_split(b, list(a), list(h), m, r, n)
        ),
    )
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
    return name


def parse_held_out_split(name: str) -> Optional[Tuple[str, List[str], Optional[str], str]]:
    """``(base_name, held_out, mode, role)`` of a name made by register_held_out_split, else None.

    ``mode`` is None for the test role, whose name does not record it.
    """
    m = _SPLIT_NAME.match(name)
    if m is None:
        return None
    suffix = m.group("suffix")
    role = "test" if suffix == "ood_test" else "train"
    return m.group("base"), m.group("held").split("+"), (suffix if role == "train" else None), role


def _held_out_split(name: str, held_out: List[str], mode: str, role: str, key: str) -> str:
    parsed = parse_held_out_split(name)
    if parsed is None:
        return register_held_out_split(name, held_out, mode, role) if held_out else name
    # The config that training saved (OUTPUT_DIR/config.yaml) already names the derived split.
    # A new process has only the base splits registered: derive it again from its base rather
    # than holding the classes out a second time from a name that does not exist yet.
    base, name_held, name_mode, name_role = parsed
    if held_out and (name_held != held_out or (name_mode is not None and name_mode != mode)):
        raise ConfigError(
            f"{key} '{name}' is '{base}' with {'+'.join(name_held)} held out"
            + (f" ({name_mode})" if name_mode else "")
            + f", but MODEL.RCDET.OOD.HELD_OUT_CLASSES = {held_out} (HOLD_OUT_MODE '{mode}'). "
            f"Name the base split '{base}': the held-out split is derived from it."
        )
    return register_held_out_split(base, name_held, name_mode or mode, name_role)


def apply_held_out_config(cfg):
    """Swap DATASETS.TRAIN/TEST for their held-out splits and check NUM_CLASSES; cfg must be
    unfrozen.

    Idempotent: names that already are held-out splits are registered and kept.
    """
    held_out = list(cfg.MODEL.RCDET.OOD.HELD_OUT_CLASSES)
    mode = cfg.MODEL.RCDET.OOD.HOLD_OUT_MODE
    cfg.DATASETS.TRAIN = tuple(
        _held_out_split(n, held_out, mode, "train", "DATASETS.TRAIN") for n in cfg.DATASETS.TRAIN
    )
    cfg.DATASETS.TEST = tuple(
        _held_out_split(n, held_out, mode, "test", "DATASETS.TEST") for n in cfg.DATASETS.TEST
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
