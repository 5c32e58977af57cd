import importlib.util
import os
import socket

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    """tools/ holds scripts, not a package: load one by its path instead of editing sys.path."""
    spec = importlib.util.spec_from_file_location(f"rcdet_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def repo_path():
    return lambda *p: os.path.join(REPO, *p)


TINY_SIZES = {"train": 12, "val": 4, "test": 8}


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A tiny built-in dataset, registered as rcdet_shapes_* for the whole session."""
    from rcdet.data import register_rcdet_shapes
    from rcdet.data.shapes import generate

    root = str(tmp_path_factory.mktemp("rcdet_shapes"))
    generate(root, seed=0, split_sizes=TINY_SIZES, workers=1)
    register_rcdet_shapes(root)
    return root


def tiny_cfg(config="configs/shapes_rince.yaml", *opts, output_dir=None):
    """A frozen-free config on the tiny dataset with a very small schedule."""
    from rcdet.engine import setup_cfg

    base = [
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
        "MODEL.RCDET.QUEUE_SIZE", "64",
    ]
    if output_dir:
        base += ["OUTPUT_DIR", str(output_dir)]
    return setup_cfg(os.path.join(REPO, config), base + list(opts), freeze=False)


@pytest.fixture(scope="session")
def tiny_models(tiny_shapes, tmp_path_factory):
    """2-iteration RINCE and softmax models trained on the tiny held-out split."""
    from rcdet.engine import Trainer

    out = {}
    for name in ("rince", "softmax"):
        d = tmp_path_factory.mktemp(name)
        cfg = tiny_cfg(f"configs/shapes_{name}_ood.yaml", "DATASETS.TEST", "()", output_dir=d)
        cfg.freeze()
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        out[name] = str(d / "model_final.pth")
    return out
