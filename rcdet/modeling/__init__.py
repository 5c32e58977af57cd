from .backbone import TinyConvNet, build_tinynet_fpn_backbone
from .memory_queue import EmbeddingQueue
from .rince import RankedInfoNCELoss, ranked_info_nce
from .roi_heads import RankedContrastiveROIHeads, build_contrastive_loss
