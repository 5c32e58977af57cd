"""rcdet.modeling.memory_queue: the ring buffer of past embeddings, on one worker and on two."""

import torch
from dist_utils import run_workers

from rcdet.modeling.memory_queue import EmbeddingQueue


def test_starts_empty_and_never_returns_unfilled_slots():
    q = EmbeddingQueue(size=5, dim=3)
    emb, labels = q.keys()
    assert emb.shape == (0, 3) and labels.shape == (0,)
    q.enqueue(torch.ones(2, 3), torch.tensor([1, 2]))
    emb, labels = q.keys()
    assert emb.tolist() == [[1.0] * 3] * 2 and labels.tolist() == [1, 2]
    assert int(q.num_filled()) == 2 and q.num_filled() / q.capacity == 0.4


def test_wraps_around_on_queue_length_not_feature_dim():
    q = EmbeddingQueue(size=4, dim=2)
    for i in range(3):  # 3 writes of 3 rows -> 9 rows through a ring of 4
        rows = torch.arange(3 * i, 3 * i + 3, dtype=torch.float32)
        q.enqueue(rows[:, None].expand(-1, 2), rows.long())
    # Slots after 9 writes: 8 sits at 0, then 5, 6, 7 at 1..3.
    assert q.labels[0].tolist() == [8, 5, 6, 7]
    assert q.embeddings[0, :, 0].tolist() == [8.0, 5.0, 6.0, 7.0]
    assert int(q.pointer[0]) == 1
    q.enqueue(torch.zeros(6, 2), torch.arange(100, 106))  # more rows than the queue holds
    assert sorted(q.labels[0].tolist()) == [102, 103, 104, 105]


def test_mask_selects_rows_and_detaches():
    q = EmbeddingQueue(size=8, dim=2)
    x = torch.randn(4, 2, requires_grad=True)
    q.enqueue(x, torch.tensor([0, 1, 2, 3]), mask=torch.tensor([True, False, True, False]))
    emb, labels = q.keys()
    assert labels.tolist() == [0, 2] and not emb.requires_grad
    assert torch.equal(emb, x.detach()[[0, 2]])


def test_state_dict_round_trip():
    q = EmbeddingQueue(size=6, dim=3, num_classes=3, class_balanced=True)
    q.enqueue(torch.randn(10, 3), torch.tensor([0, 1, 2, 0, 0, 1, 5, -1, 2, 2]))
    restored = EmbeddingQueue(size=6, dim=3, num_classes=3, class_balanced=True)
    restored.load_state_dict(q.state_dict())
    for name in ("embeddings", "labels", "filled", "pointer"):
        assert torch.equal(getattr(q, name), getattr(restored, name))
    e1, l1 = q.keys()
    e2, l2 = restored.keys()
    assert torch.equal(e1, e2) and torch.equal(l1, l2)


def test_class_balanced_rings_drop_non_class_labels():
    q = EmbeddingQueue(size=2, dim=1, num_classes=2, class_balanced=True)
    q.enqueue(torch.arange(6.0)[:, None], torch.tensor([0, 0, 0, 1, 2, -1]))
    # Class 0 sent rows 0, 1, 2 into a ring of 2: the newest two survive. Labels 2 and -1 are
    # not classes and are dropped.
    assert sorted(q.embeddings[0, :, 0].tolist()) == [1.0, 2.0]
    assert q.labels[0].tolist() == [0, 0]
    assert q.labels[1].tolist() == [1, -1] and q.filled[1].tolist() == [True, False]
    assert int(q.num_filled()) == 3
    # FIFO: the next class-0 row replaces the oldest survivor (1), not the newest (2).
    q.enqueue(torch.tensor([[9.0]]), torch.tensor([0]))
    assert sorted(q.embeddings[0, :, 0].tolist()) == [2.0, 9.0]


def _queue_worker(rank, world_size):
    q = EmbeddingQueue(size=7, dim=2)
    g = torch.Generator().manual_seed(rank)
    for step in range(4):
        n = 2 + rank + step  # different sizes per worker: padding must be dropped
        emb = torch.randn(n, 2, generator=g)
        labels = torch.full((n,), 10 * rank + step)
        q.enqueue(emb, labels, mask=torch.arange(n) % 3 != 2)
    return q.state_dict()


def test_two_workers_hold_identical_queues(tmp_path):
    a, b = run_workers(_queue_worker, 2, tmp_path)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    labels = a["labels"][a["filled"]].tolist()
    assert {lab // 10 for lab in labels} == {0, 1}  # rows from both workers


def test_fill_count_is_read_without_a_sync_and_survives_a_restore():
    from rcdet.testing import SyncCounter

    q = EmbeddingQueue(size=4, dim=2)
    assert int(q.num_filled()) == 0
    q.enqueue(
        torch.ones(3, 2),
        torch.tensor([0, 1, 2]),
        mask=torch.tensor([True, False, True]),
        gather=False,
    )
    with SyncCounter() as c:
        count = q.num_filled()
        fraction = count / q.capacity
    assert c.syncs == 0
    assert int(count) == 2 and float(fraction) == 0.5
    q.enqueue(torch.ones(1, 2), torch.tensor([3]), gather=False)
    assert int(q.num_filled()) == 3
    restored = EmbeddingQueue(size=4, dim=2)
    restored.load_state_dict(q.state_dict())
    assert int(restored.num_filled()) == 3
