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

from ..file_io import atomic_write, save_npz_atomic, write_json_atomic

__all__ = [
    "LOGIT_SCORES",
    "EMBEDDING_SCORES",
    "ALL_SCORES",
    "logit_scores",
    "EmbeddingStatistics",
    "match_detections",
    "ood_metrics",
    "score_report",
    "write_report_files",
    "merge_reports",
]


LOGIT_SCORES = ("msp", "max_logit", "energy")
EMBEDDING_SCORES = ("cosine", "knn", "gaussian")
ALL_SCORES = LOGIT_SCORES + EMBEDDING_SCORES

ID, OOD, UNMATCHED = 1, 0, -1


def logit_scores(logits: np.ndarray, num_known: int, energy_temperature: float = 1.0) -> Dict[str, np.ndarray]:
    """msp, max_logit and energy from (N, K + 1) logits whose first ``num_known`` columns are the known classes."""
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
    def fit(cls, embeddings, labels, num_classes: int, knn_k: int = 10, per_class_covariance: bool = False, shrinkage: float = 1e-3):
        x = np.asarray(embeddings, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"embeddings (n, d) and labels (n,) disagree: {x.shape} vs {y.shape}.")
        d = x.shape[1]
        present = [c for c in range(num_classes) if np.any(y == c)]
        if not present:
            raise ValueError("No known-class ground-truth embeddings to fit the OOD statistics on.")
        means = np.stack([x[y == c].mean(axis=0) if np.any(y == c) else np.full(d, np.nan) for c in range(num_classes)])
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
            log_dets = np.array([l for _, l in pairs])
        else:
            p, l = regularised(shared_cov)
            precisions, log_dets = p[None], np.array([l])
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
        save_npz_atomic(path, prototypes=self.prototypes, bank=self.bank, means=self.means,
                        precisions=self.precisions, log_dets=self.log_dets, knn_k=self.knn_k)

    @classmethod
    def load(cls, path: str):
        with np.load(path) as z:
            return cls(z["prototypes"], z["bank"], z["means"], z["precisions"], z["log_dets"], int(z["knn_k"]))


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between XYXY boxes a (N, 4) and b (M, 4)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(det_boxes, gt_boxes, gt_is_ood, iou_threshold: float = 0.5):
    """
    Match each detection of one image to the GT box with the highest IoU (ties: the first GT in
    annotation order). Returns (status, gt_index): status is 1 = ID, 0 = OOD, -1 = unmatched
    (best IoU below ``iou_threshold`` or no GT), gt_index is -1 when unmatched. Several
    detections may match the same GT object.
    """
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    gt_is_ood = np.asarray(gt_is_ood, dtype=bool).reshape(-1)
    n = det_boxes.shape[0]
    status = np.full(n, UNMATCHED, dtype=np.int64)
    index = np.full(n, -1, dtype=np.int64)
    if n == 0 or gt_is_ood.size == 0:
        return status, index
    iou = _pairwise_iou(det_boxes, gt_boxes)
    best = iou.argmax(axis=1)  # argmax returns the first maximum: ties go to the earlier GT
    ok = iou[np.arange(n), best] >= iou_threshold
    index[ok] = best[ok]
    status[ok] = np.where(gt_is_ood[best[ok]], OOD, ID)
    return status, index


def ood_metrics(scores, is_id) -> Dict[str, Optional[float]]:
    """AUROC, FPR at 95% TPR (ID positive), AUPR-In and AUPR-Out; None when undefined."""
    scores = np.asarray(scores, dtype=np.float64)
    is_id = np.asarray(is_id, dtype=bool)
    n_id, n_ood = int(is_id.sum()), int((~is_id).sum())
    out = {"auroc": None, "fpr95": None, "aupr_in": None, "aupr_out": None}
    if n_id == 0 or n_ood == 0:
        return out
    fpr, tpr, _ = skm.roc_curve(is_id, scores)
    out["auroc"] = float(skm.roc_auc_score(is_id, scores))
    out["fpr95"] = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
    out["aupr_in"] = float(skm.average_precision_score(is_id, scores))
    out["aupr_out"] = float(skm.average_precision_score(~is_id, -scores))
    return out


def score_report(score_table: Dict[str, Optional[np.ndarray]], status: np.ndarray) -> Dict[str, Dict]:
    """Metrics per score over the matched detections; unavailable scores stay marked as such."""
    status = np.asarray(status)
    matched = status != UNMATCHED
    report = {}
    for name in ALL_SCORES:
        values = score_table.get(name)
        if values is None:
            report[name] = {"available": False, "auroc": None, "fpr95": None, "aupr_in": None, "aupr_out": None}
            continue
        entry = ood_metrics(np.asarray(values)[matched], status[matched] == ID)
        report[name] = {"available": True, **entry}
    return report


CSV_FIELDS = ("score", "available", "auroc", "fpr95", "aupr_in", "aupr_out")


def _fmt(v):
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def report_csv(report: Dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS + ("num_id", "num_ood", "num_unmatched"))
    counts = report["counts"]
    for name, entry in report["scores"].items():
        w.writerow([name] + [_fmt(entry[k]) for k in CSV_FIELDS[1:]] + [counts["id"], counts["ood"], counts["unmatched"]])
    return buf.getvalue()


def _roc_figure(curves: List[tuple], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, values, is_id in curves:
        fpr, tpr, _ = skm.roc_curve(is_id, values)
        ax.plot(fpr, tpr, label=f"{label} (AUROC {skm.roc_auc_score(is_id, values):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
    ax.set_xlabel("false positive rate (OOD accepted as ID)")
    ax.set_ylabel("true positive rate (ID accepted)")
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _save_figure(fig, path: str):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_report_files(output_dir: str, report: Dict, score_table: Dict[str, Optional[np.ndarray]], status: np.ndarray, title: str = ""):
    """ood_report.json/.csv, roc.png and score_hist.png, each written atomically."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matched = status != UNMATCHED
    is_id = status[matched] == ID
    defined = bool(is_id.any() and (~is_id).any())
    available = [n for n in ALL_SCORES if score_table.get(n) is not None]
    reason = f"undefined: {int(is_id.sum())} ID and {int((~is_id).sum())} OOD matched detections"
    curves = [(n, np.asarray(score_table[n])[matched], is_id) for n in available] if defined else []
    fig = _roc_figure(curves, title or "OOD detection ROC")
    if not defined:
        fig.axes[0].text(0.5, 0.5, reason, ha="center", va="center", fontsize=9)
    _save_figure(fig, os.path.join(output_dir, "roc.png"))
    fig, axes = plt.subplots(1, max(len(available), 1), figsize=(3.2 * max(len(available), 1), 2.8), squeeze=False)
    for ax, name in zip(axes[0], available):
        v = np.asarray(score_table[name])[matched]
        if v.size:
            bins = np.histogram_bin_edges(v, bins=30)
            ax.hist(v[is_id], bins=bins, alpha=0.6, density=defined, label=f"ID ({int(is_id.sum())})")
            ax.hist(v[~is_id], bins=bins, alpha=0.6, density=defined, label=f"OOD ({int((~is_id).sum())})")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no matched detections", ha="center", va="center", fontsize=8)
        ax.set_title(name)
    fig.tight_layout()
    _save_figure(fig, os.path.join(output_dir, "score_hist.png"))
    atomic_write(os.path.join(output_dir, "ood_report.csv"), report_csv(report).encode())
    write_json_atomic(os.path.join(output_dir, "ood_report.json"), report)


def merge_reports(run_dirs: Sequence[str], output_dir: str):
    """Merge several runs' reports into one markdown + CSV table and one ROC figure."""
    import json

    rows, curves = [], []
    for run in run_dirs:
        path = os.path.join(run, "ood_report.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no OOD report here; run tools/benchmark_ood.py on it first.")
        with open(path) as f:
            rep = json.load(f)
        name = rep.get("name") or os.path.basename(os.path.normpath(run))
        rows.append((name, rep))
        raw = os.path.join(run, "ood_scores.npz")
        if os.path.isfile(raw):
            with np.load(raw) as z:
                st = z["status"]
                m = st != UNMATCHED
                for score in ALL_SCORES:
                    if score in z.files and m.any() and (st[m] == ID).any() and (st[m] == OOD).any():
                        curves.append((f"{name}: {score}", z[score][m], st[m] == ID))
    header = ["run", "AP", "AP50", "AP75"] + [f"{s} AUROC" for s in ALL_SCORES] + [f"{s} FPR95" for s in ALL_SCORES]
    table = []
    for name, rep in rows:
        det = rep.get("detection", {})
        row = [name] + [_fmt(det.get(k)) for k in ("AP", "AP50", "AP75")]
        row += ["n/a" if not rep["scores"][s]["available"] else _fmt(rep["scores"][s]["auroc"]) for s in ALL_SCORES]
        row += ["n/a" if not rep["scores"][s]["available"] else _fmt(rep["scores"][s]["fpr95"]) for s in ALL_SCORES]
        table.append(row)
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in table)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header] + table)
    atomic_write(os.path.join(output_dir, "ood_comparison.md"), md.encode())
    atomic_write(os.path.join(output_dir, "ood_comparison.csv"), buf.getvalue().encode())
    if curves:
        _save_figure(_roc_figure(curves, "OOD detection ROC, all runs"), os.path.join(output_dir, "roc_comparison.png"))
    return md
