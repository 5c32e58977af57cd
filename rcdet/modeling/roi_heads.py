"""RankedContrastiveROIHeads: StandardROIHeads plus a RINCE projection branch on the box features."""

import bisect
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

from ..config import ConfigError
from ..ranking import NEGATIVE_RANK, RankingError, load_ranking
from .contrastive_memory import RankedInfoNCEWithMemory
from .memory_queue import EmbeddingQueue
from .rince import RankedInfoNCELoss, iou_reweight, parse_variant, temperatures_from_similarity, validate_temperatures

__all__ = ["RankedContrastiveROIHeads", "build_contrastive_loss"]



def _dataset_classes(cfg):
    """(class names the model predicts, all classes of the base dataset) from the train set."""
    if not cfg.DATASETS.TRAIN:
        raise ConfigError("DATASETS.TRAIN is empty; the contrastive branch needs the training classes.")
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    classes = meta.get("thing_classes", None)
    if classes is None:
        raise ConfigError(f"DATASETS.TRAIN[0] = '{cfg.DATASETS.TRAIN[0]}' has no thing_classes; is it registered?")
    if len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ConfigError(
            f"MODEL.ROI_HEADS.NUM_CLASSES = {cfg.MODEL.ROI_HEADS.NUM_CLASSES}, but "
            f"'{cfg.DATASETS.TRAIN[0]}' has {len(classes)} classes: set it to {len(classes)}."
        )
    return list(classes), list(meta.get("all_classes", classes))


def build_contrastive_loss(cfg) -> Optional[RankedInfoNCELoss]:
    """The loss module for ``MODEL.RCDET``; None when ``MODEL.RCDET.LOSS`` is ``none``."""
    rc = cfg.MODEL.RCDET
    if rc.LOSS == "none":
        return None
    try:
        form, forced_r = parse_variant(rc.LOSS)
    except ValueError as e:
        raise ConfigError(f"MODEL.RCDET.LOSS: {e}") from None
    classes, all_classes = _dataset_classes(cfg)
    similarities = None
    if forced_r == 1 and not rc.RANKING_FILE:
        # SupCon needs no ranking: every other class is a negative.
        matrix = np.full((len(classes), len(classes)), NEGATIVE_RANK, dtype=np.int64)
        np.fill_diagonal(matrix, 1)
    else:
        if not rc.RANKING_FILE:
            raise ConfigError(f"MODEL.RCDET.RANKING_FILE is empty, but MODEL.RCDET.LOSS = {rc.LOSS} needs a ranking.")
        try:
            ranking = load_ranking(
                rc.RANKING_FILE,
                all_classes,
                allow_uncovered=rc.RANKING_ALLOW_UNCOVERED or None,
                max_rank=forced_r or rc.MAX_RANK or None,
            ).subset(classes)
        except RankingError as e:
            raise ConfigError(f"MODEL.RCDET.RANKING_FILE: {e}") from None
        matrix, similarities = ranking.matrix, ranking.rank_similarities
    r = int(matrix.max())
    try:
        if rc.TEMPERATURES:
            if len(rc.TEMPERATURES) < r:
                raise ValueError(f"{len(rc.TEMPERATURES)} values given, but the ranking has {r} ranks.")
            taus = validate_temperatures(rc.TEMPERATURES[:r])
            key = "MODEL.RCDET.TEMPERATURES"
        else:
            if similarities is not None and len(similarities) >= r - 1:
                sims = [1.0] + list(similarities[: r - 1])
            else:
                sims = list(np.linspace(1.0, 0.0, r)) if r > 1 else [1.0]
            taus = temperatures_from_similarity(sims, rc.TAU_MIN, rc.TAU_MAX)
    except ValueError as e:
        key = "MODEL.RCDET.TEMPERATURES" if rc.TEMPERATURES else "MODEL.RCDET.TAU_MIN/TAU_MAX"
        raise ConfigError(f"{key}: {e}") from None
    return RankedInfoNCELoss(torch.as_tensor(matrix), taus, rc.LOSS)


@ROI_HEADS_REGISTRY.register()
class RankedContrastiveROIHeads(StandardROIHeads):
    """
    StandardROIHeads whose box-head features also feed a projection MLP trained with RINCE (or
    SupCon) over per-region class rankings. Anchors are foreground proposals with IoU >=
    ``iou_threshold``; keys are all sampled proposals of the global batch plus a memory queue.
    With ``contrastive_loss=None`` it is exactly StandardROIHeads.
    """

    @configurable
    def __init__(
        self,
        *,
        contrastive_loss: Optional[RankedInfoNCELoss] = None,
        proj_hidden_dim: int = 1024,
        embed_dim: int = 128,
        loss_weight: float = 0.5,
        decay_steps: Sequence[int] = (),
        decay_rate: float = 0.5,
        iou_threshold: float = 0.7,
        reweight: str = "none",
        queue_size: int = 0,
        queue_iou_threshold: float = 0.7,
        queue_class_balanced: bool = False,
        gather: bool = True,
        embed_at_test: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.loss_weight = loss_weight
        self.decay_steps = sorted(decay_steps)
        self.decay_rate = decay_rate
        self.iou_threshold = iou_threshold
        self.reweight = reweight
        self.queue_iou_threshold = queue_iou_threshold
        self.embed_at_test = embed_at_test
        self.projection = None
        self.contrast = None
        if contrastive_loss is None:
            return
        iou_reweight(torch.zeros(1), reweight)  # fails early on an unknown mode
        in_dim = self.box_head.output_shape.channels
        hidden = proj_hidden_dim or in_dim
        # Building new modules consumes random numbers; fork the RNG so that everything built
        # after us initialises exactly as it would with StandardROIHeads.
        with torch.random.fork_rng(devices=[]):
            self.projection = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))
        queue = EmbeddingQueue(queue_size, embed_dim, self.num_classes, queue_class_balanced) if queue_size > 0 else None
        self.contrast = RankedInfoNCEWithMemory(contrastive_loss, queue, gather)

    # TorchScript constants, as detectron2.export.torchscript_patch declares them on
    # StandardROIHeads (annotations are per class), so that scripting compiles away the
    # absent mask and keypoint heads exactly as it does for the base class.
    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]
    # Training state, not part of a scripted (inference) model.
    __jit_unused_properties__ = ["queue"]

    @property
    def queue(self) -> Optional[EmbeddingQueue]:
        return self.contrast.queue if self.contrast is not None else None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        rc = cfg.MODEL.RCDET
        if rc.REWEIGHT not in ("none", "linear", "exp"):
            raise ConfigError(f"MODEL.RCDET.REWEIGHT = '{rc.REWEIGHT}'; choose none, linear or exp.")
        if not 0.0 <= rc.IOU_THRESHOLD <= 1.0 or not 0.0 <= rc.QUEUE_IOU_THRESHOLD <= 1.0:
            raise ConfigError("MODEL.RCDET.IOU_THRESHOLD and QUEUE_IOU_THRESHOLD must lie in [0, 1].")
        if rc.QUEUE_SIZE < 0 or rc.EMBED_DIM <= 0 or rc.PROJ_HIDDEN_DIM < 0:
            raise ConfigError("MODEL.RCDET.QUEUE_SIZE, EMBED_DIM and PROJ_HIDDEN_DIM must be non-negative (EMBED_DIM > 0).")
        ret.update(
            contrastive_loss=build_contrastive_loss(cfg),
            proj_hidden_dim=rc.PROJ_HIDDEN_DIM,
            embed_dim=rc.EMBED_DIM,
            loss_weight=rc.LOSS_WEIGHT,
            decay_steps=tuple(rc.DECAY_STEPS),
            decay_rate=rc.DECAY_RATE,
            iou_threshold=rc.IOU_THRESHOLD,
            reweight=rc.REWEIGHT,
            queue_size=rc.QUEUE_SIZE,
            queue_iou_threshold=rc.QUEUE_IOU_THRESHOLD,
            queue_class_balanced=rc.QUEUE_CLASS_BALANCED,
            gather=rc.GATHER,
            embed_at_test=rc.EMBED_AT_TEST,
        )
        return ret

    @torch.jit.unused
    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances], targets: List[Instances]) -> List[Instances]:
        proposals = super().label_and_sample_proposals(proposals, targets)
        if self.contrast is not None:
            # The IoU of each sampled proposal with the GT it was matched to.
            for p in proposals:
                if p.has("gt_boxes"):
                    p.gt_iou = matched_pairwise_iou(p.proposal_boxes, p.gt_boxes)
                else:
                    p.gt_iou = p.gt_classes.new_zeros(len(p), dtype=torch.float32)
        return proposals

    @torch.jit.unused
    def embed(self, box_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(box_features), dim=1)

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        # No super() on the inference path: TorchScript cannot compile it. These lines are
        # StandardROIHeads' inference path, plus the optional embeddings.
        if self.training:
            assert not torch.jit.is_scripting()
            return self._forward_box_train(features, proposals)
        box_in = [features[f] for f in self.box_in_features]
        box_features = self.box_pooler(box_in, [x.proposal_boxes for x in proposals])
        predictions = self.box_predictor(self.box_head(box_features))
        del box_features
        pred_instances, kept = self.box_predictor.inference(predictions, proposals)
        if self.embed_at_test:
            self._attach_embeddings(box_in, predictions[0], proposals, pred_instances, kept)
        return pred_instances

    @torch.jit.unused
    def _forward_box_train(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        if self.contrast is None:
            return super()._forward_box(features, proposals)
        if self.train_on_pred_boxes:
            raise NotImplementedError("MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported with the contrastive branch.")
        box_in = [features[f] for f in self.box_in_features]
        # StandardROIHeads._forward_box deletes box_features; the branch needs them.
        box_features = self.box_head(self.box_pooler(box_in, [x.proposal_boxes for x in proposals]))
        predictions = self.box_predictor(box_features)
        losses = self.box_predictor.losses(predictions, proposals)
        losses.update(self.contrastive_losses(box_features, proposals))
        return losses

    @torch.jit.unused
    def _attach_embeddings(
        self, features: List[torch.Tensor], logits: torch.Tensor, proposals: List[Instances], pred_instances: List[Instances], kept: List[torch.Tensor]
    ) -> None:
        """
        pred_logits from each detection's proposal; pred_embeddings (branch only) from its final
        box. Written for torch.jit.trace: split sizes come from tensor shapes, which the tracer
        records, never from len() (a Python int, frozen into the trace).
        """
        per_image_logits = logits.split([p.proposal_boxes.tensor.shape[0] for p in proposals])
        for inst, img_logits, idx in zip(pred_instances, per_image_logits, kept):
            inst.pred_logits = img_logits[idx]
        if self.projection is None:
            return
        pooled = self.box_pooler(features, [x.pred_boxes for x in pred_instances])
        embeddings = self.embed(self.box_head(pooled))
        for inst, emb in zip(pred_instances, embeddings.split([x.pred_boxes.tensor.shape[0] for x in pred_instances])):
            inst.pred_embeddings = emb

    @torch.jit.unused
    def current_loss_weight(self, iteration: int) -> float:
        """LOSS_WEIGHT times DECAY_RATE for every decay step already reached (from the iteration, so resumes agree)."""
        return self.loss_weight * self.decay_rate ** bisect.bisect_right(self.decay_steps, iteration)

    @torch.jit.unused
    def contrastive_losses(self, box_features: torch.Tensor, proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        storage = get_event_storage()
        embeddings = self.embed(box_features)
        labels = torch.cat([p.gt_classes for p in proposals])
        ious = torch.cat([p.gt_iou for p in proposals])
        foreground = (labels >= 0) & (labels < self.num_classes)
        anchor_mask = foreground & (ious >= self.iou_threshold)
        # Static bounds from the sampler (at most batch_size_per_image regions and
        # positive_fraction of them foreground per image) keep every shape data-independent.
        out = self.contrast(
            embeddings,
            labels,
            anchor_mask=anchor_mask,
            anchor_weights=iou_reweight(ious, self.reweight),
            enqueue_mask=foreground & (ious >= self.queue_iou_threshold),
            max_anchors=len(proposals) * int(self.batch_size_per_image * self.positive_fraction),
            pad_to=len(proposals) * self.batch_size_per_image,
        )
        self._log_branch_statistics(storage, out, embeddings)
        return {"loss_contrast": out.loss * self.current_loss_weight(storage.iter)}

    @torch.jit.unused
    def _log_branch_statistics(self, storage, out, embeddings):
        """Every rcdet/* scalar in one device-to-host transfer: the step's only sync from rcdet."""
        r = self.contrast.num_ranks
        fill = self.queue.fill_ratio() if self.queue is not None else out.per_rank.new_zeros(())
        stats = torch.cat([
            out.per_rank.detach().float(),
            out.anchor_counts.float(),
            out.mean_similarity.float(),
            torch.stack([out.num_anchors.float(), out.num_keys.float(), fill.float(), torch.isfinite(embeddings).all().float()]),
        ]).tolist()
        per_rank, counts, sims, (num_anchors, num_keys, fill, finite) = stats[:r], stats[r : 2 * r], stats[2 * r : 3 * r + 1], stats[3 * r + 1 :]
        if not finite:
            raise FloatingPointError(
                f"rcdet: the contrastive branch's box embeddings contain Inf/NaN at iteration={storage.iter}. "
                "The box head diverged: lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS, or check the input data."
            )
        storage.put_scalar("rcdet/num_anchors", num_anchors)
        storage.put_scalar("rcdet/num_keys", num_keys)
        if self.queue is not None:
            self.queue.record_fill(fill)
            storage.put_scalar("rcdet/queue_fill", fill)
        for k in range(r):
            storage.put_scalar(f"rcdet/loss_rank{k + 1}", per_rank[k])
            storage.put_scalar(f"rcdet/anchors_rank{k + 1}", counts[k])
        names = [f"sim_rank{k + 1}" for k in range(r)] + ["sim_negative"]
        for name, value in zip(names, sims):
            if math.isfinite(value):
                storage.put_scalar(f"rcdet/{name}", value)
