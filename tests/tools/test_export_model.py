"""tools/export_model.py end to end: a TorchScript file by tracing (with embeddings) and by
scripting, and a clear refusal of scripting with embeddings."""

import os
import subprocess
import sys

import torch
from conftest import REPO


def test_export_tool_end_to_end(tiny_shapes, tiny_models, tmp_path):
    for method, embed in (("tracing", "True"), ("scripting", "False")):
        out = tmp_path / method
        proc = subprocess.run(
            [
                sys.executable,
                "tools/export_model.py",
                "--config-file",
                "configs/shapes_rince_ood.yaml",
                "--export-method",
                method,
                "--output",
                str(out),
                "MODEL.WEIGHTS",
                tiny_models["rince"],
                "MODEL.RCDET.EMBED_AT_TEST",
                embed,
                "DATASETS.TEST",
                "('rcdet_shapes_test',)",
                "INPUT.MIN_SIZE_TEST",
                "160",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=_env(tiny_shapes),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "model.ts").is_file() and "max abs difference" in proc.stdout
        loaded = torch.jit.load(str(out / "model.ts"))
        assert loaded is not None


def test_export_tool_refuses_scripting_with_embeddings(tiny_shapes, tiny_models, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "tools/export_model.py",
            "--config-file",
            "configs/shapes_rince_ood.yaml",
            "--export-method",
            "scripting",
            "--output",
            str(tmp_path),
            "MODEL.WEIGHTS",
            tiny_models["rince"],
            "MODEL.RCDET.EMBED_AT_TEST",
            "True",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(tiny_shapes),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "MODEL.RCDET.EMBED_AT_TEST" in proc.stderr and "--export-method tracing" in proc.stderr


def _env(root):
    return dict(os.environ, RCDET_SHAPES_ROOT=root)
