"""rcdet: ranked contrastive learning (RINCE) for detectron2's Faster R-CNN."""

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "rcdet needs detectron2, which is not on PyPI under its own name. Either run `make setup`"
        " (a .venv with torch 2.3.1 and the prebuilt wheel `pip install sal-detectron2==0.7.2`), or"
        " build it from source against your torch: `pip install"
        " 'git+https://github.com/facebookresearch/detectron2.git'`, then `pip install -e .`."
    ) from e

from . import data  # noqa: F401  (registers the datasets)
from . import modeling  # noqa: F401  (registers the backbone and ROI heads)
from .config import ConfigError, add_rcdet_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "add_rcdet_config", "data", "modeling", "__version__"]
