"""A FIFO memory of detached region embeddings and labels, kept in registered buffers."""

import torch
from torch import nn

from ..distributed import all_gather_padded, gather_sizes, get_world_size, pad_rows

__all__ = ["EmbeddingQueue"]


class EmbeddingQueue(nn.Module):
    """
    Ring buffer of ``size`` embeddings (or ``size`` per class when ``class_balanced``).

    Every piece of state is a registered buffer, so detectron2's checkpointer saves it and a
    resumed run continues with the same queue. Slots never filled hold label -1, which the loss
    reads as "no key" (no random initial vectors acting as fake negatives), so the training step
    uses the whole buffer as keys with a shape that never depends on the data. ``enqueue`` makes
    no device-to-host sync either.
    """

    def __init__(self, size: int, dim: int, num_classes: int = 0, class_balanced: bool = False):
        super().__init__()
        if size <= 0:
            raise ValueError(f"Queue size must be positive, got {size}.")
        if class_balanced and num_classes <= 0:
            raise ValueError("A class-balanced queue needs num_classes > 0.")
        self.size = int(size)
        self.dim = int(dim)
        self.class_balanced = bool(class_balanced)
        self.num_classes = int(num_classes)
        rings = self.num_classes if class_balanced else 1
        self.register_buffer("embeddings", torch.zeros(rings, self.size, self.dim))
        self.register_buffer("labels", torch.full((rings, self.size), -1, dtype=torch.int64))
        self.register_buffer("filled", torch.zeros(rings, self.size, dtype=torch.bool))
        self.register_buffer("pointer", torch.zeros(rings, dtype=torch.int64))

    @property
    def capacity(self) -> int:
        """Slots in all rings."""
        return self.filled.numel()

    def num_filled(self) -> torch.Tensor:
        """Filled slots, as a device scalar: reading it never waits for the device."""
        return self.filled.sum()

    def all_slots(self):
        """(embeddings, labels) of every slot; empty ones have label -1. Fixed shape, no sync."""
        return self.embeddings.view(-1, self.dim), self.labels.view(-1)

    def keys(self):
        """
        (embeddings, labels) of the filled slots only, for inspection (boolean indexing: a sync).
        """
        mask = self.filled.view(-1)
        return self.embeddings.view(-1, self.dim)[mask], self.labels.view(-1)[mask]

    @torch.no_grad()
    def enqueue(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor = None,
        gather: bool = True,
    ):
        """
        Append the rows selected by ``mask`` (all rows if None). With ``gather``, the rows of
        every worker are gathered first (sizes may differ: one sync to learn them), so that all
        workers hold the same queue; the training step gathers once itself and passes False.
        """
        embeddings = embeddings.detach()
        labels = labels.to(torch.int64)
        take = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"Queue holds {self.dim}-d embeddings, got shape {tuple(embeddings.shape)}."
            )
        if gather and get_world_size() > 1:
            rows = max(gather_sizes(embeddings.shape[0], embeddings.device))
            packed = torch.cat(
                [embeddings.float(), labels[:, None].float(), take[:, None].float()], dim=1
            )
            packed = all_gather_padded(pad_rows(packed, rows, packed.new_zeros(1, self.dim + 2)))
            embeddings, labels, take = (
                packed[:, : self.dim],
                packed[:, self.dim].long(),
                packed[:, self.dim + 1] > 0,
            )
        if embeddings.shape[0] == 0:
            return
        self._write(embeddings.to(self.embeddings.dtype), labels, take)

    def _write(self, embeddings, labels, take):
        rings = self.pointer.shape[0]
        if self.class_balanced:
            take = take & (labels >= 0) & (labels < self.num_classes)
            ring = labels.clamp(0, rings - 1)
        else:
            ring = torch.zeros_like(labels)
        # Position of each taken row among this write's rows of its ring; only the newest
        # `size` rows of a ring can survive one write.
        per_ring = (ring[:, None] == torch.arange(rings, device=ring.device)) & take[:, None]
        seen = per_ring.cumsum(dim=0)
        position = (seen * per_ring).sum(dim=1) - 1
        total = seen[-1]
        keep = take & (position >= total.index_select(0, ring) - self.size)
        slot = ring * self.size + (self.pointer.index_select(0, ring) + position).remainder(
            self.size
        )

        # Rows that are not kept rewrite the last kept row's slot with that row's value (or, when
        # nothing is kept, slot 0 with its own content): a single fixed-size write, no sync.
        flat_emb, flat_lab, flat_fill = (
            self.embeddings.view(-1, self.dim),
            self.labels.view(-1),
            self.filled.view(-1),
        )
        # (an index tensor of shape (1,), not a 0-d one: indexing with a 0-d tensor reads it on the
        # host)
        last = (keep * torch.arange(1, keep.shape[0] + 1, device=keep.device)).argmax().view(1)
        any_keep = keep.any()
        index = torch.where(
            keep, slot, torch.where(any_keep, slot.index_select(0, last), torch.zeros_like(last))
        )
        fallback_emb = torch.where(any_keep, embeddings.index_select(0, last), flat_emb[:1])
        fallback_lab = torch.where(any_keep, labels.index_select(0, last), flat_lab[:1])
        fallback_fill = any_keep | flat_fill[:1]
        flat_emb.index_copy_(0, index, torch.where(keep[:, None], embeddings, fallback_emb))
        flat_lab.index_copy_(0, index, torch.where(keep, labels, fallback_lab))
        flat_fill.index_copy_(0, index, keep | fallback_fill)
        self.pointer.add_(total).remainder_(self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, class_balanced={self.class_balanced}"
