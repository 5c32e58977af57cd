"""
One OOD benchmark run from a checkpoint, as tools/benchmark_ood.py and tools/demo.py run it:
load the model, fit (or load cached) embedding statistics, run inference once with detectron2's
VOC evaluator and the OOD evaluator (rcdet.evaluation.evaluator), and write the report files
with their figures. The protocols and options are the evaluator's (TEST.OOD). The model's own
OOD scorer gets the statistics and its unknown-object threshold (rcdet.evaluation.calibration),
and the model is saved with it as model_ood.pth.
"""

import logging
import os
import time
from typing import Optional

from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
from detectron2.modeling import build_model

from ..checkpoint import load_trained_weights
from ..config import ConfigError
from ..data.datasets import CheckedDatasetMapper
from ..data.held_out import voc_evaluator
from .calibration import calibrate_unknown_threshold, save_model_with_scorer
from .evaluator import (
    OODDetectionEvaluator,
    OODOptions,
    fit_ood_statistics,
    ood_outputs,
    resolve_ood_dataset,
)
from .report import PROTOCOL_VERSION, OODReport, write_report_files

__all__ = ["run_ood_benchmark", "default_report_name", "PROTOCOL_VERSION"]

logger = logging.getLogger(__name__)


def default_report_name(cfg, output_dir: str) -> str:
    """The output folder's name, or, for the generic ``.../ood``, the config's OUTPUT_DIR name."""
    folder = os.path.basename(os.path.normpath(output_dir))
    if folder and folder != "ood":
        return folder
    run = os.path.basename(os.path.normpath(cfg.OUTPUT_DIR))
    if run and run not in (".", "ood"):
        return run
    return os.path.basename(os.path.dirname(os.path.abspath(output_dir))) or "ood_report"


def _loader(cfg, name):
    return build_detection_test_loader(cfg, name, mapper=CheckedDatasetMapper(cfg, False))


def run_ood_benchmark(
    cfg, output_dir: str, name: Optional[str] = None, time_plain_inference: bool = False
) -> OODReport:
    """
    The OOD report of ``cfg.DATASETS.TEST[0]`` for the model in MODEL.WEIGHTS, written with its
    figures to ``output_dir``; the options are ``cfg.TEST.OOD``. The statistics are cached next
    to the weights. ``time_plain_inference`` also times the model's plain inference and VOC
    evaluation and reports the overhead.
    """
    if not cfg.DATASETS.TEST:
        raise ConfigError("DATASETS.TEST is empty; the OOD benchmark needs a test split.")
    test_name = cfg.DATASETS.TEST[0]
    resolve_ood_dataset(test_name, OODOptions.from_config(cfg).ood_dataset)  # before any work
    model = build_model(cfg)
    load_trained_weights(model, cfg)
    model.eval()

    t0 = time.perf_counter()
    cache = os.path.dirname(os.path.abspath(cfg.MODEL.WEIGHTS))
    stats = fit_ood_statistics(model, cfg, cache_dir=cache)
    fit_seconds = time.perf_counter() - t0
    scorer_seconds = None
    if getattr(model.roi_heads, "ood_scorer", None) is not None:
        t0 = time.perf_counter()
        calibrate_unknown_threshold(model, cfg)
        path = save_model_with_scorer(model, output_dir)
        logger.info(f"The model with its fitted OOD scorer: {path}")
        scorer_seconds = time.perf_counter() - t0
    evaluator = OODDetectionEvaluator(test_name, cfg, model=model, statistics=stats)
    voc = MetadataCatalog.get(test_name).get("evaluator_type") == "pascal_voc"

    plain_seconds = None
    if time_plain_inference:
        # The reference: the same model's ordinary inference and VOC evaluation, without logits.
        t0 = time.perf_counter()
        before, model.roi_heads.embed_at_test = model.roi_heads.embed_at_test, False
        inference_on_dataset(model, _loader(cfg, test_name), voc_evaluator(test_name))
        model.roi_heads.embed_at_test = before
        plain_seconds = time.perf_counter() - t0

    evaluators = ([voc_evaluator(test_name)] if voc else []) + [evaluator]
    t0 = time.perf_counter()
    with ood_outputs(model):
        results = inference_on_dataset(
            model, _loader(cfg, test_name), DatasetEvaluators(evaluators)
        )
    seconds = time.perf_counter() - t0

    report = evaluator.report
    report.name = name or default_report_name(cfg, output_dir)
    report.weights = cfg.MODEL.WEIGHTS
    report.detection = {k: float(v) for k, v in results.get("bbox", {}).items()}
    report.timing_seconds = {"fit_statistics": fit_seconds, "inference_and_scoring": seconds}
    if scorer_seconds is not None:
        report.timing_seconds["calibrate_unknown_threshold"] = scorer_seconds
    if plain_seconds:
        report.timing_seconds["plain_inference"] = plain_seconds
        report.timing_seconds["overhead_vs_plain_inference"] = seconds / plain_seconds - 1.0
        report.timing_seconds["overhead_vs_plain_inference_with_fit"] = (
            fit_seconds + seconds
        ) / plain_seconds - 1.0
    write_report_files(output_dir, report, evaluator.arrays)
    return report
