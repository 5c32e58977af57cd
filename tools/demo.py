#!/usr/bin/env python
"""
The main job on the built-in dataset, on the CPU: generate the data if missing, train the RINCE
demo model with two classes held out, evaluate box AP on the known classes, run the OOD
benchmark (both protocols), draw a grid of test images, and write OUTPUT/metrics.json
({"AP", "AP50", "AP75", "hold_out_mode", "train_images", "ood": {...}, "ood_image_level": {...},
...}).

    python tools/demo.py --output output/demo            # what `make demo` runs
"""

import argparse
import os
import sys
import time

from detectron2.engine import default_argument_parser, hooks

from rcdet import cli
from rcdet.data.shapes import default_root, generate
from rcdet.engine import Trainer, exit_on_user_error, report_user_errors, setup_cfg
from rcdet.evaluation.ood_benchmark import run_ood_benchmark
from rcdet.evaluation.visualize import draw_ood_grid
from rcdet.file_io import write_json_atomic

DEFAULT_CONFIG = "configs/shapes_rince_ood.yaml"


class TrainOnlyTrainer(Trainer):
    """The Trainer without the evaluation DefaultTrainer runs after the last iteration: the OOD
    benchmark evaluates the same test set once, with the same detectron2 VOC evaluator. The
    config keeps DATASETS.TEST, so the saved config.yaml evaluates as it is."""

    def build_hooks(self):
        return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default="output/demo", help="folder for every output")
    parser.add_argument(
        "--resume", action="store_true", help="resume training from OUTPUT/train if present"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    return report_user_errors(run, args)


def run(args):
    cli.check_output_dir(args.output, "--output")
    train_dir = os.path.join(args.output, "train")
    train_opts = list(args.opts) + ["OUTPUT_DIR", train_dir]
    d2_args = default_argument_parser().parse_args(["--config-file", args.config_file] + train_opts)
    root = default_root()
    if not os.path.isfile(os.path.join(root, "ImageSets", "Main", "test.txt")):
        cli.check_output_dir(root, "$RCDET_SHAPES_ROOT")
        print(f"[demo] generating the built-in dataset in {root}")
        generate(root)

    cfg = setup_cfg(args.config_file, train_opts, d2_args)
    images = training_images(cfg)
    print(f"[demo] {images['line']}")
    start = time.perf_counter()
    trainer = TrainOnlyTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    train_seconds = time.perf_counter() - start

    ood_cfg = setup_cfg(
        args.config_file,
        train_opts
        + [
            "MODEL.WEIGHTS",
            os.path.join(train_dir, "model_final.pth"),
            "MODEL.RCDET.EMBED_AT_TEST",
            "True",
        ],
    )
    ood_dir = os.path.join(args.output, "ood")
    report = run_ood_benchmark(ood_cfg, ood_dir, name="demo").to_dict()
    grid = draw_ood_grid(ood_dir)

    bbox = report["detection"]
    metrics = {
        "AP": bbox["AP"],
        "AP50": bbox["AP50"],
        "AP75": bbox["AP75"],
        "config": args.config_file,
        "known_classes": report["known_classes"],
        "held_out_classes": report["held_out_classes"],
        "hold_out_mode": images["mode"],
        "train_images": images["used"],
        "train_images_available": images["available"],
        "train_seconds": round(train_seconds, 1),
        "train_iterations": cfg.SOLVER.MAX_ITER,
        "ood_protocol": report["protocol"],
        "ood": _ood_section(report["scores"]),
        "ood_counts": report["counts"],
        "open_set": report["open_set"],
        "placement": report.get("placement"),
        "ood_image_level": (
            None
            if not report["image_level"]
            else {
                "ood_dataset": report["image_level"]["ood_dataset"],
                "counts": report["image_level"]["counts"],
                "min_score": report["image_level"]["min_score"],
                "scores": _ood_section(report["image_level"]["scores"]),
            }
        ),
    }
    path = os.path.join(args.output, "metrics.json")
    write_json_atomic(path, metrics)
    print(
        f"\n[demo] known-class box AP {bbox['AP']:.1f}, AP50 {bbox['AP50']:.1f}, AP75"
        f" {bbox['AP75']:.1f} ({cfg.SOLVER.MAX_ITER} iterations, {train_seconds / 60:.1f} min)"
    )
    print(f"[demo] {images['line']}")
    c = report["counts"]
    print(
        f"[demo] OOD, one detection per object: {c['id']} ID and {c['ood']} OOD detections"
        f" ({c['id_objects']} ID and {c['ood_objects']} OOD objects; {c['duplicates']} duplicates"
        " left out)"
    )
    for name, e in metrics["ood"].items():
        print(f"[demo] OOD {name:>14}: AUROC {_with_ci(e, 'auroc')}  FPR95 {_with_ci(e, 'fpr95')}")
    o = report["open_set"]
    print(
        f"[demo] open set: A-OSE {o['a_ose']}, wilderness impact at recall 0.8 "
        + ("undefined" if o["wilderness_impact"] is None else f"{o['wilderness_impact']:.4f}")
    )
    if metrics["placement"]:
        p = metrics["placement"]
        print(
            "[demo] placement, family accuracy (chance): "
            + "; ".join(
                f"{name} "
                + ", ".join(f"{m} {_fraction(e['family_accuracy'][m])}" for m in p["methods"])
                + f" ({_fraction(e['chance'])})"
                for name, e in p["classes"].items()
            )
        )
    if metrics["ood_image_level"]:
        il = metrics["ood_image_level"]
        print(
            f"[demo] image level vs {il['ood_dataset']}: "
            + ", ".join(f"{name} AUROC {_with_ci(e, 'auroc')}" for name, e in il["scores"].items())
        )
    print(f"[demo] metrics: {path}")
    print(f"[demo] ROC plot: {os.path.join(ood_dir, 'roc.png')}")
    print(f"[demo] detections on test images: {grid}")
    return 0


def training_images(cfg) -> dict:
    """How many training images the hold-out mode left, of how many, as a sentence too."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = cfg.DATASETS.TRAIN[0]
    meta = MetadataCatalog.get(name)
    used = len(DatasetCatalog.get(name))
    held = list(meta.get("held_out_classes", []))
    if not held:
        return {
            "mode": None,
            "used": used,
            "available": used,
            "line": f"training on all {used} images of {name}",
        }
    mode, base = cfg.MODEL.RCDET.OOD.HOLD_OUT_MODE, meta.base_dataset
    available = len(DatasetCatalog.get(base))
    what = (
        "every image showing " + " or ".join(held) + " removed"
        if mode == "drop_images"
        else "all images kept, "
        + " and ".join(held)
        + " objects unlabelled (learned as background)"
    )
    return {
        "mode": mode,
        "used": used,
        "available": available,
        "line": (
            f"hold-out mode {mode}: training on {used} of the {available} images of {base} ({what})"
        ),
    }


def _ood_section(scores: dict) -> dict:
    keys = ("auroc", "auroc_ci", "fpr95", "fpr95_ci", "aupr_in")
    return {name: {k: e.get(k) for k in keys} for name, e in scores.items() if e["available"]}


def _fraction(v) -> str:
    return "undefined" if v is None else f"{v:.3f}"


def _with_ci(e: dict, key: str) -> str:
    if e[key] is None:
        return "undefined"
    ci = e.get(f"{key}_ci")
    return f"{e[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
