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
