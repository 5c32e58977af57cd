"""
rcdet.engine through the tools' entry points: each config trains, mixed precision, and the config
that training saves is reusable by every tool. The remaining tracebacks are clear errors: an
unreadable image met by the data loader is one error line with exit code 2, and Ctrl-C during
training or evaluation is one line with exit code 130 that leaves only complete files.
"""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY_SCHEDULE,
    eval_only_args,
    run_tool,
    run_training,
    tiny_cfg,
    tool_command,
    tool_env,
)
from detectron2.engine import AMPTrainer
from detectron2.utils.events import EventStorage

from rcdet.config import ConfigError
from rcdet.engine import Trainer, amp_precision

# The R50-FPN VOC configs from scratch on the tiny built-in data instead of VOC2007, small.
VOC_ON_TINY_SHAPES = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.DEVICE",
    "cpu",
    "DATASETS.TRAIN",
    "('rcdet_shapes_trainval',)",
    "DATASETS.TEST",
    "()",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "9",
    "MODEL.RCDET.RANKING_FILE",
    "configs/rankings/shapes_families.yaml",
    "INPUT.MIN_SIZE_TRAIN",
    "(128,)",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "32",
]
TRAIN_SPLIT = "rcdet_shapes_trainval__minus_ring+triangle_drop_images"
TEST_SPLIT = "rcdet_shapes_test__minus_ring+triangle_ood_test"


# ---------------------------------------------------------------- training


@pytest.mark.parametrize(
    "config",
    ["configs/shapes_softmax.yaml", "configs/shapes_supcon.yaml", "configs/shapes_rince.yaml"],
)
def test_each_shapes_config_trains_a_few_iterations(tiny_shapes, tmp_path, config):
    cfg = tiny_cfg(
        config,
        "SOLVER.MAX_ITER",
        "3",
        "TEST.EVAL_PERIOD",
        "0",
        "DATASETS.TEST",
        "()",
        output_dir=tmp_path,
    )
    trainer = run_training(cfg)
    assert trainer.iter == cfg.SOLVER.MAX_ITER
    assert os.path.isfile(tmp_path / "model_final.pth")


@pytest.mark.parametrize(
    "config",
    [
        "configs/voc_softmax.yaml",
        "configs/voc_supcon.yaml",
        "configs/voc_rince.yaml",
        "configs/voc_rince_text.yaml",
    ],
)
def test_voc_configs_build_and_train_one_iteration(tiny_shapes, tmp_path, config):
    """The R50-FPN VOC configs, from scratch, on the tiny built-in data instead of VOC2007."""
    cfg = tiny_cfg(config, *VOC_ON_TINY_SHAPES, "SOLVER.MAX_ITER", "1", output_dir=tmp_path)
    trainer = run_training(cfg)
    assert trainer.iter == 1 and (tmp_path / "model_final.pth").is_file()


def test_amp_precision_key(tiny_shapes, tmp_path):
    cfg = tiny_cfg(
        "configs/shapes_rince.yaml",
        "SOLVER.AMP.ENABLED",
        "True",
        "SOLVER.AMP.PRECISION",
        "bfloat16",
        output_dir=tmp_path,
    )
    assert amp_precision(cfg) == torch.bfloat16
    with pytest.warns(UserWarning):  # torch.cuda.amp.GradScaler without CUDA: disabled
        trainer = Trainer(cfg)
    assert trainer._trainer.precision == torch.bfloat16
    with pytest.raises(ConfigError, match="SOLVER.AMP.PRECISION = 'half'"):
        tiny_cfg("configs/shapes_rince.yaml", "SOLVER.AMP.PRECISION", "half")


def test_voc_amp_config_runs_one_float16_step(tiny_shapes, tmp_path):
    """configs/voc_rince_amp.yaml on the tiny data: detectron2's AMPTrainer is chosen, and one
    of its steps (float16 autocast, scaled loss) runs; AMPTrainer.run_step itself needs CUDA."""
    cfg = tiny_cfg(
        "configs/voc_rince_amp.yaml",
        *VOC_ON_TINY_SHAPES,
        # float16 kernels on the CPU are slow: a 64-pixel input keeps the one step short.
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "SOLVER.BASE_LR",
        "0.0",
        output_dir=tmp_path,
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


# ---------------------------------------------------------------- the saved config


@pytest.fixture(scope="module")
def held_out_run(tiny_shapes, tmp_path_factory):
    """
    2 iterations of the held-out demo config through tools/train_net.py, which saves config.yaml.
    """
    out = tmp_path_factory.mktemp("held_out_run")
    proc = run_tool(
        "train_net.py",
        "--config-file",
        "configs/shapes_rince_ood.yaml",
        *TINY_SCHEDULE,
        "OUTPUT_DIR",
        str(out),
        shapes_root=tiny_shapes,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "config.yaml") as f:
        saved = f.read()
    assert TRAIN_SPLIT in saved and TEST_SPLIT in saved
    return out


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def run_with_saved_config(run, tool, *options, shapes_root, opts=()):
    """``tool`` with the run's saved config.yaml and final weights, then the overrides ``opts``."""
    config, weights = str(run / "config.yaml"), str(run / "model_final.pth")
    argv = ["--config-file", config, *options, "MODEL.WEIGHTS", weights, *opts]
    proc = run_tool(tool, *argv, shapes_root=shapes_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_net_eval_only_with_the_saved_config(held_out_run, tiny_shapes):
    proc = run_with_saved_config(
        held_out_run,
        "train_net.py",
        "--eval-only",
        shapes_root=tiny_shapes,
        opts=("OUTPUT_DIR", str(held_out_run / "eval")),
    )
    assert "copypaste: AP,AP50,AP75" in proc.stdout


def test_benchmark_ood_with_the_saved_config_writes_readable_reports(held_out_run, tiny_shapes):
    out = held_out_run / "ood"
    proc = run_with_saved_config(
        held_out_run, "benchmark_ood.py", "--output", str(out), shapes_root=tiny_shapes
    )
    assert "Report:" in proc.stdout
    # Under umask 022 every report, plot and the statistics cache is 0644, not mkstemp's 0600.
    written = [out / name for name in os.listdir(out)] + list(held_out_run.glob("ood_stats_*.npz"))
    assert {p.name for p in written} >= {
        "ood_report.json",
        "ood_report.csv",
        "roc.png",
        "ood_scores.npz",
    }
    assert any(p.name.startswith("ood_stats_") for p in written)
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(0o644) for p in written}


def test_analyze_embeddings_with_the_saved_config(held_out_run, tiny_shapes):
    out = held_out_run / "analysis"
    run_with_saved_config(
        held_out_run,
        "analyze_embeddings.py",
        "--output",
        str(out),
        "--no-tsne",
        shapes_root=tiny_shapes,
    )
    assert (out / "analysis.json").is_file() and _mode(out / "analysis.json") == 0o644


# ---------------------------------------------------------------- unreadable images


def _one_error_line(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture
def shapes_copy(tiny_shapes, tmp_path):
    root = tmp_path / "rcdet_shapes"
    shutil.copytree(tiny_shapes, root)
    return root


def _damage_split(root, split, damage):
    with open(root / "ImageSets" / "Main" / f"{split}.txt") as f:
        ids = f.read().split()
    for image_id in ids:
        jpg = root / "JPEGImages" / f"{image_id}.jpg"
        data = jpg.read_bytes()
        jpg.write_bytes(b"" if damage == "empty" else data[: len(data) // 3])
    return {str(root / "JPEGImages" / f"{i}.jpg") for i in ids}


def test_unreadable_image_met_while_training(shapes_copy, tmp_path):
    # Zero-byte JPEGs, read in a DataLoader worker process as the shapes configs do.
    damaged = _damage_split(shapes_copy, "trainval", "empty")
    proc = run_tool(
        "train_net.py",
        "--config-file",
        "configs/shapes_rince.yaml",
        *TINY_SCHEDULE,
        "DATALOADER.NUM_WORKERS",
        "1",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        shapes_root=shapes_copy,
        timeout=300,
    )
    line = _one_error_line(proc)
    named = re.match(r"error: (\S+\.jpg): cannot read the image", line)
    assert named and named.group(1) in damaged, line
    assert "`make data`" in line


def test_unreadable_image_met_while_evaluating(shapes_copy, tiny_models, tmp_path):
    damaged = _damage_split(shapes_copy, "test", "truncated")
    argv = eval_only_args(tiny_models["rince"], tmp_path / "out", *TINY_SCHEDULE)
    proc = run_tool("train_net.py", *argv, shapes_root=shapes_copy, timeout=300)
    line = _one_error_line(proc)
    named = re.match(r"error: (\S+\.jpg): cannot read the image \(image file is truncated", line)
    assert named and named.group(1) in damaged, line


def test_worker_traceback_is_reduced_to_the_original_message():
    from rcdet.data import DatasetError
    from rcdet.engine import user_error_message

    # What torch's ExceptionWrapper.reraise builds from an exception in a DataLoader worker.
    wrapped = DatasetError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call"
        ' last):\n  File "x.py", line 1, in f\nrcdet.data.datasets.DatasetError:'
        " /d/JPEGImages/000001.jpg: cannot read the image (x).\n"
    )
    assert user_error_message(wrapped) == "/d/JPEGImages/000001.jpg: cannot read the image (x)."
    assert user_error_message(DatasetError("a: b: c")) == "a: b: c"


# ---------------------------------------------------------------- Ctrl-C


def _wait_for(predicate, proc, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _interrupt(cmd, env, tmp_path, ready, what):
    """Start ``cmd`` in its own process group, wait until ``ready()``, then press Ctrl-C (SIGINT to
    the whole group, as a terminal does); returns (returncode, stdout, stderr)."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        # SIG_DFL first: a test run started in the background of a non-interactive shell (as CI
        # may do) inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt.
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=fo,
            stderr=fe,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            _wait_for(lambda: ready(out.read_text(), err.read_text()), proc, 300, what)
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, out.read_text(), err.read_text()


def _assert_interrupted(code, stderr):
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == "interrupted (Ctrl-C)"
    assert sum("interrupted" in line for line in lines) == 1


def test_ctrl_c_during_training(tiny_shapes, tmp_path):
    run = tmp_path / "run"
    cmd = tool_command(
        "train_net.py",
        "--config-file",
        "configs/shapes_rince_ood.yaml",
        *TINY_SCHEDULE,
        "SOLVER.MAX_ITER",
        "100000",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "DATALOADER.NUM_WORKERS",
        "1",
        "DATASETS.TEST",
        "()",
        "OUTPUT_DIR",
        str(run),
    )
    code, _, stderr = _interrupt(
        cmd,
        tool_env(tiny_shapes),
        tmp_path,
        lambda out, err: (run / "last_checkpoint").is_file(),
        "the first checkpoint",
    )
    _assert_interrupted(code, stderr)
    # Nothing half-written: the checkpoint that resuming would load is complete.
    last = run / (run / "last_checkpoint").read_text().strip()
    assert (
        "roi_heads.box_predictor.cls_score.weight" in torch.load(last, map_location="cpu")["model"]
    )
    assert not [p for p in os.listdir(run) if p.startswith(".tmp_")]


def test_ctrl_c_during_evaluation(tiny_shapes, tiny_models, tmp_path):
    weights = tmp_path / "model_final.pth"  # a copy: no cached statistics next to it yet
    shutil.copy(tiny_models["rince"], weights)
    out = tmp_path / "ood"
    # Large test images give the interrupt a window of a few seconds.
    cmd = tool_command(
        "benchmark_ood.py",
        "--config-file",
        "configs/shapes_rince_ood.yaml",
        "--output",
        str(out),
        "MODEL.WEIGHTS",
        str(weights),
        "MODEL.RCDET.QUEUE_SIZE",
        "64",
        "DATALOADER.NUM_WORKERS",
        "0",
        "INPUT.MIN_SIZE_TEST",
        "800",
        "INPUT.MAX_SIZE_TEST",
        "1333",
    )
    code, _, stderr = _interrupt(
        cmd,
        tool_env(tiny_shapes),
        tmp_path,
        lambda o, e: "fitting OOD statistics" in e,
        "the OOD statistics pass",
    )
    _assert_interrupted(code, stderr)
    # Every file is complete or absent; no temporary file is left next to the weights or reports.
    for folder in (tmp_path, out):
        if folder.is_dir():
            assert not [p for p in os.listdir(folder) if p.startswith(".tmp_")], os.listdir(folder)
    for cache in tmp_path.glob("ood_stats_*.npz"):
        np.load(cache)
    if (out / "ood_report.json").exists():
        json.loads((out / "ood_report.json").read_text())
