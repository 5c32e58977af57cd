#!/usr/bin/env python
"""
Held-out-class OOD detection benchmark (higher scores mean "more in-distribution").

    python tools/benchmark_ood.py --config-file configs/shapes_rince_ood.yaml \\
        --output output/ood/rince MODEL.WEIGHTS output/shapes_rince_ood/model_final.pth
    python tools/benchmark_ood.py --compare output/ood/softmax output/ood/supcon output/ood/rince \\
        --output output/ood/comparison

Writes ood_report.json, ood_report.csv, ood_scores.npz, roc.png and score_hist.png (atomically),
with held-out classes ood_placement.csv and placement.png (where the claimed held-out objects
land, docs/unknown_objects.md), and, with an OOD image set, roc_image_level.png and
ood_image_level_scores.npz; and model_ood.pth, the weights with the model's own OOD scorer
fitted and calibrated (for tools/predict.py). The protocols are rcdet.evaluation.evaluator's
(docs/ood_benchmark.md); each option below overrides its TEST.OOD config key. ``--compare``
refuses reports of different protocols or test images.
"""

import argparse
import os
import sys

from detectron2.utils.logger import setup_logger

from rcdet import cli
from rcdet.engine import exit_on_user_error, report_user_errors, setup_cfg
from rcdet.evaluation.calibration import MODEL_WITH_SCORER
from rcdet.evaluation.evaluator import IMAGE_THRESHOLD_RULES
from rcdet.evaluation.matching import MATCHING_MODES
from rcdet.evaluation.ood_benchmark import run_ood_benchmark
from rcdet.evaluation.report import merge_reports

# (flag, TEST.OOD key, argparse type, help). The ranges are those the evaluator checks each
# TEST.OOD key against (rcdet.evaluation.evaluator.OODOptions), so a flag out of range is named
# as the flag the user typed; --ood-dataset is checked there, once the config has registered
# the run's datasets.
OPTIONS = [
    (
        "--score-thresh",
        "SCORE_THRESHOLD",
        cli.float_in_range(0.0, 1.0),
        "detections below this score are ignored",
    ),
    (
        "--match-iou",
        "MATCH_IOU",
        cli.float_in_range(0.0, 1.0, lo_open=True),
        "a detection matches its best GT at IoU >= this",
    ),
    ("--matching", "MATCHING", cli.choice(MATCHING_MODES), "as detection evaluation, or all"),
    ("--ood-dataset", "OOD_DATASET", str, "image-level OOD images: NAME, builtin, none or auto"),
    (
        "--image-threshold",
        "IMAGE_THRESHOLD",
        cli.choice(IMAGE_THRESHOLD_RULES),
        "f1_optimal is VOS's rule",
    ),
    (
        "--image-min-score",
        "IMAGE_MIN_SCORE",
        cli.float_in_range(0.0, 1.0),
        "image-level confidence (implies fixed)",
    ),
    (
        "--bootstrap",
        "BOOTSTRAP",
        cli.int_in_range(0),
        "bootstrap replicates over test images (0: none)",
    ),
    ("--seed", "SEED", cli.int_in_range(0), "seed of the bootstrap resampling"),
    ("--knn-k", "KNN_K", cli.int_in_range(1), "k of the knn score"),
    (
        "--energy-temperature",
        "ENERGY_TEMPERATURE",
        cli.float_in_range(0.0, lo_open=True),
        "T of the energy score",
    ),
]


def argument_parser():
    parser = cli.ArgumentParser(description=__doc__)
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
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if not args.compare and not args.config_file:
        parser.error("--config-file is required unless --compare is given")
    if args.compare and args.opts:
        parser.error(
            f"--compare merges finished reports; it takes no config overrides ({args.opts[0]} ...)"
        )
    setup_logger(name="rcdet")
    setup_logger(name="detectron2")
    return report_user_errors(run, args)


def run(args):
    if args.compare:
        out = cli.check_output_dir(args.output or "output/ood_comparison", "--output")
        print(merge_reports(args.compare, out))
        print(f"Merged table and ROC figure written to {out}/")
        return 0
    if args.output:
        cli.check_output_dir(args.output, "--output")
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
    out = args.output or cli.check_output_dir(f"{cfg.OUTPUT_DIR}/ood", "OUTPUT_DIR")
    report = run_ood_benchmark(cfg, out, args.name, args.time_plain)
    print("\n".join(report.summary_lines()))
    print(f"Report: {out}/ood_report.json; ROC plot: {out}/roc.png")
    if report.placement:
        print(f"Placement: {out}/ood_placement.csv; figure: {out}/placement.png")
    if os.path.isfile(os.path.join(out, MODEL_WITH_SCORER)):
        print(f"Model with its fitted OOD scorer (tools/predict.py): {out}/{MODEL_WITH_SCORER}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
