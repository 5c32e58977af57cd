#!/usr/bin/env python
"""
Held-out-class OOD detection benchmark (higher scores mean "more in-distribution").

    python tools/benchmark_ood.py --config-file configs/shapes_rince_ood.yaml \\
        --output output/ood/rince MODEL.WEIGHTS output/shapes_rince_ood/model_final.pth
    python tools/benchmark_ood.py --compare output/ood/softmax output/ood/supcon output/ood/rince \\
        --output output/ood/comparison

Writes ood_report.json, ood_report.csv, ood_scores.npz, roc.png and score_hist.png (atomically),
and, with an OOD image set, roc_image_level.png and ood_image_level_scores.npz; and
model_ood.pth, the weights with the model's own OOD scorer fitted and calibrated (for
tools/predict.py). The protocols
are rcdet.evaluation.evaluator's (docs/ood_benchmark.md); each option below overrides its
TEST.OOD config key. ``--compare`` refuses reports of different protocols or test images.
"""

import argparse
import os
import sys

from detectron2.utils.logger import setup_logger

from rcdet.engine import USER_ERRORS, exit_on_user_error, setup_cfg, user_error_message
from rcdet.evaluation.calibration import MODEL_WITH_SCORER
from rcdet.evaluation.ood_benchmark import run_ood_benchmark
from rcdet.evaluation.report import ReportError, merge_reports

# (flag, TEST.OOD key, type, help)
OPTIONS = [
    ("--score-thresh", "SCORE_THRESHOLD", float, "detections below this score are ignored"),
    ("--match-iou", "MATCH_IOU", float, "a detection matches its best GT at IoU >= this"),
    ("--matching", "MATCHING", str, "one_per_object (as detection evaluation) or all"),
    ("--ood-dataset", "OOD_DATASET", str, "image-level OOD images: NAME, builtin, none or auto"),
    ("--image-threshold", "IMAGE_THRESHOLD", str, "f1_optimal (VOS), id_recall_95 or fixed"),
    ("--image-min-score", "IMAGE_MIN_SCORE", float, "image-level confidence (implies fixed)"),
    ("--bootstrap", "BOOTSTRAP", int, "bootstrap replicates over test images (0: none)"),
    ("--seed", "SEED", int, "seed of the bootstrap resampling"),
    ("--knn-k", "KNN_K", int, "k of the knn score"),
    ("--energy-temperature", "ENERGY_TEMPERATURE", float, "T of the energy score"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="")
    parser.add_argument("--output", default="", help="output folder (default: OUTPUT_DIR/ood)")
    for flag, key, kind, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=None, help=f"{text} (TEST.OOD.{key})")
    parser.add_argument(
        "--per-class-covariance", action="store_true", help="TEST.OOD.PER_CLASS_COVARIANCE True"
    )
    parser.add_argument("--name", default=None, help="run name (default: the output folder's)")
    parser.add_argument("--time-plain", action="store_true", help="also time plain inference")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="merge existing reports")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE)")
    args = parser.parse_args(argv)
    setup_logger(name="rcdet")
    setup_logger(name="detectron2")
    try:
        if args.compare:
            out = args.output or "output/ood_comparison"
            print(merge_reports(args.compare, out))
            print(f"Merged table and ROC figure written to {out}/")
            return 0
        if not args.config_file:
            parser.error("--config-file is required unless --compare is given")
        overrides = [["MODEL.RCDET.EMBED_AT_TEST", "True"]]
        overrides += [
            [f"TEST.OOD.{key}", str(getattr(args, flag[2:].replace("-", "_")))]
            for flag, key, _, _ in OPTIONS
            if getattr(args, flag[2:].replace("-", "_")) is not None
        ]
        if args.image_min_score is not None and args.image_threshold is None:
            overrides.append(["TEST.OOD.IMAGE_THRESHOLD", "fixed"])
        if args.per_class_covariance:
            overrides.append(["TEST.OOD.PER_CLASS_COVARIANCE", "True"])
        cfg = setup_cfg(args.config_file, list(args.opts) + sum(overrides, []))
        out = args.output or f"{cfg.OUTPUT_DIR}/ood"
        report = run_ood_benchmark(cfg, out, args.name, args.time_plain)
    except (FileNotFoundError, ReportError) + USER_ERRORS as e:
        print(f"error: {user_error_message(e)}", file=sys.stderr)
        return 2
    print("\n".join(report.summary_lines()))
    print(f"Report: {out}/ood_report.json; ROC plot: {out}/roc.png")
    if os.path.isfile(os.path.join(out, MODEL_WITH_SCORER)):
        print(f"Model with its fitted OOD scorer (tools/predict.py): {out}/{MODEL_WITH_SCORER}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
