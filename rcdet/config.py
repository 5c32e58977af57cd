import difflib
import math
import numbers

from detectron2.config import CfgNode as CN

__all__ = ["add_rcdet_config", "check_rcdet_config", "check_exposure_config", "ConfigError"]


def add_rcdet_config(cfg):
    """Add the rcdet keys (``MODEL.RCDET``, ``MODEL.TINYNET``) to a detectron2 config."""
    _C = cfg

    _C.MODEL.RCDET = CN()
    # Contrastive loss on the box features: supcon (Khosla et al.'s L^sup_out, as in FSCE),
    # rince_in, rince_out, rince_out_in, rince_in_r1 or rince_out_r1 (RINCE with one rank; the
    # old names supcon_in and supcon_out still load), or none (the branch is not built).
    _C.MODEL.RCDET.LOSS = "rince_out_in"
    # Ranking YAML (see rcdet/ranking.py); required by the rince_* losses.
    _C.MODEL.RCDET.RANKING_FILE = ""
    # Accept a ranking that leaves some dataset classes out (they get no similar classes).
    _C.MODEL.RCDET.RANKING_ALLOW_UNCOVERED = False
    # Truncate the ranking to this many ranks (0: use every rank in the file).
    _C.MODEL.RCDET.MAX_RANK = 0
    # Explicit per-rank temperatures tau_1 < tau_2 < ...; empty: derive from TAU_MIN/TAU_MAX.
    _C.MODEL.RCDET.TEMPERATURES = []
    # tau_k = TAU_MIN + (1 - s_k)(TAU_MAX - TAU_MIN), s_1 = 1; s_k from the ranking file's
    # thresholds when it has them, else evenly spaced down to 0 at rank r.
    _C.MODEL.RCDET.TAU_MIN = 0.1
    _C.MODEL.RCDET.TAU_MAX = 0.3
    # Projection MLP: box-head feature -> hidden (0: same as input) -> ReLU -> EMBED_DIM,
    # L2-normalised.
    _C.MODEL.RCDET.PROJ_HIDDEN_DIM = 1024
    _C.MODEL.RCDET.EMBED_DIM = 128
    # loss_contrast = LOSS_WEIGHT * decay(iter) * L.
    _C.MODEL.RCDET.LOSS_WEIGHT = 0.5
    # The weight is multiplied by DECAY_RATE at each of these iterations (empty: no decay).
    _C.MODEL.RCDET.DECAY_STEPS = []
    _C.MODEL.RCDET.DECAY_RATE = 0.5
    # Anchors are foreground proposals whose IoU with their matched GT is >= this.
    _C.MODEL.RCDET.IOU_THRESHOLD = 0.7
    # Per-anchor IoU reweighting: none, linear (u) or exp (e^u - 1), as in FSCE.
    _C.MODEL.RCDET.REWEIGHT = "none"
    # Memory queue of past embeddings used as extra keys (0 disables it).
    _C.MODEL.RCDET.QUEUE_SIZE = 4096
    # Only foreground proposals with IoU >= this are enqueued.
    _C.MODEL.RCDET.QUEUE_IOU_THRESHOLD = 0.7
    # One ring of QUEUE_SIZE per class instead of a single shared ring.
    _C.MODEL.RCDET.QUEUE_CLASS_BALANCED = False
    # All-gather embeddings across workers so the keys are the global batch.
    _C.MODEL.RCDET.GATHER = True
    # At test time, attach pred_logits (and, with the branch, pred_embeddings) to every
    # predicted instance. Off: inference is exactly StandardROIHeads, at no extra cost.
    _C.MODEL.RCDET.EMBED_AT_TEST = False
    # Start training from MODEL.WEIGHTS of a model with another class count: its class-specific
    # box predictor layers are skipped and start from scratch. Off: that mismatch is an error.
    _C.MODEL.RCDET.FINETUNE_FROM_OTHER_CLASSES = False
    # Unpickle weight files in full, which runs any code in them: only for files you trust.
    # Off: .pth files load as tensors and plain data only, .pkl files as numpy arrays only.
    _C.MODEL.RCDET.TRUST_PICKLED_WEIGHTS = False

    _C.MODEL.RCDET.OOD = CN()
    # Classes left out of training; they are the OOD objects at test time.
    _C.MODEL.RCDET.OOD.HELD_OUT_CLASSES = []
    # drop_images: remove training images that contain a held-out object;
    # drop_annotations: keep the images, remove the held-out boxes.
    _C.MODEL.RCDET.OOD.HOLD_OUT_MODE = "drop_images"
    # Classes left out of the known ones but kept in training as outliers (docs/unknown_objects.md).
    _C.MODEL.RCDET.OOD.EXPOSED_CLASSES = []
    # Their boxes: anchors of a fixed or learned reference f, background, or removed (no exposure).
    _C.MODEL.RCDET.OOD.REFERENCE = "fixed"

    # VOS, virtual outlier synthesis (Du et al., ICLR 2022; docs/vos.md), on the box features.
    _C.MODEL.RCDET.VOS = CN()
    # Off: no VOS module (with LOSS none as well, the head equals StandardROIHeads).
    _C.MODEL.RCDET.VOS.ENABLED = False
    # Box-head features kept per class, from foreground proposals (VOS: 1000).
    _C.MODEL.RCDET.VOS.SAMPLE_NUMBER = 1000
    # From this iteration on (once every class queue is full) outliers are sampled and
    # loss_vos is trained (VOS: 12000, its first LR step).
    _C.MODEL.RCDET.VOS.STARTING_ITER = 12000
    # Samples drawn per class from its Gaussian (VOS: 10000) ...
    _C.MODEL.RCDET.VOS.SAMPLE_FROM = 10000
    # ... of which the SELECT least likely are kept as virtual outliers (VOS: 1).
    _C.MODEL.RCDET.VOS.SELECT = 1
    # loss_vos = LOSS_WEIGHT * the logistic regression's cross-entropy (VOS: 0.1).
    _C.MODEL.RCDET.VOS.LOSS_WEIGHT = 0.1
    # Added to the shared covariance's diagonal, so that it is invertible (VOS: 1e-4).
    _C.MODEL.RCDET.VOS.COVARIANCE_EPS = 1e-4

    # The model's own OOD scorer (rcdet.modeling.ood_head): with EMBED_AT_TEST, every detection
    # carries ood_scores (higher: more in-distribution) and, with a calibrated threshold,
    # is_unknown. Its statistics and threshold are buffers, fitted after training with held-out
    # classes or by tools/benchmark_ood.py.
    # The score: msp, max_logit, energy, cosine, knn, gaussian, or auto (cosine with the
    # contrastive branch, msp without).
    _C.MODEL.RCDET.OOD.SCORE = "auto"
    # is_unknown is a score below the one that keeps this fraction, in (0, 1], of the calibration
    # split's ID detections (those that claim a known object, matched as TEST.OOD matches).
    _C.MODEL.RCDET.OOD.ID_RECALL = 0.95
    # The calibration split: "" for DATASETS.TRAIN[0] (the known-class training split, on which
    # detections are more confident than on new images), or a registered split, whose held-out
    # classes are set apart as for DATASETS.TEST.
    _C.MODEL.RCDET.OOD.CALIBRATION_DATASET = ""

    # The OOD evaluation (rcdet.evaluation.OODDetectionEvaluator, tools/benchmark_ood.py); the
    # report records every value it used.
    _C.TEST.OOD = CN()
    # Detections scoring below this (in [0, 1]) are left out of the OOD evaluation.
    _C.TEST.OOD.SCORE_THRESHOLD = 0.05
    # A detection matches its best ground-truth box at IoU >= this, in (0, 1].
    _C.TEST.OOD.MATCH_IOU = 0.5
    # one_per_object: the most confident detection claims each object, the others are
    # duplicates (as detection evaluation matches); all: every matched detection counts.
    _C.TEST.OOD.MATCHING = "one_per_object"
    # The knn score is minus the distance to the k-th nearest training embedding (k >= 1).
    _C.TEST.OOD.KNN_K = 10
    # The gaussian score with one covariance per class instead of one shared covariance.
    _C.TEST.OOD.PER_CLASS_COVARIANCE = False
    # T of the energy score T * logsumexp(f / T) (> 0).
    _C.TEST.OOD.ENERGY_TEMPERATURE = 1.0
    # Bootstrap replicates over test images for the 95% intervals (0: no intervals).
    _C.TEST.OOD.BOOTSTRAP = 1000
    # Seed of the bootstrap resampling.
    _C.TEST.OOD.SEED = 0
    # OOD images of the image-level protocol: a registered dataset, builtin, none, or auto (the
    # built-in set for a held-out split of the built-in dataset, else none).
    _C.TEST.OOD.OOD_DATASET = "auto"
    # Image level: keep detections whose confidence is at least f1_optimal (VOS: the mean over
    # classes of the score at the F1-best recall, COCOeval on the ID images), id_recall_95 (the
    # confidence that keeps 95% of the claimed ID objects) or fixed (IMAGE_MIN_SCORE).
    _C.TEST.OOD.IMAGE_THRESHOLD = "f1_optimal"
    # The image-level confidence threshold of IMAGE_THRESHOLD fixed, in [0, 1].
    _C.TEST.OOD.IMAGE_MIN_SCORE = 0.0

    # A small VGG-style backbone with GroupNorm, for from-scratch CPU training.
    _C.MODEL.TINYNET = CN()
    # Output channels of the stride-4, 8, 16 and 32 stages (s2..s5).
    _C.MODEL.TINYNET.CHANNELS = [32, 64, 128, 192]
    # 3x3 convolutions per stage after its strided one.
    _C.MODEL.TINYNET.DEPTH = [1, 1, 2, 1]
    _C.MODEL.TINYNET.NORM = "GN"
    _C.MODEL.TINYNET.OUT_FEATURES = ["s2", "s3", "s4", "s5"]

    # detectron2's AMPTrainer (SOLVER.AMP.ENABLED) computes in float16 with grad scaling;
    # "bfloat16" selects bfloat16 instead. The RINCE similarities are float32 either way.
    _C.SOLVER.AMP.PRECISION = "float16"


class ConfigError(ValueError):
    """An impossible or inconsistent config; the message names the config key and the fix."""


def check_rcdet_config(cfg) -> None:
    """
    Check the type and range of every ``MODEL.RCDET`` and ``MODEL.RCDET.OOD`` key; raise
    ConfigError naming the key, its value and what is allowed. A key without a rule of its own
    must keep its default's type. Checks that need a file or the dataset (the ranking, the
    temperature count, held-out class names) come where those are read.
    """
    rc = cfg.MODEL.get("RCDET")
    if rc is None:
        raise ConfigError("MODEL.RCDET is missing: call rcdet.add_rcdet_config(cfg) first.")
    defaults = CN({"MODEL": CN(), "SOLVER": CN({"AMP": CN()}), "TEST": CN()})
    add_rcdet_config(defaults)
    rules = {**_rcdet_rules(), **_ood_scorer_rules()}
    for key, default in _flat_keys(defaults.MODEL.RCDET):
        value = _lookup(rc, key)
        if value is _MISSING:
            raise ConfigError(
                f"MODEL.RCDET.{key} is missing: build the config with add_rcdet_config."
            )
        ok, allowed = rules.get(key) or _same_type_rule(default)
        if not ok(value):
            raise ConfigError(f"MODEL.RCDET.{key} = {value!r}; allowed: {allowed}.")
    known = {key for key, _ in _flat_keys(defaults.MODEL.RCDET)}
    for key, _ in _flat_keys(rc):
        if key not in known:
            match = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean MODEL.RCDET.{match[0]}?)" if match else ""
            raise ConfigError(f"MODEL.RCDET.{key} is not an rcdet config key{hint}.")
    if not rc.TAU_MIN < rc.TAU_MAX:
        raise ConfigError(
            f"MODEL.RCDET.TAU_MIN/TAU_MAX = {rc.TAU_MIN!r}/{rc.TAU_MAX!r}; allowed:"
            " 0 < TAU_MIN < TAU_MAX."
        )
    check_exposure_config(cfg)


def check_exposure_config(cfg) -> None:
    """
    The exposure keys against each other and the head (MODEL.RCDET.OOD.EXPOSED_CLASSES,
    REFERENCE): a ConfigError naming the key. The class names are checked against the dataset
    where the split is derived (rcdet.data.held_out).
    """
    from .modeling.reference import REFERENCE_CHOICES

    ood = cfg.MODEL.RCDET.OOD
    if ood.REFERENCE not in REFERENCE_CHOICES:
        raise ConfigError(
            f"MODEL.RCDET.OOD.REFERENCE = {ood.REFERENCE!r}; allowed: one of"
            f" {', '.join(REFERENCE_CHOICES)}."
        )
    exposed, held_out = list(ood.EXPOSED_CLASSES), list(ood.HELD_OUT_CLASSES)
    if not exposed:
        return
    if len(set(exposed)) != len(exposed):
        raise ConfigError(f"MODEL.RCDET.OOD.EXPOSED_CLASSES lists a class twice: {exposed}.")
    both = [c for c in exposed if c in held_out]
    if both:
        raise ConfigError(
            f"MODEL.RCDET.OOD.EXPOSED_CLASSES {both} are also in MODEL.RCDET.OOD.HELD_OUT_CLASSES:"
            " a class is either exposed in training or a test unknown; remove it from one list."
        )
    if not held_out:
        raise ConfigError(
            "MODEL.RCDET.OOD.EXPOSED_CLASSES needs test unknowns: set"
            " MODEL.RCDET.OOD.HELD_OUT_CLASSES to the held-out classes the exposure is tested on."
        )
    reference = ood.REFERENCE
    if reference in ("fixed", "learned") and cfg.MODEL.RCDET.LOSS == "none":
        raise ConfigError(
            f"MODEL.RCDET.OOD.REFERENCE = '{reference}' trains the exposed boxes towards f with the"
            " contrastive loss, but MODEL.RCDET.LOSS is none: choose a contrastive loss, or set"
            " MODEL.RCDET.OOD.REFERENCE background (exposed objects as background)."
        )
    if reference != "removed":
        from detectron2.modeling import ROI_HEADS_REGISTRY

        from .modeling.roi_heads import RankedContrastiveROIHeads

        name = cfg.MODEL.ROI_HEADS.NAME
        head = ROI_HEADS_REGISTRY.get(name) if name in ROI_HEADS_REGISTRY else None
        if head is None or not issubclass(head, RankedContrastiveROIHeads):
            raise ConfigError(
                f"MODEL.RCDET.OOD.EXPOSED_CLASSES with MODEL.ROI_HEADS.NAME {name}: only"
                " RankedContrastiveROIHeads turns the exposed boxes into outliers; set it, or"
                " MODEL.RCDET.OOD.REFERENCE removed (train without them)."
            )


_MISSING = object()


def _flat_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _lookup(node, dotted):
    for part in dotted.split("."):
        if not isinstance(node, CN) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _in_unit_interval(v) -> bool:
    return _is_number(v) and 0 <= v <= 1


def _same_type_rule(default):
    if isinstance(default, bool):
        return (lambda v: isinstance(v, bool)), "True or False"
    if isinstance(default, int):
        return _is_int, "an integer"
    if isinstance(default, float):
        return _is_number, "a finite number"
    if isinstance(default, str):
        return (lambda v: isinstance(v, str)), "a string"
    return (lambda v: isinstance(v, (list, tuple))), "a list"


def _rcdet_rules():
    # Imported here: both modules import this one for ConfigError.
    from .data.held_out import HOLD_OUT_MODES
    from .modeling.reference import REFERENCE_CHOICES
    from .modeling.rince import DEPRECATED_NAMES, VARIANTS

    losses = tuple(VARIANTS) + ("none",)
    # Old names still build saved configs (the loss builder warns and names the new one).
    accepted = losses + tuple(DEPRECATED_NAMES)
    flag = (lambda v: isinstance(v, bool)), "True or False"
    unit = _in_unit_interval, "a number in [0, 1]"
    class_names = (
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(c, str) and c for c in v)
    ), "a list of class names"
    return {
        "LOSS": ((lambda v: isinstance(v, str) and v in accepted), f"one of {', '.join(losses)}"),
        "RANKING_FILE": ((lambda v: isinstance(v, str)), "a path, or '' for none"),
        "RANKING_ALLOW_UNCOVERED": flag,
        "MAX_RANK": ((lambda v: _is_int(v) and v >= 0), "an integer >= 0 (0: every rank)"),
        "TEMPERATURES": (
            lambda v: isinstance(v, (list, tuple))
            and all(_is_number(t) and t > 0 for t in v)
            and all(a < b for a, b in zip(v, v[1:])),
            "a list of positive numbers tau_1 < tau_2 < ..., or [] to derive them",
        ),
        "TAU_MIN": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
        "TAU_MAX": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
        "PROJ_HIDDEN_DIM": (
            (lambda v: _is_int(v) and v >= 0),
            "an integer >= 0 (0: the box head's width)",
        ),
        "EMBED_DIM": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "LOSS_WEIGHT": ((lambda v: _is_number(v) and v >= 0), "a finite number >= 0"),
        "DECAY_STEPS": (
            lambda v: isinstance(v, (list, tuple))
            and all(_is_int(s) and s >= 0 for s in v)
            and len(set(v)) == len(v),
            "a list of distinct iterations >= 0",
        ),
        "DECAY_RATE": unit,
        "IOU_THRESHOLD": unit,
        "REWEIGHT": ((lambda v: v in ("none", "linear", "exp")), "none, linear or exp"),
        "QUEUE_SIZE": ((lambda v: _is_int(v) and v >= 0), "an integer >= 0 (0: no queue)"),
        "QUEUE_IOU_THRESHOLD": unit,
        "QUEUE_CLASS_BALANCED": flag,
        "GATHER": flag,
        "EMBED_AT_TEST": flag,
        "FINETUNE_FROM_OTHER_CLASSES": flag,
        "OOD.HELD_OUT_CLASSES": class_names,
        "OOD.HOLD_OUT_MODE": (
            (lambda v: isinstance(v, str) and v in HOLD_OUT_MODES),
            f"one of {', '.join(HOLD_OUT_MODES)}",
        ),
        "OOD.EXPOSED_CLASSES": class_names,
        "OOD.REFERENCE": (
            (lambda v: isinstance(v, str) and v in REFERENCE_CHOICES),
            f"one of {', '.join(REFERENCE_CHOICES)}",
        ),
    }


def _ood_scorer_rules():
    from .modeling.ood_head import OOD_SCORE_CHOICES

    return {
        "OOD.SCORE": (
            (lambda v: isinstance(v, str) and v in OOD_SCORE_CHOICES),
            f"one of {', '.join(OOD_SCORE_CHOICES)}",
        ),
        "OOD.ID_RECALL": ((lambda v: _is_number(v) and 0 < v <= 1), "a number in (0, 1]"),
        "OOD.CALIBRATION_DATASET": (
            (lambda v: isinstance(v, str)),
            "a registered dataset name, or '' for DATASETS.TRAIN[0]",
        ),
    }
