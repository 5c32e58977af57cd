#!/usr/bin/env python
"""
The main job on the built-in dataset, on the CPU: generate the data if missing, train the RINCE
demo model with two classes held out, evaluate box AP on the known classes, run the OOD
benchmark, and write OUTPUT/metrics.json ({"AP", "AP50", "AP75", "ood": {...}}).

    python tools/demo.py --output output/demo            # what `make demo` runs
"""

import argparse
import os
import sys
import time

from detectron2.engine import default_argument_parser

from rcdet.data.shapes import default_root, generate
from rcdet.engine import USER_ERRORS, Trainer, exit_on_user_error, setup_cfg, user_error_message
from rcdet.file_io import write_json_atomic
from rcdet.evaluation.ood_benchmark import run_ood_benchmark

DEFAULT_CONFIG = "configs/shapes_rince_ood.yaml"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--resume", action="store_true", help="resume training from OUTPUT/train if present")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)

    root = default_root()
    if not os.path.isfile(os.path.join(root, "ImageSets", "Main", "test.txt")):
        print(f"[demo] generating the built-in dataset in {root}")
        generate(root)

    train_dir = os.path.join(args.output, "train")
    d2_args = default_argument_parser().parse_args(["--config-file", args.config_file])
    try:
        # No test set during training: the OOD run below evaluates AP on it once, with the
        # same detectron2 VOC evaluator, instead of the trainer doing it a second time.
        cfg = setup_cfg(args.config_file, list(args.opts) + ["OUTPUT_DIR", train_dir, "DATASETS.TEST", "()"], d2_args)
        start = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        train_seconds = time.perf_counter() - start

        ood_cfg = setup_cfg(
            args.config_file,
            list(args.opts) + ["OUTPUT_DIR", train_dir, "MODEL.WEIGHTS", os.path.join(train_dir, "model_final.pth"),
                               "MODEL.RCDET.EMBED_AT_TEST", "True"],
        )
        ood_dir = os.path.join(args.output, "ood")
        report = run_ood_benchmark(ood_cfg, ood_dir, name="demo")
    except USER_ERRORS as e:
        print(f"error: {user_error_message(e)}", file=sys.stderr)
        return 2

    bbox = report["detection"]
    metrics = {
        "AP": bbox["AP"],
        "AP50": bbox["AP50"],
        "AP75": bbox["AP75"],
        "config": args.config_file,
        "known_classes": report["known_classes"],
        "held_out_classes": report["held_out_classes"],
        "train_seconds": round(train_seconds, 1),
        "train_iterations": cfg.SOLVER.MAX_ITER,
        "ood": {
            name: {"auroc": e["auroc"], "fpr95": e["fpr95"], "aupr_in": e["aupr_in"]}
            for name, e in report["scores"].items()
            if e["available"]
        },
        "ood_counts": report["counts"],
        "a_ose": report["a_ose"],
    }
    path = os.path.join(args.output, "metrics.json")
    write_json_atomic(path, metrics)
    print(f"\n[demo] known-class box AP {bbox['AP']:.1f}, AP50 {bbox['AP50']:.1f}, AP75 {bbox['AP75']:.1f} "
          f"({cfg.SOLVER.MAX_ITER} iterations, {train_seconds / 60:.1f} min)")
    for name, e in metrics["ood"].items():
        print(f"[demo] OOD {name:>9}: AUROC {e['auroc']:.3f}  FPR95 {e['fpr95']:.3f}" if e["auroc"] is not None else f"[demo] OOD {name}: undefined")
    print(f"[demo] metrics: {path}")
    print(f"[demo] ROC plot: {os.path.join(ood_dir, 'roc.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
