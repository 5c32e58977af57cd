"""rcdet.evaluation.report: merging reports of one protocol."""

import json
import os

import numpy as np
import pytest
from conftest import fake_ood_report

from rcdet.evaluation.report import (
    PROTOCOL_VERSION,
    OODReport,
    ReportError,
    load_report,
    merge_reports,
    write_report_files,
)


def test_merge_reports_refuses_mixed_protocols(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fake_ood_report(a)
    fake_ood_report(b, matching="all")
    with pytest.raises(
        ReportError, match=r"different protocols: .*matching 'one_per_object' vs 'all'"
    ):
        merge_reports([a, b], str(tmp_path / "out"))
    # A report of an older protocol, or of none, is refused by name, whatever the others are.
    for version in (PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, None):
        fake_ood_report(b, version=version)
        if version is None:
            with open(os.path.join(b, "ood_report.json")) as f:
                old = json.load(f)
            del old["protocol"]
            with open(os.path.join(b, "ood_report.json"), "w") as f:
                json.dump(old, f)
        with pytest.raises(ReportError, match=f"{b}/ood_report.json: written under OOD protocol"):
            merge_reports([a, b], str(tmp_path / "out"))
        with pytest.raises(ReportError, match=f"version {version}, this rcdet reads version"):
            load_report(b)
    # Same protocol: merged, with the intervals.
    fake_ood_report(b)
    md = merge_reports([a, b], str(tmp_path / "out"))
    assert "| a |" in md and "0.700 [0.600, 0.800]" in md


def test_reports_scored_on_other_test_images_are_not_compared(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fake_ood_report(a)
    fake_ood_report(b)
    with open(os.path.join(b, "ood_report.json")) as f:
        other = json.load(f)
    other["data"]["test"] = "another digest"
    with open(os.path.join(b, "ood_report.json"), "w") as f:
        json.dump(other, f)
    with pytest.raises(ReportError, match="differ in test images"):
        merge_reports([a, b], str(tmp_path / "out"))


def test_a_report_written_and_read_back_is_equal(image_level_report, tmp_path):
    report = image_level_report.report
    arrays = {}
    with np.load(image_level_report.folder / "ood_scores.npz") as z:
        arrays["object"] = {k: z[k] for k in z.files}
    write_report_files(str(tmp_path), report, arrays, figures=False)
    again = load_report(str(tmp_path))
    assert isinstance(again, OODReport) and again == report
    assert again == load_report(str(image_level_report.folder))
    assert OODReport.from_dict(report.to_dict()) == report


def test_a_report_without_placement_still_loads_and_merges(tmp_path):
    # Reports written before the placement section (and the ranking scores) existed.
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fake_ood_report(a)
    fake_ood_report(b)
    old = load_report(a)
    assert old.placement is None and "sibling_margin" not in old.scores
    assert not any(k.startswith("family_accuracy") for k in old.flat_metrics())
    md = merge_reports([a, b], str(tmp_path / "out"))
    assert "Placement" not in md and "| a |" in md
    assert not (tmp_path / "out" / "placement.png").exists()
