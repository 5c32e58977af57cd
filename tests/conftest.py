"""
Shared fixtures and helpers. pytest puts this folder on sys.path (it has no __init__.py), so the
test files of every subfolder can `from conftest import ...` and `from dist_utils import ...`.
pytest's default import mode imports test files by their base name: keep those unique.
"""

import json
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_tools_package():
    """Tests import the scripts as ``from tools import demo``: that needs the repository root on
    sys.path, which ``python -m pytest`` run from the root (``make test``) gives. Without it,
    ``tools`` would be the detectron2 wheel's package of that name, with its own train_net.py."""
    import tools

    expected = os.path.join(REPO, "tools")
    found = [os.path.realpath(p) for p in getattr(tools, "__path__", [])]
    if not getattr(tools, "__file__", None) or found != [os.path.realpath(expected)]:
        raise ImportError(
            f"`import tools` finds {found}, not {expected}: run the tests from the repository "
            "root as `python -m pytest tests` (make test)"
        )


_check_tools_package()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_ood_report(folder, matching="one_per_object", version=None):
    """A minimal ood_report.json in ``folder``: one score, msp, with intervals; ``version``
    defaults to the current protocol's."""
    from rcdet.evaluation.report import PROTOCOL_VERSION

    os.makedirs(folder, exist_ok=True)
    entry = {
        "available": True,
        "auroc": 0.7,
        "fpr95": 0.8,
        "aupr_in": 0.9,
        "aupr_out": 0.5,
        "auroc_ci": [0.6, 0.8],
        "fpr95_ci": [0.7, 0.9],
        "aupr_in_ci": None,
        "aupr_out_ci": None,
    }
    rep = {
        "name": os.path.basename(folder),
        "test_dataset": "rcdet_shapes_test",
        "known_classes": ["circle"],
        "held_out_classes": ["ring"],
        "data": {"test": "digest", "ood_images": None},
        "counts": {"id": 10, "ood": 5},
        "open_set": {"a_ose": 1, "wilderness_impact": 0.1},
        "detection": {},
        "scores": {"msp": entry},
        "protocol": {
            "version": PROTOCOL_VERSION if version is None else version,
            "matching": matching,
            "match_iou": 0.5,
            "score_threshold": 0.05,
        },
    }
    with open(os.path.join(folder, "ood_report.json"), "w") as f:
        json.dump(rep, f)


def tool_command(tool, *argv):
    """The command line of tools/``tool`` with ``argv``, run by this Python."""
    return [sys.executable, os.path.join(REPO, "tools", tool), *argv]


def eval_only_args(weights, output_dir, *opts, config="configs/shapes_rince_ood.yaml"):
    """train_net.py's arguments to evaluate ``weights`` under ``config`` into ``output_dir``."""
    model = ["MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(output_dir)]
    return ["--config-file", config, "--eval-only", *model, *opts]


def tool_env(shapes_root):
    """The environment of a tool process that reads the built-in data at ``shapes_root``."""
    return dict(os.environ, RCDET_SHAPES_ROOT=str(shapes_root))


def run_tool(tool, *argv, shapes_root, timeout=600):
    """
    tools/``tool`` as a process from the repository root on the built-in data at ``shapes_root``,
    under umask 022 (a user's shell's, whatever the test runner's); returns the finished process
    with its stdout and stderr as text.
    """
    return subprocess.run(
        tool_command(tool, *argv),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tool_env(shapes_root),
        preexec_fn=lambda: os.umask(0o022),
    )


def run_in_process(tool, argv, capsys):
    """
    (exit code, stderr) of tools/``tool``'s command line, run in this process; what the test
    printed before is dropped.
    """
    import importlib
    import logging

    from detectron2.engine import default_argument_parser

    module = importlib.import_module(f"tools.{tool}")
    capsys.readouterr()
    # detectron2's setup_logger is cached: its handlers keep the capture stream of the test that
    # first called it, closed by now. The errors under test are printed, not logged.
    logging.disable(logging.CRITICAL)
    try:
        if tool == "train_net":  # its main takes detectron2's parsed arguments
            try:
                module.cli_main(default_argument_parser().parse_args(argv))
                code = 0
            except SystemExit as e:
                code = e.code
        else:
            code = module.main(argv)
    finally:
        logging.disable(logging.NOTSET)
    return code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _loggers_of_this_test():
    """detectron2's setup_logger is cached, so its handlers keep the capture stream of the test
    that first called it, closed once that test ends; a later test that logs through them gets
    a logging error in its stderr. Each test starts without them."""
    yield
    import logging

    from detectron2.utils.logger import setup_logger

    setup_logger.cache_clear()
    for name in ("detectron2", "d2", "rcdet", "fvcore"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)


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


# The tiny schedule of tiny_cfg as KEY VALUE overrides, for the tools' command lines too; overrides
# after it win.
TINY_SCHEDULE = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "1",
    "DATALOADER.NUM_WORKERS",
    "0",
    "INPUT.MIN_SIZE_TRAIN",
    "(160,)",
    "INPUT.MIN_SIZE_TEST",
    "160",
    "MODEL.RCDET.QUEUE_SIZE",
    "64",
]
# A small memory queue whose keys and anchors take any proposal of IoU >= 0.5: the multi-worker
# tests' heads, so that a few proposals per image fill both.
SMALL_QUEUE = [
    "MODEL.RCDET.QUEUE_SIZE",
    "16",
    "MODEL.RCDET.IOU_THRESHOLD",
    "0.5",
    "MODEL.RCDET.QUEUE_IOU_THRESHOLD",
    "0.5",
]


def tiny_cfg(config="configs/shapes_rince.yaml", *opts, output_dir=None):
    """A frozen-free config on the tiny dataset with a very small schedule."""
    from rcdet.engine import setup_cfg

    base = list(TINY_SCHEDULE)
    if output_dir:
        base += ["OUTPUT_DIR", str(output_dir)]
    return setup_cfg(os.path.join(REPO, config), base + list(opts), freeze=False)


def voc_object_names(root, fileid):
    """The class names of the objects in image ``fileid``'s VOC annotation under ``root``."""
    return [
        o.find("name").text
        for o in ET.parse(os.path.join(root, "Annotations", f"{fileid}.xml")).findall("object")
    ]


def shapes_batch(seed=1, n_images=2, classes=None):
    """
    A training batch of ``n_images`` random 160 x 176 images, as detectron2's data loader gives
    it, with random boxes: three each of random classes among the built-in dataset's 9, or with
    ``classes``, one box of each of those classes per image.
    """
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    n = 3 if classes is None else len(classes)
    batch = []
    for _ in range(n_images):
        inst = Instances((160, 176))
        xy = torch.rand(n, 2, generator=g) * 90
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 30 + torch.rand(n, 2, generator=g) * 50], dim=1))
        if classes is None:
            inst.gt_classes = torch.randint(0, 9, (3,), generator=g)
        else:
            inst.gt_classes = torch.tensor(classes)
        img = torch.randint(0, 256, (3, 160, 176), generator=g, dtype=torch.uint8)
        batch.append({"image": img, "instances": inst, "height": 160, "width": 176})
    return batch


def train_step_syncs(model, batch):
    """One seeded training step of ``model`` on ``batch``: (its SyncCounter, its losses)."""
    import torch
    from detectron2.utils.events import EventStorage

    from rcdet.testing import SyncCounter

    model.train()
    torch.manual_seed(5)
    with EventStorage(0), SyncCounter() as counter:
        losses = model(batch)
        sum(losses.values()).backward()
    return counter, losses


def sampled_proposals(seed, sizes, num_classes, exposed=False):
    """
    One image's sampled proposals per entry of ``sizes`` (that many each) on a 64 x 64 image,
    with random boxes, IoUs and labels: classes ``0..num_classes - 1`` and background
    ``num_classes``; with ``exposed``, also exposed boxes (``gt_exposed``, classed background).
    """
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        p = Instances((64, 64))
        p.proposal_boxes = Boxes(torch.rand(n, 4, generator=g))
        labels = torch.randint(0, num_classes + (2 if exposed else 1), (n,), generator=g)
        if exposed:
            p.gt_exposed = labels == num_classes + 1
            labels = labels.clamp(max=num_classes)
        p.gt_classes = labels
        p.gt_iou = 0.4 + 0.6 * torch.rand(n, generator=g)
        out.append(p)
    return out


def tiny_ood_benchmark(ood_dataset, bootstrap):
    """
    Overrides that benchmark a 2-iteration model with embeddings: every detection counts and
    detections match loosely (it is barely trained), with ``ood_dataset`` as the image-level OOD
    images and ``bootstrap`` replicates.
    """
    return [
        "MODEL.RCDET.EMBED_AT_TEST",
        "True",
        "TEST.OOD.SCORE_THRESHOLD",
        "0.0",
        "TEST.OOD.MATCH_IOU",
        "0.1",
        "TEST.OOD.OOD_DATASET",
        ood_dataset,
        "TEST.OOD.BOOTSTRAP",
        str(bootstrap),
    ]


def run_training(cfg):
    """Freeze ``cfg`` and train from scratch (or MODEL.WEIGHTS); returns the trainer."""
    from rcdet.engine import Trainer

    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


@pytest.fixture(scope="session")
def tiny_models(tiny_shapes, tmp_path_factory):
    """2-iteration RINCE and softmax models trained on the tiny held-out split."""
    out = {}
    for name in ("rince", "softmax"):
        d = tmp_path_factory.mktemp(name)
        cfg = tiny_cfg(f"configs/shapes_{name}_ood.yaml", "DATASETS.TEST", "()", output_dir=d)
        run_training(cfg)
        out[name] = str(d / "model_final.pth")
    return out


@pytest.fixture(scope="session")
def image_level_report(tiny_models, tmp_path_factory):
    """The OOD benchmark of the tiny RINCE model with 6 built-in OOD images, in a folder named
    `il`: its config, OOD dataset, report and folder."""
    from types import SimpleNamespace

    from detectron2.data import MetadataCatalog

    from rcdet.data.ood_images import register_shapes_ood_images
    from rcdet.evaluation.ood_benchmark import run_ood_benchmark

    root = MetadataCatalog.get("rcdet_shapes_test").dirname
    ood_name = register_shapes_ood_images(root, ["ring", "triangle"], num_images=6)
    cfg = tiny_cfg(
        "configs/shapes_rince_ood.yaml",
        "MODEL.WEIGHTS",
        tiny_models["rince"],
        *tiny_ood_benchmark(ood_name, bootstrap=40),
    )
    cfg.freeze()
    out = tmp_path_factory.mktemp("il", numbered=False)
    report = run_ood_benchmark(cfg, str(out))
    return SimpleNamespace(cfg=cfg, ood_dataset=ood_name, report=report, folder=out)


def benchmark_scores_by_image(folder, score):
    """{image index: (boxes, the benchmark's scores)} from a run's ood_scores.npz."""
    with np.load(os.path.join(folder, "ood_scores.npz")) as z:
        boxes, images, values = z["boxes"], z["image_index"], z[score]
    return {int(i): (boxes[images == i], values[images == i]) for i in np.unique(images)}


def compare_with_benchmark(found, expected, rtol=1e-4, atol=1e-4):
    """Match each benchmark detection to the predicted one with the same box; compare the scores
    the benchmark computed (embedding scores only for the detections a metric uses). Returns how
    many were compared."""
    boxes, scores = found
    ref_boxes, ref_scores = expected
    assert len(boxes) == len(ref_boxes)
    compared = 0
    for box, value in zip(ref_boxes, ref_scores):
        j = int(np.abs(boxes - box).max(axis=1).argmin())
        np.testing.assert_allclose(boxes[j], box, atol=1e-3)
        if not np.isnan(value):
            np.testing.assert_allclose(scores[j], value, rtol=rtol, atol=atol)
            compared += 1
    return compared
