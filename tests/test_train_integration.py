"""The real detectron2 path end to end on the tiny built-in data: train, checkpoint, eval, resume."""

import os
import subprocess
import sys

import pytest
import torch

from detectron2.engine import default_argument_parser

from conftest import REPO, load_tool, tiny_cfg
from rcdet.engine import Trainer


def _train(cfg):
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


@pytest.mark.parametrize("config", ["configs/shapes_softmax.yaml", "configs/shapes_supcon.yaml", "configs/shapes_rince.yaml"])
def test_each_shapes_config_trains_a_few_iterations(tiny_shapes, tmp_path, config):
    cfg = tiny_cfg(config, "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", output_dir=tmp_path)
    trainer = _train(cfg)
    assert trainer.iter == cfg.SOLVER.MAX_ITER
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_train_checkpoint_then_eval_only_reports_ap(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg("configs/shapes_rince.yaml", "DATASETS.TEST", "()", output_dir=out)
    _train(cfg)
    weights = out / "model_final.pth"
    assert weights.is_file()
    # --eval-only through the real CLI entry point, in-process.
    train_net = load_tool("train_net")

    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs/shapes_rince.yaml"), "--eval-only",
         "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out / "eval"), "INPUT.MIN_SIZE_TEST", "160",
         "MODEL.RCDET.QUEUE_SIZE", "64"]
    )
    res = train_net.main(args)
    bbox = res["bbox"]
    assert set(bbox) == {"AP", "AP50", "AP75"}
    assert all(0.0 <= v <= 100.0 for v in bbox.values())


def test_resume_restores_the_queue_exactly(tiny_shapes, tmp_path):
    cfg = tiny_cfg("configs/shapes_rince.yaml", "DATASETS.TEST", "()", "MODEL.RCDET.IOU_THRESHOLD", "0.5",
                   "MODEL.RCDET.QUEUE_IOU_THRESHOLD", "0.5", output_dir=tmp_path)
    first = _train(cfg.clone())
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


def test_cli_reports_config_errors_without_traceback(tiny_shapes):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", "configs/shapes_rince.yaml",
         "MODEL.RCDET.TEMPERATURES", "[0.3, 0.1, 0.2]"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, RCDET_SHAPES_ROOT=tiny_shapes), timeout=300,
    )
    assert proc.returncode == 2
    assert "error: MODEL.RCDET.TEMPERATURES" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("config", ["configs/voc_softmax.yaml", "configs/voc_supcon.yaml", "configs/voc_rince.yaml", "configs/voc_rince_text.yaml"])
def test_voc_configs_build_and_train_one_iteration(tiny_shapes, tmp_path, config):
    """The R50-FPN VOC configs, from scratch, on the tiny built-in data instead of VOC2007."""
    cfg = tiny_cfg(
        config, "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('rcdet_shapes_trainval',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "9", "MODEL.RCDET.RANKING_FILE", "configs/rankings/shapes_families.yaml",
        "SOLVER.MAX_ITER", "1", "INPUT.MIN_SIZE_TRAIN", "(128,)", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", output_dir=tmp_path,
    )
    trainer = _train(cfg)
    assert trainer.iter == 1 and (tmp_path / "model_final.pth").is_file()


@pytest.mark.parametrize("config", ["configs/voc_rince.yaml", "configs/voc_rince_text.yaml", "configs/voc_supcon.yaml"])
def test_voc_configs_load_their_rankings_for_voc_classes(config):
    from detectron2.config import get_cfg
    from detectron2.data.datasets.pascal_voc import CLASS_NAMES

    from rcdet.config import add_rcdet_config
    from rcdet.data.held_out import training_classes
    from rcdet.modeling.rince import build_contrastive_loss

    cfg = get_cfg()
    add_rcdet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config))
    # voc_2007_trainval metadata exists without the images
    loss = build_contrastive_loss(cfg, *training_classes(cfg))
    assert loss.rank_matrix.shape == (len(CLASS_NAMES), len(CLASS_NAMES))
    assert loss.num_ranks == (1 if "supcon" in config else 3)
