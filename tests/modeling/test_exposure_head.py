"""
RankedContrastiveROIHeads with exposed classes (MODEL.RCDET.OOD.EXPOSED_CLASSES): exposed
proposals are background for the box predictor after sampling; the contrastive loss through the
head's real path against a brute force written from the definition (exposed anchors' only
positive is f, exposed regions and f are negatives of every known anchor); f's gradient when
learned and never when fixed; the queue keeps exposed keys as background; the step's one sync;
two gloo workers against one.
"""

import math
import os

import pytest
import torch
from conftest import REPO, SMALL_QUEUE, sampled_proposals, shapes_batch, tiny_cfg, train_step_syncs
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from dist_utils import run_distributed

from rcdet.data.shapes import CLASS_NAMES
from rcdet.modeling import RankedContrastiveROIHeads
from rcdet.ranking import load_ranking
from rcdet.testing import SyncCounter

pytestmark = pytest.mark.usefixtures("tiny_shapes")

CONFIG = "configs/shapes_rince_exposure_ood.yaml"
KNOWN = ["disc", "bullseye", "square", "window", "tri_frame"]
K = len(KNOWN)  # 5 known classes; background is 5, the exposed boxes arrive as 6 and 7


def _head(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(CONFIG, *opts)).roi_heads


def _proposals_and_targets(seed=3, n_images=2):
    """Random proposals and GT boxes of known classes and both exposed classes."""
    g = torch.Generator().manual_seed(seed)
    proposals, targets = [], []
    for _ in range(n_images):
        t = Instances((128, 128))
        xy = torch.rand(6, 2, generator=g) * 70
        t.gt_boxes = Boxes(torch.cat([xy, xy + 20 + torch.rand(6, 2, generator=g) * 30], dim=1))
        t.gt_classes = torch.tensor([0, 1, 2, 6, 7, 6])  # disc, bullseye, square: ranks 1-3
        p = Instances((128, 128))
        # Proposals around the GT boxes, so that some match them well.
        boxes = t.gt_boxes.tensor.repeat(4, 1) + torch.randn(24, 4, generator=g) * 4
        p.proposal_boxes = Boxes(torch.cat([boxes, torch.rand(16, 4, generator=g) * 100]))
        p.proposal_boxes.tensor[:, 2:] = torch.maximum(
            p.proposal_boxes.tensor[:, 2:], p.proposal_boxes.tensor[:, :2] + 4
        )
        p.objectness_logits = torch.randn(40, generator=g)
        proposals.append(p)
        targets.append(t)
    return proposals, targets


def _sampled(head, seed=5):
    proposals, targets = _proposals_and_targets()
    torch.manual_seed(seed)
    with EventStorage(0):
        return head.label_and_sample_proposals(proposals, targets)


def test_exposed_proposals_become_background_after_sampling():
    head = _head()
    assert isinstance(head, RankedContrastiveROIHeads) and head.num_exposed == 2
    sampled = _sampled(head)
    proposals, targets = _proposals_and_targets()
    torch.manual_seed(5)
    with EventStorage(0):
        plain = super(RankedContrastiveROIHeads, head).label_and_sample_proposals(
            proposals, targets
        )
    exposed_seen = 0
    for p, q in zip(sampled, plain):
        # The same sample; labels above background are the exposed boxes, sampled as objects.
        assert torch.equal(p.proposal_boxes.tensor, q.proposal_boxes.tensor)
        assert torch.equal(p.gt_exposed, q.gt_classes > K)
        assert torch.equal(p.gt_classes, torch.where(q.gt_classes > K, K, q.gt_classes))
        exposed_seen += int(p.gt_exposed.sum())
    assert exposed_seen > 0

    # With every GT box exposed, the box regressor has nothing to learn; with the same boxes
    # known, it does.
    softmax = build_model(tiny_cfg("configs/shapes_softmax_exposure_ood.yaml")).roi_heads
    for labels, regress in (([6, 7, 6, 7, 6, 6], False), ([0, 1, 2, 3, 4, 0], True)):
        proposals, targets = _proposals_and_targets()
        for t in targets:
            t.gt_classes = torch.tensor(labels)
        feats = {
            f: torch.randn(2, 64, 128 // s, 128 // s)
            for f, s in zip(softmax.box_in_features, (8, 16, 32))
        }
        softmax.train()
        torch.manual_seed(5)
        with EventStorage(0):
            _, losses = softmax(None, feats, proposals, targets)
        assert torch.isfinite(losses["loss_cls"])
        assert (losses["loss_box_reg"] > 0) == regress


def _brute_force(embeddings, labels, exposed, ious, f, rank, taus, iou_threshold):
    """RINCE out_in from its definition, with the exposure's positives written out by hand."""
    n = len(labels)
    keys = list(range(n)) + ["f"]

    def key_vector(j):
        return f if j == "f" else embeddings[j]

    def rho(i, j):
        if exposed[i]:
            return 1 if j == "f" else math.inf
        if j == "f" or exposed[j] or labels[j] >= K:
            return math.inf  # f, exposed regions and background: negatives of a known anchor
        v = int(rank[labels[i]][labels[j]])
        return v if 1 <= v <= len(taus) else math.inf

    anchors = [i for i in range(n) if ious[i] >= iou_threshold and (exposed[i] or labels[i] < K)]
    total, counts = 0.0, []
    for k, tau in enumerate(taus, start=1):
        terms = []
        for i in anchors:
            s = {j: float(embeddings[i] @ key_vector(j)) / tau for j in keys if j != i}
            pos = [j for j in s if rho(i, j) == k]
            if not pos:
                continue
            if k == 1:  # "out": each positive against the negatives alone
                neg = sum(math.exp(s[j]) for j in s if rho(i, j) > k)
                ell = -sum(s[p] - math.log(math.exp(s[p]) + neg) for p in pos) / len(pos)
            else:  # "in"
                den = sum(math.exp(s[j]) for j in s if rho(i, j) >= k)
                ell = -math.log(sum(math.exp(s[p]) for p in pos) / den)
            terms.append(ell)
        counts.append(len(terms))
        total += sum(terms) / len(terms) if terms else 0.0
    exposed_anchors = sum(bool(exposed[i]) for i in anchors)
    return total, counts, exposed_anchors


def test_reference_loss_through_the_head_equals_the_brute_force():
    head = _head()
    sampled = _sampled(head)
    torch.manual_seed(1)
    feats = torch.randn(sum(len(p) for p in sampled), head.box_head.output_shape.channels)
    with EventStorage(0) as storage:
        loss = head.contrastive_losses(feats, sampled)["loss_contrast"]
        logged = storage.latest()
    labels = torch.cat([p.gt_classes for p in sampled])
    exposed = torch.cat([p.gt_exposed for p in sampled])
    ious = torch.cat([p.gt_iou for p in sampled])
    rank = (
        load_ranking(os.path.join(REPO, "configs/rankings/shapes_families.yaml"), list(CLASS_NAMES))
        .subset(KNOWN)
        .matrix
    )
    with torch.no_grad():
        embeddings = head.embed(feats).double()
        f = head.reference()[0].double()
    expected, counts, exposed_anchors = _brute_force(
        embeddings, labels.tolist(), exposed.tolist(), ious.tolist(), f, rank,
        head.contrast.loss.temperatures, head.iou_threshold,
    )  # fmt: skip
    assert exposed_anchors > 0 and counts[0] > exposed_anchors and counts[1] > 0 and counts[2] > 0
    assert logged["rcdet/exposed_anchors"][0] == exposed_anchors
    assert loss.item() == pytest.approx(expected * head.current_loss_weight(0), rel=1e-5)
    # The exposed keys entered the queue as background, and the known ones with their class.
    queue_emb, queue_labels = head.queue.keys()
    qthr = head.queue_iou_threshold
    assert (queue_labels == K).sum() == int((exposed & (ious >= qthr)).sum()) > 0
    assert (queue_labels < K).sum() == int(((labels < K) & (ious >= qthr)).sum())
    # A second step reads them back as background keys: f stays the exposed anchors' only
    # positive, and the loss still equals the brute force with the queue as extra keys.
    with EventStorage(1):
        again = head.contrastive_losses(feats, sampled)["loss_contrast"]
    all_emb = torch.cat([embeddings, queue_emb.double()])
    all_labels = labels.tolist() + queue_labels.tolist()
    all_exposed = exposed.tolist() + [False] * len(queue_labels)
    all_ious = ious.tolist() + [0.0] * len(queue_labels)  # queue slots are never anchors
    second, _, _ = _brute_force(
        all_emb, all_labels, all_exposed, all_ious, f, rank,
        head.contrast.loss.temperatures, head.iou_threshold,
    )  # fmt: skip
    assert again.item() == pytest.approx(second * head.current_loss_weight(1), rel=1e-5)


def test_gradient_reaches_f_when_learned_and_never_when_fixed():
    for mode in ("learned", "fixed"):
        head = _head("MODEL.RCDET.OOD.REFERENCE", mode)
        sampled = _sampled(head)
        feats = torch.randn(sum(len(p) for p in sampled), head.box_head.output_shape.channels)
        with EventStorage(0):
            loss = head.contrastive_losses(feats, sampled)["loss_contrast"]
        loss.backward()
        names = [n for n, _ in head.named_parameters()]
        assert "reference.vector" in head.state_dict()  # checkpoints carry f either way
        if mode == "learned":
            grad = head.reference.vector.grad
            assert "reference.vector" in names and grad is not None and grad.abs().sum() > 0
        else:
            assert "reference.vector" not in names and not head.reference.vector.requires_grad
            assert head.reference.vector.grad is None


def test_exposure_keeps_the_step_at_one_sync():
    torch.manual_seed(0)
    with_f = build_model(tiny_cfg(CONFIG, "MODEL.RCDET.QUEUE_SIZE", "32"))
    with_f.roi_heads.contrast.static_shapes = True  # the accelerator path
    torch.manual_seed(0)
    without = build_model(tiny_cfg("configs/shapes_softmax_exposure_ood.yaml"))
    batch = shapes_batch(classes=[0, 3, 6, 7])
    on, losses = train_step_syncs(with_f, batch)
    off, _ = train_step_syncs(without, batch)
    assert losses["loss_contrast"] > 0
    assert sum((on.sync_ops - off.sync_ops).values()) <= 1, dict(on.sync_ops - off.sync_ops)
    assert (off.sync_ops - on.sync_ops) == {}

    head = with_f.roi_heads
    sampled = _sampled(head)
    feats = torch.randn(sum(len(p) for p in sampled), head.box_head.output_shape.channels)
    with EventStorage(3), SyncCounter() as c:
        head.contrastive_losses(feats, sampled)["loss_contrast"].backward()
    assert c.syncs == 1 and c.sync_ops == {"Tensor.tolist": 1}


# ---------------------------------------------------------------- 2 workers against 1

STEPS = 2


def _worker_proposals(step):
    """Two images' sampled proposals: known classes, background and exposed (uneven sizes)."""
    return sampled_proposals(300 + step, (9, 7), K, exposed=True)


def _worker_head():
    return _head(*SMALL_QUEUE, "MODEL.RCDET.OOD.REFERENCE", "learned")


def _worker_losses(head, image_slice):
    losses, grads = [], []
    sizes = [9, 7]
    with EventStorage(0):
        for step in range(STEPS):
            props = _worker_proposals(step)[image_slice]
            g = torch.Generator().manual_seed(400 + step)
            feats = torch.randn(16, head.box_head.output_shape.channels, generator=g)
            start = sum(sizes[: image_slice.start or 0])
            stop = start + sum(len(p) for p in props)
            head.zero_grad()
            loss = head.contrastive_losses(feats[start:stop], props)["loss_contrast"]
            loss.backward()
            losses.append(loss.item())
            grads.append(head.reference.vector.grad.clone())
    return losses, grads


def _exposure_worker(rank, world_size, out_dir, shapes_root):
    from rcdet.data import register_rcdet_shapes

    register_rcdet_shapes(shapes_root)
    head = _worker_head()
    losses, grads = _worker_losses(head, slice(rank, rank + 1))
    torch.save(
        {"losses": losses, "grads": grads, "queue": head.queue.state_dict()},
        os.path.join(out_dir, f"rank{rank}.pth"),
    )


def test_two_workers_with_exposure_average_to_one(tmp_path, tiny_shapes):
    single_head = _worker_head()
    single, single_grads = _worker_losses(single_head, slice(0, 2))
    run_distributed(_exposure_worker, 2, str(tmp_path), tiny_shapes)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth") for r in (0, 1))
    for step in range(STEPS):
        # The mean over workers (DDP's average, for the loss and for f's gradient) is the
        # one-process value: the normaliser counts the exposed anchors of both workers.
        assert (r0["losses"][step] + r1["losses"][step]) / 2 == pytest.approx(
            single[step], abs=1e-5
        )
        torch.testing.assert_close(
            (r0["grads"][step] + r1["grads"][step]) / 2, single_grads[step], atol=1e-5, rtol=1e-4
        )
    for key, value in single_head.queue.state_dict().items():
        assert torch.equal(r0["queue"][key], r1["queue"][key]), key
        torch.testing.assert_close(r0["queue"][key], value, atol=1e-6, rtol=1e-6)
