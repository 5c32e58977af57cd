#!/usr/bin/env python
"""Write the built-in rcdet shapes dataset in PASCAL VOC2007 layout (see rcdet/data/shapes.py)."""

import os
import sys
import time

from rcdet import cli
from rcdet.data.shapes import SPLIT_SIZES, default_root, generate
from rcdet.engine import exit_on_user_error, report_user_errors


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=default_root(), help="output root (VOC layout)")
    parser.add_argument(
        "--seed", type=cli.int_in_range(0), default=0, help="the images drawn follow from it"
    )
    for split in ("train", "val", "test"):
        parser.add_argument(
            f"--{split}",
            type=cli.int_in_range(1),
            default=SPLIT_SIZES[split],
            help=f"images in the {split} split",
        )
    parser.add_argument(
        "--workers",
        type=cli.int_in_range(1),
        default=min(2, os.cpu_count() or 1),
        help="processes that draw the images",
    )
    args = parser.parse_args(argv)
    return report_user_errors(run, args)


def run(args):
    cli.check_output_dir(args.out, "--out")
    start = time.perf_counter()
    splits = generate(
        args.out, args.seed, {"train": args.train, "val": args.val, "test": args.test}, args.workers
    )
    n = len(splits["trainval"]) + len(splits["test"])
    print(
        f"Wrote {n} images to {args.out} in {time.perf_counter() - start:.1f}s "
        f"(trainval {len(splits['trainval'])}, test {len(splits['test'])})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
