"""
OOD reports: writing and reading ood_report.json (and its CSVs and figures), the protocol check,
the flat metrics and the merged comparison of several runs. Every tool and the study read
reports through this module.
"""

import csv
import io
import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..file_io import atomic_write, save_npz_atomic, write_json_atomic
from .matching import ID, OOD
from .placement import PLACEMENT_METHODS
from .plots import (
    comparison_roc_figure,
    histogram_figure,
    placement_figure,
    roc_figure,
    save_figure,
)
from .scores import ALL_SCORES

__all__ = [
    "PROTOCOL_VERSION",
    "OODReport",
    "ReportError",
    "write_report_files",
    "load_report",
    "report_version",
    "check_same_protocol",
    "protocol_of",
    "merge_reports",
    "report_metrics",
    "RocSet",
    "load_roc_set",
    "markdown_table",
    "csv_table",
    "placement_lines",
    "placement_csv",
]

# The version of what a report's numbers mean. Reports of other versions are not compared.
PROTOCOL_VERSION = 3


@dataclass
class OODReport:
    """
    The OOD benchmark's report (ood_report.json): one entry per field, JSON in and out. Each
    ``scores`` entry (and ``image_level["scores"]``'s) holds ``available``, ``auroc``, ``fpr95``,
    ``aupr_in``, ``aupr_out`` and their ``_ci`` intervals (None where undefined). ``placement``
    (held-out splits only; None in reports written before it existed) says where the claimed
    held-out objects land: ``ranking``, ``unit``, ``methods`` (those computed: ``prototype``,
    ``knn``, ``argmax``), ``knn_k``, ``warnings`` and per held-out class ``classes[name]`` with
    ``objects``, ``family``, ``chance``, and ``family_accuracy[method]`` and
    ``confusion[method]`` (known class -> objects), None for a method not computed.
    """

    name: str
    test_dataset: str
    known_classes: List[str]
    held_out_classes: List[str]
    protocol: Dict  # version, matching, match_iou, score_threshold, bootstrap, options
    data: Dict  # digests of the test split and the OOD images the numbers come from
    counts: Dict
    open_set: Dict
    scores: Dict[str, Dict]
    weights: str = ""
    hold_out_mode: Optional[str] = None
    detection: Dict = field(default_factory=dict)  # known-class AP, AP50, AP75
    defined: bool = True
    warnings: List[str] = field(default_factory=list)
    image_level: Optional[Dict] = None
    placement: Optional[Dict] = None
    timing_seconds: Dict = field(default_factory=dict)
    higher_score_means: str = "in-distribution"

    def to_dict(self) -> Dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Dict, path: str = "report") -> "OODReport":
        """The report in ``d``; ReportError (naming ``path``) if it is not one of this protocol."""
        if not isinstance(d, dict) or not isinstance(d.get("scores"), dict):
            raise ReportError(
                f"{path}: not an OOD report (no 'scores' section); re-run tools/benchmark_ood.py"
                " to write it again."
            )
        version = (d.get("protocol") or {}).get("version")
        if version != PROTOCOL_VERSION:
            raise ReportError(
                f"{path}: written under OOD protocol version {version}, this rcdet reads version"
                f" {PROTOCOL_VERSION}; re-run tools/benchmark_ood.py on the run (its checkpoint"
                " suffices)."
            )
        for name, entry in d["scores"].items():
            if not isinstance(entry, dict) or "available" not in entry or "auroc" not in entry:
                raise ReportError(
                    f"{path}: scores['{name}'] lacks 'available' or 'auroc'; re-run"
                    " tools/benchmark_ood.py."
                )
        names = {f.name for f in fields(cls)}
        missing = [
            f.name
            for f in fields(cls)
            if f.default is MISSING and f.default_factory is MISSING and f.name not in d
        ]
        if missing:
            raise ReportError(
                f"{path}: lacks {', '.join(missing)}; re-run tools/benchmark_ood.py to write it"
                " again."
            )
        return cls(**{k: v for k, v in d.items() if k in names})

    def summary_lines(self) -> List[str]:
        """The report in a few printed lines: counts, each score's AUROC and FPR95, open set."""
        c, o, il = self.counts, self.open_set, self.image_level
        lines = [
            f"Object level ({self.protocol['matching']}): {c['id']} ID and {c['ood']} OOD"
            f" detections of {c['id_objects']} ID and {c['ood_objects']} OOD objects;"
            f" {c['duplicates']} duplicates, {c['background']} background"
        ]
        lines += _score_lines(self.scores)
        wi = "undefined" if o["wilderness_impact"] is None else f"{o['wilderness_impact']:.4f}"
        lines.append(f"A-OSE {o['a_ose']}  WI@0.8 {wi}")
        if self.placement:
            lines += placement_lines(self.placement)
        if il:
            lines.append(
                f"Image level vs {il['ood_dataset']}: {il['counts']['id']} ID and"
                f" {il['counts']['ood']} OOD detections (confidence >= {il['min_score']:.3f},"
                f" {il['threshold_rule']})"
            )
            lines += _score_lines(il["scores"])
        t = self.timing_seconds
        if "overhead_vs_plain_inference" in t:
            lines.append(
                f"Overhead over plain inference: {100 * t['overhead_vs_plain_inference']:+.1f}%"
                f" (statistics cached), {100 * t['overhead_vs_plain_inference_with_fit']:+.1f}%"
                " (fitting them)"
            )
        return lines

    def flat_metrics(self) -> Dict[str, float]:
        """
        The numbers detectron2 prints and logs (as ``ood/<key>``): ``<score>_auroc``,
        ``_fpr95``, ``_aupr_in``, ``_aupr_out`` of each available score, ``a_ose``, ``wi``,
        ``img_<score>_auroc`` and ``_fpr95`` of the image level, and
        ``family_accuracy_<method>_<held-out class>`` of each placement method computed; NaN where
        undefined.
        """
        out = {}
        sections = [("", self.scores)]
        if self.image_level:
            sections.append(("img_", self.image_level["scores"]))
        for prefix, scores in sections:
            for name, entry in scores.items():
                if not entry["available"]:
                    continue
                for metric in ("auroc", "fpr95", "aupr_in", "aupr_out"):
                    v = entry.get(metric)
                    out[f"{prefix}{name}_{metric}"] = math.nan if v is None else float(v)
        out["a_ose"] = float(self.open_set["a_ose"])
        wi = self.open_set["wilderness_impact"]
        out["wi"] = math.nan if wi is None else float(wi)
        placement = self.placement or {}
        for name, entry in (placement.get("classes") or {}).items():
            for method in placement["methods"]:
                v = entry["family_accuracy"][method]
                out[f"family_accuracy_{method}_{name}"] = math.nan if v is None else float(v)
        return out


def _score_lines(scores: Dict) -> List[str]:
    return [
        f"{name:>14}: AUROC {_cell(e, 'auroc')}  FPR95 {_cell(e, 'fpr95')}"
        for name, e in scores.items()
    ]


def _accuracy(v) -> str:
    return "undefined" if v is None else f"{v:.3f}"


def placement_lines(placement: Dict) -> List[str]:
    """The placement section in printed lines: per held-out class, family accuracy and confusion."""
    source = placement.get("ranking") or "no ranking (MODEL.RCDET.RANKING_FILE empty)"
    lines = [
        "Placement: the nearest known class of each claimed held-out object; family: its rank-2"
        f" known classes in {source}"
    ]
    methods = placement["methods"]
    for name, entry in placement["classes"].items():
        if entry["family"]:
            family = f"family {'+'.join(entry['family'])}, chance {entry['chance']:.3f}"
        else:
            family = "no known family member"
        accuracy = ", ".join(f"{m} {_accuracy(entry['family_accuracy'][m])}" for m in methods)
        lines.append(f"  {name}: {entry['objects']} claimed, {family}; family accuracy: {accuracy}")
        for m in methods:
            placed = sorted(entry["confusion"][m].items(), key=lambda kv: -kv[1])
            cells = ", ".join(f"{c} {n}" for c, n in placed if n) or "none"
            lines.append(f"    {m:>9} -> {cells}")
    return lines


def placement_csv(report: OODReport) -> str:
    """
    One row per (held-out class, placement method): claimed objects, family, chance, family
    accuracy and the confusion row (one column per known class).
    """
    known = list(report.known_classes)
    rows = [["held_out_class", "method", "objects", "family", "chance", "family_accuracy"] + known]
    for name, entry in report.placement["classes"].items():
        for m in report.placement["methods"]:
            row = [name, m, entry["objects"], "+".join(entry["family"] or [])]
            row += [_fmt(entry["chance"]), _fmt(entry["family_accuracy"][m])]
            rows.append(row + [entry["confusion"][m].get(c, 0) for c in known])
    return csv_table(rows)


CSV_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")
CSV_FIELDS = (
    ("protocol", "score", "available")
    + tuple(f for k in CSV_METRICS for f in (k, f"{k}_ci_lo", f"{k}_ci_hi"))
    + ("ood_recall_at_95_id", "num_id", "num_ood")
)


def _fmt(v):
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def csv_table(rows: Sequence[Sequence]) -> str:
    """CSV text of ``rows`` (the header first), one line each."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of ``header`` and ``rows`` of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def report_csv(report: OODReport) -> str:
    """
    One row per (protocol, score): the object-level ``scores`` and, if run, the ``image_level``
    ones.
    """
    rows = [CSV_FIELDS]
    sections = [("object", report.scores, report.counts)]
    if report.image_level:
        sections.append(("image", report.image_level["scores"], report.image_level["counts"]))
    for protocol, scores, counts in sections:
        for name, entry in scores.items():
            row = [protocol, name, entry["available"]]
            for k in CSV_METRICS:
                ci = entry.get(f"{k}_ci") or [None, None]
                row += [_fmt(entry[k]), _fmt(ci[0]), _fmt(ci[1])]
            row += [_fmt(entry.get("ood_recall_at_95_id")), counts["id"], counts["ood"]]
            rows.append(row)
    return csv_table(rows)


def write_report_files(
    output_dir: str, report: OODReport, arrays: Dict, figures: bool = True, title: str = ""
):
    """
    ood_report.json/.csv and ood_scores.npz (``arrays["object"]``; with an image level also
    ood_image_level_scores.npz from ``arrays["image"]``; with a placement section
    ood_placement.csv), each written atomically; with ``figures``, roc.png and score_hist.png
    (the object-level ROC set: detections with status ID or OOD), roc_image_level.png and
    placement.png.
    """
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(os.path.join(output_dir, "ood_report.json"), report.to_dict())
    atomic_write(os.path.join(output_dir, "ood_report.csv"), report_csv(report).encode())
    if report.placement:
        atomic_write(os.path.join(output_dir, "ood_placement.csv"), placement_csv(report).encode())
    save_npz_atomic(os.path.join(output_dir, "ood_scores.npz"), **arrays["object"])
    if "image" in arrays:
        save_npz_atomic(os.path.join(output_dir, "ood_image_level_scores.npz"), **arrays["image"])
    if not figures:
        return
    status = np.asarray(arrays["object"]["status"])
    scored = (status == ID) | (status == OOD)
    is_id = status[scored] == ID
    table = {n: arrays["object"][n][scored] for n in ALL_SCORES if n in arrays["object"]}
    matching = report.protocol["matching"]
    what = "one detection per object" if matching == "one_per_object" else "every matched detection"
    title = title or f"OOD ROC: {report.name} (held out: {', '.join(report.held_out_classes)})"

    def roc(tab, ids, name, heading):
        defined = bool(ids.any() and (~ids).any())
        available = [n for n in ALL_SCORES if tab.get(n) is not None]
        curves = [(n, np.asarray(tab[n]), ids) for n in available] if defined else []
        fig = roc_figure(curves, heading)
        if not defined:
            fig.axes[0].text(
                0.5,
                0.5,
                f"undefined: {int(ids.sum())} ID and {int((~ids).sum())} OOD detections",
                ha="center",
                va="center",
                fontsize=9,
            )
        save_figure(fig, os.path.join(output_dir, name))

    roc(table, is_id, "roc.png", f"{title}\nobject level, {what}")
    if "image" in arrays:
        image = arrays["image"]
        roc(
            {n: image[n] for n in ALL_SCORES if n in image},
            np.asarray(image["is_id"], dtype=bool),
            "roc_image_level.png",
            f"{title}\nimage level: ID test images vs {report.image_level['ood_dataset']}",
        )
    save_figure(
        histogram_figure(
            table,
            is_id,
            f"{report.name}: OOD scores of ID and OOD detections (object level, {what})",
        ),
        os.path.join(output_dir, "score_hist.png"),
    )
    if report.placement:
        save_figure(
            placement_figure(
                report.placement,
                f"{report.name}: where claimed held-out objects land (family accuracy)",
            ),
            os.path.join(output_dir, "placement.png"),
        )


class ReportError(ValueError):
    """An ood_report.json that cannot be used: malformed, or not comparable with the others."""


def protocol_of(report: OODReport) -> Dict:
    """The settings that must agree for two reports' numbers to be comparable."""
    proto = report.protocol
    return {k: proto.get(k) for k in ("version", "matching", "match_iou", "score_threshold")}


def load_report(run_dir: str) -> OODReport:
    """
    A run's ood_report.json; a missing, malformed or foreign file, or one of another protocol
    version, is one clear error naming it.
    """
    path = os.path.join(run_dir, "ood_report.json")
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no OOD report here; run tools/benchmark_ood.py on it first.")
    try:
        with open(path) as f:
            rep = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(
            f"{path}: not valid JSON ({e}); re-run tools/benchmark_ood.py to write it again."
        ) from None
    return OODReport.from_dict(rep, path)


def report_version(path: str) -> Optional[int]:
    """The protocol version of the report file at ``path``; None if it cannot be read."""
    try:
        with open(path) as f:
            return (json.load(f).get("protocol") or {}).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def check_same_protocol(reports: Sequence[tuple]):
    """Refuse reports (``(path, report)`` pairs) whose protocols differ, saying how."""
    (first_path, first), rest = reports[0], reports[1:]
    p0 = protocol_of(first)
    for path, rep in rest:
        p = protocol_of(rep)
        diff = [f"{k} {p0[k]!r} vs {p[k]!r}" for k in p0 if p0[k] != p[k]]
        il0, il = first.image_level or {}, rep.image_level or {}
        if il0 and il and il0.get("ood_dataset") != il.get("ood_dataset"):
            diff.append(
                f"image-level OOD dataset {il0.get('ood_dataset')!r} vs {il.get('ood_dataset')!r}"
            )
        # Numbers of other images are not comparable, whatever the split is called.
        if first.data.get("test") != rep.data.get("test"):
            diff.append(f"test images ('{first.test_dataset}' vs '{rep.test_dataset}' hold others)")
        if il0 and il and first.data.get("ood_images") != rep.data.get("ood_images"):
            diff.append("image-level OOD images (same name, other images)")
        if diff:
            raise ReportError(
                f"refusing to compare reports from different protocols: {first_path} and"
                f" {path} differ in "
                + "; ".join(diff)
                + ". Re-run tools/benchmark_ood.py on the runs (their checkpoints suffice) with the"
                " same options."
            )


def _cell(entry, metric):
    if not entry.get("available", True):
        return "n/a"
    v, ci = entry.get(metric), entry.get(f"{metric}_ci")
    if v is None:
        return "undefined"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


_SCORE_COLUMNS = [f"{s} {metric}" for metric in ("AUROC", "FPR95") for s in ALL_SCORES]


def _score_cells(scores: Dict) -> List[str]:
    return [
        _cell(scores[s], metric) if s in scores else "n/a"
        for metric in ("auroc", "fpr95")
        for s in ALL_SCORES
    ]


def report_metrics(report: OODReport) -> Dict[str, Optional[float]]:
    """
    A report's numbers, flat: ``AP``, ``AP50``, ``AP75``, ``a_ose``, ``wi`` (wilderness impact),
    ``<score>_auroc`` and ``<score>_fpr95`` of the object-level scores and ``img_<score>_auroc``
    and ``img_<score>_fpr95`` of the image-level ones; None where the report has no such number
    or the score is not available.
    """
    out = {k: report.detection.get(k) for k in ("AP", "AP50", "AP75")}
    out["a_ose"] = report.open_set.get("a_ose")
    out["wi"] = report.open_set.get("wilderness_impact")
    image_level = (report.image_level or {}).get("scores") or {}
    for prefix, scores in (("", report.scores), ("img_", image_level)):
        for name in ALL_SCORES:
            entry = scores.get(name) or {}
            available = entry.get("available", False)
            for metric in ("auroc", "fpr95"):
                out[f"{prefix}{name}_{metric}"] = entry.get(metric) if available else None
    return out


def merge_reports(run_dirs: Sequence[str], output_dir: str):
    """
    Merge several runs' reports (same protocol, else ReportError) into one markdown + CSV table,
    with each metric's bootstrap 95% interval in brackets, and one ROC figure with one panel per
    score and one colour per run.
    """
    rows, loaded = [], []
    for run in run_dirs:
        rep = load_report(run)
        loaded.append((os.path.join(run, "ood_report.json"), rep))
        rows.append((rep.name or os.path.basename(os.path.normpath(run)), rep, run))
    check_same_protocol(loaded)
    header = ["run", "AP", "AP50", "AP75", "A-OSE", "WI"] + _SCORE_COLUMNS
    table = []
    for name, rep, _ in rows:
        values = report_metrics(rep)
        cells = [_fmt(values[k]) for k in ("AP", "AP50", "AP75", "a_ose", "wi")]
        table.append([name] + cells + _score_cells(rep.scores))
    proto = protocol_of(rows[0][1])
    md = (
        f"Object level (matching: {proto['matching']}, IoU >= {proto['match_iou']}; "
        "brackets: bootstrap 95% interval over test images)\n\n" + markdown_table(header, table)
    )
    csv_rows = [["protocol"] + header] + [["object"] + r for r in table]
    image_rows = [(name, rep.image_level) for name, rep, _ in rows if rep.image_level]
    if image_rows:
        ih = ["run", "OOD images", "ID dets", "OOD dets"] + _SCORE_COLUMNS
        it = [
            [name, il["ood_dataset"], str(il["counts"]["id"]), str(il["counts"]["ood"])]
            + _score_cells(il["scores"])
            for name, il in image_rows
        ]
        md += (
            "\nImage level (VOS protocol: every detection on the OOD images is OOD)\n\n"
            + markdown_table(ih, it)
        )
        csv_rows += [["protocol"] + ih] + [["image"] + r for r in it]
    placed = [(name, rep.placement) for name, rep, _ in rows if rep.placement]
    if placed:
        ph, pt = _placement_table(placed)
        md += (
            "\nPlacement: family accuracy of the claimed held-out objects (the share whose nearest"
            " known class is a rank-2 class of theirs; chance: the family's share of the known"
            " classes)\n\n" + markdown_table(ph, pt)
        )
        csv_rows += [["protocol"] + ph] + [["placement"] + r for r in pt]
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(os.path.join(output_dir, "ood_comparison.md"), md.encode())
    atomic_write(os.path.join(output_dir, "ood_comparison.csv"), csv_table(csv_rows).encode())
    fig = comparison_roc_figure([(name, load_roc_set(run)) for name, _, run in rows])
    if fig is not None:
        save_figure(fig, os.path.join(output_dir, "roc_comparison.png"))
    return md


def _placement_table(placed: Sequence[tuple]):
    """Header and rows of the merged placement table of ``(run name, placement)`` pairs."""
    classes = []
    for _, p in placed:
        classes += [c for c in p["classes"] if c not in classes]
    header = ["run", "ranking"]
    for c in classes:
        header += [f"{c} objects", f"{c} chance"] + [f"{c} {m}" for m in PLACEMENT_METHODS]
    table = []
    for name, p in placed:
        row = [name, p.get("ranking") or "none"]
        for c in classes:
            entry = p["classes"].get(c)
            if entry is None:
                row += ["n/a"] * (2 + len(PLACEMENT_METHODS))
                continue
            row += [str(entry["objects"]), _fmt(entry["chance"]) or "undefined"]
            row += [
                _accuracy(entry["family_accuracy"][m]) if m in p["methods"] else "n/a"
                for m in PLACEMENT_METHODS
            ]
        table.append(row)
    return header, table


@dataclass
class RocSet:
    """A run's object-level ROC set: its detections with status ID or OOD."""

    scores: Dict[str, np.ndarray]  # the scores the run saved, in ALL_SCORES order
    is_id: np.ndarray
    image_index: np.ndarray  # each detection's test image
    image_ids: tuple  # the test images image_index refers to

    @property
    def defined(self) -> bool:
        """Whether the set has both ID and OOD detections, as every ROC metric needs."""
        return bool(self.is_id.any() and (~self.is_id).any())


def load_roc_set(run_dir: str) -> Optional[RocSet]:
    """The object-level ROC set of ``run_dir``/ood_scores.npz; None without that file."""
    path = os.path.join(run_dir, "ood_scores.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path) as z:
        status = z["status"]
        m = (status == ID) | (status == OOD)
        scores = {s: z[s][m] for s in ALL_SCORES if s in z.files}
        index = z["image_index"][m]
        ids = tuple(z["image_ids"].tolist())
    return RocSet(scores, status[m] == ID, index, ids)
