"""
rcdet.evaluation.evaluator inside detectron2's pipeline: the evaluator in inference_on_dataset
gives the tool's report field by field, 2 gloo workers give the one-process report, --eval-only
and TEST.EVAL_PERIOD report OOD, the statistics follow the model and the training images, and
bad options and datasets are errors naming their key.
"""

import json
import os
import re

import numpy as np
import pytest
from conftest import eval_only_args, run_tool, run_training, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from dist_utils import run_distributed

from rcdet.checkpoint import load_trained_weights
from rcdet.config import ConfigError
from rcdet.engine import Trainer
from rcdet.evaluation.evaluator import (
    OODDetectionEvaluator,
    OODOptions,
    fit_ood_statistics,
    ood_outputs,
)
from rcdet.evaluation.report import load_report

# What the tool adds around the evaluator's report: its name, weights, AP and timings.
TOOL_FIELDS = ("name", "weights", "detection", "timing_seconds")


def _model(cfg):
    model = build_model(cfg)
    load_trained_weights(model, cfg)
    model.eval()
    return model


def _evaluate(cfg, model, distributed=True):
    test = cfg.DATASETS.TEST[0]
    evaluator = OODDetectionEvaluator(test, cfg, model=model, distributed=distributed)
    with ood_outputs(model):
        results = inference_on_dataset(model, Trainer.build_test_loader(cfg, test), evaluator)
    return evaluator, results


def _comparable(report) -> dict:
    d = json.loads(json.dumps(report.to_dict()))
    return {k: v for k, v in d.items() if k not in TOOL_FIELDS}


def _cfg_in(cfg, output_dir):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    return cfg


def test_evaluator_in_inference_on_dataset_gives_the_tools_report(image_level_report, tmp_path):
    # The model in memory, statistics fitted from it: the report the tool wrote, field by field.
    cfg = _cfg_in(image_level_report.cfg, tmp_path)
    evaluator, results = _evaluate(cfg, _model(cfg))
    on_disk = _comparable(load_report(str(image_level_report.folder)))
    assert _comparable(evaluator.report) == on_disk
    assert on_disk["image_level"]["counts"]["ood"] > 0 and on_disk["data"]["statistics"]
    # detectron2's flat result: every available score's metrics, NaN where undefined.
    flat = results["ood"]
    assert flat["msp_auroc"] == on_disk["scores"]["msp"]["auroc"]
    assert flat["img_knn_fpr95"] == on_disk["image_level"]["scores"]["knn"]["fpr95"]
    assert flat["a_ose"] == on_disk["open_set"]["a_ose"]
    assert all(isinstance(v, float) for v in flat.values())


def _gloo_worker(rank, world_size, root, cfg_yaml, out_dir):
    from detectron2.config import CfgNode

    from rcdet.data import register_rcdet_shapes
    from rcdet.data.held_out import apply_held_out_config
    from rcdet.data.ood_images import register_shapes_ood_images

    register_rcdet_shapes(root)
    register_shapes_ood_images(root, ["ring", "triangle"], num_images=6)
    cfg = CfgNode.load_cfg(cfg_yaml)
    apply_held_out_config(cfg)
    cfg.freeze()
    evaluator, _ = _evaluate(cfg, _model(cfg))
    if rank == 0:
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(_comparable(evaluator.report), f)
    else:
        assert evaluator.report is None  # scored on the main process only


def test_two_gloo_workers_give_the_one_process_report(image_level_report, tiny_shapes, tmp_path):
    cfg = _cfg_in(image_level_report.cfg, tmp_path)
    run_distributed(_gloo_worker, 2, tiny_shapes, cfg.dump(), str(tmp_path))
    with open(tmp_path / "report.json") as f:
        two = json.load(f)
    assert two == _comparable(load_report(str(image_level_report.folder)))


def _held_out_cfg(weights, output_dir, *opts):
    return tiny_cfg(
        "configs/shapes_rince_ood.yaml",
        "MODEL.WEIGHTS",
        weights,
        "TEST.OOD.OOD_DATASET",
        "none",
        "TEST.OOD.BOOTSTRAP",
        "20",
        *opts,
        output_dir=output_dir,
    )


def test_eval_only_with_held_out_classes_prints_ap_and_ood(tiny_models, tiny_shapes, tmp_path):
    opts = ["INPUT.MIN_SIZE_TEST", "160", "TEST.OOD.OOD_DATASET", "none", "TEST.OOD.BOOTSTRAP", "0"]
    argv = eval_only_args(tiny_models["rince"], tmp_path, *opts)
    proc = run_tool("train_net.py", *argv, shapes_root=tiny_shapes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copypaste: AP,AP50,AP75" in proc.stdout
    assert "copypaste: Task: ood" in proc.stdout and "msp_auroc" in proc.stdout
    # The evaluator wrote its report beside detectron2's inference outputs.
    (folder,) = (tmp_path / "inference").iterdir()
    assert load_report(str(folder)).test_dataset == folder.name


def test_eval_period_logs_ood_scalars_and_training_fits_the_statistics(tiny_shapes, tmp_path):
    cfg = _held_out_cfg("", tmp_path, "TEST.EVAL_PERIOD", "2")
    trainer = run_training(cfg)
    latest = trainer.storage.latest()
    for key in ("ood/msp_auroc", "ood/knn_fpr95", "ood/a_ose", "bbox/AP"):
        assert key in latest, sorted(latest)
    # The after-training hook fitted the statistics of the trained model; the final evaluation
    # found them cached instead of fitting again.
    (cache,) = [n for n in os.listdir(tmp_path) if n.startswith("ood_stats_")]
    stats = fit_ood_statistics(trainer.model, cfg)
    with np.load(tmp_path / cache) as z:
        assert np.array_equal(z["bank"], stats.bank)


def test_stale_statistics_are_fitted_again_for_other_training_images(tiny_models, tmp_path):
    # Same weights, same split name, other images: the cache must not be reused.
    name = "rcdet_cache_probe"
    cfg = _held_out_cfg(tiny_models["rince"], tmp_path)
    sources = (cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0])  # known-class boxes only, both
    model = _model(cfg)
    cfg.DATASETS.TRAIN = (name,)
    counts = []
    for source in sources:
        dicts = DatasetCatalog.get(source)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda d=dicts: d)
        stats = fit_ood_statistics(model, cfg)
        boxes = sum(len(d["annotations"]) for d in dicts)
        counts.append(boxes)
        assert stats.bank.shape[0] == boxes  # fitted on these images, not read from the cache
    assert counts[0] != counts[1]
    assert len([n for n in os.listdir(tmp_path) if n.startswith("ood_stats_")]) == 2
    DatasetCatalog.remove(name)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("BOOTSTRAP", "-5", "an integer >= 0"),
        ("MATCH_IOU", "1.5", "in (0, 1]"),
        ("KNN_K", "0", "an integer >= 1"),
        ("SCORE_THRESHOLD", "-0.1", "in [0, 1]"),
        ("MATCHING", "'every'", "one of one_per_object, all"),
        ("IMAGE_THRESHOLD", "'best'", "one of f1_optimal, id_recall_95, fixed"),
        ("ENERGY_TEMPERATURE", "0.0", "> 0"),
    ],
)
def test_option_keys_outside_their_range_are_refused(tiny_shapes, key, value, allowed):
    # setup_cfg refuses them too (rcdet.engine.check_config_values): set the key afterwards.
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml")
    cfg.merge_from_list([f"TEST.OOD.{key}", value])
    with pytest.raises(ConfigError, match=rf"^TEST\.OOD\.{key} = .*: must be {re.escape(allowed)}"):
        OODOptions.from_config(cfg)


def test_a_dataset_without_held_out_classes_or_ood_images_names_the_keys(tiny_shapes):
    cfg = tiny_cfg("configs/shapes_rince.yaml", "TEST.OOD.OOD_DATASET", "none")
    assert not MetadataCatalog.get("rcdet_shapes_test").get("held_out_classes", [])
    with pytest.raises(
        ConfigError, match="set MODEL.RCDET.OOD.HELD_OUT_CLASSES or TEST.OOD.OOD_DATASET"
    ):
        OODDetectionEvaluator("rcdet_shapes_test", cfg)
