"""
The OOD benchmark as a detectron2 ``DatasetEvaluator``: it runs inside ``inference_on_dataset``,
so ``Trainer.test``, ``TEST.EVAL_PERIOD``, ``--eval-only`` and multi-GPU evaluation all report
it. Its options are the ``TEST.OOD`` config keys (rcdet/config.py).

Two protocols, each under its own report key:

- ``scores`` (object level, held-out classes of the test split): detections are matched to the
  test split's ground truth as detection evaluation does, one detection per object
  (rcdet.evaluation.matching); claimed known objects are ID, claimed held-out objects OOD.
- ``image_level`` (VOS, Du et al. ICLR 2022; SIREN, NeurIPS 2022): detections on the test images
  without held-out objects against every detection on a separate OOD image set, both kept above
  one confidence threshold (by default VOS's F1-optimal one, rcdet.evaluation.coco_threshold).

Plus OpenDet2's A-OSE and wilderness impact (rcdet.evaluation.open_set) and bootstrap 95%
intervals over test images (rcdet.evaluation.bootstrap).
"""

import contextlib
import itertools
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.engine import HookBase
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError
from ..data.datasets import CheckedDatasetMapper
from ..data.ood_images import builtin_ood_dataset
from ..modeling.reference import reference_vector
from ..ranking import RankingError, load_ranking
from .coco_threshold import f1_optimal_threshold
from .extract import dataset_digest, embed_ground_truth, model_digest
from .matching import BACKGROUND, DUPLICATE, ID, MATCHING_MODES, OOD, match_detections
from .metrics import score_report
from .open_set import OPEN_SET_IOU, WI_RECALL_LEVEL, absolute_open_set_error, wilderness_impact
from .placement import (
    held_out_families,
    nearest_known_classes,
    placement_section,
    ranking_scores,
    sibling_indices,
)
from .report import PROTOCOL_VERSION, OODReport
from .scores import (
    EMBEDDING_SCORES,
    RANKING_SCORES,
    EmbeddingStatistics,
    detector_confidence,
    logit_scores,
)

__all__ = [
    "OODOptions",
    "OODDetectionEvaluator",
    "OODStatisticsHook",
    "IMAGE_THRESHOLD_RULES",
    "fit_ood_statistics",
    "resolve_ood_dataset",
    "ood_outputs",
    "ood_evaluation_configured",
]

logger = logging.getLogger(__name__)
# ood_objects_detected_as_known (not A-OSE, which counts detections): held-out objects
# matched by a known-class detection that scores at least this.
KNOWN_AS_OOD_SCORE = 0.5
# The id_recall_95 image threshold keeps this fraction of the claimed ID objects.
IMAGE_LEVEL_KEEP = 0.95
IMAGE_THRESHOLD_RULES = ("f1_optimal", "id_recall_95", "fixed")


@dataclass(frozen=True)
class OODOptions:
    """The ``TEST.OOD`` keys, checked: each wrong value is a ConfigError naming its key."""

    score_threshold: float
    match_iou: float
    matching: str
    knn_k: int
    per_class_covariance: bool
    energy_temperature: float
    bootstrap: int
    seed: int
    ood_dataset: str
    image_threshold: str
    image_min_score: float

    @classmethod
    def from_config(cls, cfg) -> "OODOptions":
        o = cfg.TEST.OOD
        opts = cls(
            float(o.SCORE_THRESHOLD),
            float(o.MATCH_IOU),
            str(o.MATCHING),
            int(o.KNN_K),
            bool(o.PER_CLASS_COVARIANCE),
            float(o.ENERGY_TEMPERATURE),
            int(o.BOOTSTRAP),
            int(o.SEED),
            str(o.OOD_DATASET),
            str(o.IMAGE_THRESHOLD),
            float(o.IMAGE_MIN_SCORE),
        )
        checks = [
            ("SCORE_THRESHOLD", 0.0 <= opts.score_threshold <= 1.0, "in [0, 1]"),
            ("MATCH_IOU", 0.0 < opts.match_iou <= 1.0, "in (0, 1]"),
            ("MATCHING", opts.matching in MATCHING_MODES, "one of " + ", ".join(MATCHING_MODES)),
            ("KNN_K", opts.knn_k >= 1, "an integer >= 1"),
            ("ENERGY_TEMPERATURE", opts.energy_temperature > 0, "> 0"),
            ("BOOTSTRAP", opts.bootstrap >= 0, "an integer >= 0 (0: no intervals)"),
            (
                "IMAGE_THRESHOLD",
                opts.image_threshold in IMAGE_THRESHOLD_RULES,
                "one of " + ", ".join(IMAGE_THRESHOLD_RULES),
            ),
            ("IMAGE_MIN_SCORE", 0.0 <= opts.image_min_score <= 1.0, "in [0, 1]"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                value = getattr(o, key)
                raise ConfigError(f"TEST.OOD.{key} = {value!r}: must be {allowed}.")
        return opts

    def as_dict(self) -> Dict:
        return asdict(self)


def ood_evaluation_configured(cfg) -> bool:
    """Whether the config holds classes out, so that evaluation reports OOD too."""
    return bool(cfg.MODEL.RCDET.OOD.HELD_OUT_CLASSES)


def resolve_ood_dataset(test_name: str, ood_dataset: Optional[str]) -> Optional[str]:
    """
    The OOD image set of the image-level protocol (TEST.OOD.OOD_DATASET): ``auto`` is the
    built-in set for a held-out split of the built-in dataset and none otherwise, ``builtin``
    requires it, ``none`` skips the protocol, and any other value must be a registered dataset.
    """
    if ood_dataset in (None, "", "none"):
        return None
    if ood_dataset in ("auto", "builtin"):
        name = builtin_ood_dataset(test_name)
        if name is None and ood_dataset == "builtin":
            raise ConfigError(
                f"TEST.OOD.OOD_DATASET builtin: '{test_name}' is not a held-out split of the"
                " built-in dataset; name a registered OOD dataset instead."
            )
        return name
    if ood_dataset not in DatasetCatalog.list():
        raise ConfigError(
            f"TEST.OOD.OOD_DATASET '{ood_dataset}' is not a registered dataset. Registered"
            f" datasets: {', '.join(sorted(DatasetCatalog.list()))}."
        )
    return ood_dataset


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def has_embedding_branch(model) -> bool:
    return getattr(_unwrap(model).roi_heads, "projection", None) is not None


@contextlib.contextmanager
def ood_outputs(model):
    """Detections carry their logits and embeddings (MODEL.RCDET.EMBED_AT_TEST) inside."""
    heads = _unwrap(model).roi_heads
    before = heads.embed_at_test
    heads.embed_at_test = True
    try:
        yield
    finally:
        heads.embed_at_test = before


def fit_ood_statistics(model, cfg, cache_dir: Optional[str] = None):
    """
    The embedding statistics (rcdet.evaluation.scores.EmbeddingStatistics) of ``model``, fitted
    on the GT boxes of ``cfg.DATASETS.TRAIN[0]``; None for a model without the embedding branch.
    Cached in ``cache_dir`` (default OUTPUT_DIR) under a key of what they were computed from:
    the weights' checksum, a digest of the training split's image ids and annotations, k and the
    covariance kind. Another model, or other images under the same split name, fit anew.
    The model's OOD scorer (rcdet.modeling.ood_head), if it has one, takes them into its buffers.
    """
    if not has_embedding_branch(model):
        return None
    stats = _fit_or_load_statistics(model, cfg, cache_dir)
    scorer = getattr(_unwrap(model).roi_heads, "ood_scorer", None)
    if scorer is not None and scorer.needs_statistics:
        scorer.fill(stats)
    return stats


def _fit_or_load_statistics(model, cfg, cache_dir: Optional[str]) -> EmbeddingStatistics:
    opts = OODOptions.from_config(cfg)
    train_name = cfg.DATASETS.TRAIN[0]
    dicts = DatasetCatalog.get(train_name)
    covariance = "perclass" if opts.per_class_covariance else "shared"
    tag = (
        f"{model_digest(_unwrap(model))[:16]}_{dataset_digest(dicts)[:16]}"
        f"_k{opts.knn_k}_{covariance}"
    )
    cache = os.path.join(cache_dir or cfg.OUTPUT_DIR, f"ood_stats_{tag}.npz")
    if os.path.isfile(cache):
        stats = EmbeddingStatistics.load(cache)
        # A cache written without the bank's classes cannot place objects by kNN: fit again.
        if stats.bank_labels is not None:
            logger.info(f"Loading cached OOD statistics from {cache}")
            return stats
    gt = embed_ground_truth(_unwrap(model), cfg, dicts, desc="fitting OOD statistics")
    stats = EmbeddingStatistics.fit(
        gt["embeddings"],
        gt["labels"],
        cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        knn_k=opts.knn_k,
        per_class_covariance=opts.per_class_covariance,
        reference=reference_vector(_unwrap(model)),
    )
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    stats.save(cache)
    logger.info(f"Cached OOD statistics in {cache}")
    return stats


class OODStatisticsHook(HookBase):
    """
    After training, fit (and cache) the OOD statistics of the trained model and calibrate its
    OOD scorer's unknown-object threshold (rcdet.evaluation.calibration), then write them into
    model_final.pth (its model entry; the training state stays as saved).
    """

    def __init__(self, cfg):
        self.cfg = cfg

    def after_train(self):
        # after_train also runs when training stopped early (an error, Ctrl-C): only a finished
        # model gets statistics, as detectron2's EvalHook only evaluates one.
        finished = self.trainer.iter + 1 >= self.trainer.max_iter
        if finished and comm.is_main_process():
            # Imported here: calibration imports this module.
            from .calibration import fit_ood_scorer, update_checkpoint_model

            scorer = fit_ood_scorer(self.trainer.model, self.cfg)
            if scorer is None:
                fit_ood_statistics(self.trainer.model, self.cfg)
            elif scorer.ready:
                # The periodic checkpointer saved model_final before this hook ran.
                path = os.path.join(self.trainer.checkpointer.save_dir, "model_final.pth")
                update_checkpoint_model(path, self.trainer.model)


def _records_of(inputs, outputs, score_threshold: float) -> List[Dict]:
    records = []
    for inp, out in zip(inputs, outputs):
        fields = out["instances"].get_fields()
        if "pred_logits" not in fields:
            raise ConfigError(
                "The OOD evaluation needs each detection's logits: set MODEL.RCDET.EMBED_AT_TEST"
                " True (rcdet's Trainer.test does it for you)."
            )
        # Plain arrays, masked with numpy: cheaper than indexing the Instances.
        scores = fields["scores"].detach().cpu().numpy()
        keep = scores >= score_threshold

        def kept(name):
            return fields[name].detach().cpu().numpy()[keep] if name in fields else None

        records.append(
            {
                "image_id": inp["image_id"],
                "boxes": fields["pred_boxes"].tensor.detach().cpu().numpy()[keep],
                "scores": scores[keep],
                "classes": kept("pred_classes"),
                "logits": kept("pred_logits"),
                "embeddings": kept("pred_embeddings"),
            }
        )
    return records


def _stacked(records, key: str, width: int) -> np.ndarray:
    """Every detection's ``key`` row (logits, embeddings) of ``records``, in order."""
    found = [r for r in records if len(r["scores"])]
    return np.concatenate([r[key] for r in found]) if found else np.zeros((0, width))


def _score_records(records, num_known: int, opts: OODOptions) -> Dict:
    """The logit scores and detector confidence of every detection of ``records``, in order."""
    logits = _stacked(records, "logits", num_known + 1)
    return {
        "scores": logit_scores(logits, num_known, opts.energy_temperature),
        "confidence": detector_confidence(logits, num_known),
    }


def _embedding_scores(
    records, stats, needed: np.ndarray, siblings=None
) -> Dict[str, Optional[np.ndarray]]:
    """
    The embedding scores and, with ``siblings`` (each known class's rank-2 known classes), the
    ranking scores of the ``needed`` detections of ``records`` (NaN for the others; None without
    statistics or siblings). Only detections a metric uses are scored: the kNN search over the
    bank is the evaluation's largest cost, and it grows with the detections searched.
    """
    out = {k: None for k in EMBEDDING_SCORES + RANKING_SCORES}
    if stats is None:
        return out
    emb = _stacked(records, "embeddings", stats.bank.shape[1])
    # One call over every needed detection: the search runs over the bank once, not per image.
    computed = dict(stats.scores(emb[needed]))
    if siblings is not None:
        computed.update(ranking_scores(emb[needed], stats.prototypes, siblings))
    for k, v in computed.items():
        out[k] = np.full(len(emb), np.nan)
        out[k][needed] = v
    return out


def family_ranking(cfg, test_name: str, warnings: List[str]):
    """
    The full ranking (MODEL.RCDET.RANKING_FILE, read for every class of the base dataset, the
    held-out ones included, and never truncated: rank 2 is what the placement's families and the
    ranking scores read); None, with a warning appended, when the key is empty or its file
    cannot be read for these classes. A warning, not an error: a softmax model never read the
    key in training, and its OOD metrics do not need it.
    """
    path = cfg.MODEL.RCDET.RANKING_FILE
    left_out = (
        f"so the placement's family accuracy and the ranking scores ({', '.join(RANKING_SCORES)})"
        " are left out"
    )
    if not path:
        warnings.append(
            f"MODEL.RCDET.RANKING_FILE is empty: no class families, {left_out}; set it to the"
            " dataset's ranking (configs/rankings/shapes_families.yaml for the built-in data)."
        )
        return None
    meta = MetadataCatalog.get(test_name)
    classes = list(meta.get("all_classes", meta.thing_classes))
    try:
        return load_ranking(
            path, classes, allow_uncovered=cfg.MODEL.RCDET.RANKING_ALLOW_UNCOVERED or None
        )
    except RankingError as e:
        warnings.append(f"MODEL.RCDET.RANKING_FILE: {e} No class families, {left_out}.")
        return None


def _placement_report(records, stats, ood_class, claimed, held_out, known, ranking, warnings):
    """
    The report's ``placement`` section (where the claimed held-out objects land) and, per
    placement method, the nearest known class of every detection (-1 where not a claimed
    held-out object), for ood_scores.npz: the study's paired tests of family accuracy use them.
    """
    families = (
        held_out_families(ranking, held_out, known, warnings)
        if ranking is not None
        else {h: None for h in held_out}
    )
    logits = _stacked(records, "logits", len(known) + 1)[claimed]
    embeddings = None
    if stats is not None:
        embeddings = _stacked(records, "embeddings", stats.bank.shape[1])[claimed]
        if stats.bank_labels is None:
            warnings.append(
                "The OOD statistics hold no class of their bank entries (cached by an older rcdet):"
                " the kNN placement is left out; delete the cached ood_stats_*.npz to fit them"
                " again."
            )
    nearest = nearest_known_classes(logits, len(known), embeddings, stats)
    section = placement_section(
        ood_class[claimed],
        held_out,
        known,
        families,
        nearest,
        None if stats is None else stats.knn_k,
    )
    placed = {}
    for method, classes in nearest.items():
        placed[f"placed_{method}"] = np.full(len(claimed), -1, dtype=np.int64)
        placed[f"placed_{method}"][claimed] = classes
    report = {
        "ranking": None if ranking is None else ranking.source,
        "unit": "claimed held-out object (one detection per object)",
        **section,
    }
    return report, placed


def _cat(parts, dtype=np.int64):
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class OODDetectionEvaluator(DatasetEvaluator):
    """
    The OOD benchmark of ``dataset_name`` (a test split with held-out classes, an OOD image set
    in TEST.OOD.OOD_DATASET, or both). ``process`` keeps each image's detections, logits and
    embeddings; ``evaluate`` gathers them from every worker and, on the main process, matches,
    scores and computes the metrics and intervals. It returns ``{"ood": {...}}``, flat numbers
    that detectron2 prints and logs (NaN where undefined); the full report is ``self.report``
    (an OODReport) with the per-detection arrays in ``self.arrays``, and, with ``output_dir``,
    ood_report.json/.csv and ood_scores.npz there.

    The embedding scores need statistics: ``statistics``, or fitted from ``model``
    (fit_ood_statistics), which also runs the image-level protocol's OOD images.
    """

    def __init__(
        self,
        dataset_name: str,
        cfg,
        *,
        model=None,
        statistics: Optional[EmbeddingStatistics] = None,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        ood_images: bool = False,
    ):
        self.dataset_name = dataset_name
        self.cfg = cfg
        self.options = OODOptions.from_config(cfg)
        self.num_known = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.model = model
        self.statistics = statistics
        self.output_dir = output_dir
        self.distributed = distributed
        self.ood_images = ood_images
        self.held_out = list(MetadataCatalog.get(dataset_name).get("held_out_classes", []))
        self.ood_name = (
            None if ood_images else resolve_ood_dataset(dataset_name, self.options.ood_dataset)
        )
        if not ood_images and not self.held_out and self.ood_name is None:
            raise ConfigError(
                f"OOD evaluation of '{dataset_name}': it has no held-out classes and no OOD image"
                " set is configured; set MODEL.RCDET.OOD.HELD_OUT_CLASSES or TEST.OOD.OOD_DATASET."
            )
        if self.ood_name is not None and model is None:
            raise ConfigError(
                f"TEST.OOD.OOD_DATASET '{self.ood_name}': the image-level protocol runs the model"
                " on those images; give the evaluator the model (or set TEST.OOD.OOD_DATASET none)."
            )
        self.reset()

    def reset(self):
        self._records: List[Dict] = []
        self.report: Optional[OODReport] = None
        self.arrays: Dict[str, Dict[str, np.ndarray]] = {}

    def process(self, inputs, outputs):
        self._records.extend(_records_of(inputs, outputs, self.options.score_threshold))

    def _gathered(self) -> Optional[List[Dict]]:
        """Every worker's records on the main process, in dataset order; None elsewhere."""
        records = self._records
        if self.distributed and comm.get_world_size() > 1:
            comm.synchronize()
            records = list(itertools.chain(*comm.gather(records, dst=0)))
            if not comm.is_main_process():
                return None
        # Inference samplers may pad or reorder: one record per image, in the dataset's order.
        position = {d["image_id"]: i for i, d in enumerate(DatasetCatalog.get(self.dataset_name))}
        unique = {r["image_id"]: r for r in records}
        return sorted(unique.values(), key=lambda r: position[r["image_id"]])

    def evaluate(self):
        records = self._gathered()
        if self.ood_images:
            self.records = records
            return {}
        ood_records = None
        if self.ood_name is not None:
            # Every worker runs its share of the OOD images; the same evaluator collects them.
            collector = OODDetectionEvaluator(
                self.ood_name, self.cfg, distributed=self.distributed, ood_images=True
            )
            loader = build_detection_test_loader(
                self.cfg, self.ood_name, mapper=CheckedDatasetMapper(self.cfg, False)
            )
            with ood_outputs(self.model):
                inference_on_dataset(self.model, loader, collector)
            ood_records = collector.records
        if records is None:
            return {}
        stats = self.statistics
        if stats is None and self.model is not None:
            stats = fit_ood_statistics(self.model, self.cfg)
        self.report, self.arrays = build_report(
            self.cfg, self.dataset_name, records, stats, self.ood_name, ood_records
        )
        if self.output_dir:
            from .report import write_report_files

            write_report_files(self.output_dir, self.report, self.arrays, figures=False)
        return {"ood": self.report.flat_metrics()}


def build_report(cfg, test_name: str, records, stats, ood_name=None, ood_records=None):
    """``(OODReport, arrays)`` of a test split's records and, with them, the OOD images'."""
    opts = OODOptions.from_config(cfg)
    num_known = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    meta = MetadataCatalog.get(test_name)
    dicts = DatasetCatalog.get(test_name)
    position = {d["image_id"]: i for i, d in enumerate(dicts)}
    scored = _score_records(records, num_known, opts)
    table, confidence = scored["scores"], scored["confidence"]
    status, one, gt_index, images, open_set_images, ood_class = [], [], [], [], [], []
    ood_objects_as_known = set()
    start = 0
    for rec in records:
        d = dicts[position[rec["image_id"]]]
        known, ood = d.get("annotations", []), d.get("ood_annotations", [])
        gt_boxes = np.array([a["bbox"] for a in known + ood], dtype=np.float64).reshape(-1, 4)
        gt_ood = np.array([False] * len(known) + [True] * len(ood), dtype=bool)
        conf = confidence[start : start + len(rec["scores"])]
        start += len(rec["scores"])
        st_one, idx = match_detections(
            rec["boxes"], gt_boxes, gt_ood, opts.match_iou, conf, "one_per_object"
        )
        st = (
            st_one
            if opts.matching == "one_per_object"
            else match_detections(rec["boxes"], gt_boxes, gt_ood, opts.match_iou, matching="all")[0]
        )
        status.append(st)
        one.append(st_one)
        gt_index.append(idx)
        # Each detection's held-out class (an index into held_out_classes) where it reaches a
        # held-out object, else -1.
        ood_class.append(
            np.array(
                [ood[i - len(known)]["category_id"] if i >= len(known) else -1 for i in idx],
                dtype=np.int64,
            ).reshape(-1)
        )
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
    status, one, gt_index, images = _cat(status), _cat(one), _cat(gt_index), _cat(images)
    ood_class = _cat(ood_class)
    num_ood_objects = sum(len(d.get("ood_annotations", [])) for d in dicts)
    counts = {
        "id": int((status == ID).sum()),
        "ood": int((status == OOD).sum()),
        "id_objects": sum(len(d.get("annotations", [])) for d in dicts),
        "ood_objects": num_ood_objects,
        "duplicates": int((one == DUPLICATE).sum()),
        "background": int((one == BACKGROUND).sum()),
        "detections": int(status.size),
    }
    wi = wilderness_impact(open_set_images, num_known)
    open_set = {
        "a_ose": absolute_open_set_error(open_set_images, opts.score_threshold),
        "wilderness_impact": wi["wi"],
        "wi_recall_level": WI_RECALL_LEVEL,
        "wi_fp_open": wi["fp_open"],
        "wi_tp_plus_fp": wi["tp_plus_fp"],
        "iou": OPEN_SET_IOU,
        "ood_objects_detected_as_known": len(ood_objects_as_known),
        "ood_objects_detected_as_known_score": KNOWN_AS_OOD_SCORE,
    }
    held_out = list(meta.get("held_out_classes", []))
    warnings = []
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
    needed = (status == ID) | (status == OOD)
    threshold = None
    if ood_name is not None:
        threshold = image_threshold(cfg, dicts, records, confidence, images, one)
        needed |= _on_id_images(dicts, images) & (confidence >= threshold[0])
    placement_warnings = []
    ranking = (
        family_ranking(cfg, test_name, placement_warnings)
        if stats is not None or held_out
        else None
    )
    known_classes = list(meta.thing_classes)
    siblings = None
    if ranking is not None:
        siblings = sibling_indices(ranking.subset(known_classes))
    table.update(_embedding_scores(records, stats, needed, siblings))
    scores = score_report(
        table,
        status,
        images,
        len(dicts),
        opts.bootstrap,
        opts.seed,
        num_ood_objects=num_ood_objects if opts.matching == "one_per_object" else None,
    )
    defined = not warnings  # the object level's; the image level has its own warnings
    image_level, image_arrays = None, None
    if ood_name is not None:
        image_level, image_arrays = image_level_report(
            cfg, test_name, dicts, table, confidence, images, threshold, stats, ood_name,
            ood_records, siblings,
        )  # fmt: skip
        warnings += image_level["warnings"]
    placement, placed = None, {}
    if held_out:
        placement, placed = _placement_report(
            records, stats, ood_class, one == OOD, held_out, known_classes, ranking,
            placement_warnings,
        )  # fmt: skip
        placement["warnings"] = placement_warnings
    warnings += placement_warnings
    for w in warnings:
        logger.warning(w)
    report = OODReport(
        name=os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)),
        weights=cfg.MODEL.WEIGHTS,
        test_dataset=test_name,
        known_classes=list(meta.thing_classes),
        held_out_classes=held_out,
        hold_out_mode=cfg.MODEL.RCDET.OOD.HOLD_OUT_MODE if held_out else None,
        protocol={
            "version": PROTOCOL_VERSION,
            "matching": opts.matching,
            "match_iou": opts.match_iou,
            "score_threshold": opts.score_threshold,
            "confidence": (
                "max known-class probability, softmax over the K known and the background logits"
            ),
            "bootstrap": {
                "replicates": opts.bootstrap,
                "seed": opts.seed,
                "unit": "test image",
                "interval": "percentile, 95%",
            },
            "options": {f"TEST.OOD.{k.upper()}": v for k, v in opts.as_dict().items()},
        },
        data={
            "test": dataset_digest(dicts),
            "ood_images": dataset_digest(DatasetCatalog.get(ood_name)) if ood_name else None,
            "statistics": stats is not None,
        },
        counts=counts,
        open_set=open_set,
        defined=defined,
        warnings=warnings,
        scores=scores,
        image_level=image_level,
        placement=placement,
    )
    arrays = {
        "object": dict(
            status=status,
            match=one,
            gt_index=gt_index,
            image_index=images,
            image_ids=np.array([str(d["image_id"]) for d in dicts]),
            boxes=_cat([r["boxes"] for r in records], np.float64).reshape(-1, 4),
            classes=_cat([r["classes"] for r in records]),
            detection_score=_cat([r["scores"] for r in records], np.float64),
            confidence=confidence,
            ood_class=ood_class,
            **{k: v for k, v in table.items() if v is not None},
            **placed,
        )
    }
    if image_arrays is not None:
        arrays["image"] = image_arrays
    return report, arrays


def _ood_images_kept(ood_name: str, known: set):
    """The OOD images without a known-class object (as VOS's process_coco_ood.py keeps them)."""
    classes = list(MetadataCatalog.get(ood_name).get("thing_classes", []))
    dicts = DatasetCatalog.get(ood_name)
    keep, dropped_objects = [], 0
    for i, d in enumerate(dicts):
        names = [classes[a["category_id"]] for a in d.get("annotations", [])]
        found = sum(n in known for n in names)
        dropped_objects += found
        if not found:
            keep.append(i)
    return dicts, keep, dropped_objects


def _on_id_images(dicts, images) -> np.ndarray:
    """Whether each detection lies on an ID image: a test image without held-out objects."""
    on_id = np.array([not d.get("ood_annotations") for d in dicts], dtype=bool)
    return on_id[images] if len(images) else np.zeros(0, dtype=bool)


def image_threshold(cfg, dicts, records, confidence, images, one):
    """``(min_score, rule, warnings)``: the image level's confidence threshold (IMAGE_THRESHOLD)."""
    opts = OODOptions.from_config(cfg)
    num_known = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    warnings = []
    id_images = [i for i, d in enumerate(dicts) if not d.get("ood_annotations")]
    on_id = _on_id_images(dicts, images)
    if opts.image_threshold == "fixed":
        return opts.image_min_score, "fixed (TEST.OOD.IMAGE_MIN_SCORE)", warnings
    if opts.image_threshold == "f1_optimal":
        position = {d["image_id"]: i for i, d in enumerate(dicts)}
        id_set = set(id_images)
        id_records = [r for r in records if position[r["image_id"]] in id_set]
        min_score = f1_optimal_threshold([dicts[i] for i in id_images], id_records, num_known)
        if min_score is not None:
            rule = (
                "f1_optimal: mean over known classes of the detection score at the F1-optimal"
                " recall (COCOeval, IoU 0.5:0.95, 100 detections) on the ID images, as VOS"
            )
            return min_score, rule, warnings
        warnings.append(
            "Image level: the F1-optimal threshold is undefined (no detection matches a known"
            " object on the ID images); detections are kept at the score threshold."
        )
        rule = "f1_optimal undefined (no ID detection on a known object): the score threshold"
        return opts.score_threshold, rule, warnings
    claimed = np.sort(confidence[on_id & (one == ID)])[::-1]
    if claimed.size:
        min_score = float(claimed[int(np.ceil(IMAGE_LEVEL_KEEP * claimed.size)) - 1])
        rule = (
            f"id_recall_95: the confidence that keeps {IMAGE_LEVEL_KEEP:.0%} of the"
            f" {claimed.size} claimed ID objects on the ID images"
        )
        return min_score, rule, warnings
    warnings.append(
        "Image level: no ID object on the ID images was detected; detections are kept at the"
        " score threshold."
    )
    return opts.score_threshold, "id_recall_95 undefined (no claimed ID objects)", warnings


def image_level_report(
    cfg,
    test_name,
    dicts,
    table,
    confidence,
    images,
    threshold,
    stats,
    ood_name,
    ood_records,
    siblings=None,
):
    """
    The VOS/SIREN protocol: detections on the test images without held-out objects (ID) against
    every detection on the OOD images without a known-class object (OOD), both kept at the same
    minimum confidence (``threshold``, from image_threshold).
    """
    opts = OODOptions.from_config(cfg)
    num_known = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    min_score, rule, warnings = threshold
    warnings = list(warnings)
    id_images = [i for i, d in enumerate(dicts) if not d.get("ood_annotations")]
    id_pos = np.full(len(dicts), -1, dtype=np.int64)
    id_pos[id_images] = np.arange(len(id_images))
    on_id = _on_id_images(dicts, images)

    known = set(MetadataCatalog.get(test_name).thing_classes)
    ood_dicts, keep, dropped_objects = _ood_images_kept(ood_name, known)
    if len(keep) < len(ood_dicts):
        warnings.append(
            f"Image level: {len(ood_dicts) - len(keep)} of the {len(ood_dicts)} images of"
            f" '{ood_name}' contain {dropped_objects} known-class objects; they are left out."
        )
    ood_position = {ood_dicts[i]["image_id"]: k for k, i in enumerate(keep)}
    ood_records = [r for r in ood_records if r["image_id"] in ood_position]
    ood_scored = _score_records(ood_records, num_known, opts)
    ood_images = _cat([np.full(len(r["scores"]), ood_position[r["image_id"]]) for r in ood_records])
    keep_id = on_id & (confidence >= min_score)
    keep_ood = ood_scored["confidence"] >= min_score
    ood_scored["scores"].update(_embedding_scores(ood_records, stats, keep_ood, siblings))
    il_table = {
        k: None if v is None else np.concatenate([v[keep_id], ood_scored["scores"][k][keep_ood]])
        for k, v in table.items()
    }
    is_id = np.r_[
        np.ones(int(keep_id.sum()), dtype=bool), np.zeros(int(keep_ood.sum()), dtype=bool)
    ]
    groups = np.r_[id_pos[images[keep_id]], len(id_images) + ood_images[keep_ood]]
    strata = np.r_[np.zeros(len(id_images), dtype=np.int64), np.ones(len(keep), dtype=np.int64)]
    counts = {"id": int(is_id.sum()), "ood": int((~is_id).sum())}
    if counts["id"] == 0 or counts["ood"] == 0:
        warnings.append(
            f"Image level: the kept detections are all one kind (ID {counts['id']}, OOD"
            f" {counts['ood']}): its metrics are undefined."
        )
    result = {
        "ood_dataset": ood_name,
        "id_images": len(id_images),
        "ood_images": len(keep),
        "ood_images_dropped": len(ood_dicts) - len(keep),
        "known_class_objects_in_ood_images": dropped_objects,
        "min_score": float(min_score),
        "min_score_rule": rule,
        "threshold_rule": opts.image_threshold,
        "counts": counts,
        "scores": score_report(
            il_table,
            np.where(is_id, ID, OOD),
            groups,
            len(id_images) + len(keep),
            opts.bootstrap,
            opts.seed,
            strata,
        ),
        "warnings": warnings,
    }
    raw = {k: v for k, v in il_table.items() if v is not None}
    return result, dict(raw, is_id=is_id, image_index=groups)
