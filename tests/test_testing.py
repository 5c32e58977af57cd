"""rcdet.testing: the sync counter sees every kind of device-to-host sync, and only those."""

import torch

from rcdet.testing import SyncCounter


def test_sync_counter_sees_every_kind_of_sync():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item()
        bool(x.any())
        x.tolist()
        torch.nonzero(x)
        x[x > 2]
        x.unique()
        x.add(1)  # no sync
    assert c.syncs == 6, dict(c.sync_ops)
    assert c.ops >= 7
