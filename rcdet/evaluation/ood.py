"""
Held-out-class OOD detection: per-detection scores, matching to ground truth, and metrics.

Every score is oriented so that **higher means more in-distribution (ID)**:

- ``msp``: max softmax probability over the known-class logits (background column excluded);
- ``max_logit``: the largest known-class logit;
- ``energy``: ``T * logsumexp(f / T)`` over the known-class logits (the negative free energy);
- ``cosine``: max cosine similarity of the embedding to the known-class prototypes;
- ``knn``: minus the distance to the k-th nearest training embedding;
- ``gaussian``: max class-conditional Gaussian log-likelihood (shared covariance by default).

The embedding scores need a model with the contrastive branch; without one they are reported
as not available (``None``), never as zeros.
"""

import csv
import io
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn import metrics as skm

from ..file_io import atomic_write, save_figure_atomic, save_npz_atomic, write_json_atomic
from .open_set import pairwise_iou

__all__ = [
    "LOGIT_SCORES",
    "EMBEDDING_SCORES",
    "ALL_SCORES",
    "MATCHING_MODES",
    "logit_scores",
    "detector_confidence",
    "EmbeddingStatistics",
    "match_detections",
    "ood_metrics",
    "score_report",
    "write_report_files",
    "ReportError",
    "load_report",
    "check_same_protocol",
    "protocol_of",
    "merge_reports",
    "report_metrics",
    "RocSet",
    "load_roc_set",
    "markdown_table",
    "csv_table",
    "plot_roc",
]


LOGIT_SCORES = ("msp", "max_logit", "energy")
EMBEDDING_SCORES = ("cosine", "knn", "gaussian")
ALL_SCORES = LOGIT_SCORES + EMBEDDING_SCORES

# Detection status after matching: ID / OOD (claimed a known / held-out object), BACKGROUND (no
# object at the matching IoU) and DUPLICATE (its object was claimed by a more confident detection).
ID, OOD, BACKGROUND, DUPLICATE = 1, 0, -1, -2
MATCHING_MODES = ("one_per_object", "all")


def logit_scores(
    logits: np.ndarray, num_known: int, energy_temperature: float = 1.0
) -> Dict[str, np.ndarray]:
    """
    msp, max_logit and energy from (N, K + 1) logits whose first ``num_known`` columns are the known
    classes.
    """
    f = np.asarray(logits, dtype=np.float64)[:, :num_known]
    if f.shape[0] == 0:
        return {k: np.zeros(0) for k in LOGIT_SCORES}
    top = f.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(f - top).sum(axis=1))
    t = float(energy_temperature)
    ft = f / t
    top_t = ft.max(axis=1, keepdims=True)
    energy = t * (top_t[:, 0] + np.log(np.exp(ft - top_t).sum(axis=1)))
    return {"msp": np.exp(top[:, 0] - lse), "max_logit": top[:, 0], "energy": energy}


@dataclass
class EmbeddingStatistics:
    """Prototypes, a kNN bank and Gaussians fitted on known-class GT-box embeddings."""

    prototypes: np.ndarray  # (K, d), L2-normalised class means
    bank: np.ndarray  # (n, d) training embeddings
    means: np.ndarray  # (K, d) class means (not normalised)
    precisions: np.ndarray  # (K, d, d), or (1, d, d) for a shared covariance
    log_dets: np.ndarray  # (K,) or (1,)
    knn_k: int = 10

    @classmethod
    def fit(
        cls,
        embeddings,
        labels,
        num_classes: int,
        knn_k: int = 10,
        per_class_covariance: bool = False,
        shrinkage: float = 1e-3,
    ):
        x = np.asarray(embeddings, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"embeddings (n, d) and labels (n,) disagree: {x.shape} vs {y.shape}.")
        d = x.shape[1]
        present = [c for c in range(num_classes) if np.any(y == c)]
        if not present:
            raise ValueError("No known-class ground-truth embeddings to fit the OOD statistics on.")
        means = np.stack(
            [
                x[y == c].mean(axis=0) if np.any(y == c) else np.full(d, np.nan)
                for c in range(num_classes)
            ]
        )
        protos = means / np.linalg.norm(means, axis=1, keepdims=True).clip(min=1e-12)

        def regularised(cov):
            # Shrink towards a scaled identity: a singular (or 1-sample) covariance still inverts.
            scale = max(np.trace(cov) / d, 1e-6)
            cov = cov + shrinkage * scale * np.eye(d) + 1e-9 * np.eye(d)
            sign, logdet = np.linalg.slogdet(cov)
            return np.linalg.inv(cov), logdet

        centred = np.concatenate([x[y == c] - means[c] for c in present])
        shared_cov = centred.T @ centred / max(len(centred), 1)
        if per_class_covariance:
            pairs = []
            for c in range(num_classes):
                xc = x[y == c] - means[c] if np.any(y == c) else np.zeros((0, d))
                # Classes with too few samples fall back to the shared covariance.
                cov = xc.T @ xc / len(xc) if len(xc) > d else shared_cov
                pairs.append(regularised(cov))
            precisions = np.stack([p for p, _ in pairs])
            log_dets = np.array([log_det for _, log_det in pairs])
        else:
            p, log_det = regularised(shared_cov)
            precisions, log_dets = p[None], np.array([log_det])
        return cls(protos, x, means, precisions, log_dets, int(knn_k))

    def scores(self, embeddings) -> Dict[str, np.ndarray]:
        e = np.asarray(embeddings, dtype=np.float64)
        if e.shape[0] == 0:
            return {k: np.zeros(0) for k in EMBEDDING_SCORES}
        valid = ~np.isnan(self.means[:, 0])
        e_unit = e / np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
        cosine = (e_unit @ self.prototypes[valid].T).max(axis=1)
        # Squared distances without an (N, n, d) tensor.
        d2 = (e**2).sum(1)[:, None] + (self.bank**2).sum(1)[None, :] - 2 * e @ self.bank.T
        k = min(self.knn_k, self.bank.shape[0])
        kth = np.partition(np.maximum(d2, 0.0), k - 1, axis=1)[:, k - 1]
        knn = -np.sqrt(kth)
        dim = e.shape[1]
        loglik = []
        for c in np.flatnonzero(valid):
            j = c if self.precisions.shape[0] > 1 else 0
            diff = e - self.means[c]
            maha = np.einsum("nd,de,ne->n", diff, self.precisions[j], diff)
            loglik.append(-0.5 * (maha + self.log_dets[j] + dim * np.log(2 * np.pi)))
        return {"cosine": cosine, "knn": knn, "gaussian": np.max(np.stack(loglik, axis=1), axis=1)}

    def save(self, path: str):
        save_npz_atomic(
            path,
            prototypes=self.prototypes,
            bank=self.bank,
            means=self.means,
            precisions=self.precisions,
            log_dets=self.log_dets,
            knn_k=self.knn_k,
        )

    @classmethod
    def load(cls, path: str):
        with np.load(path) as z:
            return cls(
                z["prototypes"],
                z["bank"],
                z["means"],
                z["precisions"],
                z["log_dets"],
                int(z["knn_k"]),
            )


def detector_confidence(logits: np.ndarray, num_known: int) -> np.ndarray:
    """
    The detector's confidence in a detection: its largest known-class probability, softmax over
    all K + 1 logits (background included), as VOS filters detections (``cls_prob[:-1].max()`` in
    ``eval_predictions_preprocess`` of github.com/deeplearning-wisc/vos). Unlike ``msp`` it keeps
    the background column in the softmax, and it is not one of the OOD scores being evaluated, so
    ordering detections by it treats every score alike.
    """
    f = np.asarray(logits, dtype=np.float64)
    if f.shape[0] == 0:
        return np.zeros(0)
    top = f.max(axis=1, keepdims=True)
    p = np.exp(f - top)
    return (p[:, :num_known] / p.sum(axis=1, keepdims=True)).max(axis=1)


def match_detections(
    det_boxes,
    gt_boxes,
    gt_is_ood,
    iou_threshold: float = 0.5,
    confidence=None,
    matching: str = "one_per_object",
):
    """
    Match the detections of one image to its ground truth. Returns ``(status, gt_index)``.

    ``one_per_object`` (the default) is how detection evaluation matches (the VOC ``voc_eval`` and
    COCO evaluators): detections are visited by decreasing ``confidence`` (ties: the given order);
    each takes the GT box with the highest IoU (ties: the first GT in annotation order); if that
    IoU is >= ``iou_threshold`` and the object is unclaimed, the detection claims it (status ID or
    OOD by the object's kind); if the object is already claimed, the detection is a DUPLICATE; if
    the IoU is below the threshold (or there is no GT) it is BACKGROUND. Each object is claimed at
    most once. ``gt_index`` is the best GT for claimed detections and duplicates, -1 for background.

    ``all`` (the per-detection protocol, version 1): every detection whose best IoU is >=
    ``iou_threshold`` is ID or OOD, however many detections share the object; the rest are
    BACKGROUND. ``confidence`` is not used.
    """
    if matching not in MATCHING_MODES:
        raise ValueError(f"matching = {matching!r}; choose one of {MATCHING_MODES}.")
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    gt_is_ood = np.asarray(gt_is_ood, dtype=bool).reshape(-1)
    n = det_boxes.shape[0]
    status = np.full(n, BACKGROUND, dtype=np.int64)
    index = np.full(n, -1, dtype=np.int64)
    if n == 0 or gt_is_ood.size == 0:
        return status, index
    iou = pairwise_iou(det_boxes, gt_boxes)
    best = iou.argmax(axis=1)  # argmax returns the first maximum: ties go to the earlier GT
    ok = iou[np.arange(n), best] >= iou_threshold
    index[ok] = best[ok]
    kind = np.where(gt_is_ood[best], OOD, ID)
    if matching == "all":
        status[ok] = kind[ok]
        return status, index
    if confidence is None:
        raise ValueError("one_per_object matching needs each detection's confidence.")
    order = np.argsort(-np.asarray(confidence, dtype=np.float64).reshape(-1), kind="stable")
    claimed = np.zeros(gt_is_ood.size, dtype=bool)
    for d in order:
        if not ok[d]:
            continue
        if claimed[best[d]]:
            status[d] = DUPLICATE
        else:
            claimed[best[d]] = True
            status[d] = kind[d]
    return status, index


def ood_metrics(scores, is_id, num_ood_objects: Optional[int] = None) -> Dict[str, Optional[float]]:
    """
    AUROC, FPR at 95% TPR (ID positive), AUPR-In and AUPR-Out (scikit-learn); None when undefined.

    FPR95 is the FPR at the highest threshold that accepts >= 95% of the ID detections (the ROC
    curve with every point kept). VOS's ``fpr_and_fdr_at_recall`` (``metric_utils.py`` of
    github.com/deeplearning-wisc/vos) takes the threshold whose TPR is *closest* to 0.95, which
    may lie just below it; the two differ by at most one ID detection's step of the curve. With
    ``num_ood_objects``, also ``ood_recall_at_95_id``: at that
    threshold, the fraction of all held-out objects whose detection scores below it, i.e. found
    and flagged as OOD; objects no detection reached count as missed.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_id = np.asarray(is_id, dtype=bool)
    n_id, n_ood = int(is_id.sum()), int((~is_id).sum())
    out = {"auroc": None, "fpr95": None, "aupr_in": None, "aupr_out": None}
    if num_ood_objects is not None:
        out["ood_recall_at_95_id"] = None
    if n_id == 0 or n_ood == 0:
        return out
    fpr, tpr, thresholds = skm.roc_curve(is_id, scores, drop_intermediate=False)
    at = int(np.searchsorted(tpr, 0.95, side="left"))
    out["auroc"] = float(skm.roc_auc_score(is_id, scores))
    out["fpr95"] = float(fpr[at])
    out["aupr_in"] = float(skm.average_precision_score(is_id, scores))
    out["aupr_out"] = float(skm.average_precision_score(~is_id, -scores))
    if num_ood_objects:
        out["ood_recall_at_95_id"] = float(
            np.sum(scores[~is_id] < thresholds[at]) / num_ood_objects
        )
    return out


def score_report(
    score_table: Dict[str, Optional[np.ndarray]],
    status: np.ndarray,
    groups: Optional[np.ndarray] = None,
    num_images: int = 0,
    bootstrap: int = 0,
    seed: int = 0,
    strata: Optional[np.ndarray] = None,
    num_ood_objects: Optional[int] = None,
) -> Dict[str, Dict]:
    """
    Metrics per score over the detections whose status is ID or OOD; unavailable scores stay
    marked as such. With ``bootstrap`` replicates, each metric gets a ``<metric>_ci`` percentile
    interval over resamples of the ``num_images`` test images (``groups``: each detection's
    image index; rcdet.evaluation.bootstrap), else the ``_ci`` keys are None.
    """
    from .bootstrap import METRICS, bootstrap_intervals

    status = np.asarray(status)
    scored = (status == ID) | (status == OOD)
    is_id = status[scored] == ID
    available = {
        n: np.asarray(score_table[n], dtype=np.float64)[scored]
        for n in ALL_SCORES
        if score_table.get(n) is not None
    }
    cis = {}
    if bootstrap and groups is not None:
        cis = bootstrap_intervals(
            available, is_id, np.asarray(groups)[scored], num_images, bootstrap, seed, strata
        )
    report = {}
    for name in ALL_SCORES:
        if name not in available:
            entry = {"available": False, **{k: None for k in METRICS}}
            if num_ood_objects is not None:
                entry["ood_recall_at_95_id"] = None
        else:
            entry = {"available": True, **ood_metrics(available[name], is_id, num_ood_objects)}
        for k in METRICS:
            entry[f"{k}_ci"] = (cis.get(name) or {}).get(f"{k}_ci")
        report[name] = entry
    return report


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


def report_csv(report: Dict) -> str:
    """
    One row per (protocol, score): the object-level ``scores`` and, if run, the ``image_level``
    ones.
    """
    rows = [CSV_FIELDS]
    sections = [("object", report["scores"], report["counts"])]
    if report.get("image_level"):
        sections.append(("image", report["image_level"]["scores"], report["image_level"]["counts"]))
    for protocol, scores, counts in sections:
        for name, entry in scores.items():
            row = [protocol, name, entry["available"]]
            for k in CSV_METRICS:
                ci = entry.get(f"{k}_ci") or [None, None]
                row += [_fmt(entry[k]), _fmt(ci[0]), _fmt(ci[1])]
            row += [_fmt(entry.get("ood_recall_at_95_id")), counts["id"], counts["ood"]]
            rows.append(row)
    return csv_table(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ROC_XLABEL = "false positive rate (OOD accepted as ID)"
ROC_YLABEL = "true positive rate (ID accepted)"


def plot_roc(ax, values, is_id, label: str, auroc_format: str = "({:.3f})", **style) -> float:
    """Draw the ROC curve of ``values`` on ``ax``, its AUROC after ``label``; returns the AUROC."""
    fpr, tpr, _ = skm.roc_curve(is_id, values)
    auroc = float(skm.roc_auc_score(is_id, values))
    ax.plot(fpr, tpr, label=f"{label} {auroc_format.format(auroc)}", **style)
    return auroc


def _roc_figure(curves: List[tuple], title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab10")
    for i, (label, values, is_id) in enumerate(curves):
        plot_roc(ax, values, is_id, label, "(AUROC {:.3f})", color=cmap(i % 10))
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
    ax.set_xlabel(ROC_XLABEL)
    ax.set_ylabel(ROC_YLABEL)
    ax.set_title(title, fontsize=9)
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _save_figure(fig, path: str):
    save_figure_atomic(path, fig, dpi=110)
    _plt().close(fig)


def _histogram_figure(score_table, is_id, title: str):
    """One panel per available score: ID and OOD distributions, with axes and a title."""
    plt = _plt()
    available = [n for n in ALL_SCORES if score_table.get(n) is not None]
    defined = bool(is_id.any() and (~is_id).any())
    fig, axes = plt.subplots(
        1, max(len(available), 1), figsize=(3.2 * max(len(available), 1), 3.1), squeeze=False
    )
    for ax, name in zip(axes[0], available):
        v = np.asarray(score_table[name])
        if v.size:
            bins = np.histogram_bin_edges(v, bins=30)
            ax.hist(
                v[is_id], bins=bins, alpha=0.6, density=defined, label=f"ID ({int(is_id.sum())})"
            )
            ax.hist(
                v[~is_id],
                bins=bins,
                alpha=0.6,
                density=defined,
                label=f"OOD ({int((~is_id).sum())})",
            )
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no scored detections", ha="center", va="center", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"{name} (higher = more in-distribution)", fontsize=8)
        ax.set_ylabel("density" if defined else "detections", fontsize=8)
    if not available:
        axes[0][0].set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_report_files(
    output_dir: str,
    report: Dict,
    score_table: Dict[str, Optional[np.ndarray]],
    status: np.ndarray,
    title: str = "",
    image_level: Optional[tuple] = None,
):
    """
    ood_report.json/.csv, roc.png and score_hist.png (the object-level protocol: detections with
    status ID or OOD), and with ``image_level = (score_table, is_id)`` roc_image_level.png; each
    written atomically.
    """
    status = np.asarray(status)
    scored = (status == ID) | (status == OOD)
    is_id = status[scored] == ID
    table = {n: None if v is None else np.asarray(v)[scored] for n, v in score_table.items()}
    matching = report.get("protocol", {}).get("matching", "one_per_object")
    what = "one detection per object" if matching == "one_per_object" else "every matched detection"

    def roc(tab, ids, name, heading):
        defined = bool(ids.any() and (~ids).any())
        available = [n for n in ALL_SCORES if tab.get(n) is not None]
        curves = [(n, np.asarray(tab[n]), ids) for n in available] if defined else []
        fig = _roc_figure(curves, heading)
        if not defined:
            fig.axes[0].text(
                0.5,
                0.5,
                f"undefined: {int(ids.sum())} ID and {int((~ids).sum())} OOD detections",
                ha="center",
                va="center",
                fontsize=9,
            )
        _save_figure(fig, os.path.join(output_dir, name))

    roc(table, is_id, "roc.png", f"{title or 'OOD detection ROC'}\nobject level, {what}")
    if image_level is not None:
        roc(
            image_level[0],
            np.asarray(image_level[1], dtype=bool),
            "roc_image_level.png",
            f"{title or 'OOD detection ROC'}\nimage level: ID test images vs"
            f" {report['image_level']['ood_dataset']}",
        )
    _save_figure(
        _histogram_figure(
            table,
            is_id,
            f"{report.get('name', '')}: OOD scores of ID and OOD detections (object level, {what})",
        ),
        os.path.join(output_dir, "score_hist.png"),
    )
    atomic_write(os.path.join(output_dir, "ood_report.csv"), report_csv(report).encode())
    write_json_atomic(os.path.join(output_dir, "ood_report.json"), report)


class ReportError(ValueError):
    """An ood_report.json that cannot be used: malformed, or not comparable with the others."""


def protocol_of(report: Dict) -> Dict:
    """The settings that must agree for two reports' numbers to be comparable."""
    proto = report.get("protocol")
    if proto is None:  # a report without a protocol section counts every matched detection
        return {
            "version": 1,
            "matching": "all",
            "match_iou": report.get("match_iou"),
            "score_threshold": report.get("score_threshold"),
        }
    return {k: proto.get(k) for k in ("version", "matching", "match_iou", "score_threshold")}


def load_report(run_dir: str) -> Dict:
    """
    A run's ood_report.json; a missing, malformed or foreign file is one clear error naming it.
    """
    import json

    path = os.path.join(run_dir, "ood_report.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no OOD report here; run tools/benchmark_ood.py on it first."
        )
    try:
        with open(path) as f:
            rep = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(
            f"{path}: not valid JSON ({e}); re-run tools/benchmark_ood.py to write it again."
        ) from None
    if not isinstance(rep, dict) or not isinstance(rep.get("scores"), dict):
        raise ReportError(
            f"{path}: not an OOD report (no 'scores' section); re-run tools/benchmark_ood.py to"
            " write it again."
        )
    for name, entry in rep["scores"].items():
        if not isinstance(entry, dict) or "available" not in entry or "auroc" not in entry:
            raise ReportError(
                f"{path}: scores['{name}'] lacks 'available' or 'auroc'; re-run"
                " tools/benchmark_ood.py."
            )
    return rep


def check_same_protocol(reports: Sequence[tuple]):
    """Refuse reports (``(path, report)`` pairs) whose protocols differ, saying how."""
    (first_path, first), rest = reports[0], reports[1:]
    p0 = protocol_of(first)
    for path, rep in rest:
        p = protocol_of(rep)
        diff = [f"{k} {p0[k]!r} vs {p[k]!r}" for k in p0 if p0[k] != p[k]]
        il0, il = first.get("image_level") or {}, rep.get("image_level") or {}
        if il0 and il and il0.get("ood_dataset") != il.get("ood_dataset"):
            diff.append(
                f"image-level OOD dataset {il0.get('ood_dataset')!r} vs {il.get('ood_dataset')!r}"
            )
        if diff:
            raise ReportError(
                f"refusing to compare reports from different protocols: {first_path} and"
                f" {path} differ in "
                + "; ".join(diff)
                + ". Re-run tools/benchmark_ood.py on the older runs (their checkpoints suffice) "
                "with the same options."
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


def report_metrics(report: Dict) -> Dict[str, Optional[float]]:
    """
    A report's numbers, flat: ``AP``, ``AP50``, ``AP75``, ``a_ose``, ``wi`` (wilderness impact),
    ``<score>_auroc`` and ``<score>_fpr95`` of the object-level scores and ``img_<score>_auroc``
    and ``img_<score>_fpr95`` of the image-level ones; None where the report has no such number
    or the score is not available.
    """
    detection = report.get("detection") or {}
    open_set = report.get("open_set") or {}
    out = {k: detection.get(k) for k in ("AP", "AP50", "AP75")}
    out["a_ose"], out["wi"] = open_set.get("a_ose"), open_set.get("wilderness_impact")
    image_level = (report.get("image_level") or {}).get("scores") or {}
    for prefix, scores in (("", report.get("scores") or {}), ("img_", image_level)):
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
        rows.append((rep.get("name") or os.path.basename(os.path.normpath(run)), rep, run))
    check_same_protocol(loaded)
    header = ["run", "AP", "AP50", "AP75", "A-OSE", "WI"] + _SCORE_COLUMNS
    table = []
    for name, rep, _ in rows:
        values = report_metrics(rep)
        cells = [_fmt(values[k]) for k in ("AP", "AP50", "AP75", "a_ose", "wi")]
        table.append([name] + cells + _score_cells(rep["scores"]))
    proto = protocol_of(rows[0][1])
    md = (
        f"Object level (matching: {proto['matching']}, IoU >= {proto['match_iou']}; "
        "brackets: bootstrap 95% interval over test images)\n\n" + markdown_table(header, table)
    )
    csv_rows = [["protocol"] + header] + [["object"] + r for r in table]
    image_rows = [(name, rep["image_level"]) for name, rep, _ in rows if rep.get("image_level")]
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
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(os.path.join(output_dir, "ood_comparison.md"), md.encode())
    atomic_write(os.path.join(output_dir, "ood_comparison.csv"), csv_table(csv_rows).encode())
    fig = _comparison_roc([(name, run) for name, _, run in rows])
    if fig is not None:
        _save_figure(fig, os.path.join(output_dir, "roc_comparison.png"))
    return md


@dataclass
class RocSet:
    """A run's object-level ROC set: its detections with status ID or OOD."""

    scores: Dict[str, np.ndarray]  # the scores the run saved, in ALL_SCORES order
    is_id: np.ndarray
    image_index: Optional[np.ndarray]  # each detection's test image; None in older files
    image_ids: Optional[tuple]  # the test images image_index refers to

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
        index = z["image_index"][m] if "image_index" in z.files else None
        ids = tuple(z["image_ids"].tolist()) if "image_ids" in z.files else None
    return RocSet(scores, status[m] == ID, index, ids)


def _comparison_roc(runs: Sequence[tuple]):
    """
    One panel per score, one colour per run (the same in every panel); None without raw scores.
    """
    per_score: Dict[str, list] = {}
    for i, (name, run) in enumerate(runs):
        roc = load_roc_set(run)
        if roc is None or not roc.defined:
            continue
        for score, values in roc.scores.items():
            per_score.setdefault(score, []).append((i, name, values, roc.is_id))
    if not per_score:
        return None
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    names = [s for s in ALL_SCORES if s in per_score]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax, score in zip(axes.flat, names):
        for i, name, values, is_id in per_score[score]:
            plot_roc(ax, values, is_id, name, color=cmap(i % cmap.N))
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        ax.set_title(score, fontsize=9)
        ax.set_xlabel(ROC_XLABEL, fontsize=8)
        ax.set_ylabel(ROC_YLABEL, fontsize=8)
        ax.legend(fontsize=6, loc="lower right", title="run (AUROC)", title_fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_axis_off()
    fig.suptitle("OOD detection ROC per score, all runs (object level)", fontsize=10)
    fig.tight_layout()
    return fig
