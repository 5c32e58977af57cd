"""
rcdet.checkpoint: wrong weights fail loudly, in every tool, through the one loader: one
'error: ...' line that names the file (and, for another class count, MODEL.ROI_HEADS.NUM_CLASSES
and both counts), exit code 2, no traceback. Resuming restores the model and the queue exactly.
"""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_training, tiny_cfg
from detectron2.engine import default_argument_parser

from rcdet.checkpoint import WeightsError, load_trained_weights
from rcdet.engine import Trainer
from tools import analyze_embeddings, benchmark_ood, train_net

EVAL_OPTS = [
    "INPUT.MIN_SIZE_TEST",
    "160",
    "MODEL.RCDET.QUEUE_SIZE",
    "64",
    "DATALOADER.NUM_WORKERS",
    "0",
]


def run_in_process(tool, argv, capsys):
    """(exit code, stderr) of a tool's command line, run in this process."""
    # detectron2's setup_logger is cached: its handlers keep the capture stream of the test that
    # first called it, closed by now. The errors under test are printed, not logged.
    logging.disable(logging.CRITICAL)
    try:
        if tool == "train_net":
            try:
                train_net.cli_main(default_argument_parser().parse_args(argv))
                code = 0
            except SystemExit as e:
                code = e.code
        else:
            module = {"benchmark_ood": benchmark_ood, "analyze_embeddings": analyze_embeddings}[
                tool
            ]
            code = module.main(argv)
    finally:
        logging.disable(logging.NOTSET)
    return code, capsys.readouterr().err


def tool_argv(tool, config, weights, tmp_path):
    argv = ["--config-file", config]
    if tool == "train_net":
        argv.append("--eval-only")
    else:
        argv += ["--output", str(tmp_path / "out")]
    if tool == "analyze_embeddings":
        argv.append("--no-tsne")
    return argv + ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path)] + EVAL_OPTS


TOOLS = ["train_net", "benchmark_ood", "analyze_embeddings"]


def assert_one_error_line(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("tool", TOOLS)
def test_checkpoint_for_another_class_count_is_an_error(
    tiny_shapes, tiny_models, tmp_path, capsys, tool
):
    # A 7-class (held-out) checkpoint with the 9-class config.
    weights = tiny_models["rince"]
    code, err = run_in_process(
        tool, tool_argv(tool, "configs/shapes_rince.yaml", weights, tmp_path), capsys
    )
    assert_one_error_line(
        code, err, weights, "trained for 7 classes", "MODEL.ROI_HEADS.NUM_CLASSES = 9"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_missing_weights_file_is_named(tiny_shapes, tmp_path, capsys, tool):
    missing = str(tmp_path / "model_nowhere.pth")
    code, err = run_in_process(
        tool, tool_argv(tool, "configs/shapes_rince_ood.yaml", missing, tmp_path), capsys
    )
    assert_one_error_line(code, err, "MODEL.WEIGHTS", missing, "not found")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_unreadable_weights_file_is_named(tiny_shapes, tiny_models, tmp_path, capsys, tool, damage):
    bad = tmp_path / f"{damage}.pth"
    if damage == "truncated":
        with open(tiny_models["rince"], "rb") as f:
            bad.write_bytes(f.read(50_000))
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_text("not a checkpoint\n")
    code, err = run_in_process(
        tool, tool_argv(tool, "configs/shapes_rince_ood.yaml", str(bad), tmp_path), capsys
    )
    assert_one_error_line(code, err, str(bad), "cannot be read")


def test_eval_only_without_weights_refuses(tiny_shapes, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "train_net.py"),
            "--config-file",
            "configs/shapes_rince_ood.yaml",
            "--eval-only",
            "OUTPUT_DIR",
            str(tmp_path),
        ]
        + EVAL_OPTS,
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, RCDET_SHAPES_ROOT=tiny_shapes),
        timeout=300,
    )
    assert_one_error_line(proc.returncode, proc.stderr, "MODEL.WEIGHTS is empty")
    assert "copypaste" not in proc.stdout  # nothing was evaluated


def test_eval_only_resume_uses_the_last_checkpoint_without_weights(
    tiny_shapes, tiny_models, tmp_path
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_models["rince"], run_dir / "model_final.pth")
    (run_dir / "last_checkpoint").write_text("model_final.pth")
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", output_dir=run_dir)
    model = Trainer.build_model(cfg)
    assert load_trained_weights(model, cfg, resume=True) == str(run_dir / "model_final.pth")
    saved = torch.load(tiny_models["rince"], map_location="cpu")["model"]
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(model.state_dict()[key], saved[key])


def test_evaluation_needs_every_parameter_from_the_file(tiny_shapes, tiny_models, tmp_path):
    # The softmax model has no projection branch: the RINCE model's would stay random.
    cfg = tiny_cfg(
        "configs/shapes_rince_ood.yaml",
        "MODEL.WEIGHTS",
        tiny_models["softmax"],
        output_dir=tmp_path,
    )
    with pytest.raises(
        WeightsError,
        match=r"does not fit this config's model: \d+ of its parameters .*roi_heads.projection",
    ):
        load_trained_weights(Trainer.build_model(cfg), cfg)


def test_training_from_another_class_count_needs_the_finetune_key(
    tiny_shapes, tiny_models, tmp_path
):
    weights = tiny_models["softmax"]  # 7 classes
    cfg = tiny_cfg(
        "configs/shapes_softmax.yaml",
        "MODEL.WEIGHTS",
        weights,
        "DATASETS.TEST",
        "()",
        output_dir=tmp_path,
    )
    cfg.freeze()
    with pytest.raises(WeightsError) as e:
        Trainer(cfg).resume_or_load(resume=False)
    msg = str(e.value)
    assert weights in msg and "7 classes" in msg and "MODEL.ROI_HEADS.NUM_CLASSES = 9" in msg
    assert "MODEL.RCDET.FINETUNE_FROM_OTHER_CLASSES True" in msg

    cfg.defrost()
    cfg.MODEL.RCDET.FINETUNE_FROM_OTHER_CLASSES = True
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    saved = torch.load(weights, map_location="cpu")["model"]
    state = trainer.model.state_dict()
    # Everything but the class-specific layers comes from the checkpoint.
    assert torch.equal(
        state["roi_heads.box_head.fc1.weight"], saved["roi_heads.box_head.fc1.weight"]
    )
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 10
    assert saved["roi_heads.box_predictor.cls_score.weight"].shape[0] == 8


# ---------------------------------------------------------------- resuming


def test_resume_restores_the_queue_exactly(tiny_shapes, tmp_path):
    cfg = tiny_cfg(
        "configs/shapes_rince.yaml",
        "DATASETS.TEST",
        "()",
        "MODEL.RCDET.IOU_THRESHOLD",
        "0.5",
        "MODEL.RCDET.QUEUE_IOU_THRESHOLD",
        "0.5",
        output_dir=tmp_path,
    )
    first = run_training(cfg.clone())
    queue = {k: v.clone() for k, v in first.model.roi_heads.queue.state_dict().items()}
    assert queue["filled"].any(), "the queue should hold embeddings after training"
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 4
    cfg.freeze()
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for key, value in resumed.model.roi_heads.queue.state_dict().items():
        assert torch.equal(value, queue[key]), key
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu")["model"]
    assert torch.equal(saved["roi_heads.contrast.queue.embeddings"], queue["embeddings"])
