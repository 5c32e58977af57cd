"""
rcdet.data.datasets: the built-in dataset registers through detectron2's VOC loader; a broken
VOC folder (unknown class, missing image, corrupt XML, empty or missing split file) and a missing
dataset root are one clear error that names the file, or the folder and its variable. The boxes
detectron2's training mapper drops are counted as it drops them: some is a warning with the
counts, all is an error; an image whose size differs from its annotation's is one error line.
A data loader worker leaves Ctrl-C to the main process and prints no traceback when it stops.
"""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch.utils.data
from conftest import run_in_process
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances
from PIL import Image

from rcdet.data import DatasetError, register_voc_dataset
from rcdet.data.shapes import CLASS_NAMES


def test_registration_goes_through_detectron2_loader(tiny_shapes):
    dicts = DatasetCatalog.get("rcdet_shapes_trainval")
    assert dicts == load_voc_instances(tiny_shapes, "trainval", list(CLASS_NAMES))
    meta = MetadataCatalog.get("rcdet_shapes_test")
    assert meta.thing_classes == list(CLASS_NAMES)
    assert meta.year == 2007 and meta.evaluator_type == "pascal_voc" and meta.dirname == tiny_shapes


@pytest.fixture
def broken_copy(tiny_shapes, tmp_path):
    root = str(tmp_path / "broken")
    shutil.copytree(tiny_shapes, root)
    return root


def _register_and_load(root, name="rcdet_test_broken"):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_voc_dataset(name, root, "train", 2007, CLASS_NAMES)
    return DatasetCatalog.get(name)


def _first_id(root):
    with open(os.path.join(root, "ImageSets", "Main", "train.txt")) as f:
        return f.readline().strip()


def test_unknown_class_in_xml(broken_copy):
    xml = os.path.join(broken_copy, "Annotations", f"{_first_id(broken_copy)}.xml")
    tree = ET.parse(xml)
    tree.find("object/name").text = "squaer"
    tree.write(xml)
    with pytest.raises(DatasetError, match=r"class name 'squaer'.*Did you mean 'square'") as e:
        _register_and_load(broken_copy)
    assert xml in str(e.value)


def test_missing_image(broken_copy):
    jpg = os.path.join(broken_copy, "JPEGImages", f"{_first_id(broken_copy)}.jpg")
    os.remove(jpg)
    with pytest.raises(DatasetError, match="image is missing") as e:
        _register_and_load(broken_copy)
    assert jpg in str(e.value)


def test_corrupt_xml(broken_copy):
    xml = os.path.join(broken_copy, "Annotations", f"{_first_id(broken_copy)}.xml")
    with open(xml, "w") as f:
        f.write("<annotation><size>")
    with pytest.raises(DatasetError, match="not valid XML") as e:
        _register_and_load(broken_copy)
    assert xml in str(e.value)


def test_empty_and_missing_split_file(broken_copy):
    split = os.path.join(broken_copy, "ImageSets", "Main", "train.txt")
    open(split, "w").close()
    with pytest.raises(DatasetError, match="split file is empty") as e:
        _register_and_load(broken_copy)
    assert split in str(e.value)
    os.remove(split)
    with pytest.raises(DatasetError, match="split file is missing"):
        _register_and_load(broken_copy)


def test_missing_dataset_root_names_path_and_variable(tiny_shapes, tmp_path):
    from rcdet.data import register_rcdet_shapes
    from rcdet.engine import setup_cfg

    missing = str(tmp_path / "nowhere")
    register_rcdet_shapes(missing)
    try:
        with pytest.raises(DatasetError) as e:
            setup_cfg("configs/shapes_rince.yaml")
        assert os.path.abspath(missing) in str(e.value) and "RCDET_SHAPES_ROOT" in str(e.value)
    finally:
        register_rcdet_shapes(tiny_shapes)


def test_missing_voc_root_names_path_and_variable():
    voc_dir = MetadataCatalog.get("voc_2007_trainval").dirname
    if os.path.isdir(voc_dir):
        pytest.skip(f"VOC2007 is present at {voc_dir}")
    with pytest.raises(DatasetError) as e:
        DatasetCatalog.get("voc_2007_trainval")
    assert os.path.abspath(voc_dir) in str(e.value) and "DETECTRON2_DATASETS" in str(e.value)


# ---------------------------------------------------------------- boxes the loader drops


TRAIN_ARGV = [
    "--config-file",
    "configs/shapes_softmax.yaml",
    "DATASETS.TEST",
    "()",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "INPUT.MIN_SIZE_TRAIN",
    "(160,)",
]


def _one_error_line(code, err):
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _training_error(root, tiny_shapes, capsys):
    """The one error line of tools/train_net.py training on the dataset at ``root``."""
    from rcdet.data import register_rcdet_shapes

    register_rcdet_shapes(root)
    try:
        code, err = run_in_process("train_net", TRAIN_ARGV, capsys)
    finally:
        register_rcdet_shapes(tiny_shapes)
    return _one_error_line(code, err)


def _edit_xmls(root, edit):
    """Apply ``edit(tree)`` to every annotation of the dataset at ``root``."""
    folder = os.path.join(root, "Annotations")
    for name in sorted(os.listdir(folder)):
        tree = ET.parse(os.path.join(folder, name))
        edit(tree)
        tree.write(os.path.join(folder, name))


def _split_ids(root, split):
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def test_count_box_drops_matches_detectron2_mapper():
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T
    from detectron2.structures import BoxMode

    from rcdet.data.datasets import count_box_drops

    def anno(box, mode=BoxMode.XYXY_ABS, **kw):
        return dict(bbox=box, bbox_mode=mode, category_id=0, **kw)

    records = [
        {
            "file_name": "a.jpg",
            "width": 100,
            "height": 50,
            "annotations": [
                anno([10, 10, 20, 20]),  # inside
                anno([90, 40, 130, 70]),  # partly outside: clipped, kept
                anno([120, 10, 130, 20]),  # right of the image
                anno([-30, -20, -10, -5]),  # above and left of it
                anno([10, 60, 20, 80]),  # below it
                anno([30, 10, 30, 20]),  # no width
                anno([30, 20, 40, 10]),  # ymax < ymin
                anno([1, 1, 5, 5], iscrowd=1),
                anno([95, 5, 10, 10], mode=BoxMode.XYWH_ABS),  # XYWH: 95..105, kept
            ],
        },
        {"file_name": "b.jpg", "width": 10, "height": 10, "annotations": []},
    ]
    drops = count_box_drops(records)
    assert (drops.images, drops.boxes, drops.usable) == (2, 9, 3)
    assert dict(drops.dropped) == {"outside": 3, "no_area": 2, "crowd": 1}
    assert drops.example[1:] == (2, "outside")
    assert drops.describe() == (
        "1 is marked iscrowd, 2 have xmax <= xmin or ymax <= ymin, 3 lie outside their image"
        " (e.g. box 2 (120, 10, 130, 20) of a.jpg, in a 100x50 image)"
    )
    # Independent reference: what detectron2's training mapper keeps of each image.
    kept = 0
    for r in records:
        annos = [
            utils.transform_instance_annotations(
                dict(a), T.TransformList([]), (r["height"], r["width"])
            )
            for a in r["annotations"]
            if not a.get("iscrowd", 0)
        ]
        instances = utils.annotations_to_instances(annos, (r["height"], r["width"]))
        kept += len(utils.filter_empty_instances(instances))
    assert kept == drops.usable


def test_split_whose_boxes_all_lie_outside_their_images_fails(broken_copy, tiny_shapes, capsys):
    def move_out(tree):
        width = int(tree.find("size/width").text)
        for box in tree.findall("object/bndbox"):
            box.find("xmin").text, box.find("xmax").text = str(width + 10), str(width + 40)

    _edit_xmls(broken_copy, move_out)
    ids = _split_ids(broken_copy, "trainval")
    boxes = sum(len(_objects(broken_copy, i)) for i in ids)
    line = _training_error(broken_copy, tiny_shapes, capsys)
    split_file = os.path.join(broken_copy, "ImageSets", "Main", "trainval.txt")
    xml = os.path.join(broken_copy, "Annotations", f"{ids[0]}.xml")
    width = ET.parse(xml).find("size/width").text
    assert (
        f"error: {split_file}: none of the {boxes} boxes of its {len(ids)} images is usable:"
        in line
    )
    assert (
        f"{boxes} lie outside their image (e.g. object 0 of {xml}, bndbox {int(width) + 10},"
        in line
    )
    assert "fix the bndbox or size fields" in line.lower()


def _objects(root, fileid):
    return ET.parse(os.path.join(root, "Annotations", f"{fileid}.xml")).findall("object")


def test_split_with_some_unusable_boxes_warns_with_the_counts(broken_copy):
    fileid = _first_id(broken_copy)
    xml = os.path.join(broken_copy, "Annotations", f"{fileid}.xml")
    tree = ET.parse(xml)
    box = tree.find("object/bndbox")
    # VOC boxes are 1-based and inclusive: xmax = xmin is one pixel wide, xmin - 1 is empty.
    box.find("xmax").text = str(int(box.find("xmin").text) - 1)
    tree.write(xml)
    boxes = sum(len(_objects(broken_copy, i)) for i in _split_ids(broken_copy, "train"))
    handler = _ListHandler()
    logger = logging.getLogger("rcdet.data.datasets")
    logger.addHandler(handler)
    try:
        records = _register_and_load(broken_copy)
    finally:
        logger.removeHandler(handler)
    assert sum(len(r["annotations"]) for r in records) == boxes  # nothing removed by rcdet
    split_file = os.path.join(broken_copy, "ImageSets", "Main", "train.txt")
    xmin, xmax = box.find("xmin").text, box.find("xmax").text
    assert handler.messages == [
        f"{split_file}: detectron2's training loader drops 1 of its {boxes} boxes, which have no"
        f" area once clipped to their image: 1 has xmax <= xmin or ymax <= ymin (e.g. object 0 of"
        f" {xml}, bndbox {xmin},{box.find('ymin').text},{xmax},{box.find('ymax').text}, in a"
        f" {tree.find('size/width').text}x{tree.find('size/height').text} image)."
    ]


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------- image and annotation sizes


def test_size_mismatch_names_image_annotation_and_both_sizes(broken_copy, tiny_shapes, capsys):
    def widen(tree):
        node = tree.find("size/width")
        node.text = str(int(node.text) + 7)

    _edit_xmls(broken_copy, widen)
    line = _training_error(broken_copy, tiny_shapes, capsys)
    m = re.fullmatch(
        r"error: (\S+\.jpg): the image is (\d+)x(\d+) pixels \(width x height\), but (\S+\.xml)"
        r" gives its size as (\d+)x(\d+)\. Fix the annotation's size/width and size/height .*",
        line,
    )
    assert m, line
    jpg, w, h, xml, xml_w, xml_h = m.groups()
    fileid = os.path.splitext(os.path.basename(jpg))[0]
    assert jpg == os.path.join(broken_copy, "JPEGImages", f"{fileid}.jpg")
    assert xml == os.path.join(broken_copy, "Annotations", f"{fileid}.xml")
    with Image.open(jpg) as image:
        assert (int(w), int(h)) == image.size
    assert (int(xml_w), int(xml_h)) == (image.size[0] + 7, image.size[1])


# A process whose multiprocessing file-descriptor sharing thread (a DataLoader worker sending a
# batch) loses its peer half-way through the handshake, as when Ctrl-C stops the main process
# while it fetches a batch: the client waits for the server's challenge and closes without reading
# it, so that the server's next read is a connection reset.
_PEER_GOES_AWAY = """
import os, select, socket, sys
from multiprocessing import resource_sharer
from rcdet.data.datasets import leave_interrupts_to_the_main_process
if sys.argv[1] == "worker":
    leave_interrupts_to_the_main_process()
read_end, _ = os.pipe()
address, _ = resource_sharer.DupFd(read_end)._id
client = socket.socket(socket.AF_UNIX)
client.connect(address)
select.select([client], [], [], 30)
client.close()
resource_sharer.stop(timeout=30)
if sys.argv[1] == "worker":
    sys.excepthook(ValueError, ValueError("still reported"), None)
"""


@pytest.mark.parametrize("process", ["plain", "worker"])
def test_worker_is_quiet_when_the_main_process_goes_away(process):
    result = subprocess.run(
        [sys.executable, "-c", _PEER_GOES_AWAY, process],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    if process == "plain":  # what the worker would print without it
        assert "Traceback" in result.stderr and "ConnectionResetError" in result.stderr
    else:
        assert "Traceback" not in result.stderr and "Error" not in result.stderr.replace(
            "ValueError: still reported", ""
        )
        assert "ValueError: still reported" in result.stderr


class _MappedWithWorkerState(torch.utils.data.Dataset):
    """Maps one record with the training mapper, then reports the worker's SIGINT handler and
    excepthook (the state the mapper leaves in the process it runs in)."""

    def __init__(self, mapper, record):
        self.mapper, self.record = mapper, record

    def __len__(self):
        return 1

    def __getitem__(self, index):
        self.mapper(dict(self.record))
        return signal.getsignal(signal.SIGINT) == signal.SIG_IGN, sys.excepthook.__qualname__


def test_the_training_mapper_leaves_interrupts_to_the_main_process_in_a_worker(tiny_shapes):
    from conftest import tiny_cfg

    from rcdet.data.datasets import CheckedDatasetMapper

    mapper = CheckedDatasetMapper(tiny_cfg(), True)
    record = DatasetCatalog.get("rcdet_shapes_trainval")[0]
    data = _MappedWithWorkerState(mapper, record)
    loader = torch.utils.data.DataLoader(data, num_workers=1, collate_fn=lambda batch: batch[0])
    ignores_sigint, hook = next(iter(loader))
    assert ignores_sigint and hook.startswith("leave_interrupts_to_the_main_process")
    # In the main process the mapper changes neither (a test run in the background of a
    # non-interactive shell may have SIGINT ignored from the start).
    before = signal.getsignal(signal.SIGINT)
    assert data[0] == (before == signal.SIG_IGN, sys.excepthook.__qualname__)
    assert signal.getsignal(signal.SIGINT) == before
