"""One OOD benchmark run: load a model, fit (or load cached) embedding statistics, run inference
once for both AP and per-detection scores, match, and write the reports."""

import logging
import os
import time
from typing import Dict, Optional

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import DatasetEvaluators, PascalVOCDetectionEvaluator, inference_on_dataset
from detectron2.modeling import build_model

from ..checkpoint import load_trained_weights
from ..config import ConfigError
from ..data.datasets import CheckedDatasetMapper
from .extract import DetectionCollector, embed_ground_truth, file_checksum
from ..file_io import save_npz_atomic
from .ood import ALL_SCORES, EMBEDDING_SCORES, ID, OOD, UNMATCHED, EmbeddingStatistics, logit_scores, match_detections, score_report, write_report_files

__all__ = ["run_ood_benchmark", "A_OSE_SCORE"]

logger = logging.getLogger(__name__)
# A held-out object counts as an open-set error when a known-class detection scores at least this.
A_OSE_SCORE = 0.5


def _fit_statistics(model, cfg, weights, knn_k, per_class_cov, num_known):
    train_name = cfg.DATASETS.TRAIN[0]
    tag = f"{file_checksum(weights)[:16]}_{train_name}_k{knn_k}_{'perclass' if per_class_cov else 'shared'}"
    cache = os.path.join(os.path.dirname(os.path.abspath(weights)), f"ood_stats_{tag}.npz")
    if os.path.isfile(cache):
        logger.info(f"Loading cached OOD statistics from {cache}")
        return EmbeddingStatistics.load(cache)
    gt = embed_ground_truth(model, cfg, train_name, desc="fitting OOD statistics")
    stats = EmbeddingStatistics.fit(gt["embeddings"], gt["labels"], num_known, knn_k=knn_k, per_class_covariance=per_class_cov)
    stats.save(cache)
    logger.info(f"Cached OOD statistics in {cache}")
    return stats


def run_ood_benchmark(
    cfg,
    output_dir: str,
    score_threshold: float = 0.05,
    knn_k: int = 10,
    per_class_covariance: bool = False,
    energy_temperature: float = 1.0,
    name: Optional[str] = None,
    match_iou: float = 0.5,
    time_plain_inference: bool = False,
) -> Dict:
    """``cfg`` must be frozen with MODEL.RCDET.EMBED_AT_TEST True and MODEL.WEIGHTS set."""
    if not cfg.MODEL.RCDET.EMBED_AT_TEST:
        raise ConfigError("MODEL.RCDET.EMBED_AT_TEST must be True for the OOD benchmark.")
    if not cfg.DATASETS.TEST:
        raise ConfigError("DATASETS.TEST is empty; the OOD benchmark needs a test split.")
    test_name = cfg.DATASETS.TEST[0]
    num_known = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    meta = MetadataCatalog.get(test_name)
    warnings = []

    model = build_model(cfg)
    load_trained_weights(model, cfg)
    model.eval()
    has_branch = getattr(model.roi_heads, "projection", None) is not None

    t0 = time.perf_counter()
    stats = _fit_statistics(model, cfg, cfg.MODEL.WEIGHTS, knn_k, per_class_covariance, num_known) if has_branch else None
    fit_seconds = time.perf_counter() - t0

    plain_seconds = None
    if time_plain_inference:
        # The reference: the same model's ordinary inference + VOC evaluation, EMBED_AT_TEST off.
        model.roi_heads.embed_at_test = False
        t0 = time.perf_counter()
        inference_on_dataset(model, build_detection_test_loader(cfg, test_name, mapper=CheckedDatasetMapper(cfg, False)), PascalVOCDetectionEvaluator(test_name))
        plain_seconds = time.perf_counter() - t0
        model.roi_heads.embed_at_test = True

    collector = DetectionCollector(score_threshold)
    evaluators = [collector]
    if meta.get("evaluator_type") == "pascal_voc":
        evaluators.insert(0, PascalVOCDetectionEvaluator(test_name))
    t0 = time.perf_counter()
    results = inference_on_dataset(model, build_detection_test_loader(cfg, test_name, mapper=CheckedDatasetMapper(cfg, False)), DatasetEvaluators(evaluators))
    inference_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    gts = {d["image_id"]: d for d in DatasetCatalog.get(test_name)}
    status, scores_by_name, det_scores = [], {n: [] for n in ALL_SCORES}, []
    ood_objects_hit, num_ood_objects = set(), 0
    for image_id, d in gts.items():
        num_ood_objects += len(d.get("ood_annotations", []))
    for rec in collector.records:
        d = gts[rec["image_id"]]
        known, ood = d.get("annotations", []), d.get("ood_annotations", [])
        gt_boxes = np.array([a["bbox"] for a in known + ood], dtype=np.float64).reshape(-1, 4)
        gt_ood = np.array([False] * len(known) + [True] * len(ood), dtype=bool)
        st, idx = match_detections(rec["boxes"], gt_boxes, gt_ood, match_iou)
        status.append(st)
        det_scores.append(rec["scores"])
        for j in np.flatnonzero((st == OOD) & (rec["scores"] >= A_OSE_SCORE)):
            ood_objects_hit.add((rec["image_id"], int(idx[j])))
        n = len(st)
        if n:
            for k, v in logit_scores(rec["logits"], num_known, energy_temperature).items():
                scores_by_name[k].append(v)
            if stats is not None:
                for k, v in stats.scores(rec["embeddings"]).items():
                    scores_by_name[k].append(v)
    status = np.concatenate(status) if status else np.zeros(0, dtype=np.int64)
    table = {}
    for k in ALL_SCORES:
        if k in EMBEDDING_SCORES and stats is None:
            table[k] = None  # not available for a model without the branch
        else:
            table[k] = np.concatenate(scores_by_name[k]) if scores_by_name[k] else np.zeros(0)
    scoring_seconds = time.perf_counter() - t0

    counts = {
        "id": int((status == ID).sum()),
        "ood": int((status == OOD).sum()),
        "unmatched": int((status == UNMATCHED).sum()),
        "detections": int(status.size),
        "ood_objects": num_ood_objects,
    }
    held_out = list(meta.get("held_out_classes", []))
    if not held_out or num_ood_objects == 0:
        warnings.append(
            f"The test set '{test_name}' has no held-out objects (MODEL.RCDET.OOD.HELD_OUT_CLASSES = {held_out}): "
            "OOD metrics are undefined."
        )
    if status.size == 0:
        warnings.append("The model produced no detections above the score threshold: OOD metrics are undefined.")
    elif counts["id"] == 0 or counts["ood"] == 0:
        warnings.append(f"Matched detections are all one kind (ID {counts['id']}, OOD {counts['ood']}): OOD metrics are undefined.")
    for w in warnings:
        logger.warning(w)

    report = {
        "name": name or os.path.basename(os.path.normpath(output_dir)),
        "weights": cfg.MODEL.WEIGHTS,
        "test_dataset": test_name,
        "known_classes": list(meta.thing_classes),
        "held_out_classes": held_out,
        "score_threshold": score_threshold,
        "match_iou": match_iou,
        "higher_score_means": "in-distribution",
        "detection": {k: float(v) for k, v in results.get("bbox", {}).items()},
        "counts": counts,
        "a_ose": len(ood_objects_hit),
        "defined": not warnings,
        "warnings": warnings,
        "scores": score_report(table, status),
        "timing_seconds": {"fit_statistics": fit_seconds, "inference": inference_seconds, "scoring": scoring_seconds},
    }
    if plain_seconds:
        report["timing_seconds"]["plain_inference"] = plain_seconds
        report["overhead_vs_plain_inference"] = (inference_seconds + scoring_seconds) / plain_seconds - 1.0
        report["overhead_vs_plain_inference_with_fit"] = (fit_seconds + inference_seconds + scoring_seconds) / plain_seconds - 1.0
    os.makedirs(output_dir, exist_ok=True)
    raw = {k: v for k, v in table.items() if v is not None}
    save_npz_atomic(os.path.join(output_dir, "ood_scores.npz"), status=status,
                    detection_score=np.concatenate(det_scores) if det_scores else np.zeros(0), **raw)
    write_report_files(output_dir, report, table, status, title=f"OOD ROC: {report['name']} (held out: {', '.join(held_out)})")
    return report
