"""tools/demo.py, the `make demo` job, end to end on the tiny built-in data with a 2-iteration schedule."""

import json

from conftest import load_tool

TINY = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160", "MODEL.RCDET.QUEUE_SIZE", "64"]


def test_demo_writes_metrics_with_ap_and_ood(tiny_shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RCDET_SHAPES_ROOT", tiny_shapes)  # the data exists: no generation
    demo = load_tool("demo")

    assert demo.main(["--output", str(tmp_path)] + TINY) == 0
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert {"AP", "AP50", "AP75"} <= set(metrics)
    assert metrics["held_out_classes"] == ["ring", "triangle"]
    assert set(metrics["ood"]) == {"msp", "max_logit", "energy", "cosine", "knn", "gaussian"}
    for entry in metrics["ood"].values():
        assert set(entry) == {"auroc", "fpr95", "aupr_in"}
    assert (tmp_path / "train" / "model_final.pth").is_file()
    assert (tmp_path / "ood" / "roc.png").is_file()
    assert f"ROC plot: {tmp_path / 'ood' / 'roc.png'}" in capsys.readouterr().out
