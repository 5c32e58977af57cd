"""rcdet.config: check_rcdet_config refuses every MODEL.RCDET key's impossible values, naming the
key, the value and what is allowed, and accepts the defaults, every shipped config and the edges
of each range."""

import glob
import math
import os

import numpy as np
import pytest
from conftest import REPO
from detectron2.config import get_cfg

from rcdet.config import ConfigError, add_rcdet_config, check_rcdet_config


def _cfg(**values):
    """The default config with ``values`` set as Python code would (no yacs type coercion);
    ``OOD__HOLD_OUT_MODE`` stands for MODEL.RCDET.OOD.HOLD_OUT_MODE."""
    cfg = get_cfg()
    add_rcdet_config(cfg)
    for key, value in values.items():
        node = cfg.MODEL.RCDET
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def _refused(**values) -> str:
    with pytest.raises(ConfigError) as e:
        check_rcdet_config(_cfg(**values))
    return str(e.value)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}__")
        else:
            yield prefix + key, value


def test_defaults_and_shipped_configs_pass():
    check_rcdet_config(_cfg())
    configs = [f for f in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if "Base-" not in f]
    assert len(configs) >= 10
    for path in configs:
        cfg = _cfg()
        cfg.merge_from_file(path)
        check_rcdet_config(cfg)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("LOSS_WEIGHT", -0.5, "a finite number >= 0"),
        ("LOSS_WEIGHT", math.nan, "a finite number >= 0"),
        ("LOSS_WEIGHT", "0.5", "a finite number >= 0"),
        (
            "LOSS",
            "rince",
            "one of rince_in, rince_out, rince_out_in, rince_in_r1, rince_out_r1, supcon, none",
        ),
        ("RANKING_FILE", None, "a path, or '' for none"),
        ("RANKING_ALLOW_UNCOVERED", "false", "True or False"),
        ("MAX_RANK", -1, "an integer >= 0 (0: every rank)"),
        ("MAX_RANK", 2.0, "an integer >= 0"),
        ("TEMPERATURES", [0.2, 0.1], "a list of positive numbers tau_1 < tau_2 < ..."),
        ("TEMPERATURES", [0.1, math.inf], "a list of positive numbers"),
        ("TEMPERATURES", [0.0, 0.1], "a list of positive numbers"),
        ("TEMPERATURES", "0.1", "a list of positive numbers"),
        ("TAU_MIN", 0.0, "a number > 0"),
        ("TAU_MAX", -0.3, "a number > 0"),
        ("PROJ_HIDDEN_DIM", -1, "an integer >= 0 (0: the box head's width)"),
        ("EMBED_DIM", 0, "an integer >= 1"),
        ("EMBED_DIM", True, "an integer >= 1"),
        ("DECAY_STEPS", [100, -5], "a list of distinct iterations >= 0"),
        ("DECAY_STEPS", [100, 100], "a list of distinct iterations >= 0"),
        ("DECAY_STEPS", [10.5], "a list of distinct iterations >= 0"),
        ("DECAY_RATE", 1.5, "a number in [0, 1]"),
        ("IOU_THRESHOLD", 1.2, "a number in [0, 1]"),
        ("QUEUE_IOU_THRESHOLD", -0.1, "a number in [0, 1]"),
        ("REWEIGHT", "cubic", "none, linear or exp"),
        ("QUEUE_SIZE", -1, "an integer >= 0 (0: no queue)"),
        ("QUEUE_CLASS_BALANCED", 1, "True or False"),
        ("GATHER", "false", "True or False"),
        ("EMBED_AT_TEST", None, "True or False"),
        ("FINETUNE_FROM_OTHER_CLASSES", "yes", "True or False"),
        ("OOD__HELD_OUT_CLASSES", "disc", "a list of class names"),
        ("OOD__HELD_OUT_CLASSES", ["disc", ""], "a list of class names"),
        ("OOD__HOLD_OUT_MODE", "drop", "one of drop_images, drop_annotations"),
        ("OOD__EXPOSED_CLASSES", "frame", "a list of class names"),
        ("OOD__EXPOSED_CLASSES", [""], "a list of class names"),
        ("OOD__REFERENCE", "random", "one of fixed, learned, background, removed"),
    ],
)
def test_impossible_values_name_key_value_and_range(key, value, allowed):
    msg = _refused(**{key: value})
    assert msg.startswith(f"MODEL.RCDET.{key.replace('__', '.')} = {value!r}; allowed: {allowed}")
    assert "\n" not in msg and msg.endswith(".")


def test_every_key_refuses_a_value_of_the_wrong_type():
    # Keys without a rule of their own are held to their default's type, so this covers every
    # key add_rcdet_config defines, including ones added later.
    wrong = {bool: "true", int: 1.5, float: "0.5", str: 1, list: "a,b"}
    keys = list(_leaves(_cfg().MODEL.RCDET))
    assert len(keys) >= 22
    for key, default in keys:
        value = wrong[type(default)]
        assert _refused(**{key: value}).startswith(
            f"MODEL.RCDET.{key.replace('__', '.')} = {value!r}; allowed: "
        ), key


@pytest.mark.parametrize(
    "values",
    [
        dict(LOSS_WEIGHT=0.0, DECAY_RATE=0.0, IOU_THRESHOLD=0.0, QUEUE_IOU_THRESHOLD=1.0),
        dict(LOSS_WEIGHT=2, DECAY_RATE=1.0, IOU_THRESHOLD=1.0, QUEUE_SIZE=0, MAX_RANK=3),
        dict(LOSS_WEIGHT=np.float64(0.25), EMBED_DIM=np.int64(64), DECAY_STEPS=(300, 100)),
        dict(TEMPERATURES=(0.05, 0.1, 0.2), PROJ_HIDDEN_DIM=0, LOSS="none"),
        dict(OOD__HELD_OUT_CLASSES=("disc", "ring"), OOD__HOLD_OUT_MODE="drop_annotations"),
    ],
)
def test_edges_of_the_ranges_are_accepted(values):
    check_rcdet_config(_cfg(**values))


def _exposure(**values):
    cfg = _cfg(OOD__HELD_OUT_CLASSES=["ring", "triangle"], OOD__EXPOSED_CLASSES=["frame"])
    cfg.MODEL.ROI_HEADS.NAME = "RankedContrastiveROIHeads"
    for key, value in values.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    "values, message",
    [
        (
            dict(MODEL__RCDET__OOD__EXPOSED_CLASSES=["frame", "ring"]),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES ['ring'] are also in MODEL.RCDET.OOD.HELD_OUT_CLASSES:"
            " a class is either exposed in training or a test unknown; remove it from one list.",
        ),
        (
            dict(MODEL__RCDET__OOD__EXPOSED_CLASSES=["frame", "frame"]),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES lists a class twice: ['frame', 'frame'].",
        ),
        (
            dict(MODEL__RCDET__OOD__HELD_OUT_CLASSES=[]),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES needs test unknowns: set"
            " MODEL.RCDET.OOD.HELD_OUT_CLASSES to the held-out classes the exposure is tested on.",
        ),
        (
            dict(MODEL__RCDET__LOSS="none", MODEL__RCDET__OOD__REFERENCE="learned"),
            "MODEL.RCDET.OOD.REFERENCE = 'learned' trains the exposed boxes towards f with the"
            " contrastive loss, but MODEL.RCDET.LOSS is none: choose a contrastive loss, or set"
            " MODEL.RCDET.OOD.REFERENCE background (exposed objects as background).",
        ),
        (
            dict(MODEL__ROI_HEADS__NAME="StandardROIHeads"),
            "MODEL.RCDET.OOD.EXPOSED_CLASSES with MODEL.ROI_HEADS.NAME StandardROIHeads: only"
            " RankedContrastiveROIHeads turns the exposed boxes into outliers; set it, or"
            " MODEL.RCDET.OOD.REFERENCE removed (train without them).",
        ),
    ],
    ids=["also-held-out", "twice", "no-test-unknowns", "loss-none", "standard-head"],
)
def test_exposure_keys_against_each_other_and_the_head(values, message):
    with pytest.raises(ConfigError) as e:
        check_rcdet_config(_exposure(**values))
    assert str(e.value) == message
    # The same config without exposed classes is fine.
    cfg = _exposure(**values)
    cfg.MODEL.RCDET.OOD.EXPOSED_CLASSES = []
    if cfg.MODEL.ROI_HEADS.NAME == "RankedContrastiveROIHeads":
        check_rcdet_config(cfg)


def test_exposure_without_f_needs_no_contrastive_loss_and_without_boxes_no_head():
    check_rcdet_config(_exposure(MODEL__RCDET__OOD__REFERENCE="learned"))
    # Softmax outlier exposure; the no-exposure baseline with detectron2's own head.
    check_rcdet_config(
        _exposure(MODEL__RCDET__LOSS="none", MODEL__RCDET__OOD__REFERENCE="background")
    )
    check_rcdet_config(
        _exposure(
            MODEL__RCDET__LOSS="none",
            MODEL__RCDET__OOD__REFERENCE="removed",
            MODEL__ROI_HEADS__NAME="StandardROIHeads",
        )
    )


def test_tau_min_must_be_below_tau_max():
    assert _refused(TAU_MIN=0.3, TAU_MAX=0.3) == (
        "MODEL.RCDET.TAU_MIN/TAU_MAX = 0.3/0.3; allowed: 0 < TAU_MIN < TAU_MAX."
    )


def test_merged_from_a_list_or_file_is_checked_too(tmp_path):
    cfg = _cfg()
    cfg.merge_from_list(["MODEL.RCDET.LOSS_WEIGHT", "-1.0"])
    with pytest.raises(ConfigError, match=r"^MODEL.RCDET.LOSS_WEIGHT = -1.0; allowed: "):
        check_rcdet_config(cfg)
    # YAML's .nan is a float, so yacs' type check lets it through.
    path = tmp_path / "nan.yaml"
    path.write_text("MODEL:\n  RCDET:\n    IOU_THRESHOLD: .nan\n")
    cfg = _cfg()
    cfg.merge_from_file(str(path))
    with pytest.raises(ConfigError, match=r"^MODEL.RCDET.IOU_THRESHOLD = nan; allowed: a number"):
        check_rcdet_config(cfg)


def test_unknown_and_missing_keys():
    cfg = _cfg()
    cfg.MODEL.RCDET.LOSS_WIEGHT = 1.0  # a typo set from Python: yacs would accept it
    with pytest.raises(ConfigError) as e:
        check_rcdet_config(cfg)
    assert str(e.value) == (
        "MODEL.RCDET.LOSS_WIEGHT is not an rcdet config key (did you mean"
        " MODEL.RCDET.LOSS_WEIGHT?)."
    )
    cfg = _cfg()
    del cfg.MODEL.RCDET["EMBED_DIM"]
    with pytest.raises(ConfigError, match=r"^MODEL.RCDET.EMBED_DIM is missing"):
        check_rcdet_config(cfg)
    with pytest.raises(ConfigError, match=r"MODEL.RCDET is missing: call .*add_rcdet_config"):
        check_rcdet_config(get_cfg())
