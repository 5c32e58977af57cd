"""
Count device-to-host synchronisations and operators, on any device, with a TorchDispatchMode.

On a GPU every ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``nonzero`` or boolean-mask
index makes the host wait for the device. On the CPU they cost nothing, so the training step is
checked by counting them instead of timing them: the counts are the same on every device.
"""

import collections
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "count_syncs"]

# Operators whose result (or output shape) needs values from the device.
_SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",  # without output_size
    "aten::equal",
    "aten::is_nonzero",
    # torch.tensor(...) / new_tensor(...) of host values: a host-to-device copy, which on a GPU
    # waits for the device like a read does.
    "aten::lift_fresh",
    "aten::lift_fresh_copy",
}


def _is_bool_index(func, args) -> bool:
    name = func._schema.name
    if name not in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class SyncCounter(TorchDispatchMode):
    """
    ``with SyncCounter() as c: ...`` then ``c.syncs`` (device-to-host syncs), ``c.ops`` (aten
    operators dispatched) and ``c.sync_ops`` (which ones synced, by name). ``Tensor.tolist``,
    ``Tensor.cpu`` and ``Tensor.numpy`` are counted too: on a CPU tensor they dispatch nothing.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.sync_ops = collections.Counter()

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func._schema.name
        if name in _SYNC_OPS and not (
            name == "aten::repeat_interleave" and kwargs.get("output_size") is not None
        ):
            self.sync_ops[name] += 1
        elif _is_bool_index(func, args):
            self.sync_ops[name + " (bool mask)"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._patches = []
        for method in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, method)

            def counted(tensor, *a, _original=original, _name=method, **kw):
                self.sync_ops[f"Tensor.{_name}"] += 1
                return _original(tensor, *a, **kw)

            setattr(torch.Tensor, method, counted)
            self._patches.append((method, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patches:
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


@contextmanager
def count_syncs():
    """Shorthand: ``with count_syncs() as c:`` yields a :class:`SyncCounter`."""
    with SyncCounter() as counter:
        yield counter
