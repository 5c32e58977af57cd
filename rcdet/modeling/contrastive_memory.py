"""The thin layer between RINCE and a training step: keys = this step's embeddings from every
worker + the memory queue (plain PyTorch and torch.distributed, no detectron2)."""

from typing import Optional

import torch
from torch import nn

from ..distributed import all_gather_with_grad, gather_sizes, get_rank, get_world_size, pad_rows
from .memory_queue import EmbeddingQueue
from .reference import exposure_labels
from .rince import RankedInfoNCELoss, RankedInfoNCEOutput, positive_anchor_counts

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

    Exposure (``exposed`` and ``reference``, rcdet.modeling.reference): the loss's rank matrix
    has the reference class K (with_reference_class); ``labels`` are in ``[0, K]`` with exposed
    regions labelled background K. Exposed anchors get label K, f (``reference``, appended to
    every worker's keys) is the one key of class K, and exposed regions are background keys, in
    this step and in the queue, where they are stored with label K like any background.
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
        exposed: Optional[torch.Tensor] = None,
        reference: Optional[torch.Tensor] = None,
    ) -> RankedInfoNCEOutput:
        """
        ``exposed``: (N,) bool, the exposed regions; ``reference``: (1, d) f. Both or neither.
        """
        if (exposed is None) != (reference is None):
            raise ValueError("Give both exposed and reference, or neither.")
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
            columns = [labels.to(emb.dtype), is_anchor.to(emb.dtype), enqueue_mask.to(emb.dtype)]
            if exposed is not None:
                columns.append(exposed.to(emb.dtype))
            flags = torch.stack(columns, dim=1)
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
                    [emb.new_zeros(dim), emb.new_full((1,), -1.0), emb.new_zeros(len(columns) - 1)]
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
            anchor_labels = labels
            # Every worker's mean runs over the global batch's anchors, counted from the
            # gathered labels; each worker's loss is its share times the world size.
            counting = dict(anchor_keys=anchor_keys if world > 1 else None)
            if reference is not None:
                anchor_labels, keys, all_labels, counting = self._with_reference(
                    labels, exposed, flags, keys, all_labels, anchor_keys, reference, world
                )
            out = self.loss(
                emb.index_select(0, anchor_idx),
                anchor_labels.index_select(0, anchor_idx),
                keys,
                all_labels,
                self_index=anchor_idx + offset,
                anchor_weights=weights,
                anchor_valid=anchor_valid,
                world_size=world,
                check_inputs=False,
                **counting,
            )
            if self.queue is not None:
                # Non-finite rows never enter the queue (the head raises on them after the step,
                # and a caller that skips such a batch must not keep them as keys).
                enqueue = (flags[:, 2] > 0.5) & torch.isfinite(rows).all(dim=1)
                self.queue.enqueue(rows, key_labels, enqueue, gather=False)
        return out

    def _with_reference(self, labels, exposed, flags, keys, all_labels, anchor_keys, f, world):
        """
        The anchor labels, keys and key labels of the reference class (rcdet.modeling.reference),
        and how the mean counts anchors: on several workers the normaliser from the gathered
        flags, since an exposed anchor's own key is background, not of its class K.
        """
        num_known = self.loss.num_classes - 1
        anchor_labels, _ = exposure_labels(labels, exposed, num_known)
        # Keys: exposed regions are labelled background already; background, this step's and
        # the queue's, moves to K + 1, the background of the larger matrix.
        all_labels = torch.where(
            all_labels >= num_known, torch.full_like(all_labels, num_known + 1), all_labels
        )
        keys = torch.cat([keys, f.to(keys.dtype)])
        all_labels = torch.cat([all_labels, all_labels.new_full((1,), num_known)])
        if world == 1:
            return anchor_labels, keys, all_labels, {}
        # The gathered exposed flags, padded with False over the queue's slots and f.
        gathered_exposed = flags[:, 3] > 0.5
        gathered_exposed = torch.cat(
            [gathered_exposed, gathered_exposed.new_zeros(keys.shape[0] - flags.shape[0])]
        )
        exposed_anchor = torch.cat([anchor_keys, anchor_keys.new_zeros(1)]) & gathered_exposed
        known_anchor = torch.cat([anchor_keys, anchor_keys.new_zeros(1)]) & ~gathered_exposed
        counts = positive_anchor_counts(
            all_labels, known_anchor, all_labels, self.loss.rank_matrix, self.num_ranks
        )
        # Each exposed anchor has one positive, f, at rank 1 and none at other ranks.
        rank1 = torch.cat([exposed_anchor.sum().view(1), counts.new_zeros(self.num_ranks - 1)])
        return anchor_labels, keys, all_labels, {"normalizer": counts + rank1}
