"""tools/train_net.py: --eval-only of a trained model reports AP, and a config error is one line
without a traceback."""

import os

from conftest import REPO, run_tool, run_training, tiny_cfg
from detectron2.engine import default_argument_parser

from tools import train_net


def test_train_checkpoint_then_eval_only_reports_ap(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg("configs/shapes_rince.yaml", "DATASETS.TEST", "()", output_dir=out)
    run_training(cfg)
    weights = out / "model_final.pth"
    assert weights.is_file()
    # --eval-only through the real CLI entry point, in-process.
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO, "configs/shapes_rince.yaml"),
            "--eval-only",
            "MODEL.WEIGHTS",
            str(weights),
            "OUTPUT_DIR",
            str(out / "eval"),
            "INPUT.MIN_SIZE_TEST",
            "160",
            "MODEL.RCDET.QUEUE_SIZE",
            "64",
        ]
    )
    res = train_net.main(args)
    bbox = res["bbox"]
    assert set(bbox) == {"AP", "AP50", "AP75"}
    assert all(0.0 <= v <= 100.0 for v in bbox.values())


def test_cli_reports_config_errors_without_traceback(tiny_shapes):
    proc = run_tool(
        "train_net.py",
        "--config-file",
        "configs/shapes_rince.yaml",
        "MODEL.RCDET.TEMPERATURES",
        "[0.3, 0.1, 0.2]",
        shapes_root=tiny_shapes,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: MODEL.RCDET.TEMPERATURES" in proc.stderr
    assert "Traceback" not in proc.stderr
