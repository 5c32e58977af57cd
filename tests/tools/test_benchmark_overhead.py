"""tools/benchmark_overhead.py reports the device syncs and operators that rcdet adds to a step."""

import json

from tools import benchmark_overhead


def _overhead(out, *options):
    """One synthetic step and batch on small images, without the memory pass; the JSON result."""
    argv = [*options, "--synthetic", "--steps", "1", "--batches", "1", "--no-memory"]
    argv += ["--json", str(out), "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TEST", "128"]
    assert benchmark_overhead.main(argv) == 0
    return json.loads(out.read_text())


def test_benchmark_overhead_reports_syncs_and_operators(tmp_path):
    result = _overhead(tmp_path / "overhead.json")
    assert result["lr"] == 0.0 and result["amp"] == "off"
    assert result["syncs_added_by_rcdet"] == {"Tensor.tolist": 1}
    assert result["syncs_per_step"]["rince"] == result["syncs_per_step"]["standard"] + 1
    assert result["ops_per_step"]["rince"] > result["ops_per_step"]["standard"]


def test_benchmark_overhead_of_vos_reports_at_most_one_added_sync(tmp_path):
    options = ["--config-file", "configs/shapes_vos_ood.yaml", "--branch", "vos"]
    result = _overhead(tmp_path / "vos.json", *options)
    assert result["branch"] == "vos" and set(result["train_step_ms"]) == {"standard", "vos"}
    assert result["syncs_added_by_rcdet"] == {"Tensor.tolist": 1}
    assert result["ops_per_step"]["vos"] > result["ops_per_step"]["standard"]
