"""
A grid of test images from an OOD benchmark run, drawn with detectron2's ``Visualizer``: the
scored detections (claimed ID and OOD objects) coloured by an OOD score, the held-out objects'
ground truth outlined, and duplicates marked. Reads a run's ``ood_report.json`` and
``ood_scores.npz``; used by tools/visualize_ood.py and tools/demo.py.
"""

import io
import os
import zipfile
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer

from ..config import ConfigError
from ..file_io import atomic_write
from .extract import dataset_digest
from .matching import BACKGROUND, DUPLICATE, ID, OOD
from .plots import pyplot
from .report import OODReport, ReportError, load_report
from .scores import ALL_SCORES

__all__ = ["best_score", "select_images", "draw_ood_grid"]

# Outline colours: held-out ground truth, and duplicates (which carry no colour-coded score).
HELD_OUT_COLOR = "magenta"
DUPLICATE_COLOR = "0.6"
BACKGROUND_COLOR = "0.85"
SCORE_CMAP = "RdYlGn"  # red: OOD-like (low score), green: ID-like (high score)


def best_score(report: OODReport) -> str:
    """The available object-level score with the highest AUROC (msp when none is defined)."""
    best, value = "msp", -1.0
    for name in ALL_SCORES:
        e = report.scores.get(name, {})
        if e.get("available") and e.get("auroc") is not None and e["auroc"] > value:
            best, value = name, e["auroc"]
    return best


def _ensure_registered(name: str):
    if name in DatasetCatalog.list():
        return
    from ..data.held_out import parse_held_out_split, register_split_by_name

    parsed = parse_held_out_split(name)
    if parsed is None or parsed.base not in DatasetCatalog.list():
        raise ConfigError(
            f"The report's test dataset '{name}' is not registered here; pass the run's"
            " --config-file (and its dataset settings) so that it is."
        )
    register_split_by_name(name)


def select_images(dicts: List[Dict], num_images: int) -> List[int]:
    """
    Indices of the first ``num_images`` test images that show a held-out object, then of the others.
    """
    with_ood = [i for i, d in enumerate(dicts) if d.get("ood_annotations")]
    others = [i for i, d in enumerate(dicts) if not d.get("ood_annotations")]
    return (with_ood + others)[:num_images]


def _panel(d: Dict, det: Dict, colors, held_out: List[str], show_background: bool) -> np.ndarray:
    img = read_image(d["file_name"], format="RGB")
    vis = Visualizer(img, metadata=None, scale=1.0)
    font = max(7, vis._default_font_size * 0.8)
    for a in d.get("ood_annotations", []):
        x0, y0, x1, y1 = a["bbox"]
        vis.draw_box((x0, y0, x1, y1), alpha=1.0, edge_color=HELD_OUT_COLOR, line_style="--")
        name = held_out[a["category_id"]] if a["category_id"] < len(held_out) else "held out"
        vis.draw_text(
            f"held out: {name}",
            (x0 + 2, y1 - 2),
            color=HELD_OUT_COLOR,
            horizontal_alignment="left",
            font_size=font,
        )
    for j in range(len(det["status"])):
        st = det["status"][j]
        box = tuple(det["boxes"][j])
        if st in (ID, OOD):
            vis.draw_box(box, alpha=1.0, edge_color=colors[j], line_style="-")
            vis.draw_text(
                f"{det['values'][j]:.2f}",
                (box[0] + 2, box[1] + 1),
                color=colors[j],
                horizontal_alignment="left",
                font_size=font,
            )
        elif st == DUPLICATE:
            vis.draw_box(box, alpha=0.9, edge_color=DUPLICATE_COLOR, line_style=":")
            vis.draw_text(
                "dup",
                (box[2] - 2, box[1] + 1),
                color=DUPLICATE_COLOR,
                horizontal_alignment="right",
                font_size=font,
            )
        elif st == BACKGROUND and show_background:
            vis.draw_box(box, alpha=0.6, edge_color=BACKGROUND_COLOR, line_style=":")
    return vis.get_output().get_image()


def draw_ood_grid(
    report_dir: str,
    output: Optional[str] = None,
    score: Optional[str] = None,
    num_images: int = 8,
    cols: int = 4,
    show_background: bool = False,
) -> str:
    """
    Write a PNG grid of ``num_images`` test images (those with held-out objects first) of the run
    in ``report_dir``: claimed detections outlined in the colour of their ``score`` (default: the
    best-AUROC score) by its percentile among all scored detections, held-out ground truth dashed
    in magenta, duplicates dotted in grey (``show_background``: also detections on no object).
    Returns the PNG's path (default ``report_dir/ood_grid.png``).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    plt = pyplot()
    report = load_report(report_dir)
    raw = os.path.join(report_dir, "ood_scores.npz")
    try:
        with np.load(raw) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        reason = "missing" if not os.path.isfile(raw) else f"not readable ({e})"
        raise ReportError(
            f"{raw}: {reason}; re-run tools/benchmark_ood.py on the run to write it again."
        ) from None
    if not {"boxes", "image_index", "match"} <= set(data):
        raise ReportError(
            f"{raw}: has no boxes or image index; re-run tools/benchmark_ood.py on the run."
        )
    score = score or best_score(report)
    if score not in ALL_SCORES:
        raise ConfigError(f"--score '{score}': choose one of {', '.join(ALL_SCORES)}.")
    if score not in data:
        raise ConfigError(
            f"--score {score}: not available for this model (no embedding branch); choose one of "
            + ", ".join(s for s in ALL_SCORES if s in data)
            + "."
        )
    matched = data["match"]
    _ensure_registered(report.test_dataset)
    dicts = DatasetCatalog.get(report.test_dataset)
    if dataset_digest(dicts) != report.data.get("test"):
        raise ReportError(
            f"{report_dir}: its test images are not those '{report.test_dataset}' holds here (the"
            " dataset root or the split changed); point the dataset back to the run's images, or"
            " re-run tools/benchmark_ood.py on these."
        )
    values = data[score]
    scored = (matched == ID) | (matched == OOD)
    # Colour by percentile among the scored detections, so every score uses the whole colour map.
    ref = np.sort(values[scored]) if scored.any() else np.sort(values)
    rank = np.searchsorted(ref, values, side="right") / max(len(ref), 1)
    cmap = plt.get_cmap(SCORE_CMAP)
    chosen = select_images(dicts, num_images)
    cols = max(1, min(cols, len(chosen)))
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.5 * rows + 0.9), squeeze=False)
    held_out = list(report.held_out_classes)
    for ax, i in zip(axes.flat, chosen):
        sel = np.flatnonzero(data["image_index"] == i)
        det = {"status": matched[sel], "boxes": data["boxes"][sel], "values": values[sel]}
        colors = [cmap(r) for r in rank[sel]]
        ax.imshow(_panel(dicts[i], det, colors, held_out, show_background))
        n_id, n_ood, n_dup = (int((det["status"] == s).sum()) for s in (ID, OOD, DUPLICATE))
        ax.set_title(f"{dicts[i]['image_id']}: {n_id} ID, {n_ood} OOD, {n_dup} dup.", fontsize=8)
        ax.set_axis_off()
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_axis_off()
    proto = report.protocol
    fig.suptitle(
        f"{report.name}: detections coloured by {score} "
        f"(object level, {proto.get('matching', 'all')} matching)",
        fontsize=10,
    )
    handles = [
        Line2D(
            [], [], color=HELD_OUT_COLOR, linestyle="--", label="held-out object (ground truth)"
        ),
        Line2D([], [], color=DUPLICATE_COLOR, linestyle=":", label="duplicate detection"),
    ]
    if show_background:
        handles.append(
            Line2D([], [], color=BACKGROUND_COLOR, linestyle=":", label="background detection")
        )
    fig.legend(handles=handles, loc="lower left", fontsize=8, ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 0.9, 0.97))
    cax = fig.add_axes([0.915, 0.15, 0.015, 0.7])
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax)
    bar.set_label(
        f"{score}: percentile among scored detections\n(red: OOD-like, green: ID-like)", fontsize=8
    )
    path = output or os.path.join(report_dir, "ood_grid.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path
