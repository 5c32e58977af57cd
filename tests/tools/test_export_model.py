"""tools/export_model.py end to end: a TorchScript file by tracing (with embeddings) and by
scripting, and a clear refusal of scripting with embeddings; the traced model's ood_scores and
is_unknown equal the OOD benchmark's on two input sizes."""

import numpy as np
import torch
from conftest import benchmark_scores_by_image, compare_with_benchmark, run_tool
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess

from rcdet.checkpoint import load_trained_weights
from rcdet.engine import Trainer
from rcdet.evaluation.calibration import MODEL_WITH_SCORER
from tools.export_model import export_tracing


def _export(method, output, weights, embed, *opts, shapes_root):
    return run_tool(
        "export_model.py",
        "--config-file",
        "configs/shapes_rince_ood.yaml",
        "--export-method",
        method,
        "--output",
        str(output),
        "MODEL.WEIGHTS",
        weights,
        "MODEL.RCDET.EMBED_AT_TEST",
        embed,
        *opts,
        shapes_root=shapes_root,
    )


def test_export_tool_end_to_end(tiny_shapes, tiny_models, tmp_path):
    for method, embed in (("tracing", "True"), ("scripting", "False")):
        out = tmp_path / method
        test_split = ("DATASETS.TEST", "('rcdet_shapes_test',)", "INPUT.MIN_SIZE_TEST", "160")
        proc = _export(
            method, out, tiny_models["rince"], embed, *test_split, shapes_root=tiny_shapes
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "model.ts").is_file() and "max abs difference" in proc.stdout
        loaded = torch.jit.load(str(out / "model.ts"))
        assert loaded is not None


def test_export_tool_refuses_scripting_with_embeddings(tiny_shapes, tiny_models, tmp_path):
    proc = _export("scripting", tmp_path, tiny_models["rince"], "True", shapes_root=tiny_shapes)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "MODEL.RCDET.EMBED_AT_TEST" in proc.stderr and "--export-method tracing" in proc.stderr


def test_traced_model_flags_unknowns_as_the_benchmark_scores_them(image_level_report):
    # The benchmark of the tiny RINCE model (conftest) wrote model_ood.pth, its cosine scorer
    # fitted and calibrated.
    cfg = image_level_report.cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(image_level_report.folder / MODEL_WITH_SCORER)
    cfg.freeze()
    model = build_model(cfg).eval()
    load_trained_weights(model, cfg)
    scorer = model.roi_heads.ood_scorer
    assert scorer.ready and scorer.has_threshold
    test = cfg.DATASETS.TEST[0]
    position = {d["image_id"]: i for i, d in enumerate(DatasetCatalog.get(test))}
    inputs, sizes = [], set()
    for (d,) in Trainer.build_test_loader(cfg, test):
        if tuple(d["image"].shape) not in sizes:
            sizes.add(tuple(d["image"].shape))
            inputs.append(d)
    assert len(inputs) >= 2, "the test split should hold images of two sizes"
    traced, adapter = export_tracing(model, {"image": inputs[0]["image"]})
    expected = benchmark_scores_by_image(image_level_report.folder, "cosine")
    compared = 0
    with torch.no_grad():
        for d in inputs:
            inst = adapter.outputs_schema(traced(d["image"]))[0]
            assert inst.is_unknown.dtype == torch.bool
            assert torch.equal(inst.is_unknown, inst.ood_scores < scorer.threshold)
            inst = detector_postprocess(inst, d["height"], d["width"])
            i = position[d["image_id"]]
            if i in expected:
                found = (inst.pred_boxes.tensor.numpy(), inst.ood_scores.numpy())
                compared += compare_with_benchmark(found, expected[i])
    assert compared >= 2 and np.isfinite(float(scorer.threshold))
