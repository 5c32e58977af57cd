"""tools/export_model.py end to end: a TorchScript file by tracing (with embeddings) and by
scripting, and a clear refusal of scripting with embeddings."""

import torch
from conftest import run_tool


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
