"""
Per-detection OOD scores: pure functions of a detection's logits and embedding and of statistics
fitted on the training set's ground-truth boxes.

Every score is oriented so that **higher means more in-distribution (ID)**:

- ``msp``: max softmax probability over the known-class logits (background column excluded);
- ``max_logit``: the largest known-class logit;
- ``energy``: ``T * logsumexp(f / T)`` over the known-class logits (the negative free energy);
- ``cosine``: max cosine similarity of the embedding to the known-class prototypes;
- ``knn``: minus the distance to the k-th nearest training embedding;
- ``gaussian``: max class-conditional Gaussian log-likelihood (shared covariance by default);
- ``sibling_margin`` and ``family_energy``: the ranking-aware scores of
  rcdet.evaluation.placement, from the prototypes and the ranking's rank-2 siblings.
- ``reference``: minus the cosine similarity to the reference embedding f of a model trained
  with exposed classes (MODEL.RCDET.OOD.REFERENCE fixed or learned): f is what the exposed
  outliers were pulled towards, so a detection close to f looks like them, and the negative
  makes higher mean more ID.

The embedding and ranking scores need a model with the contrastive branch (the ranking scores
also a ranking); without one they are reported as not available (``None``), never as zeros.
``reference`` exists only for a model with f: the statistics of any other model do not produce
it, and its report leaves it out.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from ..file_io import save_npz_atomic

__all__ = [
    "LOGIT_SCORES",
    "EMBEDDING_SCORES",
    "RANKING_SCORES",
    "REFERENCE_SCORES",
    "ALL_SCORES",
    "logit_scores",
    "detector_confidence",
    "EmbeddingStatistics",
    "kth_neighbour_distance",
]

LOGIT_SCORES = ("msp", "max_logit", "energy")
EMBEDDING_SCORES = ("cosine", "knn", "gaussian")
RANKING_SCORES = ("sibling_margin", "family_energy")
# Only for models with a reference embedding f (rcdet.modeling.reference).
REFERENCE_SCORES = ("reference",)
ALL_SCORES = LOGIT_SCORES + EMBEDDING_SCORES + RANKING_SCORES + REFERENCE_SCORES


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


# Banks up to this size are searched with numpy's dense distances; larger ones with faiss, whose
# fused search beats numpy's distance matrix and partition there (docs/benchmarks.md).
EXACT_SEARCH_MAX_BANK = 4096
# Queries per chunk of the search, bounding its (queries x bank) distance matrix.
_SEARCH_CHUNK = 1024


def _candidates_numpy(queries: np.ndarray, bank: np.ndarray, m: int) -> np.ndarray:
    out = []
    bank_sq = (bank**2).sum(1)
    for i in range(0, len(queries), _SEARCH_CHUNK):
        q = queries[i : i + _SEARCH_CHUNK]
        d2 = (q**2).sum(1)[:, None] + bank_sq[None, :] - 2 * q @ bank.T
        out.append(np.argpartition(d2, m - 1, axis=1)[:, :m])
    return np.concatenate(out)


def _candidates_faiss(queries: np.ndarray, bank: np.ndarray, m: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])  # exact search, in float32
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), m)
    return found


def kth_neighbour_distance(queries, bank, k: int, use_faiss: Optional[bool] = None) -> np.ndarray:
    """
    The Euclidean distance of each query to its k-th nearest bank entry (k capped at the bank's
    size). A fast search, numpy's dense distances or faiss's exact flat index (``use_faiss``;
    None: faiss for banks over EXACT_SEARCH_MAX_BANK), proposes the 2k nearest candidates; their
    distances are then computed exactly in float64, ``sqrt(sum((q - b)^2))``, and the k-th
    smallest is taken. The result is therefore the same from both searches and equals the exact
    search whenever the true k nearest are among the 2k proposed, which float32 rounding cannot
    prevent short of more than k entries tied within it.
    """
    q = np.asarray(queries, dtype=np.float64)
    b = np.asarray(bank, dtype=np.float64)
    k = min(int(k), b.shape[0])
    m = min(2 * k, b.shape[0])
    if use_faiss is None:
        use_faiss = b.shape[0] > EXACT_SEARCH_MAX_BANK
    found = (_candidates_faiss if use_faiss else _candidates_numpy)(q, b, m)
    out = np.empty(len(q))
    for i in range(0, len(q), _SEARCH_CHUNK):
        diff = q[i : i + _SEARCH_CHUNK, None, :] - b[found[i : i + _SEARCH_CHUNK]]
        dist = np.sqrt((diff**2).sum(axis=2))
        out[i : i + _SEARCH_CHUNK] = np.partition(dist, k - 1, axis=1)[:, k - 1]
    return out


@dataclass
class EmbeddingStatistics:
    """
    Prototypes, a kNN bank (with each entry's class, for the kNN placement) and Gaussians fitted
    on known-class GT-box embeddings, and the model's reference embedding f when it has one.
    """

    prototypes: np.ndarray  # (K, d), L2-normalised class means
    bank: np.ndarray  # (n, d) training embeddings
    means: np.ndarray  # (K, d) class means (not normalised)
    precisions: np.ndarray  # (K, d, d), or (1, d, d) for a shared covariance
    log_dets: np.ndarray  # (K,) or (1,)
    knn_k: int = 10
    bank_labels: Optional[np.ndarray] = None  # (n,) class of each bank entry
    reference: Optional[np.ndarray] = None  # (d,) unit f, or None

    @property
    def score_names(self):
        """The scores these statistics give."""
        return EMBEDDING_SCORES + (REFERENCE_SCORES if self.reference is not None else ())

    @classmethod
    def fit(
        cls,
        embeddings,
        labels,
        num_classes: int,
        knn_k: int = 10,
        per_class_covariance: bool = False,
        shrinkage: float = 1e-3,
        reference=None,
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
        if reference is not None:
            reference = np.asarray(reference, dtype=np.float64).reshape(-1)
            reference = reference / max(np.linalg.norm(reference), 1e-12)
        return cls(protos, x, means, precisions, log_dets, int(knn_k), y, reference)

    def scores(self, embeddings) -> Dict[str, np.ndarray]:
        e = np.asarray(embeddings, dtype=np.float64)
        if e.shape[0] == 0:
            return {k: np.zeros(0) for k in self.score_names}
        valid = ~np.isnan(self.means[:, 0])
        e_unit = e / np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
        cosine = (e_unit @ self.prototypes[valid].T).max(axis=1)
        knn = -kth_neighbour_distance(e, self.bank, self.knn_k)
        dim = e.shape[1]
        loglik = []
        for c in np.flatnonzero(valid):
            j = c if self.precisions.shape[0] > 1 else 0
            diff = e - self.means[c]
            maha = ((diff @ self.precisions[j]) * diff).sum(axis=1)
            loglik.append(-0.5 * (maha + self.log_dets[j] + dim * np.log(2 * np.pi)))
        out = {"cosine": cosine, "knn": knn, "gaussian": np.max(np.stack(loglik, axis=1), axis=1)}
        if self.reference is not None:
            out["reference"] = -(e_unit @ self.reference)
        return out

    def save(self, path: str):
        save_npz_atomic(
            path,
            prototypes=self.prototypes,
            bank=self.bank,
            means=self.means,
            precisions=self.precisions,
            log_dets=self.log_dets,
            knn_k=self.knn_k,
            **({} if self.bank_labels is None else {"bank_labels": self.bank_labels}),
            **({} if self.reference is None else {"reference": self.reference}),
        )

    @classmethod
    def load(cls, path: str):
        """The statistics saved at ``path``; ``bank_labels`` None in a file saved without them."""
        with np.load(path) as z:
            return cls(
                z["prototypes"],
                z["bank"],
                z["means"],
                z["precisions"],
                z["log_dets"],
                int(z["knn_k"]),
                z["bank_labels"] if "bank_labels" in z.files else None,
                z["reference"] if "reference" in z.files else None,
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
