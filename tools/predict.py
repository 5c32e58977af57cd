#!/usr/bin/env python
"""
Run a trained model on an image, a folder of images or a video, as detectron2's demo/demo.py
does, and draw what it finds: known objects with their class and score (detectron2's
Visualizer; VideoVisualizer for a video), unknown objects dashed in magenta and marked "unknown".
An object is unknown when the model's own OOD score (MODEL.RCDET.OOD.SCORE) is below the
threshold calibrated with its statistics (docs/ood_benchmark.md#the-models-own-unknown-flag).

    python tools/predict.py --config-file configs/shapes_rince_ood.yaml --input photo.jpg \\
        --output output/predict MODEL.WEIGHTS output/ood/rince/model_ood.pth
    python tools/predict.py --config-file configs/shapes_rince_ood.yaml --input clip.mp4 \\
        MODEL.WEIGHTS output/shapes_rince_ood/model_final.pth

The weights must hold the fitted statistics of the score: the model_ood.pth that
tools/benchmark_ood.py writes, or the model_final.pth of a training with held-out classes.
Writes OUTPUT/<image name> for each image (OUTPUT/<video name>.mp4 for a video) and
OUTPUT/predictions.json (each image's detections: box, class, score, ood_score, unknown).
"""

import os
import sys

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import Visualizer

from rcdet import cli
from rcdet.checkpoint import load_trained_weights
from rcdet.config import ConfigError
from rcdet.engine import exit_on_user_error, report_user_errors, setup_cfg
from rcdet.file_io import write_json_atomic

__all__ = ["build_predictor", "check_scorer", "draw_predictions", "UNKNOWN_COLOR"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
UNKNOWN_COLOR = (1.0, 0.0, 1.0)  # magenta, drawn opaque and dashed


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", required=True)
    parser.add_argument(
        "--input", required=True, help="an image file, a folder of images or a video"
    )
    parser.add_argument("--output", default="output/predict", help="folder for the drawn images")
    parser.add_argument(
        "--confidence-threshold",
        type=cli.float_in_range(0.0, 1.0),
        default=0.5,
        help="draw detections scoring at least this (MODEL.ROI_HEADS.SCORE_THRESH_TEST)",
    )
    parser.add_config_overrides()
    args = parser.parse_args(argv)
    setup_logger(name="rcdet")
    return report_user_errors(run, args)


def run(args):
    kind, paths = _inputs(args.input)
    cli.check_output_dir(args.output, "--output")
    overrides = ["MODEL.RCDET.EMBED_AT_TEST", "True"]
    overrides += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(args.confidence_threshold)]
    cfg = setup_cfg(args.config_file, list(args.opts) + overrides)
    predictor = build_predictor(cfg)
    scorer = check_scorer(predictor.model, cfg)
    if scorer.has_threshold:
        print(
            f"[predict] {scorer.score} score; unknown below {float(scorer.threshold):.4g}, which"
            f" keeps {cfg.MODEL.RCDET.OOD.ID_RECALL:.0%} of the calibration split's known objects"
        )
    else:
        print(
            f"warning: MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} has no unknown-object threshold for the"
            f" {scorer.score} score: every detection is drawn as known (tools/benchmark_ood.py"
            " calibrates one).",
            file=sys.stderr,
        )
    metadata = _metadata(cfg)
    os.makedirs(args.output, exist_ok=True)
    if kind == "video":
        _predict_video(predictor, metadata, paths[0], args.output)
        return 0
    records = []
    for path in paths:
        image = _read(path)
        instances = predictor(image)["instances"].to("cpu")
        out = os.path.join(args.output, os.path.basename(path))
        drawn = draw_predictions(image[:, :, ::-1], instances, metadata)
        if not cv2.imwrite(out, drawn[:, :, ::-1]):
            raise cli.UsageError(f"--output {args.output}: cannot write {out}.")
        records.append(_record(path, out, instances, metadata))
        unknown = sum(d["unknown"] for d in records[-1]["detections"])
        print(f"[predict] {path}: {len(instances)} detections, {unknown} unknown -> {out}")
    summary = os.path.join(args.output, "predictions.json")
    write_json_atomic(
        summary,
        {
            "weights": cfg.MODEL.WEIGHTS,
            "score": scorer.score,
            "threshold": float(scorer.threshold) if scorer.has_threshold else None,
            "confidence_threshold": args.confidence_threshold,
            "images": records,
        },
    )
    print(f"[predict] {len(records)} images; detections: {summary}")
    return 0


def build_predictor(cfg) -> DefaultPredictor:
    """
    detectron2's DefaultPredictor for ``cfg`` (MODEL.RCDET.EMBED_AT_TEST on), its weights loaded
    through rcdet.checkpoint: weights that do not fit the model, or a file that would run code
    when unpickled, are errors naming the file.
    """
    build = cfg.clone()
    build.defrost()
    build.MODEL.WEIGHTS = ""  # DefaultPredictor's own checkpointer unpickles in full
    predictor = DefaultPredictor(build)
    load_trained_weights(predictor.model, cfg)
    return predictor


def check_scorer(model, cfg):
    """The model's OOD scorer, or one line naming the fix if it cannot score detections."""
    scorer = getattr(model.roi_heads, "ood_scorer", None)
    if scorer is None:
        raise ConfigError(
            f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME} has no OOD scorer: predict.py needs"
            " RankedContrastiveROIHeads."
        )
    if not scorer.ready:
        raise ConfigError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} has no fitted OOD statistics for the"
            f" {scorer.score} score (MODEL.RCDET.OOD.SCORE): run tools/benchmark_ood.py on it and"
            " pass the model_ood.pth it writes, or train with MODEL.RCDET.OOD.HELD_OUT_CLASSES"
            " (its model_final.pth holds them); the msp, max_logit and energy scores need none."
        )
    return scorer


def draw_predictions(image_rgb, instances, metadata, video_visualizer=None) -> np.ndarray:
    """
    The RGB image with ``instances`` drawn: the known ones as detectron2 draws predictions (with
    ``video_visualizer``, as VideoVisualizer draws a video's frames), the unknown ones
    (``is_unknown``) dashed in UNKNOWN_COLOR, labelled "unknown".
    """
    unknown = (
        instances.is_unknown
        if instances.has("is_unknown")
        else torch.zeros(len(instances), dtype=torch.bool)
    )
    known = instances[~unknown]
    if video_visualizer is not None:
        vis = video_visualizer.draw_instance_predictions(image_rgb, known)
    else:
        vis = Visualizer(image_rgb, metadata).draw_instance_predictions(known)
    if not unknown.any():
        return vis.get_image()
    visualizer = Visualizer(vis.get_image(), metadata)
    for box in instances[unknown].pred_boxes.tensor.numpy():
        visualizer.draw_box(box, alpha=1.0, edge_color=UNKNOWN_COLOR, line_style="--")
        visualizer.draw_text(
            "unknown", (box[0], box[1]), color=UNKNOWN_COLOR, horizontal_alignment="left"
        )
    return visualizer.output.get_image()


def _inputs(path: str):
    """("images", [paths]) for an image or a folder of images, ("video", [path]) for a video."""
    if not os.path.exists(path):
        raise cli.UsageError(f"--input {path}: no such file or folder.")
    if os.path.isdir(path):
        images = sorted(
            os.path.join(path, n)
            for n in os.listdir(path)
            if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
        )
        if not images:
            raise cli.UsageError(
                f"--input {path}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)})."
            )
        return "images", images
    if path.lower().endswith(VIDEO_EXTENSIONS):
        return "video", [path]
    return "images", [path]


def _read(path: str) -> np.ndarray:
    try:
        return read_image(path, format="BGR")
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for a file it cannot decode
        raise cli.UsageError(f"--input {path}: cannot be read as an image ({e}).") from None


def _metadata(cfg):
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    return MetadataCatalog.get(names[0]) if names else MetadataCatalog.get("__unused")


def _record(path, out, instances, metadata):
    classes = metadata.get("thing_classes", None)
    unknown = (
        instances.is_unknown.tolist() if instances.has("is_unknown") else [False] * len(instances)
    )
    detections = []
    for box, cls, score, ood, unk in zip(
        instances.pred_boxes.tensor.tolist(),
        instances.pred_classes.tolist(),
        instances.scores.tolist(),
        instances.ood_scores.tolist(),
        unknown,
    ):
        detections.append(
            {
                "box": [round(v, 2) for v in box],
                "class": classes[cls] if classes else cls,
                "score": score,
                "ood_score": ood,
                "unknown": bool(unk),
            }
        )
    return {"file": path, "output": out, "detections": detections}


def _predict_video(predictor, metadata, path, output_dir):
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise cli.UsageError(f"--input {path}: cannot be opened as a video.")
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    out = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + ".mp4")
    writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        video.release()
        raise cli.UsageError(f"--output {output_dir}: OpenCV cannot write the video {out}.")
    visualizer = VideoVisualizer(metadata)
    frames = detections = unknown = 0
    try:
        while True:
            ok, frame = video.read()
            if not ok:
                break
            instances = predictor(frame)["instances"].to("cpu")
            drawn = draw_predictions(frame[:, :, ::-1], instances, metadata, visualizer)
            writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            frames += 1
            detections += len(instances)
            unknown += int(instances.is_unknown.sum()) if instances.has("is_unknown") else 0
    finally:
        video.release()
        writer.release()
    if frames == 0:
        raise cli.UsageError(f"--input {path}: the video has no frame OpenCV can read.")
    print(f"[predict] {path}: {frames} frames, {detections} detections, {unknown} unknown -> {out}")


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
