"""One OOD benchmark run: load a model, fit (or load cached) embedding statistics, run inference
once for both AP and per-detection scores, match, and write the reports.

Two protocols, each under its own report key:

- ``scores`` (object level, held-out classes of the test split): detections are matched to the
  test split's ground truth as detection evaluation does, one detection per object
  (rcdet.evaluation.matching.match_detections); claimed known objects are ID, claimed held-out
  objects OOD. ``--matching all`` counts every matched detection instead.
- ``image_level`` (VOS, Du et al. ICLR 2022; SIREN, NeurIPS 2022): the test images without
  held-out objects against a separate OOD image set; every detection there is OOD, no matching.

Plus OpenDet2's A-OSE and wilderness impact (rcdet.evaluation.open_set) and bootstrap 95%
intervals over test images (rcdet.evaluation.bootstrap).
"""

import logging
import os
import time
from typing import Dict, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import (
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
    inference_on_dataset,
)
from detectron2.modeling import build_model

from ..checkpoint import load_trained_weights
from ..config import ConfigError
from ..data.datasets import CheckedDatasetMapper
from ..data.ood_images import builtin_ood_dataset
from ..file_io import save_npz_atomic
from .extract import DetectionCollector, embed_ground_truth, file_checksum
from .matching import BACKGROUND, DUPLICATE, ID, MATCHING_MODES, OOD, match_detections
from .metrics import score_report
from .open_set import OPEN_SET_IOU, WI_RECALL_LEVEL, absolute_open_set_error, wilderness_impact
from .report import PROTOCOL_VERSION, write_report_files
from .scores import (
    ALL_SCORES,
    EMBEDDING_SCORES,
    EmbeddingStatistics,
    detector_confidence,
    logit_scores,
)

__all__ = [
    "run_ood_benchmark",
    "resolve_ood_dataset",
    "default_report_name",
    "PROTOCOL_VERSION",
    "KNOWN_AS_OOD_SCORE",
]

logger = logging.getLogger(__name__)
# ood_objects_detected_as_known (not A-OSE, which counts detections): held-out objects
# matched by a known-class detection that scores at least this.
KNOWN_AS_OOD_SCORE = 0.5
# The image-level protocol keeps detections whose confidence keeps this fraction of the claimed
# ID objects (unless --image-min-score is given).
IMAGE_LEVEL_KEEP = 0.95


def _fit_statistics(model, cfg, weights, knn_k, per_class_cov, num_known):
    train_name = cfg.DATASETS.TRAIN[0]
    covariance = "perclass" if per_class_cov else "shared"
    tag = f"{file_checksum(weights)[:16]}_{train_name}_k{knn_k}_{covariance}"
    cache = os.path.join(os.path.dirname(os.path.abspath(weights)), f"ood_stats_{tag}.npz")
    if os.path.isfile(cache):
        logger.info(f"Loading cached OOD statistics from {cache}")
        return EmbeddingStatistics.load(cache)
    gt = embed_ground_truth(model, cfg, train_name, desc="fitting OOD statistics")
    stats = EmbeddingStatistics.fit(
        gt["embeddings"], gt["labels"], num_known, knn_k=knn_k, per_class_covariance=per_class_cov
    )
    stats.save(cache)
    logger.info(f"Cached OOD statistics in {cache}")
    return stats


def resolve_ood_dataset(test_name: str, ood_dataset: Optional[str]) -> Optional[str]:
    """
    The OOD image set of the image-level protocol: ``auto`` (the default) is the built-in set for
    a held-out split of the built-in dataset and none otherwise, ``builtin`` requires it, ``none``
    skips the protocol, and any other value must be a registered detectron2 dataset.
    """
    if ood_dataset in (None, "", "none"):
        return None
    if ood_dataset in ("auto", "builtin"):
        name = builtin_ood_dataset(test_name)
        if name is None and ood_dataset == "builtin":
            raise ConfigError(
                f"--ood-dataset builtin: '{test_name}' is not a held-out split of the built-in"
                " dataset; name a registered OOD dataset instead."
            )
        return name
    if ood_dataset not in DatasetCatalog.list():
        raise ConfigError(
            f"--ood-dataset '{ood_dataset}' is not a registered dataset. Registered datasets: "
            f"{', '.join(sorted(DatasetCatalog.list()))}."
        )
    return ood_dataset


def default_report_name(cfg, output_dir: str) -> str:
    """The output folder's name, or, for the generic ``.../ood``, the config's OUTPUT_DIR name."""
    folder = os.path.basename(os.path.normpath(output_dir))
    if folder and folder != "ood":
        return folder
    run = os.path.basename(os.path.normpath(cfg.OUTPUT_DIR))
    if run and run not in (".", "ood"):
        return run
    return os.path.basename(os.path.dirname(os.path.abspath(output_dir))) or "ood_report"


def _score_records(records, num_known: int, energy_temperature: float, stats) -> Dict:
    """Per-detection OOD scores, detector confidence and record index of a collector's records."""
    table = {n: [] for n in ALL_SCORES}
    conf, record = [], []
    for r, rec in enumerate(records):
        n = len(rec["scores"])
        record.append(np.full(n, r, dtype=np.int64))
        if not n:
            continue
        conf.append(detector_confidence(rec["logits"], num_known))
        for k, v in logit_scores(rec["logits"], num_known, energy_temperature).items():
            table[k].append(v)
        if stats is not None:
            for k, v in stats.scores(rec["embeddings"]).items():
                table[k].append(v)
    out = {
        k: (
            None
            if k in EMBEDDING_SCORES and stats is None
            else (np.concatenate(v) if v else np.zeros(0))
        )
        for k, v in table.items()
    }
    return {
        "scores": out,
        "confidence": np.concatenate(conf) if conf else np.zeros(0),
        "record": np.concatenate(record) if record else np.zeros(0, dtype=np.int64),
    }


def _collect(model, cfg, dataset: str, score_threshold: float, extra_evaluators=()):
    collector = DetectionCollector(score_threshold)
    loader = build_detection_test_loader(cfg, dataset, mapper=CheckedDatasetMapper(cfg, False))
    results = inference_on_dataset(
        model, loader, DatasetEvaluators(list(extra_evaluators) + [collector])
    )
    return collector.records, results


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
    matching: str = "one_per_object",
    ood_dataset: Optional[str] = "auto",
    image_min_score: Optional[float] = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Dict:
    """
    ``cfg`` must be frozen with MODEL.RCDET.EMBED_AT_TEST True and MODEL.WEIGHTS set.

    ``matching``: ``one_per_object`` or ``all`` (see rcdet.evaluation.matching.match_detections).
    ``ood_dataset``: the image-level protocol's OOD images (see resolve_ood_dataset).
    ``image_min_score``: the image-level protocol keeps detections whose confidence is at least
    this; None: the confidence that keeps 95% of the claimed ID objects on the ID images.
    ``bootstrap``: replicates for the 95% intervals (0: none), resampling test images with ``seed``.
    """
    if not cfg.MODEL.RCDET.EMBED_AT_TEST:
        raise ConfigError("MODEL.RCDET.EMBED_AT_TEST must be True for the OOD benchmark.")
    if not cfg.DATASETS.TEST:
        raise ConfigError("DATASETS.TEST is empty; the OOD benchmark needs a test split.")
    if matching not in MATCHING_MODES:
        raise ConfigError(f"--matching '{matching}': choose one of {', '.join(MATCHING_MODES)}.")
    test_name = cfg.DATASETS.TEST[0]
    num_known = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    meta = MetadataCatalog.get(test_name)
    warnings = []
    ood_name = resolve_ood_dataset(test_name, ood_dataset)

    model = build_model(cfg)
    load_trained_weights(model, cfg)
    model.eval()
    has_branch = getattr(model.roi_heads, "projection", None) is not None

    t0 = time.perf_counter()
    stats = (
        _fit_statistics(model, cfg, cfg.MODEL.WEIGHTS, knn_k, per_class_covariance, num_known)
        if has_branch
        else None
    )
    fit_seconds = time.perf_counter() - t0

    plain_seconds = None
    if time_plain_inference:
        # The reference: the same model's ordinary inference + VOC evaluation, EMBED_AT_TEST off.
        model.roi_heads.embed_at_test = False
        t0 = time.perf_counter()
        inference_on_dataset(
            model,
            build_detection_test_loader(cfg, test_name, mapper=CheckedDatasetMapper(cfg, False)),
            PascalVOCDetectionEvaluator(test_name),
        )
        plain_seconds = time.perf_counter() - t0
        model.roi_heads.embed_at_test = True

    evaluators = (
        [PascalVOCDetectionEvaluator(test_name)]
        if meta.get("evaluator_type") == "pascal_voc"
        else []
    )
    t0 = time.perf_counter()
    records, results = _collect(model, cfg, test_name, score_threshold, evaluators)
    inference_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    dicts = DatasetCatalog.get(test_name)
    image_ids = [d["image_id"] for d in dicts]
    position = {iid: i for i, iid in enumerate(image_ids)}
    scored = _score_records(records, num_known, energy_temperature, stats)
    table, confidence = scored["scores"], scored["confidence"]
    status, one, gt_index, images, open_set_images = [], [], [], [], []
    ood_objects_as_known = set()
    offsets = np.r_[0, np.cumsum([len(rec["scores"]) for rec in records])].astype(
        np.int64
    )  # records' detections are contiguous
    for r, rec in enumerate(records):
        d = dicts[position[rec["image_id"]]]
        known, ood = d.get("annotations", []), d.get("ood_annotations", [])
        gt_boxes = np.array([a["bbox"] for a in known + ood], dtype=np.float64).reshape(-1, 4)
        gt_ood = np.array([False] * len(known) + [True] * len(ood), dtype=bool)
        conf = confidence[offsets[r] : offsets[r + 1]]
        st_one, idx = match_detections(
            rec["boxes"], gt_boxes, gt_ood, match_iou, conf, "one_per_object"
        )
        st = (
            st_one
            if matching == "one_per_object"
            else match_detections(rec["boxes"], gt_boxes, gt_ood, match_iou, matching="all")[0]
        )
        status.append(st)
        one.append(st_one)
        gt_index.append(idx)
        images.append(np.full(len(st), position[rec["image_id"]], dtype=np.int64))
        for j in np.flatnonzero((idx >= 0) & (rec["scores"] >= KNOWN_AS_OOD_SCORE)):
            if gt_ood[idx[j]]:
                ood_objects_as_known.add((rec["image_id"], int(idx[j])))
        open_set_images.append(
            {
                "boxes": rec["boxes"],
                "scores": rec["scores"],
                "classes": rec["classes"],
                "gt_boxes": gt_boxes[: len(known)],
                "gt_classes": [a["category_id"] for a in known],
                "unknown_boxes": gt_boxes[len(known) :],
            }
        )

    def cat(parts, dtype=np.int64):
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    status, one, gt_index, images = cat(status), cat(one), cat(gt_index), cat(images)
    num_id_objects = sum(len(d.get("annotations", [])) for d in dicts)
    num_ood_objects = sum(len(d.get("ood_annotations", [])) for d in dicts)
    counts = {
        "id": int((status == ID).sum()),
        "ood": int((status == OOD).sum()),
        "id_objects": num_id_objects,
        "ood_objects": num_ood_objects,
        "duplicates": int((one == DUPLICATE).sum()),
        "background": int((one == BACKGROUND).sum()),
        "detections": int(status.size),
    }
    wi = wilderness_impact(open_set_images, num_known)
    open_set = {
        "a_ose": absolute_open_set_error(open_set_images, score_threshold),
        "wilderness_impact": wi["wi"],
        "wi_recall_level": WI_RECALL_LEVEL,
        "wi_fp_open": wi["fp_open"],
        "wi_tp_plus_fp": wi["tp_plus_fp"],
        "iou": OPEN_SET_IOU,
        "ood_objects_detected_as_known": len(ood_objects_as_known),
        "ood_objects_detected_as_known_score": KNOWN_AS_OOD_SCORE,
    }
    held_out = list(meta.get("held_out_classes", []))
    if not held_out or num_ood_objects == 0:
        warnings.append(
            f"The test set '{test_name}' has no held-out objects (MODEL.RCDET.OOD.HELD_OUT_CLASSES"
            f" = {held_out}): OOD metrics are undefined."
        )
    if status.size == 0:
        warnings.append(
            "The model produced no detections above the score threshold: OOD metrics are undefined."
        )
    elif counts["id"] == 0 or counts["ood"] == 0:
        warnings.append(
            f"Matched detections are all one kind (ID {counts['id']}, OOD {counts['ood']}): OOD"
            " metrics are undefined."
        )
    scores = score_report(
        table,
        status,
        images,
        len(dicts),
        bootstrap,
        seed,
        num_ood_objects=num_ood_objects if matching == "one_per_object" else None,
    )
    scoring_seconds = time.perf_counter() - t0

    defined = not warnings  # the object-level metrics; the image level has its own warnings
    image_level, image_level_raw, ood_seconds = None, None, None
    if ood_name is not None:
        t0 = time.perf_counter()
        image_level, image_level_raw = _image_level(
            model,
            cfg,
            ood_name,
            dicts,
            table,
            confidence,
            images,
            one,
            num_known,
            energy_temperature,
            stats,
            score_threshold,
            image_min_score,
            bootstrap,
            seed,
        )
        warnings += image_level["warnings"]
        ood_seconds = time.perf_counter() - t0
    for w in warnings:
        logger.warning(w)

    report = {
        "name": name or default_report_name(cfg, output_dir),
        "weights": cfg.MODEL.WEIGHTS,
        "test_dataset": test_name,
        "known_classes": list(meta.thing_classes),
        "held_out_classes": held_out,
        "hold_out_mode": cfg.MODEL.RCDET.OOD.HOLD_OUT_MODE if held_out else None,
        "protocol": {
            "version": PROTOCOL_VERSION,
            "matching": matching,
            "match_iou": match_iou,
            "score_threshold": score_threshold,
            "confidence": (
                "max known-class probability, softmax over the K known and the background logits"
            ),
            "bootstrap": {
                "replicates": bootstrap,
                "seed": seed,
                "unit": "test image",
                "interval": "percentile, 95%",
            },
        },
        "higher_score_means": "in-distribution",
        "detection": {k: float(v) for k, v in results.get("bbox", {}).items()},
        "counts": counts,
        "open_set": open_set,
        "defined": defined,
        "warnings": warnings,
        "scores": scores,
        "image_level": image_level,
        "timing_seconds": {
            "fit_statistics": fit_seconds,
            "inference": inference_seconds,
            "scoring": scoring_seconds,
        },
    }
    if ood_seconds is not None:
        report["timing_seconds"]["image_level"] = ood_seconds
    if plain_seconds:
        report["timing_seconds"]["plain_inference"] = plain_seconds
        report["overhead_vs_plain_inference"] = (
            inference_seconds + scoring_seconds
        ) / plain_seconds - 1.0
        report["overhead_vs_plain_inference_with_fit"] = (
            fit_seconds + inference_seconds + scoring_seconds
        ) / plain_seconds - 1.0
    os.makedirs(output_dir, exist_ok=True)
    raw = {k: v for k, v in table.items() if v is not None}
    save_npz_atomic(
        os.path.join(output_dir, "ood_scores.npz"),
        status=status,
        match=one,
        gt_index=gt_index,
        image_index=images,
        image_ids=np.array([str(i) for i in image_ids]),
        boxes=cat([r["boxes"] for r in records], np.float64).reshape(-1, 4),
        classes=cat([r["classes"] for r in records]),
        detection_score=cat([r["scores"] for r in records], np.float64),
        confidence=confidence,
        **raw,
    )
    if image_level_raw is not None:
        save_npz_atomic(os.path.join(output_dir, "ood_image_level_scores.npz"), **image_level_raw)
    il = (
        None
        if image_level_raw is None
        else ({k: image_level_raw.get(k) for k in ALL_SCORES}, image_level_raw["is_id"])
    )
    write_report_files(
        output_dir,
        report,
        table,
        status,
        title=f"OOD ROC: {report['name']} (held out: {', '.join(held_out)})",
        image_level=il,
    )
    return report


def _image_level(
    model,
    cfg,
    ood_name,
    dicts,
    table,
    confidence,
    images,
    one,
    num_known,
    energy_temperature,
    stats,
    score_threshold,
    image_min_score,
    bootstrap,
    seed,
):
    """The VOS/SIREN protocol: detections on the test images without held-out objects (ID) against
    every detection on the OOD image set (OOD), both kept at the same minimum confidence."""
    warnings = []
    known = set(MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes)
    id_images = [i for i, d in enumerate(dicts) if not d.get("ood_annotations")]
    id_pos = np.full(len(dicts), -1, dtype=np.int64)
    id_pos[id_images] = np.arange(len(id_images))
    on_id = id_pos[images] >= 0
    if image_min_score is None:
        claimed = np.sort(confidence[on_id & (one == ID)])[::-1]
        if claimed.size:
            min_score = float(claimed[int(np.ceil(IMAGE_LEVEL_KEEP * claimed.size)) - 1])
            rule = (
                f"the confidence that keeps {IMAGE_LEVEL_KEEP:.0%} of the {claimed.size} claimed ID"
                " objects on the ID images"
            )
        else:
            min_score, rule = (
                float(score_threshold),
                "no claimed ID objects on the ID images: the score threshold",
            )
            warnings.append(
                "Image level: no ID object on the ID images was detected; detections are kept at"
                " the score threshold."
            )
    else:
        min_score, rule = float(image_min_score), "given (--image-min-score)"

    ood_dicts = DatasetCatalog.get(ood_name)
    ood_classes = list(MetadataCatalog.get(ood_name).get("thing_classes", []))
    known_objects = [
        ood_classes[a["category_id"]]
        for d in ood_dicts
        for a in d.get("annotations", [])
        if a["category_id"] < len(ood_classes) and ood_classes[a["category_id"]] in known
    ]
    if known_objects:
        names = ", ".join(sorted(set(known_objects)))
        warnings.append(
            f"The OOD image set '{ood_name}' contains {len(known_objects)} known-class objects"
            f" ({names}); their detections are counted as OOD."
        )
    records, _ = _collect(model, cfg, ood_name, score_threshold)
    ood_scored = _score_records(records, num_known, energy_temperature, stats)
    ood_position = {d["image_id"]: i for i, d in enumerate(ood_dicts)}
    ood_images = np.array(
        [ood_position[records[r]["image_id"]] for r in ood_scored["record"]], dtype=np.int64
    )

    keep_id = on_id & (confidence >= min_score)
    keep_ood = ood_scored["confidence"] >= min_score
    il_table = {
        k: None if v is None else np.concatenate([v[keep_id], ood_scored["scores"][k][keep_ood]])
        for k, v in table.items()
    }
    is_id = np.r_[
        np.ones(int(keep_id.sum()), dtype=bool), np.zeros(int(keep_ood.sum()), dtype=bool)
    ]
    groups = np.r_[id_pos[images[keep_id]], len(id_images) + ood_images[keep_ood]]
    strata = np.r_[
        np.zeros(len(id_images), dtype=np.int64), np.ones(len(ood_dicts), dtype=np.int64)
    ]
    status = np.where(is_id, ID, OOD)
    counts = {"id": int(is_id.sum()), "ood": int((~is_id).sum())}
    if counts["id"] == 0 or counts["ood"] == 0:
        warnings.append(
            f"Image level: the kept detections are all one kind (ID {counts['id']}, OOD"
            f" {counts['ood']}): its metrics are undefined."
        )
    result = {
        "ood_dataset": ood_name,
        "id_images": len(id_images),
        "ood_images": len(ood_dicts),
        "min_score": min_score,
        "min_score_rule": rule,
        "known_class_objects_in_ood_images": len(known_objects),
        "counts": counts,
        "scores": score_report(
            il_table, status, groups, len(id_images) + len(ood_dicts), bootstrap, seed, strata
        ),
        "warnings": warnings,
    }
    raw = {k: v for k, v in il_table.items() if v is not None}
    return result, dict(raw, is_id=is_id, image_index=groups)
