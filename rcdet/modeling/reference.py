"""
The reference embedding f of the exposure experiment, and the labels that make RINCE use it.

Objects of the *exposed* classes are seen in training but are not known classes: each exposed
box is an anchor whose only positive is f, and a negative key of every known anchor. In the
loss's terms the rank matrix gains one class, the reference class K, ranked 1 by itself and
negative by everyone else; exposed anchors carry label K, and f is the one key of label K.
Exposed boxes as keys are background (a negative of every anchor, other exposed anchors
included), so f stays their only positive. f is either a fixed random unit vector or a learned
parameter, normalised on use.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ..ranking import NEGATIVE_RANK

__all__ = [
    "REFERENCE_MODES",
    "REFERENCE_CHOICES",
    "ReferenceEmbedding",
    "with_reference_class",
    "exposure_labels",
    "reference_vector",
]

REFERENCE_MODES = ("fixed", "learned")
# MODEL.RCDET.OOD.REFERENCE: f fixed or learned; or no f, the exposed boxes trained as background
# (outlier exposure, the softmax baseline) or removed from training (the no-exposure baseline).
REFERENCE_CHOICES = REFERENCE_MODES + ("background", "removed")


class ReferenceEmbedding(nn.Module):
    """The unit reference vector f: a buffer (``fixed``) or a parameter (``learned``)."""

    def __init__(self, dim: int, mode: str = "fixed", seed: int = 0):
        super().__init__()
        if mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got '{mode}'.")
        self.mode = mode
        # Its own generator: building f must not move the global random stream.
        g = torch.Generator().manual_seed(seed)
        vector = F.normalize(torch.randn(dim, generator=g), dim=0)
        if mode == "fixed":
            self.register_buffer("vector", vector)
        else:
            self.vector = nn.Parameter(vector)

    def forward(self) -> torch.Tensor:
        """(1, dim): f as one key."""
        return F.normalize(self.vector, dim=0)[None]

    def extra_repr(self) -> str:
        return f"dim={self.vector.numel()}, mode={self.mode}"


def with_reference_class(rank_matrix: torch.Tensor) -> torch.Tensor:
    """(K + 1, K + 1): ``rank_matrix`` plus the reference class K, rank 1 only to itself."""
    k = rank_matrix.shape[0]
    out = torch.full((k + 1, k + 1), NEGATIVE_RANK, dtype=rank_matrix.dtype)
    out = out.to(rank_matrix.device)
    out[:k, :k] = rank_matrix
    out[k, k] = 1
    return out


def exposure_labels(labels: torch.Tensor, exposed: torch.Tensor, num_classes: int):
    """
    ``(anchor_labels, key_labels)`` for the matrix of :func:`with_reference_class`, from region
    labels in ``[0, K]`` (K: background) and the ``exposed`` mask: exposed anchors get the
    reference class K; as keys, exposed regions and background get K + 1, the background of the
    larger matrix. Labels < 0 (no key) stay as they are.
    """
    reference = torch.full_like(labels, num_classes)
    background = torch.full_like(labels, num_classes + 1)
    anchor_labels = torch.where(exposed, reference, labels)
    key_labels = torch.where(exposed | (labels >= num_classes), background, labels)
    return anchor_labels, key_labels


@torch.no_grad()
def reference_vector(model):
    """The unit f of a detector's ROI heads as a numpy (d,) vector, or None without one."""
    reference = getattr(getattr(model, "roi_heads", None), "reference", None)
    if reference is None:
        return None
    return reference()[0].detach().cpu().double().numpy()
