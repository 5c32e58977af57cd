from .matching import match_detections
from .metrics import ood_metrics
from .scores import ALL_SCORES, EMBEDDING_SCORES, LOGIT_SCORES, EmbeddingStatistics, logit_scores

__all__ = [
    "ALL_SCORES",
    "EMBEDDING_SCORES",
    "LOGIT_SCORES",
    "EmbeddingStatistics",
    "logit_scores",
    "match_detections",
    "ood_metrics",
]
