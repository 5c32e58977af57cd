"""
OODScorer: the OOD score of every detection, computed inside the model at test time from its
known-class logits and its embedding, with the statistics fitted on the training set's GT boxes
(rcdet.evaluation.fit_ood_statistics) held in buffers, so that the checkpointer saves them.

The scores are rcdet.evaluation.scores' six, in torch on the model's device (float32), oriented
like them: **higher means more in-distribution**. A detection is unknown when its score is below
the threshold that keeps ``MODEL.RCDET.OOD.ID_RECALL`` of the ID detections of a calibration
split (rcdet.evaluation.calibration).

The scorer's state dict holds only what the configured score needs, and only once it is fitted:
an unfitted scorer saves nothing, so a model without statistics has exactly the state dict it had
before the scorer existed, and a checkpoint without statistics loads as an unfitted scorer. The
buffers take the shapes of the checkpoint they are loaded from.
"""

import logging
import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError
from ..evaluation.scores import EMBEDDING_SCORES, LOGIT_SCORES

__all__ = [
    "OODScorer",
    "build_ood_scorer",
    "resolve_ood_score",
    "MODEL_SCORES",
    "OOD_SCORE_CHOICES",
]

logger = logging.getLogger(__name__)

# The scores the model computes itself, in the order of rcdet.evaluation.scores.ALL_SCORES (a
# checkpoint stores the index). The ranking-aware scores and ``reference`` are the benchmark's
# only: they need the ranking's families or f beside the statistics.
MODEL_SCORES = LOGIT_SCORES + EMBEDDING_SCORES
# MODEL.RCDET.OOD.SCORE: auto or one of MODEL_SCORES.
OOD_SCORE_CHOICES = ("auto",) + MODEL_SCORES
# The buffers each score needs besides score_index and threshold.
_STATISTICS = {
    "msp": (),
    "max_logit": (),
    "energy": (),
    "cosine": ("prototypes",),
    "knn": ("bank", "knn_k"),
    "gaussian": ("means", "precisions", "log_dets"),
}
# score_index, num_known, knn_k and threshold have one element, not zero dimensions: numpy
# arithmetic on a 0-d array gives a scalar, which no longer loads as a checkpoint's tensor.
_ALL_BUFFERS = ("score_index", "num_known", "threshold", "prototypes", "bank", "knn_k") + (
    "means",
    "precisions",
    "log_dets",
)


class OODScorer(nn.Module):
    """
    ``scorer(logits, embeddings) -> (N,)`` scores of the configured ``score`` for detections
    with (N, K + 1) logits (known classes first, background last) and (N, d) embeddings (None
    for the logit scores). ``fill`` takes EmbeddingStatistics, ``set_threshold`` the calibrated
    threshold; ``ready`` says whether the score can be computed (the logit scores always can),
    ``has_threshold`` whether detections can be flagged unknown.
    """

    # Test-time Python only: a scripted model exports boxes, scores and classes (the ROI head's
    # ood fields are attached by a method TorchScript leaves out).
    __jit_unused_properties__ = ["ready", "has_threshold", "needs_statistics"]

    def __init__(
        self, score: str, num_classes: int, embed_dim: int, energy_temperature: float = 1.0
    ):
        super().__init__()
        if score not in MODEL_SCORES:
            raise ValueError(f"score must be one of {MODEL_SCORES}, got {score!r}")
        self.score = score
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.energy_temperature = float(energy_temperature)
        # Not persistent: _save_to_state_dict and _load_from_state_dict below decide what a
        # checkpoint holds, so that buffers of any shape load.
        for name in _ALL_BUFFERS:
            self.register_buffer(name, torch.zeros(0), persistent=False)
        self.clear()

    def clear(self):
        """Drop the statistics and the threshold: the scorer is unfitted."""
        device = self.score_index.device
        for name in _ALL_BUFFERS:
            setattr(self, name, torch.zeros(0, device=device))
        # Plain attributes, set when the buffers change, never read back from them in forward.
        self._fitted = False
        self._has_threshold = False
        self._k = 0

    @property
    def ready(self) -> bool:
        return self.score in LOGIT_SCORES or self._fitted

    @property
    def has_threshold(self) -> bool:
        return self._has_threshold

    @property
    def needs_statistics(self) -> bool:
        return self.score in EMBEDDING_SCORES

    def _names(self):
        return ("score_index", "num_known", "threshold") + _STATISTICS[self.score]

    @torch.no_grad()
    def fill(self, stats) -> None:
        """
        Take the statistics of ``stats`` (rcdet.evaluation.scores.EmbeddingStatistics; None for
        the logit scores) that the configured score needs. The threshold is kept if the
        statistics are the ones already held, and cleared otherwise: it belongs to them.
        """
        device = self.score_index.device
        new = {
            "score_index": torch.tensor([MODEL_SCORES.index(self.score)], device=device),
            "num_known": torch.tensor([self.num_classes], device=device),
        }
        if self.needs_statistics:
            if stats is None:
                raise ConfigError(
                    f"MODEL.RCDET.OOD.SCORE '{self.score}' needs the embedding statistics, and"
                    " this model has no contrastive branch to fit them (MODEL.RCDET.LOSS none)."
                )
            valid = ~torch.isnan(torch.as_tensor(stats.means)[:, 0])

            def f32(x):
                return torch.as_tensor(x, dtype=torch.float32, device=device)

            if self.score == "cosine":
                new["prototypes"] = f32(stats.prototypes)[valid.to(device)]
            elif self.score == "knn":
                new["bank"] = f32(stats.bank)
                new["knn_k"] = torch.tensor([int(stats.knn_k)], device=device)
            else:
                new["means"] = f32(stats.means)[valid.to(device)]
                precisions, log_dets = f32(stats.precisions), f32(stats.log_dets)
                if precisions.shape[0] > 1:  # one per class: keep the fitted classes'
                    precisions, log_dets = precisions[valid.to(device)], log_dets[valid.to(device)]
                new["precisions"], new["log_dets"] = precisions, log_dets
        same = self._fitted and all(
            getattr(self, k).shape == v.shape and torch.equal(getattr(self, k), v)
            for k, v in new.items()
        )
        threshold = self.threshold if same else torch.tensor([float("nan")], device=device)
        self.clear()
        for k, v in new.items():
            setattr(self, k, v)
        self.threshold = threshold
        self._sync_attributes()

    def set_threshold(self, value: Optional[float]) -> None:
        """The score below which a detection is unknown (None: none, nothing is flagged)."""
        if not self._fitted:
            raise RuntimeError("fill the scorer (fill(stats)) before setting its threshold")
        nan = float("nan")
        self.threshold = torch.tensor(
            [nan if value is None else float(value)], device=self.score_index.device
        )
        self._sync_attributes()

    def _sync_attributes(self):
        self._fitted = self.score_index.numel() == 1
        self._has_threshold = self._fitted and not bool(torch.isnan(self.threshold))
        self._k = int(self.knn_k) if self.knn_k.numel() == 1 else 0

    # ----------------------------------------------------------------- state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self._fitted:
            return
        for name in self._names():
            value = getattr(self, name)
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        found = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        device = self.score_index.device
        self.clear()
        if not found:
            return  # a checkpoint without statistics: unfitted
        index = int(found["score_index"]) if "score_index" in found else -1
        stored = MODEL_SCORES[index] if 0 <= index < len(MODEL_SCORES) else None
        wanted = ("score_index", "num_known", "threshold") + (_STATISTICS[stored] if stored else ())
        if set(found) != set(wanted):
            # detectron2's checkpointer drops a buffer whose shape differs from the model's
            # before loading: the rest would not fit together.
            logger.warning(
                f"{prefix}: the checkpoint's OOD statistics are incomplete ({sorted(found)});"
                " the OOD scorer is left unfitted. Load them into a freshly built model."
            )
            return
        if int(found["num_known"]) != self.num_classes:
            logger.warning(
                f"{prefix}: the checkpoint's OOD statistics are for {int(found['num_known'])}"
                f" known classes, the model has {self.num_classes}; the OOD scorer is left"
                " unfitted."
            )
            return
        if stored != self.score:
            logger.warning(
                f"{prefix}: the checkpoint's OOD statistics and threshold are for the score"
                f" '{stored}', not MODEL.RCDET.OOD.SCORE '{self.score}'; the OOD scorer is left"
                " unfitted."
            )
            return
        for name, value in found.items():
            value = torch.as_tensor(value)
            dtype = torch.int64 if name in ("score_index", "num_known", "knn_k") else torch.float32
            setattr(self, name, value.to(device=device, dtype=dtype))
        self._sync_attributes()

    # ----------------------------------------------------------------- scores

    @torch.jit.unused
    def forward(self, logits: torch.Tensor, embeddings: Optional[torch.Tensor]) -> torch.Tensor:
        f = logits[:, : self.num_classes].float()
        if self.score == "msp":
            return F.softmax(f, dim=1).max(dim=1).values
        if self.score == "max_logit":
            return f.max(dim=1).values
        if self.score == "energy":
            t = self.energy_temperature
            return t * torch.logsumexp(f / t, dim=1)
        if not self._fitted:
            raise RuntimeError(f"the OOD scorer has no statistics for the score '{self.score}'")
        e = embeddings.float()
        if self.score == "cosine":
            unit = e / e.norm(dim=1, keepdim=True).clamp(min=1e-12)
            return (unit @ self.prototypes.t()).max(dim=1).values
        if self.score == "knn":
            return -self.kth_neighbour_distance(e)
        return self.gaussian_log_likelihood(e)

    def kth_neighbour_distance(self, queries: torch.Tensor) -> torch.Tensor:
        """
        As rcdet.evaluation.scores.kth_neighbour_distance: the 2k nearest bank entries by the
        fast (matrix-product) distance, then their exact distances, ``sqrt(sum((q - b)^2))``, and
        the k-th smallest.
        """
        bank = self.bank
        k = min(self._k, bank.shape[0])
        m = min(2 * k, bank.shape[0])
        d2 = (queries**2).sum(1, keepdim=True) + (bank**2).sum(1)[None] - 2 * queries @ bank.t()
        candidates = d2.topk(m, dim=1, largest=False).indices
        exact = (queries[:, None, :] - bank[candidates]).pow(2).sum(2).sqrt()
        return exact.topk(k, dim=1, largest=False).values[:, k - 1]

    def gaussian_log_likelihood(self, e: torch.Tensor) -> torch.Tensor:
        """The largest class-conditional Gaussian log-likelihood (shared or per-class precision)."""
        diff = e[:, None, :] - self.means[None]  # (N, classes, d)
        if self.precisions.shape[0] == 1:
            maha = ((diff @ self.precisions[0]) * diff).sum(2)
        else:
            maha = torch.einsum("nvd,vde,nve->nv", diff, self.precisions, diff)
        log_norm = self.log_dets[None] + e.shape[1] * math.log(2 * math.pi)
        return (-0.5 * (maha + log_norm)).max(dim=1).values

    def unknown(self, scores: torch.Tensor) -> torch.Tensor:
        """Whether each score is below the calibrated threshold (call when has_threshold)."""
        return scores < self.threshold

    def extra_repr(self) -> str:
        shapes = {n: tuple(getattr(self, n).shape) for n in _STATISTICS[self.score]}
        return f"score={self.score}, fitted={self._fitted}, has_threshold={self._has_threshold}" + (
            f", {shapes}" if self._fitted and shapes else ""
        )


def resolve_ood_score(cfg, has_branch: bool) -> str:
    """MODEL.RCDET.OOD.SCORE, with ``auto`` resolved: cosine with the contrastive branch (the best
    embedding score of the committed studies), msp without."""
    score = cfg.MODEL.RCDET.OOD.SCORE
    if score == "auto":
        return "cosine" if has_branch else "msp"
    if score in EMBEDDING_SCORES and not has_branch:
        raise ConfigError(
            f"MODEL.RCDET.OOD.SCORE = '{score}' needs the contrastive branch's embeddings, but"
            " MODEL.RCDET.LOSS is none; use msp, max_logit, energy or auto."
        )
    return score


def build_ood_scorer(cfg, has_branch: bool) -> OODScorer:
    return OODScorer(
        resolve_ood_score(cfg, has_branch),
        cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        cfg.MODEL.RCDET.EMBED_DIM,
        cfg.TEST.OOD.ENERGY_TEMPERATURE,
    )
