"""Inputs, timing and peak-memory helpers shared by the loss tests and the CPU/GPU benchmarks."""

import os
import statistics
import time

import torch
from torch.nn import functional as F

__all__ = [
    "random_loss_inputs",
    "ring_rank_matrix",
    "time_call",
    "median_time",
    "paired_ratio",
    "rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
]


def random_loss_inputs(n, m, d, num_classes, device, seed=0):
    """
    (anchors, anchor_labels, keys, key_labels, self_index) for the loss: ``m`` random unit keys
    whose labels include background (``num_classes``); the first ``n`` keys are the anchors.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    keys = F.normalize(torch.randn(m, d, generator=g), dim=1).to(device)
    key_labels = torch.randint(0, num_classes + 1, (m,), generator=g).to(device)
    anchors = keys[:n].clone()
    labels = key_labels[:n].clone() % num_classes
    key_labels[:n] = labels
    return anchors, labels, keys, key_labels, torch.arange(n, device=device)


def ring_rank_matrix(num_classes, r, device):
    """Classes on a ring, rank 1 + distance up to r: every rank up to r is populated."""
    idx = torch.arange(num_classes)
    dist = (idx[:, None] - idx[None, :]).abs()
    dist = torch.minimum(dist, num_classes - dist)
    return torch.where(dist + 1 <= r, dist + 1, torch.full_like(dist, -1)).to(device)


def time_call(fn, device) -> float:
    """Seconds of one call of ``fn``, the device's queue drained before and after."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_time(fn, device, repeats) -> float:
    """Median time of ``repeats`` calls after one warm-up call."""
    time_call(fn, device)
    return statistics.median(time_call(fn, device) for _ in range(max(repeats, 1)))


def paired_ratio(fn_a, fn_b, device, repeats) -> float:
    """Median of time(fn_a) / time(fn_b) over ``repeats`` alternating pairs, after one warm-up
    pair: load from other processes hits both members of a pair alike."""
    ratios = []
    for i in range(repeats + 1):
        t_a = time_call(fn_a, device)
        t_b = time_call(fn_b, device)
        if i:
            ratios.append(t_a / t_b)
    return statistics.median(ratios)


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    # VmHWM belongs to this address space; ru_maxrss would carry a parent's peak over fork+exec.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident size (Linux >= 4.0); a no-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
