"""
The built-in dataset: "rcdet shapes", a deterministic synthetic detection set written in the
exact PASCAL VOC2007 layout, so it is read by detectron2's own VOC loader and evaluator.

Nine classes in three families. Members of a family share their outline and differ in the
interior (filled, hollow, or patterned); the interior style is shared across families. That
gives a real two-level similarity structure for rankings: same family first, then same style.

    python -m rcdet.data.shapes --out datasets/rcdet_shapes        # or datasets/generate_shapes.py
"""

import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["FAMILIES", "STYLES", "CLASS_NAMES", "generate", "default_root"]

# The single place where the families are defined: family -> its classes, one per style.
FAMILIES: Dict[str, Tuple[str, ...]] = {
    "round": ("disc", "ring", "bullseye"),
    "box": ("square", "frame", "window"),
    "wedge": ("triangle", "tri_frame", "tri_split"),
}
# Interior styles, shared across families (the second level of the hierarchy).
STYLES: Tuple[str, ...] = ("filled", "hollow", "patterned")
CLASS_NAMES: Tuple[str, ...] = tuple(c for members in FAMILIES.values() for c in members)
_OUTLINE = {c: fam for fam, members in FAMILIES.items() for c in members}
_STYLE = {c: STYLES[i] for members in FAMILIES.values() for i, c in enumerate(members)}

SPLIT_SIZES = {"train": 600, "val": 200, "test": 300}


def default_root() -> str:
    """``$RCDET_SHAPES_ROOT``, else ``$DETECTRON2_DATASETS/rcdet_shapes``, else
    ``datasets/rcdet_shapes``.

    The Makefile's SHAPES_ROOT (``make data``) resolves the same order; an empty variable counts
    as unset in both.
    """
    if os.environ.get("RCDET_SHAPES_ROOT"):
        return os.environ["RCDET_SHAPES_ROOT"]
    return os.path.join(os.environ.get("DETECTRON2_DATASETS") or "datasets", "rcdet_shapes")


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour noise plus clutter strokes and dots that are not any class."""
    low = rng.uniform(40, 215, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(
        np.clip(np.asarray(img, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    )
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(4, 12)):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.6:
            pts = [
                tuple(int(v) for v in rng.integers(0, [w, h])) for _ in range(rng.integers(2, 4))
            ]
            draw.line(pts, fill=color, width=int(rng.integers(1, 4)))
        else:
            x, y = rng.integers(0, [w, h])
            rad = int(rng.integers(2, 6))
            draw.rectangle([x - rad, y - rad, x + rad, y + rad], fill=color)
    return img


def _outline_points(outline: str, box) -> List[Tuple[float, float]]:
    x0, y0, x1, y1 = box
    if outline == "box":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if outline == "wedge":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    raise ValueError(outline)


def _shrink(points, factor: float):
    cx = sum(p[0] for p in points) / len(points)
    cy = sum(p[1] for p in points) / len(points)
    return [(cx + (x - cx) * factor, cy + (y - cy) * factor) for x, y in points]


def _draw_object(draw: ImageDraw.ImageDraw, cls: str, box, color, hole) -> None:
    """Draw one object; ``hole`` is the colour of cut-out interior (a background-like tone)."""
    x0, y0, x1, y1 = box
    outline, style = _OUTLINE[cls], _STYLE[cls]
    w, h = x1 - x0, y1 - y0
    if outline == "round":
        draw.ellipse(box, fill=color)
        if style == "hollow":
            draw.ellipse([x0 + 0.3 * w, y0 + 0.3 * h, x1 - 0.3 * w, y1 - 0.3 * h], fill=hole)
        elif style == "patterned":
            draw.ellipse([x0 + 0.2 * w, y0 + 0.2 * h, x1 - 0.2 * w, y1 - 0.2 * h], fill=hole)
            draw.ellipse([x0 + 0.38 * w, y0 + 0.38 * h, x1 - 0.38 * w, y1 - 0.38 * h], fill=color)
        return
    pts = _outline_points(outline, box)
    draw.polygon(pts, fill=color)
    if style == "hollow":
        draw.polygon(_shrink(pts, 0.45 if outline == "box" else 0.35), fill=hole)
    elif style == "patterned":
        if outline == "box":
            # Four window panes separated by cross bars.
            bx, by = 0.14 * w, 0.14 * h
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            gx, gy = 0.06 * w, 0.06 * h
            for ax0, ax1 in ((x0 + bx, mx - gx), (mx + gx, x1 - bx)):
                for ay0, ay1 in ((y0 + by, my - gy), (my + gy, y1 - by)):
                    draw.rectangle([ax0, ay0, ax1, ay1], fill=hole)
        else:
            # A horizontal slit across the triangle.
            ya, yb = y0 + 0.55 * h, y0 + 0.70 * h
            half_a, half_b = 0.5 * w * 0.55, 0.5 * w * 0.70
            cx = (x0 + x1) / 2
            draw.polygon(
                [
                    (cx - half_a + 2, ya),
                    (cx + half_a - 2, ya),
                    (cx + half_b - 2, yb),
                    (cx - half_b + 2, yb),
                ],
                fill=hole,
            )


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _make_image(seed: int, index: int, classes: Tuple[str, ...] = CLASS_NAMES):
    """Render image ``index`` with objects drawn from ``classes``; its own RNG stream makes the
    output independent of worker order."""
    rng = np.random.default_rng([seed, index])
    w, h = int(rng.integers(256, 321)), int(rng.integers(256, 321))
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(20):
            side = float(rng.uniform(34, 96))
            aspect = float(rng.uniform(0.8, 1.25))
            bw, bh = side * math.sqrt(aspect), side / math.sqrt(aspect)
            x0, y0 = float(rng.uniform(1, w - bw - 1)), float(rng.uniform(1, h - bh - 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            # Partial occlusion is allowed, but every object must stay mostly visible.
            if all(_iou(box, o["box"]) < 0.25 for o in objects):
                break
        else:
            continue
        cls = classes[int(rng.integers(len(classes)))]
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        hole = tuple(int(v) for v in (255 - np.asarray(color)) // 2 + rng.integers(0, 60, 3))
        _draw_object(draw, cls, box, color, hole)
        objects.append({"name": cls, "box": box})
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))
    return img, w, h, objects


def _annotation_xml(fileid: str, w: int, h: int, objects) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "rcdet_shapes"
    ET.SubElement(root, "filename").text = f"{fileid}.jpg"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj["name"]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = "0"
        bb = ET.SubElement(node, "bndbox")
        # VOC boxes are 1-based inclusive pixel indices.
        x0, y0, x1, y1 = obj["box"]
        coords = (
            int(math.floor(x0)) + 1,
            int(math.floor(y0)) + 1,
            int(math.ceil(x1)),
            int(math.ceil(y1)),
        )
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), coords):
            ET.SubElement(bb, tag).text = str(min(v, w if tag[0] == "x" else h))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _write_one(args):
    root, seed, index, *classes = args
    fileid = f"{index:06d}"
    img, w, h, objects = _make_image(seed, index, *classes)
    img.save(os.path.join(root, "JPEGImages", f"{fileid}.jpg"), quality=92)
    with open(os.path.join(root, "Annotations", f"{fileid}.xml"), "wb") as f:
        f.write(_annotation_xml(fileid, w, h, objects))
    return fileid


def generate(
    root: str, seed: int = 0, split_sizes: Dict[str, int] = None, workers: int = 2
) -> Dict[str, List[str]]:
    """Write the dataset under ``root`` (VOC layout) and return the image ids of each split."""
    sizes = dict(SPLIT_SIZES if split_sizes is None else split_sizes)
    for key in ("train", "val", "test"):
        if sizes.get(key, 0) < 1:
            raise ValueError(f"split_sizes['{key}'] must be >= 1, got {sizes.get(key)}.")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    total = sizes["train"] + sizes["val"] + sizes["test"]
    jobs = [(root, seed, i) for i in range(total)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            ids = list(pool.map(_write_one, jobs, chunksize=32))
    else:
        ids = [_write_one(j) for j in jobs]
    a, b = sizes["train"], sizes["train"] + sizes["val"]
    splits = {"train": ids[:a], "val": ids[a:b], "trainval": ids[:b], "test": ids[b:]}
    for name, members in splits.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{name}.txt"), "w") as f:
            f.write("\n".join(members) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    return splits


def argument_parser(description: str = __doc__, prog: Optional[str] = None):
    """The command line of ``python -m rcdet.data.shapes`` and datasets/generate_shapes.py."""
    from .. import cli

    parser = cli.ArgumentParser(description=description, prog=prog)
    parser.add_argument("--out", default=default_root(), help="output root (VOC layout)")
    parser.add_argument(
        "--seed", type=cli.int_in_range(0), default=0, help="the images drawn follow from it"
    )
    for split in ("train", "val", "test"):
        parser.add_argument(
            f"--{split}",
            type=cli.int_in_range(1),
            default=SPLIT_SIZES[split],
            help=f"images in the {split} split",
        )
    parser.add_argument(
        "--workers",
        type=cli.int_in_range(1),
        default=min(2, os.cpu_count() or 1),
        help="processes that draw the images",
    )
    return parser


def main(argv=None, description: str = __doc__, prog: Optional[str] = None) -> int:
    """Parse ``argv``, write the dataset; a bad option or output path is one error line (exit
    code 2)."""
    from ..engine import report_user_errors

    args = argument_parser(description, prog).parse_args(argv)
    return report_user_errors(_run, args)


def _run(args) -> int:
    from .. import cli

    cli.check_output_dir(args.out, "--out")
    start = time.perf_counter()
    splits = generate(
        args.out, args.seed, {"train": args.train, "val": args.val, "test": args.test}, args.workers
    )
    n = len(splits["trainval"]) + len(splits["test"])
    print(
        f"Wrote {n} images to {args.out} in {time.perf_counter() - start:.1f}s "
        f"(trainval {len(splits['trainval'])}, test {len(splits['test'])})."
    )
    return 0


if __name__ == "__main__":
    from ..engine import exit_on_user_error

    sys.exit(exit_on_user_error(main, prog="python -m rcdet.data.shapes"))
