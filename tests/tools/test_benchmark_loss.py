"""tools/benchmark_loss.py reports no device syncs for RINCE and rcdet's SupCon, and an operator
count that does not grow with the number of classes."""

import json

from tools import benchmark_loss


def test_benchmark_loss_reports_syncs_and_operators(tmp_path):
    loss_json = tmp_path / "loss.json"
    argv = [
        "--sizes",
        "64x256",
        "--ranks",
        "2",
        "--no-memory",
        "--repeats",
        "1",
        "--json",
        str(loss_json),
    ]
    assert benchmark_loss.main(argv) == 0
    rows = json.loads(loss_json.read_text())["syncs_and_operators"]
    rcdet = [r for r in rows if r["loss"] != "supcon_autograd"]
    assert {r["loss"] for r in rcdet} >= {"supcon", "rince_out_in"}
    assert all(r["syncs"] == 0 for r in rcdet)
    by_key = {(r["loss"], r["r"], r["classes"]): r["ops"] for r in rows}
    assert by_key["rince_out_in", 3, 20] == by_key["rince_out_in", 3, 80]
    assert by_key["supcon", 1, 20] == by_key["supcon", 1, 80]
    # The autograd SupCon syncs (boolean-mask indexing): the count is real.
    assert [r["syncs"] for r in rows if r["loss"] == "supcon_autograd"][0] > 0
