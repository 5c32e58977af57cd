"""
Streaming passes of a trained model over a dataset: embed ground-truth boxes through the box
head and projection, and collect per-detection outputs during normal inference. Neither ever
holds the images in memory; each keeps only small per-box arrays.
"""

import hashlib
from typing import Dict, List

import numpy as np
import torch
import tqdm
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.evaluation import DatasetEvaluator

from ..data.datasets import CheckedDatasetMapper

__all__ = ["file_checksum", "embed_ground_truth", "DetectionCollector"]


def file_checksum(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _gt_mapper(cfg):
    """Test-time resizing, but keep (and transform) the annotations."""
    return CheckedDatasetMapper(
        is_train=True,
        augmentations=[T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)],
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=False,
        recompute_boxes=False,
    )


@torch.no_grad()
def embed_ground_truth(
    model, cfg, dataset, with_features: bool = False, desc: str = ""
) -> Dict[str, np.ndarray]:
    """
    Pool every GT box of ``dataset`` (a registered name or a list of dataset dicts) through the
    box head (and the projection, if the model has one). Returns ``labels`` (category ids as in
    the dataset), ``embeddings`` (or None) and, with ``with_features``, the box-head ``features``.
    """
    heads = model.roi_heads
    dicts = DatasetCatalog.get(dataset) if isinstance(dataset, str) else dataset
    loader = build_detection_test_loader(
        dicts, mapper=_gt_mapper(cfg), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
    labels, embeddings, features = [], [], []
    was_training = model.training
    model.eval()
    for batch in tqdm.tqdm(
        loader, total=len(dicts), desc=desc or "embedding GT boxes", mininterval=2.0
    ):
        instances = [b["instances"].to(model.device) for b in batch]
        if sum(len(i) for i in instances) == 0:
            continue
        images = model.preprocess_image(batch)
        feats = model.backbone(images.tensor)
        pooled = heads.box_pooler(
            [feats[f] for f in heads.box_in_features], [i.gt_boxes for i in instances]
        )
        box_feats = heads.box_head(pooled)
        labels.append(torch.cat([i.gt_classes for i in instances]).cpu().numpy())
        if getattr(heads, "projection", None) is not None:
            embeddings.append(heads.embed(box_feats).cpu().numpy())
        if with_features:
            features.append(box_feats.cpu().numpy())
    model.train(was_training)
    return {
        "labels": np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        "embeddings": np.concatenate(embeddings) if embeddings else None,
        "features": np.concatenate(features) if with_features and features else None,
    }


class DetectionCollector(DatasetEvaluator):
    """Keeps each detection's image id, box, score, class, logits and embedding (CPU numpy)."""

    def __init__(self, score_threshold: float = 0.05):
        self.score_threshold = score_threshold
        self.reset()

    def reset(self):
        self.records: List[dict] = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            keep = inst.scores >= self.score_threshold
            inst = inst[keep]
            fields = inst.get_fields()
            if len(inst) and "pred_logits" not in fields:
                raise RuntimeError(
                    "Detections carry no pred_logits: run with MODEL.RCDET.EMBED_AT_TEST True."
                )
            self.records.append(
                {
                    "image_id": inp["image_id"],
                    "boxes": inst.pred_boxes.tensor.numpy(),
                    "scores": inst.scores.numpy(),
                    "classes": inst.pred_classes.numpy(),
                    "logits": fields["pred_logits"].numpy() if "pred_logits" in fields else None,
                    "embeddings": (
                        fields["pred_embeddings"].numpy() if "pred_embeddings" in fields else None
                    ),
                }
            )

    def evaluate(self):
        return {}
