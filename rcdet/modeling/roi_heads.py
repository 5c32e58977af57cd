"""
RankedContrastiveROIHeads: StandardROIHeads plus a RINCE projection branch on the box features,
and optionally VOS (virtual outlier synthesis) on the same features.
"""

import bisect
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n
from torch import nn
from torch.nn import functional as F

from ..config import check_rcdet_config
from ..data.held_out import training_classes
from .contrastive_memory import RankedInfoNCEWithMemory
from .memory_queue import EmbeddingQueue
from .ood_head import OODScorer, build_ood_scorer
from .reference import REFERENCE_MODES, ReferenceEmbedding, with_reference_class
from .rince import RankedInfoNCELoss, build_contrastive_loss, iou_reweight
from .vos import VirtualOutlierSynthesis, build_vos

__all__ = ["RankedContrastiveROIHeads"]


@ROI_HEADS_REGISTRY.register()
class RankedContrastiveROIHeads(StandardROIHeads):
    """
    StandardROIHeads whose box-head features also feed a projection MLP trained with RINCE (or
    SupCon) over per-region class rankings. Anchors are foreground proposals with IoU >=
    ``iou_threshold``; keys are all sampled proposals of the global batch plus a memory queue.
    ``vos`` adds VOS's uncertainty loss (rcdet.modeling.vos). With ``contrastive_loss=None``
    and ``vos=None`` it is exactly StandardROIHeads.

    Exposure (``num_exposed`` > 0; docs/unknown_objects.md): GT labels above the background
    label K mark exposed boxes (rcdet.data.datasets.CheckedDatasetMapper gives them K + 1 + j).
    After sampling, their proposals are background for the box classifier, the box regressor and
    VOS, and carry ``gt_exposed``. With ``reference`` (f, a buffer or a parameter, so
    checkpoints carry it) they are also anchors of the contrastive loss whose only positive is
    f, and background keys of every anchor; without it they are background keys only.

    ``ood_scorer`` (rcdet.modeling.ood_head) scores each detection for OOD at test time once it
    holds statistics (its state dict is empty until then).
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
        vos: Optional[VirtualOutlierSynthesis] = None,
        num_exposed: int = 0,
        reference: Optional[ReferenceEmbedding] = None,
        ood_scorer: Optional[OODScorer] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vos = vos
        self.num_exposed = num_exposed
        if reference is not None:
            if contrastive_loss is None or num_exposed == 0:
                raise ValueError("A reference embedding needs the contrastive loss and exposure.")
            if contrastive_loss.num_classes != self.num_classes + 1:
                raise ValueError(
                    "With a reference embedding the loss's rank matrix has the reference class:"
                    " build it with with_reference_class."
                )
            self.reference = reference
        else:
            self.reference = None
        self.ood_scorer = ood_scorer
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
            self.projection = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim)
            )
        queue = (
            EmbeddingQueue(queue_size, embed_dim, self.num_classes, queue_class_balanced)
            if queue_size > 0
            else None
        )
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
        check_rcdet_config(cfg)
        ret = super().from_config(cfg, input_shape)
        rc = cfg.MODEL.RCDET
        contrastive_loss = None
        if rc.LOSS != "none":
            contrastive_loss = build_contrastive_loss(cfg, *training_classes(cfg))
        # REFERENCE removed: the exposed boxes never reach the model.
        exposed = list(rc.OOD.EXPOSED_CLASSES) if rc.OOD.REFERENCE != "removed" else []
        reference = None
        if exposed and rc.OOD.REFERENCE in REFERENCE_MODES:
            reference = ReferenceEmbedding(rc.EMBED_DIM, rc.OOD.REFERENCE)
            contrastive_loss = RankedInfoNCELoss(
                with_reference_class(contrastive_loss.rank_matrix),
                contrastive_loss.temperatures,
                contrastive_loss.form,
            )
        ret.update(
            contrastive_loss=contrastive_loss,
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
            num_exposed=len(exposed),
            reference=reference,
        )
        shape = ret["box_head"].output_shape
        feature_dim = shape.channels * (shape.height or 1) * (shape.width or 1)
        ret["vos"] = build_vos(cfg, cfg.MODEL.ROI_HEADS.NUM_CLASSES, feature_dim)
        ret["ood_scorer"] = build_ood_scorer(cfg, has_branch=contrastive_loss is not None)
        return ret

    @torch.jit.unused
    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        proposals = super().label_and_sample_proposals(proposals, targets)
        if self.num_exposed:
            # Exposed boxes (labels above background) were sampled as objects; from here on they
            # are background, flagged.
            for p in proposals:
                p.gt_exposed = p.gt_classes > self.num_classes
                p.gt_classes = torch.where(
                    p.gt_exposed, torch.full_like(p.gt_classes, self.num_classes), p.gt_classes
                )
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
            self._attach_ood_scores(pred_instances)
        return pred_instances

    @torch.jit.unused
    def _forward_box_train(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        if self.contrast is None and self.vos is None:
            return super()._forward_box(features, proposals)
        if self.train_on_pred_boxes:
            raise NotImplementedError(
                "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported with the contrastive"
                " branch or VOS."
            )
        box_in = [features[f] for f in self.box_in_features]
        # StandardROIHeads._forward_box deletes box_features; the branch needs them.
        box_features = self.box_head(self.box_pooler(box_in, [x.proposal_boxes for x in proposals]))
        predictions = self.box_predictor(box_features)
        losses = self.box_predictor.losses(predictions, proposals)
        scalars = {}  # device scalars, logged in the step's one transfer
        if self.vos is not None:
            losses.update(self.vos_losses(box_features, predictions[0], proposals, scalars))
        if self.contrast is not None:
            losses.update(self.contrastive_losses(box_features, proposals, scalars))
        else:
            self._log_scalars(get_event_storage(), scalars)
        return losses

    @torch.jit.unused
    def vos_losses(
        self,
        box_features: torch.Tensor,
        logits: torch.Tensor,
        proposals: List[Instances],
        scalars: Dict[str, torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        out = self.vos(
            box_features,
            logits,
            torch.cat([p.gt_classes for p in proposals]),
            lambda x: self.box_predictor(x)[0],
            get_event_storage().iter,
            max_foreground=len(proposals) * int(self.batch_size_per_image * self.positive_fraction),
        )
        scalars.update(out.scalars)
        return {"loss_vos": out.loss}

    @torch.jit.unused
    def _log_scalars(self, storage, scalars: Dict[str, torch.Tensor]) -> None:
        """Log ``rcdet/<name>`` for device scalars, read back in one transfer."""
        if not scalars:
            return
        names = list(scalars)
        for name, value in zip(names, torch.stack([scalars[k].float() for k in names]).tolist()):
            storage.put_scalar(f"rcdet/{name}", value)

    @torch.jit.unused
    def _attach_embeddings(
        self,
        features: List[torch.Tensor],
        logits: torch.Tensor,
        proposals: List[Instances],
        pred_instances: List[Instances],
        kept: List[torch.Tensor],
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
        for inst, emb in zip(
            pred_instances, embeddings.split([x.pred_boxes.tensor.shape[0] for x in pred_instances])
        ):
            inst.pred_embeddings = emb

    @torch.jit.unused
    def _attach_ood_scores(self, pred_instances: List[Instances]) -> None:
        """
        ood_scores (MODEL.RCDET.OOD.SCORE, higher: more in-distribution) and, with a calibrated
        threshold, is_unknown, for every detection; neither while the scorer lacks the statistics
        its score needs.
        """
        scorer = self.ood_scorer
        if scorer is None:
            return
        if not scorer.ready:
            log_first_n(
                logging.WARNING,
                f"The OOD scorer has no statistics for the score '{scorer.score}': detections"
                " carry no ood_scores (fit them with rcdet.evaluation.fit_ood_statistics).",
                name=__name__,
            )
            return
        embeddings = (
            torch.cat([x.pred_embeddings for x in pred_instances])
            if scorer.needs_statistics
            else None
        )
        scores = scorer(torch.cat([x.pred_logits for x in pred_instances]), embeddings)
        sizes = [x.pred_logits.shape[0] for x in pred_instances]
        for inst, img_scores in zip(pred_instances, scores.split(sizes)):
            inst.ood_scores = img_scores
            if scorer.has_threshold:
                inst.is_unknown = scorer.unknown(img_scores)

    @torch.jit.unused
    def current_loss_weight(self, iteration: int) -> float:
        """
        LOSS_WEIGHT times DECAY_RATE for every decay step already reached (from the iteration, so
        resumes agree).
        """
        return self.loss_weight * self.decay_rate ** bisect.bisect_right(
            self.decay_steps, iteration
        )

    @torch.jit.unused
    def contrastive_losses(
        self,
        box_features: torch.Tensor,
        proposals: List[Instances],
        extra_scalars: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        storage = get_event_storage()
        embeddings = self.embed(box_features)
        labels = torch.cat([p.gt_classes for p in proposals])
        ious = torch.cat([p.gt_iou for p in proposals])
        foreground = (labels >= 0) & (labels < self.num_classes)
        anchor_mask = foreground & (ious >= self.iou_threshold)
        enqueue_mask = foreground & (ious >= self.queue_iou_threshold)
        extra_scalars = dict(extra_scalars or {})
        exposure = {}
        if self.num_exposed:
            exposed = torch.cat([p.gt_exposed for p in proposals])
            # Exposed keys enter the queue as the background they are labelled.
            enqueue_mask = enqueue_mask | (exposed & (ious >= self.queue_iou_threshold))
            if self.reference is not None:
                exposed_anchors = exposed & (ious >= self.iou_threshold)
                anchor_mask = anchor_mask | exposed_anchors
                exposure = dict(exposed=exposed, reference=self.reference())
                extra_scalars["exposed_anchors"] = exposed_anchors.sum()
        # Static bounds from the sampler (at most batch_size_per_image regions and
        # positive_fraction of them foreground, exposed ones included, per image) keep every
        # shape data-independent.
        out = self.contrast(
            embeddings,
            labels,
            anchor_mask=anchor_mask,
            anchor_weights=iou_reweight(ious, self.reweight),
            enqueue_mask=enqueue_mask,
            max_anchors=len(proposals) * int(self.batch_size_per_image * self.positive_fraction),
            pad_to=len(proposals) * self.batch_size_per_image,
            **exposure,
        )
        stats = self._branch_statistics(out, embeddings, extra_scalars)
        if not stats["finite"]:
            raise FloatingPointError(
                "rcdet: the contrastive branch's box embeddings contain Inf/NaN at "
                f"iteration={storage.iter}. The box head diverged: lower SOLVER.BASE_LR, raise "
                "SOLVER.WARMUP_ITERS, or check the input data."
            )
        self._log_branch_statistics(storage, stats)
        for name, value in stats["extra"].items():
            storage.put_scalar(f"rcdet/{name}", value)
        return {"loss_contrast": out.loss * self.current_loss_weight(storage.iter)}

    @torch.jit.unused
    def _branch_statistics(self, out, embeddings, extra=None) -> Dict[str, object]:
        """
        Every rcdet/* scalar, ``extra`` ({name: device scalar}) included, in one device-to-host
        transfer: the step's only sync from rcdet.
        """
        extra = extra or {}
        r = self.contrast.num_ranks
        queue = self.queue
        fill = (
            queue.num_filled() / queue.capacity if queue is not None else out.per_rank.new_zeros(())
        )
        finite = torch.isfinite(embeddings).all()
        totals = torch.stack(
            [t.float() for t in (out.num_anchors, out.num_keys, fill, finite, *extra.values())]
        )
        values = torch.cat(
            [
                out.per_rank.detach().float(),
                out.normalizer.float(),
                out.mean_similarity.float(),
                totals,
            ]
        ).tolist()
        num_anchors, num_keys, fill, finite = values[3 * r + 1 : 3 * r + 5]
        return {
            "per_rank": values[:r],
            "anchors_per_rank": values[r : 2 * r],
            "similarities": values[2 * r : 3 * r + 1],
            "num_anchors": num_anchors,
            "num_keys": num_keys,
            "queue_fill": fill,
            "finite": bool(finite),
            "extra": dict(zip(extra, values[3 * r + 5 :])),
        }

    @torch.jit.unused
    def _log_branch_statistics(self, storage, stats) -> None:
        storage.put_scalar("rcdet/num_anchors", stats["num_anchors"])
        storage.put_scalar("rcdet/num_keys", stats["num_keys"])
        if self.queue is not None:
            storage.put_scalar("rcdet/queue_fill", stats["queue_fill"])
        for k, (loss, count) in enumerate(zip(stats["per_rank"], stats["anchors_per_rank"])):
            storage.put_scalar(f"rcdet/loss_rank{k + 1}", loss)
            storage.put_scalar(f"rcdet/anchors_rank{k + 1}", count)
        names = [f"sim_rank{k + 1}" for k in range(len(stats["per_rank"]))] + ["sim_negative"]
        for name, value in zip(names, stats["similarities"]):
            if math.isfinite(value):
                storage.put_scalar(f"rcdet/{name}", value)
