from .backbone import TinyConvNet, build_tinynet_fpn_backbone
from .contrastive_memory import RankedInfoNCEWithMemory
from .memory_queue import EmbeddingQueue
from .rince import RankedInfoNCELoss, build_contrastive_loss, ranked_info_nce
from .roi_heads import RankedContrastiveROIHeads
from .vos import VirtualOutlierSynthesis, build_vos

__all__ = [
    "TinyConvNet",
    "build_tinynet_fpn_backbone",
    "EmbeddingQueue",
    "RankedInfoNCELoss",
    "ranked_info_nce",
    "RankedInfoNCEWithMemory",
    "RankedContrastiveROIHeads",
    "build_contrastive_loss",
    "VirtualOutlierSynthesis",
    "build_vos",
]
