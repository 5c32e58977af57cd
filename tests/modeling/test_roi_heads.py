"""
rcdet.modeling.roi_heads: the branch off is detectron2's StandardROIHeads, on it adds only its
loss; degenerate batches, the loss weight schedule, embeddings at test time, config errors; the
device syncs of a training step, mixed precision, non-finite embeddings; two gloo workers against
one; TorchScript scripting of the head and tracing of the whole model with embeddings.
"""

import pytest
import torch
from conftest import SMALL_QUEUE, sampled_proposals, shapes_batch, tiny_cfg, train_step_syncs
from detectron2.export import TracingAdapter
from detectron2.export.torchscript_patch import freeze_training_mode, patch_instances
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from dist_utils import run_workers

from rcdet.config import ConfigError
from rcdet.modeling import RankedContrastiveROIHeads
from rcdet.testing import SyncCounter

# Every model here is built for the tiny built-in dataset.
pytestmark = pytest.mark.usefixtures("tiny_shapes")


def _build(*opts, seed=0):
    cfg = tiny_cfg("configs/shapes_rince.yaml", *opts)
    torch.manual_seed(seed)
    return build_model(cfg)


def _inputs(num_boxes=(3, 2), classes=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, n in enumerate(num_boxes):
        img = torch.randint(0, 256, (3, 160, 176), generator=g, dtype=torch.uint8)
        inst = Instances((160, 176))
        xy = torch.rand(n, 2, generator=g) * 90
        wh = 30 + torch.rand(n, 2, generator=g) * 50
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = (
            torch.full((n,), classes, dtype=torch.int64)
            if classes is not None
            else torch.randint(0, 9, (n,), generator=g)
        )
        batch.append({"image": img, "instances": inst, "height": 160, "width": 176})
    return batch


def _train_losses(model, batch, seed=5):
    model.train()
    torch.manual_seed(seed)
    with EventStorage(0):
        return model(batch)


def test_branch_off_equals_standard_roi_heads():
    std = _build("MODEL.ROI_HEADS.NAME", "StandardROIHeads")
    off = _build("MODEL.RCDET.LOSS", "none")
    assert isinstance(off.roi_heads, RankedContrastiveROIHeads) and off.roi_heads.projection is None
    assert off.roi_heads.vos is None  # MODEL.RCDET.VOS.ENABLED is off by default
    sd_std, sd_off = std.state_dict(), off.state_dict()
    assert sd_std.keys() == sd_off.keys()
    assert all(torch.equal(sd_std[k], sd_off[k]) for k in sd_std)
    batch = _inputs()
    l_std, l_off = _train_losses(std, batch), _train_losses(off, batch)
    assert l_std.keys() == l_off.keys()
    assert all(torch.equal(l_std[k], l_off[k]) for k in l_std)
    std.eval(), off.eval()
    with torch.no_grad():
        o_std, o_off = std(batch), off(batch)
    for a, b in zip(o_std, o_off):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_branch_on_keeps_standard_initialisation_and_losses():
    std = _build("MODEL.ROI_HEADS.NAME", "StandardROIHeads")
    on = _build("MODEL.RCDET.LOSS", "rince_out_in")
    sd_std, sd_on = std.state_dict(), on.state_dict()
    assert all(torch.equal(sd_std[k], sd_on[k]) for k in sd_std)
    assert {k for k in sd_on if k not in sd_std} == {
        k
        for k in sd_on
        if k.startswith("roi_heads.projection") or k.startswith("roi_heads.contrast.queue")
    }
    batch = _inputs()
    l_std, l_on = _train_losses(std, batch), _train_losses(on, batch)
    for k in l_std:
        assert torch.equal(l_std[k], l_on[k]), k
    assert "loss_contrast" in l_on


@pytest.mark.parametrize(
    "loss", ["rince_in", "rince_out", "rince_out_in", "rince_in_r1", "rince_out_r1", "supcon"]
)
def test_losses_finite_and_gradient_reaches_backbone(loss):
    model = _build("MODEL.RCDET.LOSS", loss, "MODEL.RCDET.IOU_THRESHOLD", "0.5")
    losses = _train_losses(model, _inputs((4, 4), seed=3))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_contrast"] > 0
    model.zero_grad()
    losses["loss_contrast"].backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("old, form", [("supcon_out", "out"), ("supcon_in", "in")])
def test_saved_configs_with_the_old_one_rank_names_still_build(old, form):
    with pytest.warns(FutureWarning, match=f"'{old}' is RINCE with one rank"):
        model = _build("MODEL.RCDET.LOSS", old)
    loss = model.roi_heads.contrast.loss
    assert loss.form == form and loss.num_ranks == 1
    assert _build("MODEL.RCDET.LOSS", "supcon").roi_heads.contrast.loss.form == "supcon"


@pytest.mark.parametrize(
    "num_boxes, classes",
    [((0, 2), None), ((0, 0), None), ((3, 3), 4)],
    ids=["empty-gt", "all-background", "single-class"],
)
def test_degenerate_batches_stay_finite_and_differentiable(num_boxes, classes):
    model = _build("MODEL.RCDET.LOSS", "rince_out_in")
    losses = _train_losses(model, _inputs(num_boxes, classes=classes))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for p in model.roi_heads.projection.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_decay_schedule_comes_from_iteration():
    model = _build(
        "MODEL.RCDET.LOSS_WEIGHT",
        "0.8",
        "MODEL.RCDET.DECAY_STEPS",
        "[10, 20]",
        "MODEL.RCDET.DECAY_RATE",
        "0.5",
    )
    head = model.roi_heads
    assert [head.current_loss_weight(i) for i in (0, 9, 10, 19, 20, 100)] == [
        0.8,
        0.8,
        0.4,
        0.4,
        0.2,
        0.2,
    ]


def test_embed_at_test():
    model = _build("MODEL.RCDET.EMBED_AT_TEST", "True", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    model.eval()
    with torch.no_grad():
        out = model(_inputs())
    inst = out[0]["instances"]
    assert len(inst) > 0
    assert inst.pred_embeddings.shape == (len(inst), 64)
    assert torch.allclose(inst.pred_embeddings.norm(dim=1), torch.ones(len(inst)), atol=1e-5)
    assert inst.pred_logits.shape == (len(inst), 10)
    # The logits are those of the proposal each detection came from: its class's softmax
    # probability is the detection score.
    probs = inst.pred_logits.softmax(dim=1)
    assert torch.allclose(probs[torch.arange(len(inst)), inst.pred_classes], inst.scores, atol=1e-5)
    plain = _build()
    plain.eval()
    with torch.no_grad():
        fields = plain(_inputs())[0]["instances"].get_fields()
    assert "pred_embeddings" not in fields and "pred_logits" not in fields


@pytest.mark.parametrize(
    "opts, key",
    [
        (("MODEL.RCDET.RANKING_FILE", "configs/rankings/missing.yaml"), "MODEL.RCDET.RANKING_FILE"),
        (
            ("MODEL.RCDET.RANKING_FILE", "configs/rankings/voc_human.yaml"),
            "MODEL.RCDET.RANKING_FILE",
        ),
        (("MODEL.RCDET.TEMPERATURES", "[0.3, 0.2, 0.4]"), "MODEL.RCDET.TEMPERATURES"),
        (("MODEL.RCDET.TEMPERATURES", "[0.1]"), "MODEL.RCDET.TEMPERATURES"),
        (
            ("MODEL.RCDET.TAU_MIN", "0.5", "MODEL.RCDET.TAU_MAX", "0.2"),
            "MODEL.RCDET.TAU_MIN/TAU_MAX",
        ),
        (("MODEL.RCDET.LOSS", "rince_sideways"), "MODEL.RCDET.LOSS"),
        (("MODEL.RCDET.REWEIGHT", "cubic"), "MODEL.RCDET.REWEIGHT"),
        (("MODEL.RCDET.LOSS_WEIGHT", "-0.5"), "MODEL.RCDET.LOSS_WEIGHT = -0.5; allowed: a finite"),
        (("MODEL.RCDET.DECAY_RATE", "2.0"), "MODEL.RCDET.DECAY_RATE = 2.0; allowed: a number in"),
        (("MODEL.RCDET.EMBED_DIM", "0"), "MODEL.RCDET.EMBED_DIM = 0; allowed: an integer >= 1"),
        # Without the branch the keys are still checked: a later run with it would fail.
        (
            ("MODEL.RCDET.LOSS", "none", "MODEL.RCDET.QUEUE_SIZE", "-1"),
            "MODEL.RCDET.QUEUE_SIZE = -1; allowed: an integer >= 0",
        ),
    ],
)
def test_config_errors_name_the_key(opts, key):
    with pytest.raises(ConfigError) as e:
        _build(*opts)
    assert key in str(e.value)


# ---------------------------------------------------------------- syncs, precision, non-finite


def test_head_step_adds_at_most_one_sync(tiny_shapes):
    # Everything detectron2 itself syncs on (proposal sampling, pooler level assignment) is the
    # same with and without the branch, so the difference is what rcdet adds: the one transfer
    # of the logged scalars.
    torch.manual_seed(0)
    with_branch = build_model(tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.QUEUE_SIZE", "32"))
    with_branch.roi_heads.contrast.static_shapes = (
        True  # the accelerator path (auto on the CPU reads the anchor count)
    )
    torch.manual_seed(0)
    without = build_model(tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.LOSS", "none"))
    batch = shapes_batch()
    on, losses = train_step_syncs(with_branch, batch)
    off, _ = train_step_syncs(without, batch)
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
    head = build_model(
        tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.QUEUE_SIZE", "32")
    ).roi_heads
    feats = torch.randn(20, head.box_head.output_shape.channels)
    results = {}
    for static in (True, False):
        head.contrast.static_shapes = static
        head.queue.load_state_dict(
            {
                k: torch.zeros_like(v) if k != "labels" else torch.full_like(v, -1)
                for k, v in head.queue.state_dict().items()
            }
        )
        with EventStorage(3), SyncCounter() as c:
            results[static] = head.contrastive_losses(feats, _proposals())["loss_contrast"]
        results[static, "syncs"] = dict(c.sync_ops)
    torch.testing.assert_close(results[True], results[False], atol=1e-6, rtol=1e-6)
    assert results[False, "syncs"] == {"Tensor.tolist": 1, "aten::_local_scalar_dense": 1}
    assert (
        head.contrast.static_shapes is False
        and build_model(tiny_cfg("configs/shapes_rince.yaml")).roi_heads.contrast.static_shapes
        is None
    )


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
    model = build_model(
        tiny_cfg(
            "configs/shapes_rince.yaml",
            "MODEL.RCDET.QUEUE_SIZE",
            "32",
            "MODEL.RCDET.TEMPERATURES",
            "[0.01, 0.02, 0.03]",
        )
    )
    model.train()
    with EventStorage(0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(shapes_batch())
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
    with (
        EventStorage(7),
        pytest.raises(FloatingPointError, match=r"Inf/NaN at iteration=7.*SOLVER.BASE_LR"),
    ):
        head.contrastive_losses(feats, _proposals())
    # A caller that skips the batch keeps a clean queue: the non-finite row was not enqueued.
    assert head.queue.filled.any() and torch.isfinite(head.queue.embeddings).all()


# ---------------------------------------------------------------- 2 workers against 1
# Two CPU workers (gloo), each with half the batch, against one worker with the whole batch.


STEPS = 2


def _worker_proposals(step):
    """Two images' sampled proposals: the 9 classes and background (uneven sizes)."""
    return sampled_proposals(100 + step, (9, 6), 9)


def _worker_features(step, dim):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(15, dim, generator=g)


def _worker_head():
    cfg = tiny_cfg("configs/shapes_rince.yaml", *SMALL_QUEUE, "MODEL.RCDET.REWEIGHT", "linear")
    torch.manual_seed(0)
    return build_model(cfg).roi_heads


def _contrastive_losses(head, image_slice):
    losses = []
    with EventStorage(0):
        for step in range(STEPS):
            props = _worker_proposals(step)[image_slice]
            feats = _worker_features(step, head.box_head.output_shape.channels)
            sizes = [9, 6]
            start = sum(sizes[: image_slice.start or 0])
            stop = start + sum(len(p) for p in props)
            losses.append(head.contrastive_losses(feats[start:stop], props)["loss_contrast"].item())
    return losses


def _head_worker(rank, world_size, shapes_root):
    from rcdet.data import register_rcdet_shapes

    # A spawned process imports rcdet afresh: point it at the test's dataset again.
    register_rcdet_shapes(shapes_root)
    head = _worker_head()
    losses = _contrastive_losses(head, slice(rank, rank + 1))
    return {"losses": losses, "queue": head.queue.state_dict()}


def test_two_workers_average_to_single_worker_loss(tmp_path, tiny_shapes):
    single_head = _worker_head()
    single = _contrastive_losses(single_head, slice(0, 2))
    r0, r1 = run_workers(_head_worker, 2, tmp_path, tiny_shapes)
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


# ---------------------------------------------------------------- TorchScript


def _head_inputs(head, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(96, 112), (80, 96)]
    images = ImageList(torch.zeros(2, 3, 96, 112), sizes)
    features = {
        f: torch.randn(
            2,
            head.box_head.input_shape.channels if hasattr(head.box_head, "input_shape") else 64,
            96 // s,
            112 // s,
            generator=g,
        )
        for f, s in zip(head.box_in_features, (8, 16, 32))
    }
    proposals = []
    for h, w in sizes:
        p = Instances((h, w))
        xy = torch.rand(30, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        p.proposal_boxes = Boxes(
            torch.cat([xy, xy + 10 + torch.rand(30, 2, generator=g) * 30], dim=1)
        )
        p.objectness_logits = torch.randn(30, generator=g)
        proposals.append(p)
    return images, features, proposals


@pytest.mark.parametrize(
    "opts",
    [
        ("MODEL.RCDET.LOSS", "none"),
        ("MODEL.RCDET.LOSS", "rince_out_in"),
        ("MODEL.RCDET.VOS.ENABLED", "True", "MODEL.RCDET.VOS.SAMPLE_NUMBER", "40"),
        (
            "MODEL.RCDET.OOD.HELD_OUT_CLASSES",
            "['ring', 'triangle']",
            "MODEL.RCDET.OOD.EXPOSED_CLASSES",
            "['frame', 'tri_split']",
            "MODEL.RCDET.OOD.REFERENCE",
            "learned",
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "5",
        ),
    ],
    ids=["none", "rince_out_in", "rince_out_in+vos", "rince_out_in+learned_f"],
)
def test_head_scripts_like_standard_roi_heads(tiny_shapes, opts):
    cfg = tiny_cfg(
        "configs/shapes_rince.yaml",
        *opts,
        "MODEL.RCDET.VOS.STARTING_ITER",
        "0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
    )
    torch.manual_seed(0)
    head = build_model(cfg).roi_heads.eval()
    images, features, proposals = _head_inputs(head)
    fields = {
        "proposal_boxes": Boxes,
        "objectness_logits": torch.Tensor,
        "pred_boxes": Boxes,
        "scores": torch.Tensor,
        "pred_classes": torch.Tensor,
    }
    with torch.no_grad():
        eager, _ = head(images, features, proposals)
        with freeze_training_mode(head), patch_instances(fields) as new_instances:
            scripted_head = torch.jit.script(head)
            scripted, _ = scripted_head(
                images, features, [new_instances.from_instances(p) for p in proposals]
            )
    assert sum(len(x) for x in eager) > 0
    for e, s in zip(eager, scripted):
        assert torch.equal(e.pred_boxes.tensor, s.pred_boxes.tensor)
        assert torch.equal(e.scores, s.scores) and torch.equal(e.pred_classes, s.pred_classes)


def _model_and_images(tiny_shapes, embed=True):
    cfg = tiny_cfg(
        "configs/shapes_rince.yaml",
        "MODEL.RCDET.EMBED_AT_TEST",
        str(embed),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
        "TEST.DETECTIONS_PER_IMAGE",
        "1000",
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    images = [
        torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float()
        for h, w in ((160, 192), (128, 224))
    ]
    return model, images


def test_tracing_exports_logits_and_embeddings_for_any_input_size(tiny_shapes):
    model, (first, second) = _model_and_images(tiny_shapes)

    def inference(m, inputs):
        return m.inference(inputs, do_postprocess=False)

    adapter = TracingAdapter(model, [{"image": first}], inference)
    traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    counts = set()
    for image in (first, second):  # the second size was never seen by the tracer
        with torch.no_grad():
            ref = model.inference([{"image": image}], do_postprocess=False)[0]
            got = adapter.outputs_schema(traced(image))[0]
        counts.add(len(ref))
        assert len(got) == len(ref) > 0
        for field in ("pred_boxes", "scores", "pred_classes", "pred_logits", "pred_embeddings"):
            a, b = ref.get(field), got.get(field)
            a, b = (a.tensor, b.tensor) if isinstance(a, Boxes) else (a, b)
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=field)
        assert got.pred_embeddings.shape[1] == 64 and got.pred_logits.shape[1] == 10
    assert (
        len(counts) == 2
    ), "both sizes gave the same number of detections: the check would not catch a frozen split"
