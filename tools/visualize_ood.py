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

import sys

from rcdet import cli
from rcdet.engine import exit_on_user_error, report_user_errors, setup_cfg
from rcdet.evaluation.scores import ALL_SCORES
from rcdet.evaluation.visualize import draw_ood_grid


def argument_parser():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("report_dir", help="folder with ood_report.json and ood_scores.npz")
    parser.add_argument(
        "--score",
        type=cli.choice(ALL_SCORES),
        default=None,
        help="colouring score (default: the best AUROC)",
    )
    parser.add_argument(
        "--num-images", type=cli.int_in_range(1), default=8, help="test images drawn"
    )
    parser.add_argument("--cols", type=cli.int_in_range(1), default=4, help="columns of the grid")
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
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_intermixed_args(argv)
    if args.opts and not args.config_file:
        parser.error(f"config overrides ({args.opts[0]} ...) need the run's --config-file")
    return report_user_errors(run, args)


def run(args):
    if args.output:
        cli.check_output_file(args.output, "--output")
    else:
        cli.check_output_dir(args.report_dir, "REPORT_DIR")
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
    print(f"Grid: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
