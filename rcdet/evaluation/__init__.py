from .evaluator import OODDetectionEvaluator, OODOptions, fit_ood_statistics, ood_outputs
from .matching import match_detections
from .metrics import fpr_at_recall, ood_metrics
from .report import OODReport, load_report
from .scores import ALL_SCORES, EMBEDDING_SCORES, LOGIT_SCORES, EmbeddingStatistics, logit_scores

__all__ = [
    "ALL_SCORES",
    "EMBEDDING_SCORES",
    "LOGIT_SCORES",
    "EmbeddingStatistics",
    "OODDetectionEvaluator",
    "OODOptions",
    "OODReport",
    "fit_ood_statistics",
    "fpr_at_recall",
    "load_report",
    "logit_scores",
    "match_detections",
    "ood_metrics",
    "ood_outputs",
]
