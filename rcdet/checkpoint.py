"""
Loading weights so that wrong weights fail loudly.

detectron2's checkpointer skips, with a warning, every parameter whose shape differs from the
model's. That is what fine-tuning to a new class count needs, but it also makes a 7-class
checkpoint "load" into a 9-class model and evaluate at AP 0.2. A missing or truncated file
surfaces as an AssertionError or a PytorchStreamReader error that does not name the file. Every
tool loads weights through this module instead.
"""

import os
import pickle
import weakref

from detectron2.checkpoint import DetectionCheckpointer

from .config import ConfigError

__all__ = ["WeightsError", "RcdetCheckpointer", "load_trained_weights", "load_training_weights"]

_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"
_EVAL_HINT = "Evaluate it with the config it was trained with (its OUTPUT_DIR/config.yaml)."
# What torch.load and pickle raise for a truncated, empty or non-checkpoint file.
_UNREADABLE = (OSError, RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError)


class WeightsError(ConfigError):
    """A weights file is missing, unreadable, or does not fit the model; the message names it."""


class RcdetCheckpointer(DetectionCheckpointer):
    """
    A DetectionCheckpointer that refuses weights which do not fit the model:

    * a missing or unreadable file is an error that names it;
    * a box predictor trained for another number of classes is an error that names
      MODEL.ROI_HEADS.NUM_CLASSES and both counts, unless ``finetune_from_other_classes``;
    * with ``require_all`` (evaluation), so is any model parameter the file does not provide.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        finetune_from_other_classes=False,
        require_all=False,
        **checkpointables,
    ):
        super().__init__(model, save_dir, **checkpointables)
        self.finetune_from_other_classes = finetune_from_other_classes
        self.require_all = require_all
        self._loading = None

    def load(self, path, *args, **kwargs):
        # URLs (detectron2://, https://) are resolved by PathManager inside super().load.
        if path and "://" not in path and not os.path.isfile(path):
            raise WeightsError(f"checkpoint {path}: file not found.")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except _UNREADABLE as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise WeightsError(
                f"checkpoint {filename}: cannot be read ({reason}). The file is truncated or not a "
                "model checkpoint; copy it again or point to another one."
            ) from None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        for key, shape_file, shape_model in incompatible.incorrect_shapes:
            if key.endswith(_CLS_SCORE) and not self.finetune_from_other_classes:
                # cls_score has one row per class plus background.
                msg = (
                    f"checkpoint {self._loading} was trained for {shape_file[0] - 1} classes, but "
                    f"MODEL.ROI_HEADS.NUM_CLASSES = {shape_model[0] - 1}. "
                )
                if self.require_all:
                    msg += _EVAL_HINT
                else:
                    msg += (
                        "To fine-tune from it (the class-specific box predictor layers then start "
                        "from scratch), set MODEL.RCDET.FINETUNE_FROM_OTHER_CLASSES True."
                    )
                raise WeightsError(msg)
        if self.require_all:
            params = {name for name, _ in self.model.named_parameters()}
            absent = sorted(k for k in set(incompatible.missing_keys) if k in params)
            if absent:
                shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
                raise WeightsError(
                    f"checkpoint {self._loading} does not fit this config's model: {len(absent)} of"
                    f" its parameters are missing from the file or have another shape ({shown})."
                    f" {_EVAL_HINT}"
                )
        return incompatible


def load_trained_weights(model, cfg, resume: bool = False) -> str:
    """
    Load the weights that ``model`` is evaluated with: MODEL.WEIGHTS or, with ``resume``, the last
    checkpoint in OUTPUT_DIR if there is one. Every parameter must come from the file. Returns
    the path loaded.
    """
    checkpointer = RcdetCheckpointer(model, cfg.OUTPUT_DIR, require_all=True)
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()
    else:
        path = cfg.MODEL.WEIGHTS
        if not path:
            raise WeightsError(
                "MODEL.WEIGHTS is empty: evaluation needs the trained model's weights, e.g. "
                "MODEL.WEIGHTS OUTPUT_DIR/model_final.pth (otherwise a randomly initialised model "
                "would be evaluated)."
            )
        if "://" not in path and not os.path.isfile(path):
            raise WeightsError(
                f"MODEL.WEIGHTS = '{path}': file not found; pass the trained model's .pth."
            )
    checkpointer.load(path, checkpointables=[])
    return path


def load_training_weights(trainer, resume: bool = True) -> None:
    """
    ``DefaultTrainer.resume_or_load`` through RcdetCheckpointer: resume from the last checkpoint
    in OUTPUT_DIR, else start from MODEL.WEIGHTS (empty: from scratch), which may be for another
    class count only with MODEL.RCDET.FINETUNE_FROM_OTHER_CLASSES.
    """
    cfg = trainer.cfg
    checkpointer = RcdetCheckpointer(
        trainer.model,
        cfg.OUTPUT_DIR,
        finetune_from_other_classes=cfg.MODEL.RCDET.FINETUNE_FROM_OTHER_CLASSES,
        trainer=weakref.proxy(trainer),
    )
    resuming = resume and checkpointer.has_checkpoint()
    path = cfg.MODEL.WEIGHTS
    if not resuming and path and "://" not in path and not os.path.isfile(path):
        raise WeightsError(f"MODEL.WEIGHTS = '{path}': file not found.")
    checkpointer.resume_or_load(path, resume=resume)
    if resuming:
        # The checkpoint stores the iteration that just finished.
        trainer.start_iter = trainer.iter + 1
