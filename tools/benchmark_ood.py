#!/usr/bin/env python
"""
Held-out-class OOD detection benchmark (higher scores mean "more in-distribution").

    python tools/benchmark_ood.py --config-file configs/shapes_rince_ood.yaml --output output/ood/rince \
        MODEL.WEIGHTS output/shapes_rince_ood/model_final.pth
    python tools/benchmark_ood.py --compare output/ood/softmax output/ood/supcon output/ood/rince \
        --output output/ood/comparison

Writes ood_report.json, ood_report.csv, roc.png and score_hist.png (atomically).
"""

import argparse
import sys

from detectron2.utils.logger import setup_logger

from rcdet.engine import USER_ERRORS, exit_on_user_error, setup_cfg, user_error_message
from rcdet.evaluation.ood import merge_reports
from rcdet.evaluation.ood_benchmark import run_ood_benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="")
    parser.add_argument("--output", default="", help="output folder (default: OUTPUT_DIR/ood)")
    parser.add_argument("--score-thresh", type=float, default=0.05, help="detections below this score are ignored")
    parser.add_argument("--match-iou", type=float, default=0.5, help="a detection matches its best GT at IoU >= this")
    parser.add_argument("--knn-k", type=int, default=10)
    parser.add_argument("--per-class-covariance", action="store_true", help="one Gaussian covariance per class")
    parser.add_argument("--energy-temperature", type=float, default=1.0)
    parser.add_argument("--name", default=None, help="run name in merged tables (default: output folder name)")
    parser.add_argument("--time-plain", action="store_true", help="also time plain inference and report the overhead")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="merge existing reports instead of running")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS path.pth")
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
        cfg = setup_cfg(args.config_file, list(args.opts) + ["MODEL.RCDET.EMBED_AT_TEST", "True"])
        out = args.output or f"{cfg.OUTPUT_DIR}/ood"
        report = run_ood_benchmark(cfg, out, args.score_thresh, args.knn_k, args.per_class_covariance, args.energy_temperature, args.name, args.match_iou, args.time_plain)
    except (FileNotFoundError,) + USER_ERRORS as e:
        print(f"error: {user_error_message(e)}", file=sys.stderr)
        return 2
    for name, entry in report["scores"].items():
        auroc = "n/a" if not entry["available"] else ("undefined" if entry["auroc"] is None else f"{entry['auroc']:.3f}")
        print(f"{name:>10}: AUROC {auroc}")
    if "overhead_vs_plain_inference" in report:
        print(f"Overhead over plain inference: {100 * report['overhead_vs_plain_inference']:+.1f}% "
              f"(statistics cached), {100 * report['overhead_vs_plain_inference_with_fit']:+.1f}% (fitting them)")
    print(f"Report: {out}/ood_report.json; ROC plot: {out}/roc.png")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
