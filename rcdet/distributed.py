"""
Tensor all-gathers for per-step embeddings (``detectron2.utils.comm.all_gather`` pickles
Python objects and is for metadata only). Everything here is a no-op with one process or
without an initialised process group.
"""

from typing import List

import torch
import torch.distributed as dist

__all__ = [
    "get_world_size",
    "get_rank",
    "gather_sizes",
    "pad_rows",
    "all_gather_padded",
    "all_gather_with_grad",
]


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_sizes(n: int, device) -> List[int]:
    """
    Every worker's row count. Reads them back to the host: one sync, so not for a training step.
    """
    size = torch.tensor([n], device=device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return torch.cat(sizes).tolist()


def pad_rows(tensor: torch.Tensor, rows: int, fill: torch.Tensor) -> torch.Tensor:
    """``tensor`` followed by copies of the row ``fill`` up to ``rows`` rows (differentiable)."""
    missing = rows - tensor.shape[0]
    if missing < 0:
        raise ValueError(f"Cannot pad {tensor.shape[0]} rows down to {rows}.")
    if missing == 0:
        return tensor
    return torch.cat([tensor, fill.to(tensor.dtype).expand(missing, -1)], dim=0)


def all_gather_padded(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate ``tensor`` (same shape on every worker) from every worker in rank order. No
    gradient.
    """
    if get_world_size() == 1:
        return tensor.detach()
    chunks = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(chunks, tensor.detach().contiguous())
    return torch.cat(chunks, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """
    All-gather whose backward sums the gathered tensor's gradient over workers and returns
    this worker's slice: every worker's loss uses every worker's rows, so the gradient with
    respect to this worker's rows is the sum of all those losses' gradients.
    """

    @staticmethod
    def forward(ctx, tensor):
        ctx.rows = tensor.shape[0]
        return all_gather_padded(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate ``tensor`` (same shape on every worker; pad first) from every worker, with a
    gradient that reaches every worker's rows. After DDP's averaging, a loss summed over
    workers then gets exactly the gradient of one process holding the global batch.
    """
    if get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)
