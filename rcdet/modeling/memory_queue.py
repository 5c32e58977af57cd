"""A FIFO memory of detached region embeddings and labels, kept in registered buffers."""

import torch
from torch import nn

from ..distributed import all_gather_variable

__all__ = ["EmbeddingQueue"]


class EmbeddingQueue(nn.Module):
    """
    Ring buffer of ``size`` embeddings (or ``size`` per class when ``class_balanced``).

    Every piece of state is a registered buffer, so detectron2's checkpointer saves it and a
    resumed run continues with the same queue. Slots never filled are never returned as keys
    (no random initial vectors acting as fake negatives). ``enqueue`` gathers the selected rows
    from every worker first, so all workers hold the same queue.
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

    def __len__(self) -> int:
        return int(self.filled.sum())

    @property
    def capacity(self) -> int:
        return self.filled.numel()

    def fill_fraction(self) -> float:
        return len(self) / self.capacity

    def keys(self):
        """(embeddings, labels) of the filled slots, oldest ring order not guaranteed."""
        mask = self.filled.view(-1)
        return self.embeddings.view(-1, self.dim)[mask], self.labels.view(-1)[mask]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor = None, gather: bool = True):
        """Append the rows selected by ``mask`` (all rows if None), from every worker if ``gather``."""
        embeddings = embeddings.detach()
        if mask is not None:
            embeddings, labels = embeddings[mask], labels[mask]
        if gather:
            embeddings, _ = all_gather_variable(embeddings)
            labels, _ = all_gather_variable(labels)
        if embeddings.shape[0] == 0:
            return
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"Queue holds {self.dim}-d embeddings, got {embeddings.shape[1]}-d.")
        embeddings = embeddings.to(self.embeddings.dtype)
        labels = labels.to(torch.int64)
        if self.class_balanced:
            keep = (labels >= 0) & (labels < self.num_classes)
            for c in labels[keep].unique().tolist():
                self._write(c, embeddings[labels == c], labels[labels == c])
        else:
            self._write(0, embeddings, labels)

    def _write(self, ring: int, embeddings: torch.Tensor, labels: torch.Tensor):
        # Only the newest `size` rows can survive one write.
        embeddings, labels = embeddings[-self.size :], labels[-self.size :]
        n = embeddings.shape[0]
        slots = (self.pointer[ring] + torch.arange(n, device=self.pointer.device)) % self.size
        self.embeddings[ring, slots] = embeddings
        self.labels[ring, slots] = labels
        self.filled[ring, slots] = True
        self.pointer[ring] = (self.pointer[ring] + n) % self.size

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, class_balanced={self.class_balanced}"
