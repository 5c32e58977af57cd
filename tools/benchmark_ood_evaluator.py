#!/usr/bin/env python
"""
The OOD evaluator's own cost at VOC scale, on synthetic detections (no model, no images): 4952
test images with 20 to 100 detections each (15 known classes, 5 held out), a bank of 40k
training embeddings (128-d), 1000 bootstrap replicates. Times OODDetectionEvaluator.process and
.evaluate (matching, the six scores, open-set metrics, intervals), the kNN search alone with
faiss and with numpy's dense distances (on --search-queries detections), and the peak resident
memory.

    python tools/benchmark_ood_evaluator.py            # the figures in docs/benchmarks.md
    python tools/benchmark_ood_evaluator.py --images 500 --bank 4000
"""

import resource
import sys
import time

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from rcdet import cli
from rcdet.config import add_rcdet_config
from rcdet.engine import exit_on_user_error, report_user_errors
from rcdet.evaluation.evaluator import OODDetectionEvaluator
from rcdet.evaluation.scores import EmbeddingStatistics, kth_neighbour_distance

KNOWN, HELD_OUT, DIM, SIZE = 15, 5, 128, 500


def _boxes(rng, n):
    xy = rng.uniform(0, SIZE - 60, size=(n, 2))
    wh = rng.uniform(20, 60, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def synthetic_split(name, num_images, seed=0):
    """A registered test split with known and held-out ground truth, and per-image outputs."""
    rng = np.random.default_rng(seed)
    dicts, outputs = [], []
    for i in range(num_images):
        known, held = _boxes(rng, rng.integers(1, 6)), _boxes(rng, rng.integers(0, 3))
        dicts.append(
            {
                "image_id": f"{i:06d}",
                "file_name": f"{i:06d}.jpg",
                "height": SIZE,
                "width": SIZE,
                "annotations": [
                    {"bbox": b.tolist(), "category_id": int(rng.integers(KNOWN))} for b in known
                ],
                "ood_annotations": [
                    {"bbox": b.tolist(), "category_id": int(rng.integers(HELD_OUT))} for b in held
                ],
            }
        )
        gt = np.concatenate([known, held])
        n = int(rng.integers(20, 101))
        boxes = gt[rng.integers(len(gt), size=n)] + rng.normal(scale=4.0, size=(n, 4))
        boxes[n // 2 :] = _boxes(rng, n - n // 2)  # half on no object
        inst = Instances((SIZE, SIZE))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor(rng.uniform(0.05, 1.0, size=n), dtype=torch.float32)
        inst.pred_classes = torch.tensor(rng.integers(KNOWN, size=n))
        inst.pred_logits = torch.tensor(rng.normal(size=(n, KNOWN + 1)), dtype=torch.float32)
        emb = rng.normal(size=(n, DIM))
        inst.pred_embeddings = torch.tensor(emb / np.linalg.norm(emb, axis=1, keepdims=True))
        outputs.append(({"image_id": f"{i:06d}"}, {"instances": inst}))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(
        thing_classes=[f"k{c}" for c in range(KNOWN)],
        held_out_classes=[f"h{c}" for c in range(HELD_OUT)],
    )
    return outputs


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--images", type=cli.int_in_range(1), default=4952, help="synthetic test images"
    )
    parser.add_argument(
        "--bank", type=cli.int_in_range(1), default=40000, help="training embeddings"
    )
    parser.add_argument(
        "--bootstrap", type=cli.int_in_range(0), default=1000, help="bootstrap replicates"
    )
    parser.add_argument(
        "--search-queries",
        type=cli.int_in_range(1),
        default=20000,
        help="queries of the kNN search timings",
    )
    args = parser.parse_args(argv)
    return report_user_errors(run, args)


def run(args):
    cfg = get_cfg()
    add_rcdet_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = KNOWN
    cfg.MODEL.RCDET.OOD.HELD_OUT_CLASSES = [f"h{c}" for c in range(HELD_OUT)]
    cfg.TEST.OOD.OOD_DATASET = "none"
    cfg.TEST.OOD.BOOTSTRAP = args.bootstrap
    outputs = synthetic_split("rcdet_synthetic_voc_ood", args.images)
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(args.bank, DIM))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    stats = EmbeddingStatistics.fit(bank, rng.integers(KNOWN, size=args.bank), KNOWN)
    detections = sum(len(o["instances"]) for _, o in outputs)
    print(f"{args.images} images, {detections} detections, bank {args.bank} x {DIM}")
    print(f"peak memory before evaluating: {_peak_mib():.0f} MiB")

    evaluator = OODDetectionEvaluator("rcdet_synthetic_voc_ood", cfg, statistics=stats)
    t0 = time.perf_counter()
    for inp, out in outputs:
        evaluator.process([inp], [out])
    t1 = time.perf_counter()
    result = evaluator.evaluate()
    t2 = time.perf_counter()
    print(f"process: {t1 - t0:.1f} s; evaluate: {t2 - t1:.1f} s; total {t2 - t0:.1f} s")
    print(f"peak memory: {_peak_mib():.0f} MiB; knn AUROC {result['ood']['knn_auroc']:.3f}")

    queries = np.concatenate([o["instances"].pred_embeddings.numpy() for _, o in outputs])
    queries = queries[: args.search_queries]
    for use_faiss in (True, False):
        t0 = time.perf_counter()
        kth_neighbour_distance(queries, stats.bank, stats.knn_k, use_faiss=use_faiss)
        what = "faiss (IndexFlatL2)" if use_faiss else "numpy dense distances"
        print(f"kNN search of {len(queries)} queries, {what}: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
