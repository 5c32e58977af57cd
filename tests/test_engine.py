"""
The remaining tracebacks are clear errors, and Ctrl-C is one line with exit code 130:
an unreadable image met by the data loader, an unregistered `analyze_embeddings.py --dataset`,
the tools' own usage examples, and an interrupted training or evaluation.
"""

import ast
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, load_tool

TINY = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160", "MODEL.RCDET.QUEUE_SIZE", "64"]


def _tool_cmd(tool, *argv):
    return [sys.executable, os.path.join(REPO, "tools", tool), *argv]


def _env(shapes_root):
    return dict(os.environ, RCDET_SHAPES_ROOT=str(shapes_root))


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
    proc = subprocess.run(
        _tool_cmd("train_net.py", "--config-file", "configs/shapes_rince.yaml", *TINY, "SOLVER.MAX_ITER", "2",
                  "DATALOADER.NUM_WORKERS", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")),
        cwd=REPO, env=_env(shapes_copy), capture_output=True, text=True, timeout=300,
    )
    line = _one_error_line(proc)
    named = re.match(r"error: (\S+\.jpg): cannot read the image", line)
    assert named and named.group(1) in damaged, line
    assert "`make data`" in line


def test_unreadable_image_met_while_evaluating(shapes_copy, tiny_models, tmp_path):
    damaged = _damage_split(shapes_copy, "test", "truncated")
    proc = subprocess.run(
        _tool_cmd("train_net.py", "--config-file", "configs/shapes_rince_ood.yaml", "--eval-only", *TINY,
                  "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", tiny_models["rince"], "OUTPUT_DIR", str(tmp_path / "out")),
        cwd=REPO, env=_env(shapes_copy), capture_output=True, text=True, timeout=300,
    )
    line = _one_error_line(proc)
    named = re.match(r"error: (\S+\.jpg): cannot read the image \(image file is truncated", line)
    assert named and named.group(1) in damaged, line


def test_worker_traceback_is_reduced_to_the_original_message():
    from rcdet.data import DatasetError
    from rcdet.engine import user_error_message

    # What torch's ExceptionWrapper.reraise builds from an exception in a DataLoader worker.
    wrapped = DatasetError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nrcdet.data.datasets.DatasetError: /d/JPEGImages/000001.jpg: cannot read the image (x).\n'
    )
    assert user_error_message(wrapped) == "/d/JPEGImages/000001.jpg: cannot read the image (x)."
    assert user_error_message(DatasetError("a: b: c")) == "a: b: c"


def test_analyze_embeddings_unregistered_dataset_lists_the_registered_splits(tiny_shapes, tmp_path, capsys):
    tool = load_tool("analyze_embeddings")
    logging.disable(logging.CRITICAL)  # detectron2's cached log handlers hold a closed capture stream
    try:
        code = tool.main(["--config-file", "configs/shapes_rince_ood.yaml", "--dataset", "rcdet_shapes_tset",
                          "--output", str(tmp_path), "MODEL.WEIGHTS", str(tmp_path / "unused.pth")])
    finally:
        logging.disable(logging.NOTSET)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "--dataset 'rcdet_shapes_tset' is not a registered dataset" in line
    assert "Did you mean 'rcdet_shapes_test'?" in line
    for split in ("rcdet_shapes_train", "rcdet_shapes_val", "rcdet_shapes_trainval", "rcdet_shapes_test"):
        assert split in line
    assert "coco_2017_train" not in line  # only the splits of this dataset


def test_analyze_embeddings_derives_a_named_held_out_split(tiny_shapes):
    from detectron2.data import DatasetCatalog

    from conftest import tiny_cfg

    tool = load_tool("analyze_embeddings")
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml")
    name = "rcdet_shapes_val__minus_ring+triangle_ood_test"
    assert tool.resolve_dataset(cfg, name) == name
    assert all("ood_annotations" in d for d in DatasetCatalog.get(name))


# A config key as detectron2's KEY VALUE overrides spell it, e.g. MODEL.WEIGHTS.
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def _examples(text):
    """The `python tools/...` command lines in ``text``, continuation lines joined."""
    text = text.replace("\\\n", " ")
    for match in re.finditer(r"python (tools/\w+\.py[^\n`]*)", text):
        yield match.group(1).split("#")[0].strip()


def _example_sources():
    for name in sorted(os.listdir(os.path.join(REPO, "tools"))):
        if name.endswith(".py"):
            with open(os.path.join(REPO, "tools", name)) as f:
                yield f"tools/{name} --help", ast.get_docstring(ast.parse(f.read())) or ""
    docs = ["README.md", "datasets/README.md"]
    docs += sorted(f"docs/{n}" for n in os.listdir(os.path.join(REPO, "docs")) if n.endswith(".md"))
    docs += sorted(f"results/{s}/README.md" for s in os.listdir(os.path.join(REPO, "results"))
                   if os.path.isfile(os.path.join(REPO, "results", s, "README.md")))
    for doc in docs:
        with open(os.path.join(REPO, doc)) as f:
            yield doc, f.read()


def test_usage_examples_put_tool_options_before_config_overrides():
    checked = 0
    for source, text in _example_sources():
        for example in _examples(text):
            tokens = shlex.split(example)
            first_key = next((i for i, t in enumerate(tokens) if _KEY.match(t)), len(tokens))
            late = [t for t in tokens[first_key:] if t.startswith("--")]
            assert not late, f"{source}: `{example}` puts {late} after the config overrides, which the parser rejects"
            checked += 1
    assert checked >= 10


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
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fo, stderr=fe, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
    cmd = _tool_cmd("train_net.py", "--config-file", "configs/shapes_rince_ood.yaml", *TINY, "SOLVER.MAX_ITER", "100000",
                    "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "1", "DATASETS.TEST", "()",
                    "OUTPUT_DIR", str(run))
    code, _, stderr = _interrupt(cmd, _env(tiny_shapes), tmp_path, lambda out, err: (run / "last_checkpoint").is_file(),
                                 "the first checkpoint")
    _assert_interrupted(code, stderr)
    # Nothing half-written: the checkpoint that resuming would load is complete.
    last = run / (run / "last_checkpoint").read_text().strip()
    assert "roi_heads.box_predictor.cls_score.weight" in torch.load(last, map_location="cpu")["model"]
    assert not [p for p in os.listdir(run) if p.startswith(".tmp_")]


def test_ctrl_c_during_evaluation(tiny_shapes, tiny_models, tmp_path):
    weights = tmp_path / "model_final.pth"  # a copy: no cached statistics next to it yet
    shutil.copy(tiny_models["rince"], weights)
    out = tmp_path / "ood"
    # Large test images give the interrupt a window of a few seconds.
    cmd = _tool_cmd("benchmark_ood.py", "--config-file", "configs/shapes_rince_ood.yaml", "--output", str(out),
                    "MODEL.WEIGHTS", str(weights), "MODEL.RCDET.QUEUE_SIZE", "64", "DATALOADER.NUM_WORKERS", "0",
                    "INPUT.MIN_SIZE_TEST", "800", "INPUT.MAX_SIZE_TEST", "1333")
    code, _, stderr = _interrupt(cmd, _env(tiny_shapes), tmp_path, lambda o, e: "fitting OOD statistics" in e,
                                 "the OOD statistics pass")
    _assert_interrupted(code, stderr)
    # Every file is complete or absent; no temporary file is left next to the weights or reports.
    for folder in (tmp_path, out):
        if folder.is_dir():
            assert not [p for p in os.listdir(folder) if p.startswith(".tmp_")], os.listdir(folder)
    for cache in tmp_path.glob("ood_stats_*.npz"):
        np.load(cache)
    if (out / "ood_report.json").exists():
        json.loads((out / "ood_report.json").read_text())
