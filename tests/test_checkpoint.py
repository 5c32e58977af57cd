"""
rcdet.checkpoint: wrong or unsafe weights fail loudly, in every tool, through the one loader: one
'error: ...' line that names the file (and, for another class count, MODEL.ROI_HEADS.NUM_CLASSES
and both counts; for a file that shares no parameter with the model, the counts), exit code 2, no
traceback. A crafted checkpoint whose unpickling would create a file creates none in any tool
unless MODEL.RCDET.TRUST_PICKLED_WEIGHTS says so. Resuming (weights_only) restores the model, the
queue, the optimizer, the scheduler and the AMP grad scaler exactly.
"""

import collections
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import run_in_process, run_tool, run_training, tiny_cfg

from rcdet.checkpoint import RcdetCheckpointer, WeightsError, load_trained_weights
from rcdet.engine import Trainer

EVAL_OPTS = [
    "INPUT.MIN_SIZE_TEST",
    "160",
    "MODEL.RCDET.QUEUE_SIZE",
    "64",
    "DATALOADER.NUM_WORKERS",
    "0",
]


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
    proc = run_tool(
        "train_net.py",
        "--config-file",
        "configs/shapes_rince_ood.yaml",
        "--eval-only",
        "OUTPUT_DIR",
        str(tmp_path),
        *EVAL_OPTS,
        shapes_root=tiny_shapes,
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


def test_resume_restores_optimizer_scheduler_and_amp_grad_scaler(tiny_shapes, tmp_path):
    # A checkpoint detectron2's AMPTrainer writes holds only tensors and plain data, so it
    # resumes under weights_only=True. GradScaler("cpu") stands in for the CUDA scaler, which
    # disables itself (and saves nothing) without CUDA.
    cfg = tiny_cfg(
        "configs/shapes_rince.yaml",
        "DATASETS.TEST",
        "()",
        "SOLVER.AMP.ENABLED",
        "True",
        output_dir=tmp_path,
    )
    cfg.freeze()
    with pytest.warns(UserWarning):  # torch.cuda.amp.GradScaler without CUDA
        first = Trainer(cfg)
    first._trainer.grad_scaler = torch.amp.GradScaler("cpu")
    scaler_state = dict(first._trainer.grad_scaler.state_dict(), scale=512.0, _growth_tracker=7)
    first._trainer.grad_scaler.load_state_dict(scaler_state)
    first.iter = 5
    first.scheduler.last_epoch = 6
    for group in first.optimizer.param_groups:
        for p in group["params"]:
            first.optimizer.state[p]["momentum_buffer"] = torch.full_like(p, 0.25)
    first.checkpointer.save("model_0000005")
    saved = torch.load(tmp_path / "model_0000005.pth", weights_only=True)
    assert saved["trainer"]["_trainer"]["grad_scaler"] == scaler_state

    with pytest.warns(UserWarning):
        resumed = Trainer(cfg)
    resumed._trainer.grad_scaler = torch.amp.GradScaler("cpu")
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6 and resumed.scheduler.last_epoch == 6
    assert resumed._trainer.grad_scaler.state_dict() == scaler_state
    buffers = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
    assert len(buffers) == sum(len(g["params"]) for g in first.optimizer.param_groups) > 0
    assert all(torch.equal(b, torch.full_like(b, 0.25)) for b in buffers)


@pytest.mark.parametrize("content", ["", "model_0000999.pth"])
def test_resume_from_a_last_checkpoint_that_names_no_file_is_named(
    tiny_shapes, tmp_path, capsys, content
):
    (tmp_path / "last_checkpoint").write_text(content)
    argv = [
        "--config-file",
        "configs/shapes_rince_ood.yaml",
        "--resume",
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.MAX_ITER",
        "2",
    ] + EVAL_OPTS
    code, err = run_in_process("train_net", argv, capsys)
    tag = str(tmp_path / "last_checkpoint")
    if content:
        assert_one_error_line(code, err, tag, "names 'model_0000999.pth'", "does not exist")
    else:
        assert_one_error_line(code, err, tag, "is empty", "model_final.pth", "MODEL.WEIGHTS")
    code, err = run_in_process("train_net", argv[:2] + ["--eval-only"] + argv[2:], capsys)
    assert_one_error_line(code, err, tag, "does not exist" if content else "is empty")


# ---------------------------------------------------------------- weights that load nothing


def test_training_from_weights_that_share_no_parameter_is_an_error(tiny_shapes, tmp_path, capsys):
    # A torchvision ResNet-style state dict: none of its names is a parameter of the model.
    weights = tmp_path / "resnet18.pth"
    torch.save(
        {
            "conv1.weight": torch.zeros(64, 3, 7, 7),
            "bn1.weight": torch.ones(64),
            "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
            "fc.weight": torch.zeros(1000, 512),
        },
        weights,
    )
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", output_dir=tmp_path)
    params = list(Trainer.build_model(cfg).named_parameters())
    values = sum(p.numel() for _, p in params)
    capsys.readouterr()  # what building the model logged through detectron2's cached handlers
    argv = [
        "--config-file",
        "configs/shapes_rince_ood.yaml",
        "MODEL.WEIGHTS",
        str(weights),
        "OUTPUT_DIR",
        str(tmp_path / "run"),
        "SOLVER.MAX_ITER",
        "2",
    ] + EVAL_OPTS
    code, err = run_in_process("train_net", argv, capsys)
    assert_one_error_line(
        code,
        err,
        str(weights),
        f"provides 0 of the model's {len(params)} parameters (0 of {values:,} values, 0.0%)",
        "of its 4 weights, 4 match no parameter name",
        "'conv1.weight'",
        f"the model '{params[0][0]}'",
        "convert-torchvision-to-d2.py",
        "MODEL.WEIGHTS ''",
    )
    assert not (tmp_path / "run" / "model_final.pth").exists()


def test_weights_that_provide_a_tenth_of_the_values_load(tiny_shapes, tiny_models, tmp_path):
    # The smallest tensors first, up to the first prefix with 10% of the values: it loads (a
    # backbone-only file is far above that), one tensor less is an error.
    saved = torch.load(tiny_models["rince"], map_location="cpu")["model"]
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", output_dir=tmp_path)
    model = Trainer.build_model(cfg)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    keys, values = [], 0
    for key in sorted(params, key=lambda k: (params[k].numel(), k)):
        keys.append(key)
        values += params[key].numel()
        if values >= 0.1 * total:
            break
    enough, too_few = tmp_path / "enough.pth", tmp_path / "too_few.pth"
    torch.save({"model": {k: saved[k] for k in keys}}, enough)
    torch.save({"model": {k: saved[k] for k in keys[:-1]}}, too_few)
    RcdetCheckpointer(model).load(str(enough), checkpointables=[])
    assert torch.equal(model.state_dict()[keys[-1]], saved[keys[-1]])
    with pytest.raises(WeightsError) as e:
        RcdetCheckpointer(model).load(str(too_few), checkpointables=[])
    short = values - params[keys[-1]].numel()
    assert f"provides {len(keys) - 1} of the model's {len(params)} parameters" in str(e.value)
    assert f"({short:,} of {total:,} values, {100 * short / total:.1f}%)" in str(e.value)


# ---------------------------------------------------------------- checkpoints that run code


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears only if the pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(tmp_path, weights, suffix=".pth"):
    """A checkpoint with a real model state dict and a payload that creates tmp_path/marker."""
    marker = tmp_path / "marker"
    state = torch.load(weights, map_location="cpu")["model"]
    path = tmp_path / f"crafted{suffix}"
    if suffix == ".pth":
        torch.save({"model": state, "payload": _CreatesFile(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(
                {
                    "model": {k: v.numpy() for k, v in state.items()},
                    "__author__": "someone",
                    "payload": _CreatesFile(marker),
                },
                f,
            )
    return str(path), marker


def test_crafted_checkpoint_runs_only_when_trusted(tiny_shapes, tiny_models, tmp_path):
    path, marker = _crafted(tmp_path, tiny_models["rince"])
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.WEIGHTS", path, output_dir=tmp_path)
    model = Trainer.build_model(cfg)
    with pytest.raises(WeightsError) as e:
        load_trained_weights(model, cfg)
    assert str(e.value) == (
        f"checkpoint {path}: not loaded, because it holds pickled Python objects (io.open) besides"
        " tensors, numbers, strings, lists and dicts, and unpickling them can run any code. If you"
        " trust where the file comes from, load it with MODEL.RCDET.TRUST_PICKLED_WEIGHTS True."
    )
    assert not marker.exists()
    # The payload is real: the option that the message names unpickles it in full.
    cfg.MODEL.RCDET.TRUST_PICKLED_WEIGHTS = True
    load_trained_weights(model, cfg)
    assert marker.exists()
    saved = torch.load(tiny_models["rince"], map_location="cpu")["model"]
    assert torch.equal(model.state_dict()[_KEY], saved[_KEY])


_KEY = "roi_heads.box_predictor.cls_score.weight"


def test_numpy_pickle_weights_load_and_crafted_pickle_is_refused(
    tiny_shapes, tiny_models, tmp_path
):
    saved = torch.load(tiny_models["rince"], map_location="cpu")["model"]
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", output_dir=tmp_path)
    model = Trainer.build_model(cfg)
    # detectron2's model zoo format, as pickle protocol 2 (bytes through _codecs.encode), 4 and 5
    # (arrays through _frombuffer) write it; numpy scalars and an OrderedDict included.
    for protocol in (2, 4, 5):
        path = tmp_path / f"zoo{protocol}.pkl"
        zoo = collections.OrderedDict((k, v.numpy() + 1) for k, v in saved.items())
        with open(path, "wb") as f:
            pickle.dump(
                {"model": zoo, "__author__": "zoo", "step": np.int64(3)}, f, protocol=protocol
            )
        extra = RcdetCheckpointer(model, require_all=True).load(str(path), checkpointables=[])
        assert torch.equal(model.state_dict()[_KEY], saved[_KEY] + 1), protocol
        assert extra["step"] == 3
    path, marker = _crafted(tmp_path, tiny_models["rince"], ".pkl")
    with pytest.raises(WeightsError, match=r"\(io.open\) besides numpy arrays.*TRUST_PICKLED"):
        RcdetCheckpointer(model).load(path, checkpointables=[])
    assert not marker.exists()


def test_pth_with_numpy_arrays_needs_the_trust_key(tiny_shapes, tiny_models, tmp_path):
    saved = torch.load(tiny_models["rince"], map_location="cpu")["model"]
    path = str(tmp_path / "numpy.pth")
    torch.save({"model": {k: v.numpy() for k, v in saved.items()}}, path)
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.WEIGHTS", path, output_dir=tmp_path)
    model = Trainer.build_model(cfg)
    with pytest.raises(WeightsError, match=r"\(numpy\.[\w.]+\).*TRUST_PICKLED_WEIGHTS True"):
        load_trained_weights(model, cfg)
    cfg.MODEL.RCDET.TRUST_PICKLED_WEIGHTS = True
    load_trained_weights(model, cfg)
    assert torch.equal(model.state_dict()[_KEY], saved[_KEY])


def _tool_command(tool, weights, out):
    config = ["--config-file", "configs/shapes_rince_ood.yaml"]
    weights_opts = ["MODEL.WEIGHTS", weights]
    if tool == "train_net --eval-only":
        return ["train_net.py", *config, "--eval-only", *weights_opts, "OUTPUT_DIR", out]
    if tool == "train_net":
        return ["train_net.py", *config, *weights_opts, "OUTPUT_DIR", out]
    if tool == "demo --resume":
        # The crafted file is the run's last checkpoint.
        os.makedirs(os.path.join(out, "train"))
        shutil.copy(weights, os.path.join(out, "train", "model_final.pth"))
        with open(os.path.join(out, "train", "last_checkpoint"), "w") as f:
            f.write("model_final.pth")
        return ["demo.py", *config, "--output", out, "--resume"]
    extra = ["--no-tsne"] if tool == "analyze_embeddings" else []
    return [f"{tool}.py", *config, "--output", out, *extra, *weights_opts]


@pytest.mark.parametrize(
    "tool,suffix",
    [
        ("train_net --eval-only", ".pth"),
        ("train_net", ".pkl"),
        ("benchmark_ood", ".pth"),
        ("analyze_embeddings", ".pth"),
        ("export_model", ".pth"),
        ("demo --resume", ".pth"),
    ],
)
def test_crafted_checkpoint_runs_no_code_in_any_tool(
    tiny_shapes, tiny_models, tmp_path, tool, suffix
):
    path, marker = _crafted(tmp_path, tiny_models["rince"], suffix)
    script, *argv = _tool_command(tool, path, str(tmp_path / "out"))
    proc = run_tool(script, *argv, *EVAL_OPTS, shapes_root=tiny_shapes, timeout=300)
    loaded = path if tool != "demo --resume" else str(tmp_path / "out/train/model_final.pth")
    assert_one_error_line(
        proc.returncode,
        proc.stderr,
        f"checkpoint {loaded}: not loaded",
        "TRUST_PICKLED_WEIGHTS True",
    )
    assert not marker.exists()
