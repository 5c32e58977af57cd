from .datasets import DatasetError, check_voc_split, register_rcdet_shapes, register_voc_dataset
from .shapes import CLASS_NAMES as SHAPES_CLASSES
from .shapes import FAMILIES as SHAPES_FAMILIES

__all__ = [
    "DatasetError",
    "check_voc_split",
    "register_rcdet_shapes",
    "register_voc_dataset",
    "SHAPES_CLASSES",
    "SHAPES_FAMILIES",
]
