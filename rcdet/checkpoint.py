"""
Loading weights so that wrong or unsafe weights fail loudly.

detectron2's checkpointer skips, with a warning, every parameter whose shape differs from the
model's. That is what fine-tuning to a new class count needs, but it also makes a 7-class
checkpoint "load" into a 9-class model and evaluate at AP 0.2, and a file that shares no name
with the model (a torchvision state dict) "load" into nothing. A missing or truncated file
surfaces as an AssertionError or a PytorchStreamReader error that does not name the file. And
detectron2 unpickles ``.pth`` and ``.pkl`` files in full, which runs any code the file's author
put in it. Every tool loads weights through this module instead.
"""

import codecs
import collections
import logging
import os
import pickle
import re
import weakref

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .config import ConfigError

__all__ = [
    "WeightsError",
    "RcdetCheckpointer",
    "load_trained_weights",
    "load_training_weights",
    "TRUST_KEY",
]

logger = logging.getLogger(__name__)

TRUST_KEY = "MODEL.RCDET.TRUST_PICKLED_WEIGHTS"
_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"
_EVAL_HINT = "Evaluate it with the config it was trained with (its OUTPUT_DIR/config.yaml)."
# What torch.load and pickle raise for a truncated, empty or non-checkpoint file.
_UNREADABLE = (OSError, RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError)
# Training from a file that provides less of the model's parameters than this (by value count)
# is training from scratch by mistake: an ImageNet backbone alone is over half of a detector.
_MIN_LOADED_FRACTION = 0.1
# torch's weights_only refusal names the global it would have had to import: "Unsupported class
# posix.system" (torch 2.3), "Unsupported global: GLOBAL posix.system was not..." (torch >= 2.4).
_TORCH_REFUSED = re.compile(r"Unsupported (?:class|global: GLOBAL) ([A-Za-z_][\w.]*)")


class WeightsError(ConfigError):
    """A weights file is missing, unreadable, unsafe or does not fit the model; the message names
    it."""


class _UnsafeGlobal(pickle.UnpicklingError):
    def __init__(self, name):
        super().__init__(f"Unsupported global {name}")
        self.name = name


def _latin1_encode(text, encoding="latin1"):
    # Python 3 writes bytes in a protocol-2 pickle as _codecs.encode(str, "latin1"); no other codec.
    if encoding not in ("latin1", "latin-1"):
        raise _UnsafeGlobal(f"_codecs.encode(..., {encoding!r})")
    return codecs.encode(text, encoding)


def _numpy_globals():
    """The callables numpy's own pickles of arrays, dtypes and scalars name, under their numpy 1
    (numpy.core) and numpy 2 (numpy._core) module names, resolved from the installed numpy."""
    array, scalar = np.zeros(1, np.float32), np.float32(0)
    reconstruct = array.__reduce__()[0]
    frombuffer = array.__reduce_ex__(5)[0]
    found = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for core in ("numpy.core", "numpy._core"):
        found[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        found[(f"{core}.multiarray", "scalar")] = scalar.__reduce__()[0]
        found[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return found


_NUMPY_GLOBALS = _numpy_globals()


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: any other global (a function to call, a class
    to build) is refused before it is imported, so the file cannot run code."""

    def find_class(self, module, name):
        found = _NUMPY_GLOBALS.get((module, name))
        if found is None:
            raise _UnsafeGlobal(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not plain data")


def _refused_global(e):
    """The global a refused unpickle named, '' if it did not name one, None if ``e`` is not a
    refusal (the file is not a pickle at all)."""
    if isinstance(e, _UnsafeGlobal):
        return e.name
    msg = str(e)
    if "Weights only load failed" not in msg or "Unsupported operand" in msg:
        return None
    m = _TORCH_REFUSED.search(msg)
    if m is None:
        return ""
    # A truncated legacy file stops inside a name ("collectio."): that is unreadable, not unsafe.
    return None if m.group(1).endswith(".") else m.group(1)


def _safe_summary(path):
    kind = "numpy arrays" if path.endswith(".pkl") else "tensors"
    return f"{kind}, numbers, strings, lists and dicts"


def _count(n):
    return f"{n:,}"


class RcdetCheckpointer(DetectionCheckpointer):
    """
    A DetectionCheckpointer that refuses weights which are unsafe or do not fit the model:

    * a missing or unreadable file is an error that names it;
    * a file is unpickled with ``weights_only=True`` (``.pth``) or an unpickler that admits only
      numpy arrays (``.pkl``, detectron2's model zoo), unless ``trust_pickled_weights``: a file
      that holds other objects is refused, since unpickling them can run any code;
    * a box predictor trained for another number of classes is an error that names
      MODEL.ROI_HEADS.NUM_CLASSES and both counts, unless ``finetune_from_other_classes``;
    * a file that provides almost none of the model's parameters is an error with the counts;
    * with ``require_all`` (evaluation), so is any model parameter the file does not provide.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        finetune_from_other_classes=False,
        require_all=False,
        trust_pickled_weights=False,
        **checkpointables,
    ):
        super().__init__(model, save_dir, **checkpointables)
        self.finetune_from_other_classes = finetune_from_other_classes
        self.require_all = require_all
        self.trust_pickled_weights = trust_pickled_weights
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

    def get_checkpoint_file(self):
        """The checkpoint OUTPUT_DIR/last_checkpoint names; an error if it names none or a
        missing file (fvcore would return OUTPUT_DIR/ itself for an empty one)."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with PathManager.open(tag, "r") as f:
                name = f.read().strip()
        except OSError as e:
            raise WeightsError(f"{tag}: cannot be read ({e}).") from None
        fix = (
            f"write the name of a checkpoint in {self.save_dir} into it (e.g. model_final.pth), "
            "or delete it to start from MODEL.WEIGHTS."
        )
        if not name:
            raise WeightsError(f"{tag} is empty, so there is no checkpoint to resume from: {fix}")
        path = os.path.join(self.save_dir, name)
        if not PathManager.isfile(path):
            raise WeightsError(f"{tag} names '{name}', but {path} does not exist: {fix}")
        return path

    def _torch_load(self, f):
        return torch.load(f, map_location="cpu", weights_only=not self.trust_pickled_weights)

    def _load_file(self, filename):
        if self.trust_pickled_weights:
            logger.warning(
                f"Unpickling {filename} in full ({TRUST_KEY} True): it can run code; only for a "
                "file whose source you trust."
            )
        try:
            if filename.endswith(".pkl") and not self.trust_pickled_weights:
                loaded = self._load_numpy_pickle(filename)
            elif filename.endswith(".pyth") and not self.trust_pickled_weights:
                loaded = self._load_pycls(filename)
            else:
                loaded = super()._load_file(filename)
        except WeightsError:
            raise
        except _UNREADABLE as e:
            name = _refused_global(e)
            if name is not None:
                what = f" ({name})" if name else ""
                raise WeightsError(
                    f"checkpoint {filename}: not loaded, because it holds pickled Python objects"
                    f"{what} besides {_safe_summary(filename)}, and unpickling them can run any"
                    f" code. If you trust where the file comes from, load it with {TRUST_KEY} True."
                ) from None
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise WeightsError(
                f"checkpoint {filename}: cannot be read ({reason}). The file is truncated or not a "
                "model checkpoint; copy it again or point to another one."
            ) from None
        self._check_state_dict(filename, loaded)
        return loaded

    def _load_numpy_pickle(self, filename):
        """detectron2's ``.pkl`` formats (model zoo, Caffe2 blobs) through _NumpyUnpickler; the
        conversion is DetectionCheckpointer._load_file's."""
        with PathManager.open(filename, "rb") as f:
            data = _NumpyUnpickler(f, encoding="latin1").load()
        if not isinstance(data, dict):
            raise WeightsError(
                f"checkpoint {filename}: holds a {type(data).__name__}, not a dict of weights; "
                "point to a detectron2 or Caffe2 model zoo .pkl."
            )
        if "model" in data and "__author__" in data:
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            loaded = data
        else:
            if "blobs" in data:  # Caffe2 detection models; ImageNet models have no "blobs"
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            loaded = {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        return loaded

    def _load_pycls(self, filename):
        """pycls ``.pyth`` checkpoints, as DetectionCheckpointer reads them, with weights_only."""
        with PathManager.open(filename, "rb") as f:
            data = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or not isinstance(data.get("model_state"), dict):
            raise WeightsError(
                f"checkpoint {filename}: a .pyth file must be a pycls checkpoint with a "
                "'model_state' dict."
            )
        state = {
            k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
        }
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}

    @staticmethod
    def _check_state_dict(filename, loaded):
        # fvcore raises a bare ValueError, after the file is read, for a value that is no array.
        state = loaded.get("model") if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise WeightsError(
                f"checkpoint {filename}: its 'model' entry is a {type(state).__name__}, not a "
                "state dict of tensors; point to a model checkpoint."
            )
        for key, value in state.items():
            if not isinstance(value, (torch.Tensor, np.ndarray)):
                raise WeightsError(
                    f"checkpoint {filename}: weight '{key}' is a {type(value).__name__}, not a "
                    "tensor or array; the file is not a model state dict."
                )

    def _load_model(self, checkpoint):
        file_keys = len(checkpoint["model"])
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
        params = dict(self.model.named_parameters())
        absent = sorted(k for k in set(incompatible.missing_keys) if k in params)
        self._check_loads_something(params, absent, incompatible, file_keys)
        if self.require_all and absent:
            shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
            raise WeightsError(
                f"checkpoint {self._loading} does not fit this config's model: {len(absent)} of"
                f" its parameters are missing from the file or have another shape ({shown})."
                f" {_EVAL_HINT}"
            )
        return incompatible

    def _check_loads_something(self, params, absent, incompatible, file_keys):
        """An error with the counts if the file provides almost none of the model's parameter
        values: detectron2 only warns "not found" for each, and training starts from scratch."""
        total = sum(p.numel() for p in params.values())
        missing = set(absent)
        loaded = sum(p.numel() for k, p in params.items() if k not in missing)
        if total == 0 or loaded >= _MIN_LOADED_FRACTION * total:
            return
        unexpected, shapes = incompatible.unexpected_keys, incompatible.incorrect_shapes
        why = f"of its {file_keys} weights, {len(unexpected)} match no parameter name"
        if unexpected and absent:
            first = next(k for k in params if k in missing)
            why += f" (the file has e.g. '{unexpected[0]}', the model '{first}')"
        if shapes:
            why += f" and {len(shapes)} have another shape (e.g. '{shapes[0][0]}')"
        if self.require_all:
            fix = (
                "Point MODEL.WEIGHTS to a model trained with this config, or evaluate the file "
                "with the config it was trained with."
            )
        else:
            fix = (
                "If it is another library's checkpoint, convert it first (detectron2's "
                "tools/convert-torchvision-to-d2.py turns a torchvision ResNet into a .pkl that "
                "loads by name matching); to train from scratch, set MODEL.WEIGHTS ''."
            )
        raise WeightsError(
            f"checkpoint {self._loading} provides {len(params) - len(missing)} of the model's"
            f" {len(params)} parameters ({_count(loaded)} of {_count(total)} values,"
            f" {100 * loaded / total:.1f}%): {why}. The model would start almost from scratch."
            f" {fix}"
        )


def load_trained_weights(model, cfg, resume: bool = False) -> str:
    """
    Load the weights that ``model`` is evaluated with: MODEL.WEIGHTS or, with ``resume``, the last
    checkpoint in OUTPUT_DIR if there is one. Every parameter must come from the file. Returns
    the path loaded.
    """
    checkpointer = RcdetCheckpointer(
        model,
        cfg.OUTPUT_DIR,
        require_all=True,
        trust_pickled_weights=cfg.MODEL.RCDET.TRUST_PICKLED_WEIGHTS,
    )
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
        trust_pickled_weights=cfg.MODEL.RCDET.TRUST_PICKLED_WEIGHTS,
        trainer=weakref.proxy(trainer),
    )
    resuming = resume and checkpointer.has_checkpoint()
    path = cfg.MODEL.WEIGHTS
    if not resuming and path and "://" not in path and not os.path.isfile(path):
        raise WeightsError(f"MODEL.WEIGHTS = '{path}': file not found.")
    checkpointer.resume_or_load(path, resume=resume)
    _drop_ood_statistics(trainer.model)
    if resuming:
        # The checkpoint stores the iteration that just finished.
        trainer.start_iter = trainer.iter + 1


def _drop_ood_statistics(model) -> None:
    """A model about to be trained has no OOD statistics: those of a loaded checkpoint describe
    its weights, which training changes (rcdet's after-training hook fits them anew)."""
    model = getattr(model, "module", model)
    scorer = getattr(getattr(model, "roi_heads", None), "ood_scorer", None)
    if scorer is not None and scorer.state_dict():
        logger.info("The checkpoint's OOD statistics are dropped: training changes its weights.")
        scorer.clear()
