"""
tools/demo.py, the `make demo` job, end to end on the tiny built-in data with a 2-iteration
schedule; its saved config evaluates as it is, and that evaluation keeps it.
"""

import json

from conftest import TINY_SCHEDULE, TINY_SIZES, run_tool
from detectron2.data import DatasetCatalog

from rcdet.evaluation.scores import ALL_SCORES, REFERENCE_SCORES
from tools import demo

# A model trained without exposed classes has no reference embedding f, so no `reference` score.
SCORES_WITHOUT_F = tuple(s for s in ALL_SCORES if s not in REFERENCE_SCORES)


def test_demo_writes_metrics_with_ap_and_ood(tiny_shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RCDET_SHAPES_ROOT", tiny_shapes)  # the data exists: no generation
    assert demo.main(["--output", str(tmp_path)] + TINY_SCHEDULE) == 0
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert {"AP", "AP50", "AP75"} <= set(metrics)
    assert metrics["held_out_classes"] == ["ring", "triangle"]
    assert set(metrics["ood"]) == set(SCORES_WITHOUT_F)  # a RINCE model with its ranking, without f
    assert metrics["placement"]["methods"] == ["prototype", "knn", "argmax"]
    assert metrics["placement"]["classes"]["ring"]["family"] == ["disc", "bullseye"]
    for entry in metrics["ood"].values():
        assert set(entry) == {"auroc", "auroc_ci", "fpr95", "fpr95_ci", "aupr_in"}
    assert metrics["ood_protocol"]["matching"] == "one_per_object"
    assert metrics["ood_image_level"]["ood_dataset"] == "rcdet_shapes_ood_images__ring+triangle"
    assert set(metrics["ood_image_level"]["scores"]) == set(metrics["ood"])
    assert {"a_ose", "wilderness_impact"} <= set(metrics["open_set"])
    # The demo states its hold-out mode and how many training images that left.
    assert metrics["hold_out_mode"] == "drop_images"
    assert (
        metrics["train_images_available"]
        == len(DatasetCatalog.get("rcdet_shapes_trainval"))
        == TINY_SIZES["train"] + TINY_SIZES["val"]
    )
    assert 0 < metrics["train_images"] < metrics["train_images_available"]
    assert (tmp_path / "train" / "model_final.pth").is_file()
    assert (tmp_path / "ood" / "roc.png").is_file() and (
        tmp_path / "ood" / "ood_grid.png"
    ).is_file()
    out = capsys.readouterr().out
    assert f"ROC plot: {tmp_path / 'ood' / 'roc.png'}" in out
    assert "[demo] placement, family accuracy (chance): ring prototype" in out
    assert (
        f"hold-out mode drop_images: training on {metrics['train_images']} of the"
        f" {metrics['train_images_available']} images of rcdet_shapes_trainval (every image showing"
        " ring or triangle removed)" in out
    )

    # The saved config describes the run as a user re-runs it: train_net --eval-only evaluates
    # its test split (not an empty one), and leaves the training's config.yaml as it was.
    train = tmp_path / "train"
    saved = (train / "config.yaml").read_bytes()
    assert b"rcdet_shapes_test__minus_ring+triangle_ood_test" in saved
    proc = run_tool(
        "train_net.py",
        "--eval-only",
        "--config-file",
        str(train / "config.yaml"),
        "MODEL.WEIGHTS",
        str(train / "model_final.pth"),
        shapes_root=tiny_shapes,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copypaste: AP,AP50,AP75" in proc.stdout
    ap = proc.stdout.split("copypaste: AP,AP50,AP75\n")[1].split("copypaste: ")[1].split(",")
    # The demo's AP, of the same test split by the same evaluator.
    assert abs(float(ap[0]) - metrics["AP"]) < 1e-3, (ap, metrics["AP"])
    assert (train / "config.yaml").read_bytes() == saved
    assert (train / "eval" / "config.yaml").is_file()
