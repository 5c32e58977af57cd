#!/usr/bin/env python
"""
Held-out-class OOD detection benchmark (higher scores mean "more in-distribution").

    python tools/benchmark_ood.py --config-file configs/shapes_rince_ood.yaml \\
        --output output/ood/rince MODEL.WEIGHTS output/shapes_rince_ood/model_final.pth
    python tools/benchmark_ood.py --compare output/ood/softmax output/ood/supcon output/ood/rince \\
        --output output/ood/comparison

Writes ood_report.json, ood_report.csv, ood_scores.npz, roc.png and score_hist.png (atomically),
and, with an OOD image set, roc_image_level.png and ood_image_level_scores.npz.

Protocols (rcdet/evaluation/ood_benchmark.py): the object level matches one detection per object
(``--matching all``: every matched detection) and reports AUROC,
FPR95, AUPR-In/Out with bootstrap 95% intervals over test images, the recall of held-out objects
at 95% ID, and OpenDet2's A-OSE and wilderness impact. The image level (VOS/SIREN) scores the test
images without held-out objects against ``--ood-dataset`` (default: the built-in OOD image set
for the built-in dataset; any registered detectron2 dataset, e.g. a COCO subset without VOC
classes, for VOC). ``--compare`` refuses reports from different protocols.
"""

import argparse
import sys

from detectron2.utils.logger import setup_logger

from rcdet.engine import USER_ERRORS, exit_on_user_error, setup_cfg, user_error_message
from rcdet.evaluation.matching import MATCHING_MODES
from rcdet.evaluation.ood_benchmark import run_ood_benchmark
from rcdet.evaluation.report import ReportError, merge_reports


def _interval(entry, key):
    v, ci = entry.get(key), entry.get(f"{key}_ci")
    if not entry["available"]:
        return "n/a"
    if v is None:
        return "undefined"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="")
    parser.add_argument("--output", default="", help="output folder (default: OUTPUT_DIR/ood)")
    parser.add_argument(
        "--score-thresh", type=float, default=0.05, help="detections below this score are ignored"
    )
    parser.add_argument(
        "--match-iou",
        type=float,
        default=0.5,
        help="a detection matches its best GT at IoU >= this",
    )
    parser.add_argument(
        "--matching",
        choices=MATCHING_MODES,
        default="one_per_object",
        help=(
            "one_per_object: the most confident detection claims each object, the others are "
            "duplicates (as detection evaluation); all: every matched detection counts"
        ),
    )
    parser.add_argument(
        "--ood-dataset",
        default="auto",
        metavar="NAME",
        help=(
            "OOD images of the image-level protocol: a registered detectron2 dataset, 'builtin', "
            "'none', or 'auto' (the built-in set for the built-in dataset, else none)"
        ),
    )
    parser.add_argument(
        "--image-min-score",
        type=float,
        default=None,
        help=(
            "image level: keep detections with at least this confidence (default: the confidence "
            "that keeps 95%% of the claimed ID objects)"
        ),
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap replicates over test images (0: no intervals)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument("--knn-k", type=int, default=10)
    parser.add_argument(
        "--per-class-covariance", action="store_true", help="one Gaussian covariance per class"
    )
    parser.add_argument("--energy-temperature", type=float, default=1.0)
    parser.add_argument(
        "--name",
        default=None,
        help=(
            "run name in merged tables (default: the output folder's name, or OUTPUT_DIR's for"
            " .../ood)"
        ),
    )
    parser.add_argument(
        "--time-plain",
        action="store_true",
        help="also time plain inference and report the overhead",
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="DIR", help="merge existing reports instead of running"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS path.pth"
    )
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
        report = run_ood_benchmark(
            cfg,
            out,
            args.score_thresh,
            args.knn_k,
            args.per_class_covariance,
            args.energy_temperature,
            args.name,
            args.match_iou,
            args.time_plain,
            args.matching,
            args.ood_dataset,
            args.image_min_score,
            args.bootstrap,
            args.seed,
        )
    except (FileNotFoundError, ReportError) + USER_ERRORS as e:
        print(f"error: {user_error_message(e)}", file=sys.stderr)
        return 2
    c = report["counts"]
    print(
        f"Object level ({args.matching}): {c['id']} ID and {c['ood']} OOD detections of"
        f" {c['id_objects']} ID and {c['ood_objects']} OOD objects; {c['duplicates']} duplicates,"
        f" {c['background']} background"
    )
    for name, entry in report["scores"].items():
        print(f"{name:>10}: AUROC {_interval(entry, 'auroc')}  FPR95 {_interval(entry, 'fpr95')}")
    o = report["open_set"]
    wi = "undefined" if o["wilderness_impact"] is None else f"{o['wilderness_impact']:.4f}"
    print(f"A-OSE {o['a_ose']}  WI@0.8 {wi}")
    il = report["image_level"]
    if il:
        print(
            f"Image level vs {il['ood_dataset']}: {il['counts']['id']} ID and"
            f" {il['counts']['ood']} OOD detections (confidence >= {il['min_score']:.3f})"
        )
        for name, entry in il["scores"].items():
            print(
                f"{name:>10}: AUROC {_interval(entry, 'auroc')}  FPR95 {_interval(entry, 'fpr95')}"
            )
    if "overhead_vs_plain_inference" in report:
        print(
            f"Overhead over plain inference: {100 * report['overhead_vs_plain_inference']:+.1f}%"
            f" (statistics cached), {100 * report['overhead_vs_plain_inference_with_fit']:+.1f}%"
            " (fitting them)"
        )
    print(f"Report: {out}/ood_report.json; ROC plot: {out}/roc.png")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
