"""
Tensor all-gathers for per-step embeddings (``detectron2.utils.comm.all_gather`` pickles
Python objects and is for metadata only). Everything here is a no-op with one process or
without an initialised process group.
"""

from typing import List, Tuple

import torch
import torch.distributed as dist

__all__ = ["get_world_size", "get_rank", "all_gather_variable", "gather_with_local_grad", "all_reduce_sum"]


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_variable(tensor: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    """
    Concatenate ``tensor`` (sizes may differ along dim 0) from every worker in rank order.
    Pads to the largest size for the collective and drops the padding. No gradient.
    Returns the gathered tensor and the per-worker sizes.
    """
    world = get_world_size()
    if world == 1:
        return tensor.detach(), [tensor.shape[0]]
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = tensor.detach().new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0), sizes


def gather_with_local_grad(tensor: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """
    Like :func:`all_gather_variable`, but the local slice of the result is ``tensor`` itself,
    so gradients flow into this worker's inputs. Returns the gathered tensor and the offset
    of the local slice in it.
    """
    gathered, sizes = all_gather_variable(tensor)
    if len(sizes) == 1:
        return tensor, 0
    rank = get_rank()
    offset = sum(sizes[:rank])
    parts = [gathered[:offset], tensor, gathered[offset + sizes[rank] :]]
    return torch.cat(parts, dim=0), offset


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over workers (a copy); identity with one process."""
    if get_world_size() == 1:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor
