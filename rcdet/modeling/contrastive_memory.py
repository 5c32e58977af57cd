"""The thin layer between RINCE and a training step: keys = this step's embeddings from every
worker + the memory queue (plain PyTorch and torch.distributed, no detectron2)."""

from typing import Optional

import torch
from torch import nn

from ..distributed import all_gather_with_grad, gather_sizes, get_rank, get_world_size, pad_rows
from .memory_queue import EmbeddingQueue
from .rince import RankedInfoNCELoss, RankedInfoNCEOutput

__all__ = ["RankedInfoNCEWithMemory", "compact_indices"]


def compact_indices(mask: torch.Tensor, capacity: int):
    """
    The indices of the True entries of ``mask``, in order, in a tensor of fixed length
    ``capacity`` (no ``nonzero``: its output size would need a sync). Returns ``(index,
    valid, kept)``: ``index[valid]`` are the first ``capacity`` True positions, the other
    entries point at row 0; ``kept`` marks the rows of ``mask`` that made it in.
    """
    capacity = min(int(capacity), mask.shape[0])
    position = mask.to(torch.int64).cumsum(0) - 1
    kept = mask & (position < capacity)
    slot = torch.where(
        kept, position, torch.full_like(position, capacity)
    )  # the rest land in a spare slot
    index = torch.zeros(capacity + 1, dtype=torch.int64, device=mask.device)
    index.scatter_(0, slot, torch.arange(mask.shape[0], device=mask.device))
    valid = torch.arange(capacity, device=mask.device) < kept.sum()
    return torch.where(valid, index[:capacity], torch.zeros_like(index[:capacity])), valid, kept


class RankedInfoNCEWithMemory(nn.Module):
    """
    Anchors are the rows of this worker's ``embeddings`` selected by ``anchor_mask``. Keys are
    all rows of every worker's ``embeddings`` followed by the queue; each anchor's own key is
    excluded by index. After the loss, the rows selected by ``enqueue_mask`` (from every
    worker) enter the queue, so every worker holds the same queue.

    Multi-GPU: embeddings, labels and both masks travel in one all-gather whose backward sums
    the key gradients over workers. Each rank's mean runs over the anchors of the global batch
    (counted from the gathered labels, no second collective) and each worker's loss is its
    share times the world size. So the average of ``loss`` over workers, and the gradient after
    DDP's averaging, equal those of one process holding the whole batch.

    Sync-free: anchors are compacted into ``max_anchors`` rows and every worker's rows are padded
    to ``pad_to`` rows, both static bounds from the config, so no tensor shape depends on data.
    Without ``pad_to`` the per-worker sizes are gathered first (one sync). On the CPU the anchor
    rows are sized by the exact count instead (``static_shapes``).
    """

    def __init__(
        self,
        loss: RankedInfoNCELoss,
        queue: Optional[EmbeddingQueue] = None,
        gather: bool = True,
        static_shapes: Optional[bool] = None,
    ):
        super().__init__()
        self.loss = loss
        self.queue = queue
        self.gather = gather
        # None: static anchor capacity on accelerators; on the CPU, where reading a count back
        # costs nothing, the exact anchor count (the static bound runs the loss over about 3x
        # more padded anchor rows there). True/False force either.
        self.static_shapes = static_shapes

    @property
    def num_ranks(self) -> int:
        return self.loss.num_ranks

    @torch.jit.unused
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        anchor_mask: torch.Tensor,
        anchor_weights: Optional[torch.Tensor] = None,
        enqueue_mask: Optional[torch.Tensor] = None,
        max_anchors: Optional[int] = None,
        pad_to: Optional[int] = None,
    ) -> RankedInfoNCEOutput:
        n, dim = embeddings.shape
        device = embeddings.device
        # Float32 whatever the autocast state: the gathered rows carry labels and masks too.
        with torch.autocast(device_type=device.type, enabled=False):
            emb = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            capacity = n if max_anchors is None else max_anchors
            static = self.static_shapes if self.static_shapes is not None else device.type != "cpu"
            if not static:
                capacity = min(capacity, int(anchor_mask.sum()))
            anchor_idx, anchor_valid, is_anchor = compact_indices(anchor_mask, capacity)
            if enqueue_mask is None:
                enqueue_mask = torch.zeros_like(anchor_mask)
            world = get_world_size() if self.gather else 1
            rows = emb
            flags = torch.stack(
                [labels.to(emb.dtype), is_anchor.to(emb.dtype), enqueue_mask.to(emb.dtype)], dim=1
            )
            offset = 0
            if world > 1:
                packed = torch.cat([emb, flags], dim=1)
                width = pad_to if pad_to is not None else max(gather_sizes(n, device))
                if n > width:
                    # Unreachable in training (pad_to is the sampler's bound); raising here, before
                    # the collective, would leave the other workers waiting until their timeout.
                    raise ValueError(f"{n} regions on this worker, more than pad_to = {width}.")
                # Padding rows have label -1: "no key", never an anchor, never enqueued.
                padding = torch.cat(
                    [emb.new_zeros(dim), emb.new_full((1,), -1.0), emb.new_zeros(2)]
                )[None]
                packed = all_gather_with_grad(pad_rows(packed, width, padding))
                rows, flags = packed[:, :dim], packed[:, dim:]
                offset = get_rank() * width
            key_labels = flags[:, 0].round().long()

            keys, all_labels = rows, key_labels
            anchor_keys = flags[:, 1] > 0.5
            if self.queue is not None:
                queue_emb, queue_labels = self.queue.all_slots()
                keys = torch.cat([rows, queue_emb.to(rows.dtype)])
                all_labels = torch.cat([key_labels, queue_labels])
                anchor_keys = torch.cat(
                    [anchor_keys, torch.zeros_like(queue_labels, dtype=torch.bool)]
                )
            weights = (
                anchor_weights.index_select(0, anchor_idx) if anchor_weights is not None else None
            )
            out = self.loss(
                emb.index_select(0, anchor_idx),
                labels.index_select(0, anchor_idx),
                keys,
                all_labels,
                self_index=anchor_idx + offset,
                anchor_weights=weights,
                anchor_valid=anchor_valid,
                # Every worker's mean runs over the global batch's anchors, counted from the
                # gathered labels; each worker's loss is its share times the world size.
                anchor_keys=anchor_keys if world > 1 else None,
                world_size=world,
                check_inputs=False,
            )
            if self.queue is not None:
                # Non-finite rows never enter the queue (the head raises on them after the step,
                # and a caller that skips such a batch must not keep them as keys).
                enqueue = (flags[:, 2] > 0.5) & torch.isfinite(rows).all(dim=1)
                self.queue.enqueue(rows, key_labels, enqueue, gather=False)
        return out
