from detectron2.config import CfgNode as CN

__all__ = ["add_rcdet_config", "ConfigError"]


def add_rcdet_config(cfg):
    """Add the rcdet keys (``MODEL.RCDET``, ``MODEL.TINYNET``) to a detectron2 config."""
    _C = cfg

    _C.MODEL.RCDET = CN()
    # Contrastive loss on the box features: rince_in, rince_out, rince_out_in, supcon_in,
    # supcon_out, or none (the branch is not built; the model equals StandardROIHeads).
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

    _C.MODEL.RCDET.OOD = CN()
    # Classes left out of training; they are the OOD objects at test time.
    _C.MODEL.RCDET.OOD.HELD_OUT_CLASSES = []
    # drop_images: remove training images that contain a held-out object;
    # drop_annotations: keep the images, remove the held-out boxes.
    _C.MODEL.RCDET.OOD.HOLD_OUT_MODE = "drop_images"

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
