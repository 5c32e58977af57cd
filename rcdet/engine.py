"""The trainer and config setup shared by tools/train_net.py and the other tools."""

import logging
import os
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
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, PascalVOCDetectionEvaluator

from .checkpoint import load_training_weights
from .config import ConfigError, add_rcdet_config
from .data.datasets import SHAPES_HINT, CheckedDatasetMapper, DatasetError
from .evaluation.evaluator import (
    OODDetectionEvaluator,
    OODStatisticsHook,
    ood_evaluation_configured,
    ood_outputs,
)
from .ranking import RankingError

__all__ = [
    "Trainer",
    "setup_cfg",
    "check_datasets_exist",
    "USER_ERRORS",
    "user_error_message",
    "exit_on_user_error",
]


# Errors caused by the user's files or config: reported as one clear line, no traceback.
USER_ERRORS = (ConfigError, DatasetError, RankingError)


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
        return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))

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
            voc = PascalVOCDetectionEvaluator(dataset_name)
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


def setup_cfg(config_file: str, opts=(), args=None, freeze: bool = True):
    """
    get_cfg -> add_rcdet_config -> merge file -> merge opts -> (held-out splits) -> freeze ->
    default_setup.
    """
    cfg = get_cfg()
    add_rcdet_config(cfg)
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file}: file not found.")
    try:
        cfg.merge_from_file(config_file)
    except (AssertionError, KeyError, ValueError) as e:
        raise ConfigError(
            f"--config-file {config_file}: {e} (is add_rcdet_config's key spelled right?)"
        ) from None
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd list: {opts}")
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (AssertionError, KeyError, ValueError, TypeError) as e:
            hint = " Tool options go before the KEY VALUE overrides." if key.startswith("-") else ""
            raise ConfigError(f"config override {key} {value}: {e}.{hint}") from None
    from .data.held_out import apply_held_out_config

    apply_held_out_config(cfg)
    check_datasets_exist(cfg)
    amp_precision(cfg)  # an unknown name fails here, not after the model is built
    if freeze:
        cfg.freeze()
    if args is not None:
        default_setup(cfg, args)
    return cfg


def user_error_message(e: BaseException) -> str:
    """The message of a user error, as one line."""
    msg = str(e).strip()
    # torch re-raises an exception from a DataLoader worker with the worker's formatted traceback
    # as its message; the original message is on its last line, after "module.Class: ".
    if "\nOriginal Traceback" in msg:
        msg = msg.splitlines()[-1].split(": ", 1)[-1]
    return msg


def exit_on_user_error(fn, *args, **kwargs):
    """
    Run ``fn``. A user error becomes one 'error: ...' line on stderr and exit code 2; Ctrl-C one
    line and exit code 130 (128 + SIGINT), as a shell reports it. rcdet's reports and caches are
    written atomically (rcdet.file_io), so an interrupted run leaves each complete or absent.
    """
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        print(f"error: {user_error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
