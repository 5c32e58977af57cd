#!/usr/bin/env python
"""
Does the learned embedding follow the ranking? Pools the ground-truth boxes of a dataset split
through the trained box head and projection (streamed), then writes to --output:

  analysis.json               all numbers (outliers per level, R@1, ranking fidelity, Spearman)
  tsne_class.png              t-SNE coloured by class, marker by group (held-out classes: black x)
  tsne_group.png              t-SNE coloured by group
  centroid_similarity.png     class-centroid cosine similarity, ordered by group
  box_features_*.png          the same for the box-head features (--pre-projection)

    python tools/analyze_embeddings.py --config-file configs/shapes_rince_ood.yaml \\
        --output output/analysis/rince MODEL.WEIGHTS output/demo/train/model_final.pth
"""

import argparse
import difflib
import os
import sys

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from rcdet import cli
from rcdet.analysis import analyse, plot_centroid_similarity, plot_tsne, tsne_2d
from rcdet.checkpoint import load_trained_weights
from rcdet.config import ConfigError
from rcdet.data.held_out import register_split_by_name
from rcdet.engine import exit_on_user_error, report_user_errors, setup_cfg
from rcdet.evaluation.extract import embed_ground_truth
from rcdet.file_io import write_json_atomic
from rcdet.ranking import load_ranking


def dataset_with_held_out(name):
    """Dicts whose annotations include held-out objects (labels K + j), and the class names."""
    meta = MetadataCatalog.get(name)
    known, held = list(meta.thing_classes), list(meta.get("held_out_classes", []))
    dicts = []
    for d in DatasetCatalog.get(name):
        extra = [
            dict(a, category_id=len(known) + a["category_id"]) for a in d.get("ood_annotations", [])
        ]
        dicts.append(dict(d, annotations=list(d.get("annotations", [])) + extra))
    return dicts, known, held


def resolve_dataset(cfg, name=None):
    """The registered split to embed: ``name`` (--dataset), else DATASETS.TEST[0]."""
    if name is None:
        if not cfg.DATASETS.TEST:
            raise ConfigError("DATASETS.TEST is empty: name the split to embed with --dataset.")
        return cfg.DATASETS.TEST[0]
    # A held-out split (as analysis.json or a saved config names it) is derived on demand.
    derived = register_split_by_name(name, cfg.MODEL.RCDET.OOD.HOLD_OUT_MODE)
    if derived is not None:
        return derived
    if name in DatasetCatalog.list():
        return name

    def all_classes(split):
        meta = MetadataCatalog.get(split)
        return meta.get("all_classes", meta.get("thing_classes", None))

    registered = sorted(DatasetCatalog.list())
    match = difflib.get_close_matches(name, registered, n=1)
    # detectron2 registers COCO, LVIS, Cityscapes, ... too: list only this dataset's splits.
    same = [n for n in registered if all_classes(n) == all_classes(cfg.DATASETS.TRAIN[0])]
    raise ConfigError(
        f"--dataset '{name}' is not a registered dataset."
        + (f" Did you mean '{match[0]}'?" if match else "")
        + f" Registered splits with the classes of DATASETS.TRAIN: {', '.join(same)}."
    )


def run(cfg, output, dataset=None, pre_projection=False, max_tsne=2000, tsne=True, title=""):
    dataset = resolve_dataset(cfg, dataset)
    model = build_model(cfg)
    load_trained_weights(model, cfg)
    dicts, known, held = dataset_with_held_out(dataset)
    names = known + held
    ranking, group_levels, groups0 = None, [], list(names)
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    if cfg.MODEL.RCDET.RANKING_FILE:
        all_classes = list(meta.get("all_classes", meta.thing_classes))
        try:
            full = load_ranking(
                cfg.MODEL.RCDET.RANKING_FILE,
                all_classes,
                allow_uncovered=cfg.MODEL.RCDET.RANKING_ALLOW_UNCOVERED or None,
            )
        except ValueError as e:
            raise ConfigError(f"MODEL.RCDET.RANKING_FILE: {e}") from None
        ranking = full.subset(known)
        ordered = full.subset(names)
        group_levels = [ordered.group_labels(level) for level in range(len(ordered.groups))]
        if group_levels:
            groups0 = group_levels[0]
    gt = embed_ground_truth(
        model, cfg, dicts, with_features=pre_projection or model.roi_heads.projection is None
    )
    spaces = {}
    if gt["embeddings"] is not None:
        spaces["projection"] = gt["embeddings"]
    if gt["features"] is not None:
        spaces["box_features"] = gt["features"]
    labels = gt["labels"]
    report = {
        "dataset": dataset,
        "weights": cfg.MODEL.WEIGHTS,
        "class_names": names,
        "held_out_classes": held,
        "group_levels": group_levels,
        "ranking_file": cfg.MODEL.RCDET.RANKING_FILE,
        "num_boxes_per_class": {n: int((labels == i).sum()) for i, n in enumerate(names)},
        "spaces": {},
    }
    os.makedirs(output, exist_ok=True)
    for space, values in spaces.items():
        report["spaces"][space] = analyse(
            values,
            labels,
            known,
            ranking.matrix if ranking else None,
            [np.asarray(level)[: len(known)] for level in group_levels],
        )
        prefix = "" if space == "projection" else "box_features_"
        fid = report["spaces"][space]["ranking_fidelity"]
        if fid is not None:
            plot_centroid_similarity(
                np.asarray(fid["centroid_similarity"]),
                known,
                groups0[: len(known)],
                os.path.join(output, f"{prefix}centroid_similarity.png"),
                f"{title} {space}".strip(),
            )
        if tsne and len(labels) > 5:
            pts, idx = tsne_2d(values, max_points=max_tsne)
            plot_tsne(
                pts,
                labels[idx],
                names,
                groups0,
                os.path.join(output, f"{prefix}tsne_class.png"),
                os.path.join(output, f"{prefix}tsne_group.png"),
                held_out=held,
                title=f"{title} {space}".strip(),
            )
            np.savez(
                os.path.join(output, f"{prefix}tsne_points.npz"), points=pts, labels=labels[idx]
            )
    write_json_atomic(os.path.join(output, "analysis.json"), report)
    return report


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", default="", help="default: OUTPUT_DIR/analysis")
    parser.add_argument(
        "--dataset", default=None, help="dataset split to embed (default: DATASETS.TEST[0])"
    )
    parser.add_argument(
        "--pre-projection", action="store_true", help="also analyse the box-head features"
    )
    # t-SNE needs more points than its perplexity, which is at least 2.
    parser.add_argument(
        "--max-tsne", type=cli.int_in_range(3), default=2000, help="t-SNE subsample size"
    )
    parser.add_argument("--no-tsne", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_logger(name="rcdet")
    return report_user_errors(_main, args)


def _main(args):
    cfg = setup_cfg(args.config_file, args.opts)
    out = args.output or os.path.join(cfg.OUTPUT_DIR, "analysis")
    cli.check_output_dir(out, "--output" if args.output else "OUTPUT_DIR")
    report = run(cfg, out, args.dataset, args.pre_projection, args.max_tsne, not args.no_tsne)
    for space, res in report["spaces"].items():
        fid = res["ranking_fidelity"]
        print(
            f"[{space}] outliers: "
            + ", ".join(
                f"{k} {v['count']} ({100 * v['fraction']:.1f}%)" for k, v in res["outliers"].items()
            )
        )
        print(
            f"[{space}] R@1: " + ", ".join(f"{k} {v:.3f}" for k, v in res["retrieval_r1"].items())
        )
        if fid:
            print(
                f"[{space}] mean similarity: "
                + ", ".join(
                    f"{k} {v:.3f}" for k, v in fid["mean_similarity"].items() if v is not None
                )
                + f"; Spearman {fid['spearman']}"
            )
    print(f"Wrote {out}/analysis.json")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
