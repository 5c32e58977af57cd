"""tools/visualize_ood.py writes the grid of a benchmark report as a PNG."""

import json
import shutil

from PIL import Image

from tools import visualize_ood


def test_grid_of_a_benchmark_report_is_a_png(image_level_report, tmp_path):
    grid = tmp_path / "grid.png"
    folder = str(image_level_report.folder)
    argv = [folder, "--num-images", "3", "--score", "knn", "--output", str(grid)]
    assert visualize_ood.main(argv) == 0
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_a_report_of_other_test_images_is_refused(image_level_report, tmp_path, capsys):
    # The same split name holding other images (another dataset root): nothing is drawn.
    folder = tmp_path / "copy"
    shutil.copytree(image_level_report.folder, folder)
    with open(folder / "ood_report.json") as f:
        report = json.load(f)
    report["data"]["test"] = "digest of other images"
    with open(folder / "ood_report.json", "w") as f:
        json.dump(report, f)
    assert visualize_ood.main([str(folder), "--output", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert "its test images are not those" in err and not (tmp_path / "grid.png").exists()
