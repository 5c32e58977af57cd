from .ood import (
    ALL_SCORES,
    EMBEDDING_SCORES,
    LOGIT_SCORES,
    EmbeddingStatistics,
    logit_scores,
    match_detections,
    ood_metrics,
)

__all__ = [
    "ALL_SCORES",
    "EMBEDDING_SCORES",
    "LOGIT_SCORES",
    "EmbeddingStatistics",
    "logit_scores",
    "match_detections",
    "ood_metrics",
]
