"""
Helpers that rcdet's tests and benchmarks share, as ``detectron2.utils.testing`` does for
detectron2: nothing in the model code imports them.

- :mod:`.rince_reference`: the brute-force RINCE loss, written from the definitions;
- :mod:`.sync_counter`: counts device-to-host synchronisations and operators;
- :mod:`.benchmark`: loss inputs, timing and peak-memory helpers.
"""

from .benchmark import median_time, paired_ratio, random_loss_inputs, ring_rank_matrix, time_call
from .rince_reference import reference_rince
from .sync_counter import SyncCounter, count_syncs

__all__ = [
    "SyncCounter",
    "count_syncs",
    "median_time",
    "paired_ratio",
    "random_loss_inputs",
    "reference_rince",
    "ring_rank_matrix",
    "time_call",
]
