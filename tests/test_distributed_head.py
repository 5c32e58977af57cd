"""2 CPU workers (gloo), each with half the batch, against 1 worker with the whole batch."""

import os

import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from conftest import tiny_cfg
from dist_utils import run_distributed

STEPS = 2


def _proposals(step):
    """Two images' sampled proposals with hand-set labels and IoUs (uneven sizes)."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for n in (9, 6):
        p = Instances((64, 64))
        p.proposal_boxes = Boxes(torch.rand(n, 4, generator=g))
        p.gt_classes = torch.randint(0, 10, (n,), generator=g)  # 9 = background
        p.gt_iou = 0.4 + 0.6 * torch.rand(n, generator=g)
        out.append(p)
    return out


def _features(step, dim):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(15, dim, generator=g)


def _head():
    cfg = tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.QUEUE_SIZE", "16", "MODEL.RCDET.IOU_THRESHOLD", "0.5",
                   "MODEL.RCDET.QUEUE_IOU_THRESHOLD", "0.5", "MODEL.RCDET.REWEIGHT", "linear")
    torch.manual_seed(0)
    return build_model(cfg).roi_heads


def _run(head, image_slice):
    losses = []
    with EventStorage(0):
        for step in range(STEPS):
            props = _proposals(step)[image_slice]
            feats = _features(step, head.box_head.output_shape.channels)
            sizes = [9, 6]
            start = sum(sizes[: image_slice.start or 0])
            stop = start + sum(len(p) for p in props)
            losses.append(head.contrastive_losses(feats[start:stop], props)["loss_contrast"].item())
    return losses


def _worker(rank, world_size, out_dir, shapes_root):
    from rcdet.data import register_rcdet_shapes

    # A spawned process imports rcdet afresh: point it at the test's dataset again.
    register_rcdet_shapes(shapes_root)
    head = _head()
    losses = _run(head, slice(rank, rank + 1))
    torch.save({"losses": losses, "queue": head.queue.state_dict()}, os.path.join(out_dir, f"rank{rank}.pth"))


def test_two_workers_average_to_single_worker_loss(tmp_path, tiny_shapes):
    single_head = _head()
    single = _run(single_head, slice(0, 2))
    run_distributed(_worker, 2, str(tmp_path), tiny_shapes)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth") for r in (0, 1))
    for step in range(STEPS):
        # Each worker's loss is its anchors' share rescaled by world size, so the mean over
        # workers (what DDP averages and detectron2 logs) equals the single-worker loss.
        assert abs((r0["losses"][step] + r1["losses"][step]) / 2 - single[step]) < 1e-5
    assert r0["losses"][0] != r1["losses"][0]
    # Identical on both workers (they write the same gathered rows); equal to the one-process
    # queue up to float rounding, since the embeddings come from differently shaped matmuls.
    for key, value in single_head.queue.state_dict().items():
        assert torch.equal(r0["queue"][key], r1["queue"][key]), key
        torch.testing.assert_close(r0["queue"][key], value, atol=1e-6, rtol=1e-6)
