"""
A streaming pass of a trained model over a dataset that embeds ground-truth boxes through the
box head and projection (never holding the images in memory), and the checksums that key what
is computed from a model and a split: of the weights in memory, of a file, of a split's images
and annotations.
"""

import hashlib
import json
import os
from typing import Dict

import numpy as np
import torch
import tqdm
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data import transforms as T

from ..data.datasets import CheckedDatasetMapper

__all__ = [
    "file_checksum",
    "dataset_digest",
    "model_digest",
    "embed_ground_truth",
]


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
    # Every box, also in a multi-process run: detectron2's default sampler shards by rank.
    loader = build_detection_test_loader(
        dicts,
        mapper=_gt_mapper(cfg),
        sampler=list(range(len(dicts))),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
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


def dataset_digest(dicts) -> str:
    """
    A digest of what a split holds: each image's id, file base name and size, and its (known
    and held-out) annotations' classes and boxes. Another root with other images under the same
    split name gives another digest; moving the same files does not.
    """
    h = hashlib.sha256()
    for d in dicts:
        anns = [
            (a["category_id"], [round(float(v), 3) for v in a["bbox"]])
            for key in ("annotations", "ood_annotations")
            for a in d.get(key, [])
        ]
        item = [
            str(d.get("image_id")),
            os.path.basename(d.get("file_name", "")),
            d.get("height"),
            d.get("width"),
            anns,
        ]
        h.update(json.dumps(item).encode())
    return h.hexdigest()


def model_digest(model) -> str:
    """
    The checksum of a model's weights in memory: its state dict's names, shapes and bytes,
    without the OOD scorer's buffers (rcdet.modeling.ood_head), which are fitted from the rest.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".ood_scorer." in f".{name}":
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()
