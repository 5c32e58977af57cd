#!/usr/bin/env python
"""
A grid of test images of an OOD benchmark run, drawn with detectron2's Visualizer: detections
outlined in the colour of an OOD score (red: OOD-like, green: ID-like), held-out objects' ground
truth dashed in magenta, duplicates dotted in grey.

    python tools/visualize_ood.py output/demo/ood    # writes output/demo/ood/ood_grid.png
    python tools/visualize_ood.py output/demo/ood --score msp --num-images 12 --output grid.png

Reads the run's ood_report.json and ood_scores.npz (tools/benchmark_ood.py writes them). The
test images are read from the report's test dataset: the built-in dataset and VOC are registered
on import; for another dataset pass the run's --config-file (and overrides) so that it is.
"""

import argparse
import sys

from rcdet.engine import USER_ERRORS, exit_on_user_error, setup_cfg, user_error_message
from rcdet.evaluation.report import ReportError
from rcdet.evaluation.scores import ALL_SCORES
from rcdet.evaluation.visualize import draw_ood_grid


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("report_dir", help="folder with ood_report.json and ood_scores.npz")
    parser.add_argument(
        "--score",
        choices=ALL_SCORES,
        default=None,
        help="colouring score (default: the best AUROC)",
    )
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument(
        "--show-background", action="store_true", help="also draw detections on no object"
    )
    parser.add_argument(
        "--output", default=None, help="PNG path (default: REPORT_DIR/ood_grid.png)"
    )
    parser.add_argument(
        "--config-file", default="", help="the run's config, to register its datasets"
    )
    parser.add_argument(
        "opts", nargs="*", help="config overrides (KEY VALUE ...), with --config-file"
    )
    args = parser.parse_intermixed_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be at least 1")
    try:
        if args.config_file:
            setup_cfg(args.config_file, args.opts)
        path = draw_ood_grid(
            args.report_dir,
            args.output,
            args.score,
            args.num_images,
            args.cols,
            args.show_background,
        )
    except (FileNotFoundError, ReportError) + USER_ERRORS as e:
        print(f"error: {user_error_message(e)}", file=sys.stderr)
        return 2
    print(f"Grid: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
