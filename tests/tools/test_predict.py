"""
tools/predict.py: it writes the drawn image of an image file, of each image of a folder and the
frames of a video, with the model's own ood_scores and unknown flags; unknown detections are
drawn in their own colour; bad inputs (no such file, a folder without images, weights without
the score's statistics) are one line.
"""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from rcdet.checkpoint import load_trained_weights
from rcdet.evaluation.calibration import MODEL_WITH_SCORER
from tools import predict

CONFIG = "configs/shapes_rince_ood.yaml"


@pytest.fixture(scope="module")
def fitted(image_level_report):
    """The tiny RINCE model with its fitted and calibrated cosine scorer (conftest's benchmark),
    and the tiny test images."""
    weights = str(image_level_report.folder / MODEL_WITH_SCORER)
    files = [d["file_name"] for d in DatasetCatalog.get("rcdet_shapes_test")]
    return weights, files


def _run(weights, input_path, output, *extra):
    return predict.main(
        [
            "--config-file",
            CONFIG,
            "--input",
            str(input_path),
            "--output",
            str(output),
            "--confidence-threshold",
            "0.05",
            *extra,
            "MODEL.WEIGHTS",
            weights,
            "INPUT.MIN_SIZE_TEST",
            "160",
        ]
    )


def test_predict_writes_its_image_with_the_models_unknown_flags(fitted, tmp_path, capsys):
    weights, files = fitted
    assert _run(weights, files[0], tmp_path) == 0
    out = tmp_path / os.path.basename(files[0])
    drawn, original = cv2.imread(str(out)), cv2.imread(files[0])
    assert drawn.shape == original.shape and not np.array_equal(drawn, original)
    with open(tmp_path / "predictions.json") as f:
        summary = json.load(f)
    assert summary["score"] == "cosine" and summary["threshold"] is not None
    (record,) = summary["images"]
    assert record["output"] == str(out) and record["detections"]
    classes = MetadataCatalog.get("rcdet_shapes_test").thing_classes
    for d in record["detections"]:
        assert d["class"] in classes and d["score"] >= 0.05
        assert d["unknown"] == (np.float32(d["ood_score"]) < np.float32(summary["threshold"]))
    assert "unknown" in capsys.readouterr().out


def test_predict_on_a_folder_flags_some_objects_unknown(fitted, tmp_path):
    weights, files = fitted
    folder = tmp_path / "images"
    folder.mkdir()
    for f in files:
        os.symlink(f, folder / os.path.basename(f))
    (folder / "notes.txt").write_text("not an image")
    assert _run(weights, folder, tmp_path / "out") == 0
    with open(tmp_path / "out" / "predictions.json") as f:
        images = json.load(f)["images"]
    assert [os.path.basename(r["file"]) for r in images] == sorted(
        os.path.basename(f) for f in files
    )
    flags = [d["unknown"] for r in images for d in r["detections"]]
    # The threshold keeps 95% of the training split's ID detections: on the test images with
    # held-out objects some detections fall below it, most do not.
    assert any(flags) and not all(flags)
    for r in images:
        assert os.path.isfile(r["output"])


def test_unknown_detections_are_drawn_dashed_in_their_own_colour(tiny_shapes):
    image = np.full((120, 160, 3), 128, dtype=np.uint8)
    inst = Instances((120, 160))
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 20.0, 60.0, 90.0], [90.0, 30.0, 150.0, 100.0]]))
    inst.scores = torch.tensor([0.9, 0.8])
    inst.pred_classes = torch.tensor([0, 1])
    inst.is_unknown = torch.tensor([False, True])
    meta = MetadataCatalog.get("rcdet_shapes_test")
    np.random.seed(0)  # detectron2 colours known detections at random, magenta among them
    drawn = predict.draw_predictions(image, inst, meta)
    assert drawn.shape == image.shape

    def magenta(region):
        r, g, b = (region[..., i].astype(int) for i in range(3))
        return int(((r > 200) & (g < 60) & (b > 200)).sum())

    assert magenta(drawn[95:105, 85:155]) > 5  # the unknown box's bottom edge
    assert magenta(drawn[85:95, 5:65]) == 0  # the known one is drawn as detectron2 draws it
    np.random.seed(0)
    known_only = predict.draw_predictions(image, inst[:1], meta)
    assert magenta(known_only) == 0


def test_predict_on_a_video_writes_every_frame(fitted, tmp_path):
    weights, files = fitted
    frame = read_image(files[0], format="BGR")
    h, w = frame.shape[:2]
    clip = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(clip, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (w, h))
    assert writer.isOpened()
    for f in files[:3]:
        writer.write(cv2.resize(read_image(f, format="BGR"), (w, h)))
    writer.release()
    assert _run(weights, clip, tmp_path / "out") == 0
    video = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = 0
    while video.read()[0]:
        frames += 1
    assert frames == 3 and int(video.get(cv2.CAP_PROP_FRAME_WIDTH)) == w
    video.release()


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_missing_input_is_one_line(fitted, tmp_path, capsys):
    weights, _ = fitted
    missing = tmp_path / "nope.jpg"
    assert _run(weights, missing, tmp_path / "out") == 2
    assert _error_line(capsys) == f"error: --input {missing}: no such file or folder."
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(weights, empty, tmp_path / "out") == 2
    assert "the folder holds no image" in _error_line(capsys)


def test_weights_without_statistics_name_the_fix(tiny_models, tmp_path, capsys):
    # The tiny model's weights with its scorer emptied: a checkpoint without OOD statistics.
    cfg = tiny_cfg(CONFIG, "MODEL.WEIGHTS", tiny_models["rince"])
    model = build_model(cfg)
    load_trained_weights(model, cfg)
    model.roi_heads.ood_scorer.clear()
    bare = str(tmp_path / "bare.pth")
    torch.save({"model": model.state_dict()}, bare)
    image = DatasetCatalog.get("rcdet_shapes_test")[0]["file_name"]
    assert _run(bare, image, tmp_path / "out") == 2
    line = _error_line(capsys)
    assert f"MODEL.WEIGHTS {bare} has no fitted OOD statistics for the cosine score" in line
    assert "run tools/benchmark_ood.py" in line and "MODEL.RCDET.OOD.HELD_OUT_CLASSES" in line

    # A logit score needs no statistics: it runs, and without a threshold draws all as known.
    assert _run(bare, image, tmp_path / "msp", "MODEL.RCDET.OOD.SCORE", "msp") == 0
    assert "has no unknown-object threshold for the msp score" in capsys.readouterr().err
    with open(tmp_path / "msp" / "predictions.json") as f:
        summary = json.load(f)
    assert summary["threshold"] is None
    assert not any(d["unknown"] for d in summary["images"][0]["detections"])
