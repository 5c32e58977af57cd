"""TorchScript scripting of the head (branch off and on) and tracing of the whole model with embeddings."""

import subprocess
import sys

import pytest
import torch

from detectron2.export import TracingAdapter
from detectron2.export.torchscript_patch import freeze_training_mode, patch_instances
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances

from conftest import REPO, load_tool, tiny_cfg

export_tool = load_tool("export_model")


def _head_inputs(head, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(96, 112), (80, 96)]
    images = ImageList(torch.zeros(2, 3, 96, 112), sizes)
    features = {f: torch.randn(2, head.box_head.input_shape.channels if hasattr(head.box_head, "input_shape") else 64, 96 // s, 112 // s, generator=g)
                for f, s in zip(head.box_in_features, (8, 16, 32))}
    proposals = []
    for h, w in sizes:
        p = Instances((h, w))
        xy = torch.rand(30, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        p.proposal_boxes = Boxes(torch.cat([xy, xy + 10 + torch.rand(30, 2, generator=g) * 30], dim=1))
        p.objectness_logits = torch.randn(30, generator=g)
        proposals.append(p)
    return images, features, proposals


@pytest.mark.parametrize("loss", ["none", "rince_out_in"])
def test_head_scripts_like_standard_roi_heads(tiny_shapes, loss):
    cfg = tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.LOSS", loss, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    torch.manual_seed(0)
    head = build_model(cfg).roi_heads.eval()
    images, features, proposals = _head_inputs(head)
    fields = {"proposal_boxes": Boxes, "objectness_logits": torch.Tensor, "pred_boxes": Boxes, "scores": torch.Tensor, "pred_classes": torch.Tensor}
    with torch.no_grad():
        eager, _ = head(images, features, proposals)
        with freeze_training_mode(head), patch_instances(fields) as new_instances:
            scripted_head = torch.jit.script(head)
            scripted, _ = scripted_head(images, features, [new_instances.from_instances(p) for p in proposals])
    assert sum(len(x) for x in eager) > 0
    for e, s in zip(eager, scripted):
        assert torch.equal(e.pred_boxes.tensor, s.pred_boxes.tensor)
        assert torch.equal(e.scores, s.scores) and torch.equal(e.pred_classes, s.pred_classes)


def _model_and_images(tiny_shapes, embed=True):
    cfg = tiny_cfg("configs/shapes_rince.yaml", "MODEL.RCDET.EMBED_AT_TEST", str(embed), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                   "TEST.DETECTIONS_PER_IMAGE", "1000")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float() for h, w in ((160, 192), (128, 224))]
    return model, images


def test_tracing_exports_logits_and_embeddings_for_any_input_size(tiny_shapes):
    model, (first, second) = _model_and_images(tiny_shapes)
    traced, adapter = export_tool.export_tracing(model, {"image": first})
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
    assert len(counts) == 2, "both sizes gave the same number of detections: the check would not catch a frozen split"


def test_export_tool_end_to_end(tiny_shapes, tiny_models, tmp_path):
    for method, embed in (("tracing", "True"), ("scripting", "False")):
        out = tmp_path / method
        proc = subprocess.run(
            [sys.executable, "tools/export_model.py", "--config-file", "configs/shapes_rince_ood.yaml", "--export-method", method,
             "--output", str(out), "MODEL.WEIGHTS", tiny_models["rince"], "MODEL.RCDET.EMBED_AT_TEST", embed,
             "DATASETS.TEST", "('rcdet_shapes_test',)", "INPUT.MIN_SIZE_TEST", "160"],
            cwd=REPO, capture_output=True, text=True, env=_env(tiny_shapes),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "model.ts").is_file() and "max abs difference" in proc.stdout
        loaded = torch.jit.load(str(out / "model.ts"))
        assert loaded is not None


def test_export_tool_refuses_scripting_with_embeddings(tiny_shapes, tiny_models, tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/export_model.py", "--config-file", "configs/shapes_rince_ood.yaml", "--export-method", "scripting",
         "--output", str(tmp_path), "MODEL.WEIGHTS", tiny_models["rince"], "MODEL.RCDET.EMBED_AT_TEST", "True"],
        cwd=REPO, capture_output=True, text=True, env=_env(tiny_shapes),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "MODEL.RCDET.EMBED_AT_TEST" in proc.stderr and "--export-method tracing" in proc.stderr


def _env(root):
    import os

    return dict(os.environ, RCDET_SHAPES_ROOT=root)
