"""
What a GPU training run needs, checked on the CPU: no device-to-host syncs in the loss, at most
one in the head's step, an operator count independent of the number of classes, mixed
precision, and clear errors for non-finite embeddings and impossible labels.
"""

import math

import pytest
import torch
from torch.nn import functional as F

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import load_tool, tiny_cfg
from rcdet.config import ConfigError
from rcdet.modeling.rince import RankedInfoNCELoss, ranked_info_nce
from rcdet.testing import SyncCounter, random_loss_inputs, ring_rank_matrix

bench = load_tool("benchmark_loss")


def _loss_inputs(num_classes, n=96, m=512, d=32, dtype=torch.float32):
    z, y, k, ky, self_idx = random_loss_inputs(n, m, d, num_classes, torch.device("cpu"))
    return z.to(dtype).requires_grad_(True), y, k.to(dtype).requires_grad_(True), ky, self_idx


def _count_loss(num_classes, variant="out_in", r=3):
    z, y, k, ky, self_idx = _loss_inputs(num_classes)
    loss = RankedInfoNCELoss(ring_rank_matrix(num_classes, r, "cpu"), [0.1 * (i + 1) for i in range(r)], variant)
    with SyncCounter() as counter:
        loss(z, y, k, ky, self_idx, check_inputs=False).loss.backward()
    return counter


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


@pytest.mark.parametrize("variant", ["out_in", "in", "out"])
def test_loss_forward_and_backward_make_no_sync(variant):
    counter = _count_loss(20, variant)
    assert counter.syncs == 0, dict(counter.sync_ops)


def test_operator_count_does_not_grow_with_the_number_of_classes():
    ops20, ops80 = _count_loss(20).ops, _count_loss(80).ops
    assert abs(ops80 - ops20) <= 0.1 * ops20, (ops20, ops80)
    # ... but it does grow with the number of ranks (the count is real).
    assert _count_loss(20, r=4).ops > _count_loss(20, r=2).ops


def test_label_check_of_the_functional_api():
    z, y, k, ky, self_idx = _loss_inputs(5)
    bad = y.clone()
    bad[3] = 5
    with pytest.raises(ValueError, match=r"anchor_labels must lie in \[0, 5\).*\[5\]"):
        ranked_info_nce(z, bad, k, ky, ring_rank_matrix(5, 2, "cpu"), [0.1, 0.2], "out_in", self_idx)
    bad[3] = -1
    with pytest.raises(ValueError, match=r"\[-1\]"):
        ranked_info_nce(z, bad, k, ky, ring_rank_matrix(5, 2, "cpu"), [0.1, 0.2], "out_in", self_idx)


@pytest.mark.parametrize("variant", ["out_in", "in", "out"])
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_bfloat16_autocast_close_to_float32(variant, tau):
    torch.manual_seed(0)
    proj = torch.nn.Linear(24, 16)
    feats = torch.randn(64, 24)
    labels = torch.randint(0, 6, (64,))
    ranks = ring_rank_matrix(6, 3, "cpu")
    taus = [tau, 2 * tau, 3 * tau]

    def run(autocast):
        proj.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            emb = F.normalize(proj(feats), dim=1)
            out = ranked_info_nce(emb, labels, emb, labels, ranks, taus, variant, torch.arange(64))
        out.loss.backward()
        return emb.dtype, out.loss.detach(), proj.weight.grad.clone()

    dtype16, loss16, grad16 = run(True)
    dtype32, loss32, grad32 = run(False)
    assert dtype16 == torch.bfloat16 and dtype32 == torch.float32  # autocast really was on
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) <= 0.02 * abs(loss32.item())
    assert torch.isfinite(grad16).all()


def test_float16_inputs_at_tau_001_are_finite():
    z, y, k, ky, self_idx = _loss_inputs(8, dtype=torch.float16)
    out = ranked_info_nce(z, y, k, ky, ring_rank_matrix(8, 3, "cpu"), [0.01, 0.02, 0.03], "out_in", self_idx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all() and torch.isfinite(k.grad).all()
    assert z.grad.dtype == torch.float16


def _batch(seed=1, n_images=2):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n_images):
        inst = Instances((160, 176))
        xy = torch.rand(3, 2, generator=g) * 90
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 30 + torch.rand(3, 2, generator=g) * 50], dim=1))
        inst.gt_classes = torch.randint(0, 9, (3,), generator=g)
        img = torch.randint(0, 256, (3, 160, 176), generator=g, dtype=torch.uint8)
        batch.append({"image": img, "instances": inst, "height": 160, "width": 176})
    return batch


def _train_step_syncs(model, batch):
    model.train()
    torch.manual_seed(5)
    with EventStorage(0), SyncCounter() as counter:
        losses = model(batch)
        sum(losses.values()).backward()
    return counter, losses


def test_head_step_adds_at_most_one_sync(tiny_shapes):
    # Everything detectron2 itself syncs on (proposal sampling, pooler level assignment) is the
    # same with and without the branch, so the difference is what rcdet adds: the one transfer
    # of the logged scalars.
    torch.manual_seed(0)
    with_branch = build_model(tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.QUEUE_SIZE", "32"))
    with_branch.roi_heads.contrast.static_shapes = True  # the accelerator path (auto on the CPU reads the anchor count)
    torch.manual_seed(0)
    without = build_model(tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.LOSS", "none"))
    batch = _batch()
    on, losses = _train_step_syncs(with_branch, batch)
    off, _ = _train_step_syncs(without, batch)
    assert "loss_contrast" in losses and losses["loss_contrast"] > 0
    diff = on.sync_ops - off.sync_ops
    assert sum(diff.values()) <= 1, dict(diff)
    assert (off.sync_ops - on.sync_ops) == {}, "the branch changed detectron2's own path"

    # The contrastive step alone, queue enqueue and logging included.
    head = with_branch.roi_heads
    feats = torch.randn(20, head.box_head.output_shape.channels, requires_grad=True)
    props = _proposals()
    with EventStorage(3), SyncCounter() as c:
        head.contrastive_losses(feats, props)["loss_contrast"].backward()
    assert c.syncs == 1 and c.sync_ops == {"Tensor.tolist": 1}
    with SyncCounter() as c:  # the queue's fill count stays on the device
        count = head.queue.num_filled()
    assert c.syncs == 0 and int(count) == int(head.queue.filled.sum()) > 0


def test_cpu_exact_anchor_count_equals_the_static_path(tiny_shapes):
    torch.manual_seed(0)
    head = build_model(tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.QUEUE_SIZE", "32")).roi_heads
    feats = torch.randn(20, head.box_head.output_shape.channels)
    results = {}
    for static in (True, False):
        head.contrast.static_shapes = static
        head.queue.load_state_dict({k: torch.zeros_like(v) if k != "labels" else torch.full_like(v, -1) for k, v in head.queue.state_dict().items()})
        with EventStorage(3), SyncCounter() as c:
            results[static] = head.contrastive_losses(feats, _proposals())["loss_contrast"]
        results[static, "syncs"] = dict(c.sync_ops)
    torch.testing.assert_close(results[True], results[False], atol=1e-6, rtol=1e-6)
    assert results[False, "syncs"] == {"Tensor.tolist": 1, "aten::_local_scalar_dense": 1}
    assert head.contrast.static_shapes is False and build_model(tiny_cfg("configs/shapes_rince.yaml")).roi_heads.contrast.static_shapes is None


def _proposals():
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(4)
    out = []
    for n in (12, 8):
        p = Instances((64, 64))
        p.proposal_boxes = Boxes(torch.rand(n, 4, generator=g))
        p.gt_classes = torch.randint(0, 10, (n,), generator=g)
        p.gt_iou = 0.5 + 0.5 * torch.rand(n, generator=g)
        out.append(p)
    return out


def test_one_head_training_step_under_bfloat16_autocast(tiny_shapes):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.QUEUE_SIZE", "32", "MODEL.RCDET.TEMPERATURES", "[0.01, 0.02, 0.03]"))
    model.train()
    with EventStorage(0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(_batch())
        sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_contrast"].dtype == torch.float32
    grads = [p.grad for p in model.roi_heads.projection.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_non_finite_embeddings_get_detectron2_style_error(tiny_shapes):
    torch.manual_seed(0)
    head = build_model(tiny_cfg("configs/shapes_rince.yaml")).roi_heads
    feats = torch.randn(20, head.box_head.output_shape.channels)
    feats[4, 0] = float("nan")
    with EventStorage(7), pytest.raises(FloatingPointError, match=r"Inf/NaN at iteration=7.*SOLVER.BASE_LR"):
        head.contrastive_losses(feats, _proposals())
    # A caller that skips the batch keeps a clean queue: the non-finite row was not enqueued.
    assert head.queue.filled.any() and torch.isfinite(head.queue.embeddings).all()


def test_amp_precision_key(tiny_shapes, tmp_path):
    from rcdet.engine import Trainer, amp_precision

    cfg = tiny_cfg("configs/shapes_rince.yaml", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16", output_dir=tmp_path)
    assert amp_precision(cfg) == torch.bfloat16
    with pytest.warns(UserWarning):  # torch.cuda.amp.GradScaler without CUDA: disabled
        trainer = Trainer(cfg)
    assert trainer._trainer.precision == torch.bfloat16
    with pytest.raises(ConfigError, match="SOLVER.AMP.PRECISION = 'half'"):
        tiny_cfg("configs/shapes_rince.yaml", "SOLVER.AMP.PRECISION", "half")


def test_voc_amp_config_runs_one_float16_step(tiny_shapes, tmp_path):
    """configs/voc_rince_amp.yaml on the tiny data: detectron2's AMPTrainer is chosen, and one
    of its steps (float16 autocast, scaled loss) runs; AMPTrainer.run_step itself needs CUDA."""
    from detectron2.engine import AMPTrainer

    from rcdet.engine import Trainer

    cfg = tiny_cfg(
        "configs/voc_rince_amp.yaml", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('rcdet_shapes_trainval',)",
        "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "9", "MODEL.RCDET.RANKING_FILE", "configs/rankings/shapes_families.yaml",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "SOLVER.BASE_LR", "0.0", output_dir=tmp_path,
    )
    with pytest.warns(UserWarning):
        trainer = Trainer(cfg)
    amp = trainer._trainer
    assert isinstance(amp, AMPTrainer) and amp.precision == torch.float16
    with EventStorage(0):
        with torch.autocast("cpu", dtype=amp.precision):
            losses = amp.model(next(amp._data_loader_iter))
        (sum(losses.values()) * 1024.0).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_contrast"] > 0
    assert all(torch.isfinite(p.grad).all() for p in amp.model.roi_heads.projection.parameters())


def test_benchmark_tools_report_syncs_and_operators(tmp_path):
    overhead = load_tool("benchmark_overhead")
    out = tmp_path / "overhead.json"
    assert overhead.main(["--synthetic", "--steps", "1", "--batches", "1", "--no-memory", "--json", str(out),
                          "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TEST", "128"]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["lr"] == 0.0 and result["amp"] == "off"
    assert result["syncs_added_by_rcdet"] == {"Tensor.tolist": 1}
    assert result["syncs_per_step"]["rince"] == result["syncs_per_step"]["standard"] + 1
    assert result["ops_per_step"]["rince"] > result["ops_per_step"]["standard"]

    loss_json = tmp_path / "loss.json"
    assert bench.main(["--sizes", "64x256", "--ranks", "2", "--no-memory", "--repeats", "1", "--json", str(loss_json)]) == 0
    rows = json.loads(loss_json.read_text())["syncs_and_operators"]
    rince = [r for r in rows if r["loss"] != "supcon_out"]
    assert rince and all(r["syncs"] == 0 for r in rince)
    by_key = {(r["loss"], r["r"], r["classes"]): r["ops"] for r in rows}
    assert by_key["rince_out_in", 3, 20] == by_key["rince_out_in", 3, 80]
