"""The thin layer between RINCE and a training step: keys = this step's embeddings from every
worker + the memory queue (plain PyTorch and torch.distributed, no detectron2)."""

from typing import Optional

import torch
from torch import nn

from ..distributed import all_gather_variable, all_reduce_sum, gather_with_local_grad, get_world_size
from .memory_queue import EmbeddingQueue
from .rince import RankedInfoNCELoss, RankedInfoNCEOutput

__all__ = ["RankedInfoNCEWithMemory"]


class RankedInfoNCEWithMemory(nn.Module):
    """
    Anchors are the rows of this worker's ``embeddings`` selected by ``anchor_mask``. Keys are
    all rows of every worker's ``embeddings`` (all-gathered; gradients flow through the local
    slice) followed by the queue; each anchor's own key is excluded by index. After the loss,
    the rows selected by ``enqueue_mask`` (from every worker) enter the queue.

    Each rank's mean runs over the anchors of the whole global batch: this worker's mean is
    rescaled by ``n_local * world_size / n_global``, so the average of ``loss`` over workers
    (what DDP averages and detectron2 logs) equals the loss of one worker holding the whole batch.
    """

    def __init__(self, loss: RankedInfoNCELoss, queue: Optional[EmbeddingQueue] = None, gather: bool = True):
        super().__init__()
        self.loss = loss
        self.queue = queue
        self.gather = gather

    @property
    def num_ranks(self) -> int:
        return self.loss.num_ranks

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        anchor_mask: torch.Tensor,
        anchor_weights: Optional[torch.Tensor] = None,
        enqueue_mask: Optional[torch.Tensor] = None,
    ) -> RankedInfoNCEOutput:
        anchor_idx = torch.nonzero(anchor_mask).squeeze(1)
        if self.gather:
            keys, offset = gather_with_local_grad(embeddings)
            key_labels, _ = all_gather_variable(labels)
        else:
            keys, offset, key_labels = embeddings, 0, labels
        if self.queue is not None:
            queue_emb, queue_labels = self.queue.keys()
            keys = torch.cat([keys, queue_emb.to(keys.dtype)])
            key_labels = torch.cat([key_labels, queue_labels])
        weights = anchor_weights[anchor_idx] if anchor_weights is not None else None
        out = self.loss(embeddings[anchor_idx], labels[anchor_idx], keys, key_labels, anchor_idx + offset, weights)
        if self.gather and get_world_size() > 1:
            local = out.anchor_counts
            total = all_reduce_sum(local)
            scale = torch.where(total > 0, local * get_world_size() / total.clamp(min=1), torch.zeros_like(local))
            out.loss = (out.per_rank * scale).sum() + embeddings.sum() * 0.0
        else:
            out.loss = out.loss + embeddings.sum() * 0.0
        if self.queue is not None and enqueue_mask is not None:
            self.queue.enqueue(embeddings, labels, enqueue_mask, gather=self.gather)
        out.num_keys = keys.shape[0]
        return out
