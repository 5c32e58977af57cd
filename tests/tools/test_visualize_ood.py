"""tools/visualize_ood.py writes the grid of a benchmark report as a PNG."""

from PIL import Image

from tools import visualize_ood


def test_grid_of_a_benchmark_report_is_a_png(image_level_report, tmp_path):
    grid = tmp_path / "grid.png"
    folder = str(image_level_report.folder)
    argv = [folder, "--num-images", "3", "--score", "knn", "--output", str(grid)]
    assert visualize_ood.main(argv) == 0
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size[0] > 300
