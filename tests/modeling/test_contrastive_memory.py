"""
rcdet.modeling.contrastive_memory under DDP: two gloo workers against one process holding the
global batch. After DDP's averaging the gradient must be the one-process gradient (float64,
1e-9), the loss the same, and the queue the same on every worker. Uneven batches, a worker
without anchors and a worker without regions must neither hang nor change the result. The step
makes no sync.
"""

import pytest
import torch
from dist_utils import run_workers
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from rcdet.modeling.contrastive_memory import RankedInfoNCEWithMemory
from rcdet.modeling.memory_queue import EmbeddingQueue
from rcdet.modeling.rince import RankedInfoNCELoss
from rcdet.testing import SyncCounter

NUM_CLASSES, FEAT, DIM, PAD = 4, 6, 5, 16
RANK = torch.tensor([[1, 2, 3, -1], [2, 1, -1, 3], [3, -1, 1, 2], [-1, -1, 2, 1]])
# (rows of worker 0, rows of worker 1); worker 1's rows in the third case have no anchor.
SCENARIOS = {"uneven": (11, 5), "no_anchors": (9, 7), "no_regions": (14, 0)}
VARIANTS = ("out_in", "in", "supcon")


def _batch(scenario):
    n0, n1 = SCENARIOS[scenario]
    g = torch.Generator().manual_seed(7)
    n = n0 + n1
    feats = torch.randn(n, FEAT, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES + 1, (n,), generator=g)  # NUM_CLASSES = background
    anchors = (labels < NUM_CLASSES) & (torch.rand(n, generator=g) < 0.8)
    if scenario == "no_anchors":
        anchors[n0:] = False
    weights = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    enqueue = labels < NUM_CLASSES
    return feats, labels, anchors, weights, enqueue, n0


class _Net(torch.nn.Module):
    """A projection plus an independent classifier with its own loss, so DDP's bucketed
    all-reduces interleave with the gather's backward all-reduce, as in a detectron2 model."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(FEAT, DIM).double()
        self.cls = torch.nn.Linear(FEAT, NUM_CLASSES + 1).double()

    def forward(self, feats):
        return F.normalize(self.proj(feats), dim=1), self.cls(feats)


def _model(variant):
    torch.manual_seed(0)
    proj = _Net()
    queue = EmbeddingQueue(size=8, dim=DIM)
    # Queue entries from "earlier steps", identical everywhere.
    g = torch.Generator().manual_seed(3)
    queue.enqueue(
        F.normalize(torch.randn(6, DIM, generator=g, dtype=torch.float64), dim=1),
        torch.tensor([0, 1, 2, 3, 4, 1]),
        gather=False,
    )
    contrast = RankedInfoNCEWithMemory(RankedInfoNCELoss(RANK, [0.1, 0.2, 0.35], variant), queue)
    return proj, contrast


def _step(net, contrast, feats, labels, anchors, weights, enqueue, world, total_rows):
    emb, logits = net(feats)
    out = contrast(emb, labels, anchors, weights, enqueue, max_anchors=PAD, pad_to=PAD)
    # Each worker's sum scaled by world / global rows: DDP's average is the global mean.
    ce = F.cross_entropy(logits, labels, reduction="sum") * world / total_rows
    return out.loss + ce


def _reference(scenario, variant):
    proj, contrast = _model(variant)
    feats, labels, anchors, weights, enqueue, _ = _batch(scenario)
    loss = _step(proj, contrast, feats, labels, anchors, weights, enqueue, 1, len(labels))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in proj.parameters()], contrast.queue.state_dict()


def _worker(rank, world_size):
    results = {}
    for variant in VARIANTS:
        for scenario in SCENARIOS:
            proj, contrast = _model(variant)
            contrast.static_shapes = (
                True  # the accelerator path; the one-process reference uses the CPU's exact sizes
            )
            ddp = DistributedDataParallel(proj)
            feats, labels, anchors, weights, enqueue, n0 = _batch(scenario)
            part = slice(0, n0) if rank == 0 else slice(n0, None)
            with SyncCounter() as counter:
                loss = _step(
                    ddp,
                    contrast,
                    feats[part],
                    labels[part],
                    anchors[part],
                    weights[part],
                    enqueue[part],
                    world_size,
                    len(labels),
                )
                loss.backward()
            results[variant, scenario] = {
                "loss": loss.item(),
                "grads": [p.grad.clone() for p in proj.parameters()],
                "queue": contrast.queue.state_dict(),
                "syncs": dict(counter.sync_ops),
            }
    return results


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    return run_workers(_worker, 2, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ddp_gradient_and_loss_equal_one_process(worker_results, scenario, variant):
    ref_loss, ref_grads, ref_queue = _reference(scenario, variant)
    r0, r1 = (w[variant, scenario] for w in worker_results)
    # DDP averages gradients, detectron2 logs the average of the workers' losses.
    assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(ref_loss, abs=1e-9, rel=1e-9)
    for g0, g1, ref in zip(r0["grads"], r1["grads"], ref_grads):
        assert ref.abs().max() > 1e-3  # a real gradient, not an all-zero one
        torch.testing.assert_close(g0, ref, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(g1, ref, atol=1e-9, rtol=1e-9)
    for key, value in ref_queue.items():
        torch.testing.assert_close(r0["queue"][key], value, atol=1e-12, rtol=0)
        torch.testing.assert_close(r1["queue"][key], value, atol=1e-12, rtol=0)


def test_ddp_step_makes_no_sync(worker_results):
    for results in worker_results:
        for key, r in results.items():
            assert r["syncs"] == {}, key


def test_remote_anchors_loss_has_a_gradient_on_local_keys():
    # The part that a gather without gradient would drop: the loss of worker 1's anchors with
    # respect to worker 0's rows. It is far from zero here, so the DDP test above would catch
    # its loss.
    proj, contrast = _model("out_in")
    feats, labels, anchors, weights, enqueue, n0 = _batch("uneven")
    emb, _ = proj(feats)
    remote_only = anchors.clone()
    remote_only[:n0] = False
    out = contrast(emb, labels, remote_only, weights, max_anchors=PAD, pad_to=PAD)
    (grad,) = torch.autograd.grad(out.loss, emb)
    assert grad[:n0].abs().sum() > 1e-3
