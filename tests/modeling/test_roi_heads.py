import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from conftest import tiny_cfg
from rcdet.config import ConfigError
from rcdet.modeling import RankedContrastiveROIHeads


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
            torch.full((n,), classes, dtype=torch.int64) if classes is not None else torch.randint(0, 9, (n,), generator=g)
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
        k for k in sd_on if k.startswith("roi_heads.projection") or k.startswith("roi_heads.contrast.queue")
    }
    batch = _inputs()
    l_std, l_on = _train_losses(std, batch), _train_losses(on, batch)
    for k in l_std:
        assert torch.equal(l_std[k], l_on[k]), k
    assert "loss_contrast" in l_on


@pytest.mark.parametrize("loss", ["rince_in", "rince_out", "rince_out_in", "supcon_in", "supcon_out"])
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


@pytest.mark.parametrize(
    "num_boxes, classes", [((0, 2), None), ((0, 0), None), ((3, 3), 4)], ids=["empty-gt", "all-background", "single-class"]
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
    model = _build("MODEL.RCDET.LOSS_WEIGHT", "0.8", "MODEL.RCDET.DECAY_STEPS", "[10, 20]", "MODEL.RCDET.DECAY_RATE", "0.5")
    head = model.roi_heads
    assert [head.current_loss_weight(i) for i in (0, 9, 10, 19, 20, 100)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2]


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
        (("MODEL.RCDET.RANKING_FILE", "configs/rankings/voc_human.yaml"), "MODEL.RCDET.RANKING_FILE"),
        (("MODEL.RCDET.TEMPERATURES", "[0.3, 0.2, 0.4]"), "MODEL.RCDET.TEMPERATURES"),
        (("MODEL.RCDET.TEMPERATURES", "[0.1]"), "MODEL.RCDET.TEMPERATURES"),
        (("MODEL.RCDET.TAU_MIN", "0.5", "MODEL.RCDET.TAU_MAX", "0.2"), "MODEL.RCDET.TAU_MIN/TAU_MAX"),
        (("MODEL.RCDET.LOSS", "rince_sideways"), "MODEL.RCDET.LOSS"),
        (("MODEL.RCDET.REWEIGHT", "cubic"), "MODEL.RCDET.REWEIGHT"),
    ],
)
def test_config_errors_name_the_key(opts, key):
    with pytest.raises(ConfigError) as e:
        _build(*opts)
    assert key in str(e.value)
