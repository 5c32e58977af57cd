"""
The model's own unknown-object flag (rcdet.modeling.ood_head.OODScorer): its statistics, and
the threshold below which a detection is unknown, calibrated on a split with known-class ground
truth (MODEL.RCDET.OOD.CALIBRATION_DATASET, by default the training split).

The threshold is the score that keeps ``MODEL.RCDET.OOD.ID_RECALL`` (95%) of that split's ID
detections: those at or above TEST.OOD.SCORE_THRESHOLD that claim a known object, matched as the
OOD benchmark matches (TEST.OOD.MATCH_IOU and MATCHING, by the detector's confidence).
"""

import io
import logging
import os
from typing import Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader

from ..config import ConfigError
from ..data.datasets import CheckedDatasetMapper
from ..data.held_out import _held_out_split, parse_held_out_split
from ..file_io import atomic_write
from .evaluator import OODOptions, _unwrap, fit_ood_statistics, ood_outputs
from .matching import ID, match_detections
from .scores import detector_confidence

__all__ = [
    "calibration_split",
    "calibrate_unknown_threshold",
    "fit_ood_scorer",
    "threshold_keeping",
    "save_model_with_scorer",
    "update_checkpoint_model",
    "MODEL_WITH_SCORER",
]

logger = logging.getLogger(__name__)

KEY = "MODEL.RCDET.OOD.CALIBRATION_DATASET"
# The checkpoint tools/benchmark_ood.py writes next to its report: the weights and the fitted
# OOD scorer, for tools/predict.py and DefaultPredictor.
MODEL_WITH_SCORER = "model_ood.pth"


def calibration_split(cfg) -> str:
    """The registered split the threshold is calibrated on (held-out classes set apart)."""
    name = cfg.MODEL.RCDET.OOD.CALIBRATION_DATASET
    if not name:
        if not cfg.DATASETS.TRAIN:
            raise ConfigError(
                f"{KEY} is '' (the training split) and DATASETS.TRAIN is empty: name a split."
            )
        return cfg.DATASETS.TRAIN[0]
    held_out = list(cfg.MODEL.RCDET.OOD.HELD_OUT_CLASSES)
    base = parse_held_out_split(name)
    if (base[0] if base else name) not in DatasetCatalog.list():
        raise ConfigError(f"{KEY} '{name}' is not a registered dataset; name one, or '' for none.")
    ood = cfg.MODEL.RCDET.OOD
    exposed, keep_exposed = list(ood.EXPOSED_CLASSES), ood.REFERENCE != "removed"
    split = _held_out_split(name, held_out, ood.HOLD_OUT_MODE, "test", KEY, exposed, keep_exposed)
    classes = list(MetadataCatalog.get(split).get("thing_classes", []))
    if cfg.DATASETS.TRAIN:
        known = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes)
        if classes != known:
            raise ConfigError(
                f"{KEY} '{name}' has the classes {classes}, the model {known}: name a split of"
                " the training classes."
            )
    return split


@torch.no_grad()
def calibrate_unknown_threshold(model, cfg) -> Optional[float]:
    """
    Run ``model`` over the calibration split and set its OOD scorer's threshold (the score that
    keeps ID_RECALL of the ID detections). Returns it; None (and no threshold) when the split
    has no ID detection. The model runs on this process alone, over every image.
    """
    net = _unwrap(model)
    scorer = net.roi_heads.ood_scorer
    if not scorer.needs_statistics:
        scorer.fill(None)  # a logit score: nothing to fit but the threshold
    if not scorer.ready:
        raise ConfigError(
            f"MODEL.RCDET.OOD.SCORE '{scorer.score}': fit the statistics"
            " (rcdet.evaluation.fit_ood_statistics) before calibrating the threshold."
        )
    opts = OODOptions.from_config(cfg)
    num_known = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    name = calibration_split(cfg)
    dicts = DatasetCatalog.get(name)
    loader = build_detection_test_loader(
        dicts,
        mapper=CheckedDatasetMapper(cfg, False),
        sampler=list(range(len(dicts))),  # every image, also in a multi-process run
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    # A test-mode mapper drops the annotations: the ground truth comes from the dataset dicts.
    by_id = {d["image_id"]: d for d in dicts}
    id_scores = []
    was_training = net.training
    net.eval()
    with ood_outputs(net):
        for batch in loader:
            for inp, out in zip(batch, net(batch)):
                record = by_id[inp["image_id"]]
                id_scores.append(_id_detection_scores(record, out["instances"], num_known, opts))
    net.train(was_training)
    scores = np.concatenate(id_scores) if id_scores else np.zeros(0)
    keep = cfg.MODEL.RCDET.OOD.ID_RECALL
    threshold = threshold_keeping(scores, keep)
    if threshold is None:
        logger.warning(
            f"No detection claims a known object of '{name}' ({KEY}): the OOD scorer gets no"
            " unknown-object threshold, and detections carry no is_unknown."
        )
        scorer.set_threshold(None)
        return None
    scorer.set_threshold(threshold)
    logger.info(
        f"Unknown-object threshold of the {scorer.score} score: {threshold:.6g}, keeping"
        f" {keep:.0%} of the {scores.size} ID detections of '{name}'"
    )
    return threshold


def threshold_keeping(scores, fraction: float) -> Optional[float]:
    """
    The largest threshold t with at least ``fraction`` of ``scores`` >= t: the
    ceil(fraction * n)-th largest score (None for no scores). As the id_recall_95 image-level
    threshold of rcdet.evaluation.evaluator, for a score instead of the confidence.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if s.size == 0:
        return None
    # Rounded first: 0.7 * 10 is 7.000000000000001 in floating point, whose ceiling is 8.
    count = max(1, int(np.ceil(round(fraction * s.size, 9))))
    return float(s[count - 1])


def _id_detection_scores(record, instances, num_known: int, opts: OODOptions) -> np.ndarray:
    """The ood_scores of one image's detections that claim a known object of ``record``."""
    scores = instances.scores.cpu().numpy()
    keep = scores >= opts.score_threshold
    boxes = instances.pred_boxes.tensor.cpu().numpy()[keep]
    logits = instances.pred_logits.cpu().numpy()[keep]
    known, ood = record.get("annotations", []), record.get("ood_annotations", [])
    gt_boxes = np.array([a["bbox"] for a in known + ood], dtype=np.float64).reshape(-1, 4)
    gt_ood = np.array([False] * len(known) + [True] * len(ood), dtype=bool)
    confidence = detector_confidence(logits, num_known)
    status, _ = match_detections(boxes, gt_boxes, gt_ood, opts.match_iou, confidence, opts.matching)
    return instances.ood_scores.cpu().numpy()[keep][status == ID]


def fit_ood_scorer(model, cfg, cache_dir: Optional[str] = None):
    """
    Fit the model's OOD scorer: its statistics (fit_ood_statistics, cached in ``cache_dir``, by
    default OUTPUT_DIR) and its unknown-object threshold. Returns the scorer; None for ROI heads
    without one.
    """
    scorer = getattr(_unwrap(model).roi_heads, "ood_scorer", None)
    if scorer is None:
        return None
    fit_ood_statistics(model, cfg, cache_dir)
    calibrate_unknown_threshold(model, cfg)
    return scorer


def save_model_with_scorer(model, output_dir: str) -> str:
    """
    Write ``output_dir``/model_ood.pth: the model's state dict, its fitted OOD scorer included,
    as detectron2's checkpointer writes a model (``{"model": state_dict}``), atomically. Returns
    the path.
    """
    path = os.path.join(output_dir, MODEL_WITH_SCORER)
    buf = io.BytesIO()
    torch.save({"model": _unwrap(model).state_dict()}, buf)
    atomic_write(path, buf.getvalue())
    return path


def update_checkpoint_model(path: str, model) -> None:
    """
    Replace the model entry of checkpoint ``path`` with ``model``'s state dict (its fitted OOD
    scorer included), keeping the rest (iteration, optimizer, scheduler) as it was saved;
    atomically. Without the file, write the model alone.
    """
    checkpoint = (
        torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else {}
    )
    checkpoint["model"] = _unwrap(model).state_dict()
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    atomic_write(path, buf.getvalue())
