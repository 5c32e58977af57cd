"""
rcdet.evaluation.calibration: the unknown-object threshold keeps ID_RECALL of the calibration
split's ID detections, which the OOD evaluator finds on the same split; the calibration split
and its errors; the after-training hook saves model_final.pth with the fitted scorer, and
training from fitted weights starts without statistics.
"""

import numpy as np
import pytest
import torch
from conftest import run_training, tiny_cfg
from detectron2.data import MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from rcdet.checkpoint import load_trained_weights
from rcdet.config import ConfigError
from rcdet.engine import Trainer
from rcdet.evaluation.calibration import (
    calibrate_unknown_threshold,
    calibration_split,
    fit_ood_scorer,
    threshold_keeping,
)
from rcdet.evaluation.evaluator import OODDetectionEvaluator, fit_ood_statistics, ood_outputs
from rcdet.evaluation.matching import ID

LOOSE = ("TEST.OOD.SCORE_THRESHOLD", "0.0", "TEST.OOD.MATCH_IOU", "0.1")


def test_threshold_keeping_by_hand():
    scores = [0.9, 0.1, 0.5, 0.7, 0.3]
    assert threshold_keeping(scores, 1.0) == 0.1
    assert threshold_keeping(scores, 0.95) == 0.1  # ceil(4.75) = 5 scores kept
    assert threshold_keeping(scores, 0.6) == 0.5  # exactly 3 of 5
    assert threshold_keeping(scores, 0.5) == 0.5  # ceil(2.5) = 3
    assert threshold_keeping(scores, 0.01) == 0.9
    assert threshold_keeping(np.arange(10.0), 0.7) == 3.0  # 0.7 * 10 is not 7 in floats
    assert threshold_keeping([], 0.95) is None


def _fitted_model(weights, *opts):
    cfg = tiny_cfg(
        "configs/shapes_rince_ood.yaml", "MODEL.WEIGHTS", weights, "TEST.OOD.OOD_DATASET", "none"
    )
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    model = build_model(cfg)
    load_trained_weights(model, cfg)
    return model.eval(), cfg


@pytest.mark.parametrize("score, keep", [("cosine", 0.95), ("knn", 0.5), ("msp", 0.8)])
def test_threshold_keeps_id_recall_of_the_id_detections_the_evaluator_finds(
    tiny_models, tmp_path, score, keep
):
    model, cfg = _fitted_model(
        tiny_models["rince"],
        *LOOSE,
        "MODEL.RCDET.OOD.SCORE",
        score,
        "MODEL.RCDET.OOD.ID_RECALL",
        str(keep),
        "OUTPUT_DIR",
        str(tmp_path),
    )
    stats = fit_ood_statistics(model, cfg)
    threshold = calibrate_unknown_threshold(model, cfg)
    scorer = model.roi_heads.ood_scorer
    assert scorer.has_threshold and float(scorer.threshold) == pytest.approx(threshold)

    # Independently: the evaluator's ID detections on the training split and their scores.
    split = cfg.DATASETS.TRAIN[0]
    assert calibration_split(cfg) == split
    evaluator = OODDetectionEvaluator(split, cfg, model=model, statistics=stats)
    with ood_outputs(model):
        inference_on_dataset(model, Trainer.build_test_loader(cfg, split), evaluator)
    arrays = evaluator.arrays["object"]
    ids = np.sort(arrays[score][arrays["status"] == ID])[::-1]
    assert ids.size >= 10
    kept = int(np.ceil(round(keep * ids.size, 9)))
    assert threshold == pytest.approx(ids[kept - 1], rel=1e-5, abs=1e-5)
    assert (ids >= threshold - 1e-5).sum() >= keep * ids.size


def test_no_id_detection_leaves_no_threshold(tiny_models, tmp_path, caplog):
    model, cfg = _fitted_model(
        tiny_models["rince"], "TEST.OOD.SCORE_THRESHOLD", "1.0", "OUTPUT_DIR", str(tmp_path)
    )
    fit_ood_statistics(model, cfg)
    assert calibrate_unknown_threshold(model, cfg) is None
    assert model.roi_heads.ood_scorer.ready and not model.roi_heads.ood_scorer.has_threshold
    assert "No detection claims a known object" in caplog.text


def test_calibration_split_names_and_errors(tiny_shapes):
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.RCDET.OOD.CALIBRATION_DATASET", "")
    assert calibration_split(cfg) == cfg.DATASETS.TRAIN[0]
    cfg.MODEL.RCDET.OOD.CALIBRATION_DATASET = "rcdet_shapes_val"
    name = calibration_split(cfg)
    assert name == "rcdet_shapes_val__minus_ring+triangle_ood_test"
    assert (
        MetadataCatalog.get(name).thing_classes
        == MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
    )
    cfg.MODEL.RCDET.OOD.CALIBRATION_DATASET = "rcdet_shapes_vall"
    with pytest.raises(ConfigError, match="CALIBRATION_DATASET 'rcdet_shapes_vall' is not a reg"):
        calibration_split(cfg)
    # All nine classes known, but a split with one class set apart.
    nine = tiny_cfg(
        "configs/shapes_rince.yaml",
        "MODEL.RCDET.OOD.CALIBRATION_DATASET",
        "rcdet_shapes_val__minus_ring_ood_test",
    )
    with pytest.raises(ConfigError, match="has the classes .* the model .*: name a split of the"):
        calibration_split(nine)


def test_calibrating_before_fitting_names_the_fix(tiny_models):
    model, cfg = _fitted_model(tiny_models["rince"])
    model.roi_heads.ood_scorer.clear()
    with pytest.raises(ConfigError, match="fit the statistics"):
        calibrate_unknown_threshold(model, cfg)


def test_training_fits_the_scorer_into_model_final_and_training_again_drops_it(
    tiny_shapes, tmp_path
):
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", "DATASETS.TEST", "()", *LOOSE)
    cfg.OUTPUT_DIR = str(tmp_path / "first")
    trainer = run_training(cfg)
    scorer = trainer.model.roi_heads.ood_scorer
    assert scorer.ready and scorer.has_threshold
    saved = torch.load(tmp_path / "first" / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 1  # the periodic checkpointer's last iteration, kept
    state = saved["model"]
    for name, value in scorer.state_dict().items():
        assert torch.equal(state[f"roi_heads.ood_scorer.{name}"], value), name

    again = tiny_cfg(
        "configs/shapes_rince_ood.yaml", "MODEL.WEIGHTS", str(tmp_path / "first/model_final.pth")
    )
    again.OUTPUT_DIR = str(tmp_path / "second")
    again.freeze()
    second = Trainer(again)
    second.resume_or_load(resume=False)
    assert not second.model.roi_heads.ood_scorer.ready  # its weights are about to change


def test_fit_ood_scorer_of_a_softmax_head_calibrates_msp(tiny_models, tmp_path):
    cfg = tiny_cfg(
        "configs/shapes_softmax_ood.yaml",
        "MODEL.WEIGHTS",
        tiny_models["softmax"],
        "OUTPUT_DIR",
        str(tmp_path),
        *LOOSE,
    )
    cfg.freeze()
    model = build_model(cfg)
    load_trained_weights(model, cfg)
    scorer = fit_ood_scorer(model.eval(), cfg)
    assert scorer.score == "msp" and scorer.has_threshold
    assert set(scorer.state_dict()) == {"score_index", "num_known", "threshold"}
