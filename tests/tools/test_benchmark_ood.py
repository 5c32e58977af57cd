"""tools/benchmark_ood.py: `--compare` refuses reports of different protocols and malformed
reports, an unregistered `--ood-dataset` lists the registered ones, and TEST.OOD keys out of
range are named, each in one error line."""

import json
import os

from conftest import REPO, fake_ood_report

from tools import benchmark_ood


def test_compare_refuses_mixed_protocols_and_malformed_reports(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fake_ood_report(a)
    fake_ood_report(b, matching="all")
    assert benchmark_ood.main(["--compare", a, b, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refusing to compare reports from different protocols")
    assert "\n" not in err
    # Malformed files: one line naming the file.
    with open(os.path.join(b, "ood_report.json"), "w") as f:
        f.write('{"scores": {')
    assert benchmark_ood.main(["--compare", a, b]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {b}/ood_report.json: not valid JSON") and "\n" not in err
    with open(os.path.join(b, "ood_report.json"), "w") as f:
        json.dump({"name": "b", "detection": {}}, f)
    assert benchmark_ood.main(["--compare", a, b]) == 2
    err = capsys.readouterr().err
    assert f"{b}/ood_report.json: not an OOD report (no 'scores' section)" in err


def test_unregistered_ood_dataset_lists_the_registered_ones(tiny_shapes, capsys):
    config = os.path.join(REPO, "configs/shapes_rince_ood.yaml")
    rc = benchmark_ood.main(
        ["--config-file", config, "--ood-dataset", "coco_no_voc", "MODEL.WEIGHTS", "unused.pth"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(
        "error: TEST.OOD.OOD_DATASET 'coco_no_voc' is not a registered dataset. Registered"
        " datasets:"
    )
    assert "rcdet_shapes_test" in err and "voc_2007_test" in err


def test_out_of_range_keys_are_refused_naming_the_key(tiny_shapes, capsys):
    # The flags are refused by their argparse types (tests/test_cli.py); the keys they set are
    # checked when the config is set up, before the model is loaded.
    config = os.path.join(REPO, "configs/shapes_rince_ood.yaml")
    for key, value, expected in (
        ("BOOTSTRAP", "-5", "TEST.OOD.BOOTSTRAP = -5: must be an integer >= 0"),
        ("MATCH_IOU", "1.5", "TEST.OOD.MATCH_IOU = 1.5: must be in (0, 1]"),
        ("KNN_K", "0", "TEST.OOD.KNN_K = 0: must be an integer >= 1"),
    ):
        argv = ["--config-file", config, "MODEL.WEIGHTS", "x.pth", f"TEST.OOD.{key}", value]
        rc = benchmark_ood.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(f"error: {expected}") and "\n" not in err, err


def test_benchmark_prints_and_draws_the_placement_section(tiny_models, tmp_path, capsys):
    out = tmp_path / "ood"
    rc = benchmark_ood.main(
        [
            "--config-file",
            os.path.join(REPO, "configs/shapes_rince_ood.yaml"),
            "--output",
            str(out),
            "--score-thresh",
            "0",
            "--match-iou",
            "0.1",
            "--ood-dataset",
            "none",
            "--bootstrap",
            "0",
            "MODEL.WEIGHTS",
            tiny_models["rince"],
            "INPUT.MIN_SIZE_TEST",
            "160",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    with open(out / "ood_report.json") as f:
        placement = json.load(f)["placement"]
    assert placement["methods"] == ["prototype", "knn", "argmax"]
    assert placement["ranking"] == "configs/rankings/shapes_families.yaml"
    ring = placement["classes"]["ring"]
    assert ring["family"] == ["disc", "bullseye"] and ring["chance"] == 2 / 7
    assert sum(ring["confusion"]["knn"].values()) == ring["objects"]
    # The printed section: a header, then each held-out class with its family accuracy.
    assert "Placement: the nearest known class of each claimed held-out object" in printed
    assert f"  ring: {ring['objects']} claimed, family disc+bullseye, chance 0.286;" in printed
    assert "family_energy: AUROC" in printed
    assert f"figure: {out}/placement.png" in printed and (out / "placement.png").is_file()


def test_benchmark_of_an_exposure_model_reports_the_reference_score(tiny_shapes, tmp_path, capsys):
    import numpy as np
    import torch
    from conftest import run_training, tiny_cfg
    from detectron2.data import MetadataCatalog

    from rcdet.data.ood_images import register_shapes_ood_images
    from rcdet.modeling.reference import ReferenceEmbedding

    # Two iterations of the exposure config: f (fixed) is in the checkpoint.
    config = os.path.join(REPO, "configs/shapes_rince_exposure_ood.yaml")
    run_training(tiny_cfg(config, "DATASETS.TEST", "()", output_dir=tmp_path / "train"))
    weights = str(tmp_path / "train" / "model_final.pth")
    f = torch.load(weights, map_location="cpu")["model"]["roi_heads.reference.vector"]
    assert torch.equal(f, ReferenceEmbedding(64, "fixed").vector)

    ood = register_shapes_ood_images(
        MetadataCatalog.get("rcdet_shapes_test").dirname, ["ring", "triangle"], num_images=6
    )
    out = str(tmp_path / "ood")
    argv = ["--config-file", config, "--output", out, "--bootstrap", "0", "--score-thresh", "0"]
    argv += ["--match-iou", "0.1", "--ood-dataset", ood, "MODEL.WEIGHTS", weights]
    argv += ["MODEL.RCDET.QUEUE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "160"]  # as trained
    assert benchmark_ood.main(argv) == 0
    printed = capsys.readouterr().out
    assert "reference: AUROC" in printed
    with open(os.path.join(out, "ood_report.json")) as fh:
        report = json.load(fh)
    assert report["test_dataset"] == (
        "rcdet_shapes_test__minus_ring+triangle_exposed_frame+tri_split_ood_test"
    )
    assert report["known_classes"] == ["disc", "bullseye", "square", "window", "tri_frame"]
    assert set(report["detection"]) == {"AP", "AP50", "AP75"}
    for section in (report["scores"], report["image_level"]["scores"]):
        assert list(section) == [
            "msp",
            "max_logit",
            "energy",
            "cosine",
            "knn",
            "gaussian",
            "sibling_margin",
            "family_energy",
            "reference",
        ]
        assert section["reference"]["available"] is True
    # The statistics, cached next to the weights, carry f.
    caches = [n for n in os.listdir(tmp_path / "train") if n.startswith("ood_stats_")]
    assert caches
    for cache in caches:
        with np.load(tmp_path / "train" / cache) as z:
            np.testing.assert_allclose(z["reference"], f.double().numpy(), atol=1e-6)
    with np.load(os.path.join(out, "ood_scores.npz")) as z:
        scored = np.isin(z["status"], [0, 1])
        assert scored.any() and np.all(np.abs(z["reference"][scored]) <= 1 + 1e-9)
