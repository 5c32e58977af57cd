"""The trainer and config setup shared by tools/train_net.py and the other tools."""

import logging
import os
import re
import sys

import torch
from detectron2.config import get_cfg
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine.hooks import EvalHook
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from .checkpoint import load_training_weights
from .cli import (
    check_device,
    check_output_dir,
    load_config_file,
    merge_overrides,
    resolve_input_files,
)
from .config import ConfigError, add_rcdet_config, check_rcdet_config
from .data.datasets import SHAPES_HINT, CheckedDatasetMapper, DatasetError
from .data.held_out import exposure_training_dicts, voc_evaluator
from .evaluation.evaluator import (
    OODDetectionEvaluator,
    OODOptions,
    OODStatisticsHook,
    ood_evaluation_configured,
    ood_outputs,
)
from .evaluation.report import ReportError
from .ranking import RankingError

__all__ = [
    "Trainer",
    "setup_cfg",
    "check_datasets_exist",
    "check_config_values",
    "check_task",
    "check_training_values",
    "USER_ERRORS",
    "user_error_message",
    "report_user_errors",
    "exit_on_user_error",
]


# Errors caused by the user's files or config: reported as one clear line, no traceback. A
# ReportError is an ood_report.json that is missing, malformed, or not comparable with another.
USER_ERRORS = (ConfigError, DatasetError, RankingError, ReportError)


def _not_a_user_error(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], USER_ERRORS))


# TrainerBase.train logs every exception with its traceback before re-raising it. A user error
# met mid-training (an unreadable image) is reported as one line by exit_on_user_error instead.
logging.getLogger("detectron2.engine.train_loop").addFilter(_not_a_user_error)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the evaluator chosen from the dataset's ``evaluator_type``, whose
    MODEL.WEIGHTS must fit the model (rcdet.checkpoint)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED:
            # DefaultTrainer builds AMPTrainer with its default, float16.
            self._trainer.precision = amp_precision(cfg)

    def resume_or_load(self, resume=True):
        load_training_weights(self, resume)

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = CheckedDatasetMapper(cfg, True)
        if mapper.exposed_label is None:
            return build_detection_train_loader(cfg, mapper=mapper)
        return build_detection_train_loader(
            cfg, mapper=mapper, dataset=exposure_training_dicts(cfg)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, model=None):
        """The dataset's detection evaluator; with held-out classes, also the OOD evaluator of
        ``model`` (rcdet.evaluation.OODDetectionEvaluator), its report in OUTPUT_DIR/inference."""
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "pascal_voc":
            voc = voc_evaluator(dataset_name)
            if not ood_evaluation_configured(cfg):
                return voc
            folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
            ood = OODDetectionEvaluator(dataset_name, cfg, model=model, output_dir=folder)
            return DatasetEvaluators([voc, ood])
        if evaluator_type == "coco":
            return COCOEvaluator(
                dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
            )
        raise NotImplementedError(
            f"No evaluator for dataset '{dataset_name}' (evaluator_type={evaluator_type})."
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test; with held-out classes the detections carry their logits and
        embeddings, and each test split's evaluators include the OOD evaluator of ``model``."""
        if not ood_evaluation_configured(cfg):
            return super().test(cfg, model, evaluators)
        if evaluators is None:
            evaluators = [cls.build_evaluator(cfg, n, model=model) for n in cfg.DATASETS.TEST]
        with ood_outputs(model):
            return super().test(cfg, model, evaluators)

    def build_hooks(self):
        hooks = super().build_hooks()
        if ood_evaluation_configured(self.cfg):
            # Before the final evaluation, which then finds the statistics cached.
            at = next((i for i, h in enumerate(hooks) if isinstance(h, EvalHook)), len(hooks))
            hooks.insert(at, OODStatisticsHook(self.cfg))
        return hooks


def amp_precision(cfg) -> torch.dtype:
    """The autocast dtype named by SOLVER.AMP.PRECISION."""
    choices = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if cfg.SOLVER.AMP.PRECISION not in choices:
        raise ConfigError(
            f"SOLVER.AMP.PRECISION = '{cfg.SOLVER.AMP.PRECISION}'; choose float16 or bfloat16."
        )
    return choices[cfg.SOLVER.AMP.PRECISION]


def check_datasets_exist(cfg):
    """Fail before building anything if a configured dataset's folder is missing."""
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in MetadataCatalog.list():
            raise ConfigError(f"DATASETS: '{name}' is not a registered dataset.")
        dirname = MetadataCatalog.get(name).get("dirname", None)
        if dirname and not os.path.isdir(dirname):
            hint = (
                SHAPES_HINT
                if name.startswith("rcdet_shapes")
                else (
                    "Set $DETECTRON2_DATASETS to the folder that contains VOC2007 (see"
                    " datasets/README.md)."
                )
            )
            raise DatasetError(
                f"Dataset '{name}': folder {os.path.abspath(dirname)} does not exist. {hint}"
            )


TASKS = ("train", "eval")


def setup_cfg(config_file: str, opts=(), args=None, freeze: bool = True, task=None):
    """
    The config of a tool's run: get_cfg -> add_rcdet_config -> the file -> the ``KEY VALUE``
    overrides (a mistake in either is named by file, line and key: rcdet.cli) -> the input files
    that keys name (a relative MODEL.RCDET.RANKING_FILE is read from the working directory, then
    from the folder of the config that sets it: rcdet.cli.resolve_input_files) -> held-out splits
    -> checks -> freeze -> default_setup.

    ``args``: a train_net-style command line; default_setup then logs the run and saves its config
    in OUTPUT_DIR, an evaluation's (``--eval-only``) in OUTPUT_DIR/eval, so that the training's
    config.yaml survives. ``task``: "train" or "eval" (with ``args``, from ``--eval-only``) also
    checks what that run needs: a writable OUTPUT_DIR, a training or test set, a GPU for AMP.
    """
    if task is None and args is not None:
        task = "eval" if getattr(args, "eval_only", False) else "train"
    if task not in (None,) + TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    cfg = get_cfg()
    add_rcdet_config(cfg)
    load_config_file(cfg, config_file)
    merge_overrides(cfg, opts)
    resolve_input_files(cfg, config_file, opts)
    from .data.held_out import apply_held_out_config

    apply_held_out_config(cfg)
    check_datasets_exist(cfg)
    amp_precision(cfg)  # an unknown name fails here, not after the model is built
    check_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")
    check_config_values(cfg)
    if task is not None:
        check_task(cfg, task)
    if freeze:
        cfg.freeze()
    if args is not None:
        default_setup(_record_cfg(cfg, task), args)
    return cfg


def _record_cfg(cfg, task):
    """The config default_setup logs and saves: an evaluation's goes to OUTPUT_DIR/eval."""
    if task != "eval" or not cfg.OUTPUT_DIR:
        return cfg
    record = cfg.clone()
    record.defrost()
    record.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "eval")
    record.freeze()
    return record


# (key, smallest value, what it is): detectron2 keys whose nonsensical values otherwise fail deep
# inside a run (a ZeroDivisionError in the checkpointer) or silently do nothing.
_AT_LEAST = (
    ("SOLVER.IMS_PER_BATCH", 1, "images per batch, over all GPUs"),
    ("SOLVER.CHECKPOINT_PERIOD", 1, "iterations between checkpoints"),
    ("SOLVER.BASE_LR", 0, "the learning rate"),
    ("SOLVER.WARMUP_ITERS", 0, "warm-up iterations"),
    ("DATALOADER.NUM_WORKERS", 0, "data loader worker processes"),
    ("TEST.EVAL_PERIOD", 0, "iterations between evaluations (0: only after training)"),
    ("TEST.DETECTIONS_PER_IMAGE", 1, "detections kept per image"),
    ("INPUT.MIN_SIZE_TRAIN", 1, "shorter image sides in training"),
    ("INPUT.MAX_SIZE_TRAIN", 1, "the longest image side in training"),
    ("INPUT.MIN_SIZE_TEST", 0, "the shorter image side in testing (0: no resizing)"),
    ("INPUT.MAX_SIZE_TEST", 1, "the longest image side in testing"),
    ("MODEL.ROI_HEADS.NUM_CLASSES", 1, "the classes the model predicts"),
    ("TEST.OOD.SEED", 0, "the seed of the bootstrap resampling (numpy takes no negative seed)"),
)


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_config_values(cfg):
    """Values that cannot work, before anything is built or written: every MODEL.RCDET key
    (rcdet.config.check_rcdet_config), every TEST.OOD key (the evaluator's OODOptions) and the
    detectron2 keys of ``_AT_LEAST``; one ConfigError naming the key and its range."""
    check_rcdet_config(cfg)
    OODOptions.from_config(cfg)
    for key, lo, what in _AT_LEAST:
        value = _get(cfg, key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(v >= lo for v in values):  # `not >=` also catches nan
            each = "each " if isinstance(value, (list, tuple)) else ""
            raise ConfigError(f"{key} = {value}: {what}, {each}must be >= {lo}.")


def check_task(cfg, task: str):
    """What a training (``task`` "train") or an evaluation ("eval") needs of ``cfg``."""
    check_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    if task == "eval":
        if not cfg.DATASETS.TEST:
            raise ConfigError(
                "--eval-only evaluates DATASETS.TEST, which is empty: set DATASETS.TEST to the"
                f" splits to evaluate, e.g. DATASETS.TEST \"('{_test_split_hint(cfg)}',)\"."
            )
        return
    check_training_values(cfg)


def check_training_values(cfg):
    """What a training needs of ``cfg`` besides its output folder: a training set, iterations,
    a GPU for AMP."""
    if not cfg.DATASETS.TRAIN:
        raise ConfigError("DATASETS.TRAIN is empty: set DATASETS.TRAIN to the splits to train on.")
    if cfg.SOLVER.MAX_ITER < 1:
        raise ConfigError(
            f"SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER}: training runs that many iterations; set it"
            " to 1 or more (--eval-only evaluates without training)."
        )
    if cfg.SOLVER.AMP.ENABLED and torch.device(cfg.MODEL.DEVICE).type != "cuda":
        raise ConfigError(
            f"SOLVER.AMP.ENABLED True with MODEL.DEVICE {cfg.MODEL.DEVICE}: detectron2's"
            " AMPTrainer trains on a GPU only; set SOLVER.AMP.ENABLED False."
        )


def _test_split_hint(cfg) -> str:
    """The test split beside DATASETS.TRAIN[0] (its held-out base's), for the error message."""
    if cfg.DATASETS.TRAIN:
        name = cfg.DATASETS.TRAIN[0]
        base = MetadataCatalog.get(name).get("base_dataset", name)
        for suffix in ("_trainval", "_train"):
            if base.endswith(suffix) and base[: -len(suffix)] + "_test" in MetadataCatalog.list():
                return base[: -len(suffix)] + "_test"
    return "NAME_test"


def user_error_message(e: BaseException) -> str:
    """The message of a user error, as one line."""
    msg = str(e).strip()
    # torch re-raises an exception from a DataLoader worker with the worker's formatted traceback
    # as its message; the original message is on its last line, after "module.Class: ".
    if "\nOriginal Traceback" in msg:
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return re.sub(r"\s*\n\s*", " ", msg)


def _print_user_error(e: BaseException):
    print(f"error: {user_error_message(e)}", file=sys.stderr)


def report_user_errors(fn, *args, **kwargs):
    """
    Run ``fn`` and return its result; a user error is printed as one 'error: ...' line on stderr
    and returns exit code 2. A tool's ``main(argv)`` returns through it, so that it can be called
    in-process too.
    """
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        _print_user_error(e)
        return 2


def exit_on_user_error(fn, *args, **kwargs):
    """
    Run ``fn``, a tool's entry point. A user error becomes one 'error: ...' line on stderr and
    exit code 2; Ctrl-C one line and exit code 130 (128 + SIGINT), as a shell reports it. rcdet's
    reports and caches are written atomically (rcdet.file_io), so an interrupted run leaves each
    complete or absent.
    """
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        _print_user_error(e)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
