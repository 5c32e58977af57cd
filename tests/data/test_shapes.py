"""
rcdet.data.shapes: the generator is deterministic and writes valid VOC files. One dataset root,
one answer: `make data`, the tools and their error messages resolve the built-in dataset's root
in the same order ($RCDET_SHAPES_ROOT, $DETECTRON2_DATASETS, datasets/).
"""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import REPO, TINY_SIZES

from rcdet.data.shapes import CLASS_NAMES, FAMILIES, default_root, generate


def _read_tree(root):
    out = {}
    for sub in ("Annotations", os.path.join("ImageSets", "Main")):
        for name in sorted(os.listdir(os.path.join(root, sub))):
            with open(os.path.join(root, sub, name), "rb") as f:
                out[os.path.join(sub, name)] = f.read()
    return out


def test_generator_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    generate(a, seed=7, split_sizes={"train": 5, "val": 2, "test": 3}, workers=1)
    generate(b, seed=7, split_sizes={"train": 5, "val": 2, "test": 3}, workers=2)
    generate(c, seed=8, split_sizes={"train": 5, "val": 2, "test": 3}, workers=1)
    assert _read_tree(a) == _read_tree(b)
    assert _read_tree(a) != _read_tree(c)


def test_families_define_at_least_nine_classes_in_three_families():
    assert len(FAMILIES) >= 3 and len(CLASS_NAMES) >= 9
    assert all(len(m) >= 2 for m in FAMILIES.values())


def test_voc_files_are_valid(tiny_shapes):
    ids = {}
    for split in ("train", "val", "trainval", "test"):
        with open(os.path.join(tiny_shapes, "ImageSets", "Main", f"{split}.txt")) as f:
            ids[split] = f.read().split()
    assert len(ids["train"]) == TINY_SIZES["train"] and len(ids["test"]) == TINY_SIZES["test"]
    assert ids["trainval"] == ids["train"] + ids["val"]
    assert not set(ids["trainval"]) & set(ids["test"])
    for fileid in ids["trainval"] + ids["test"]:
        tree = ET.parse(os.path.join(tiny_shapes, "Annotations", f"{fileid}.xml"))
        w, h = int(tree.find("size/width").text), int(tree.find("size/height").text)
        assert 256 <= w <= 320 and 256 <= h <= 320
        assert os.path.isfile(os.path.join(tiny_shapes, "JPEGImages", f"{fileid}.jpg"))
        objects = tree.findall("object")
        assert 1 <= len(objects) <= 6
        for obj in objects:
            assert obj.find("name").text in CLASS_NAMES
            assert obj.find("difficult").text == "0"
            x0, y0, x1, y1 = (
                int(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax")
            )
            assert 1 <= x0 < x1 <= w and 1 <= y0 < y1 <= h


# ---------------------------------------------------------------- the dataset root

ENVS = [
    {},
    {"DETECTRON2_DATASETS": "/data/d2"},
    {"DETECTRON2_DATASETS": "/data/d2", "RCDET_SHAPES_ROOT": "/data/shapes"},
    {"RCDET_SHAPES_ROOT": "/data/shapes"},
    {"DETECTRON2_DATASETS": ""},
]


def _env(variables):
    env = {
        k: v for k, v in os.environ.items() if k not in ("RCDET_SHAPES_ROOT", "DETECTRON2_DATASETS")
    }
    env.update(variables)
    return env


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    "variables", ENVS, ids=lambda v: "+".join(f"{k}={v[k]}" for k in sorted(v)) or "unset"
)
def test_make_data_writes_where_the_tools_look(monkeypatch, variables):
    for key in ("RCDET_SHAPES_ROOT", "DETECTRON2_DATASETS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    root = default_root()
    # -n prints the recipe without running it (or the setup it depends on).
    proc = subprocess.run(
        ["make", "-n", "--no-print-directory", "data"],
        cwd=REPO,
        env=_env(variables),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"generate_shapes.py --out {root};" in proc.stdout
    assert f"[ -f {root}/ImageSets/Main/test.txt ]" in proc.stdout


def test_missing_root_error_names_the_resolved_folder_and_make_data(tmp_path):
    d2 = tmp_path / "d2"
    d2.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "train_net.py"),
            "--config-file",
            "configs/shapes_rince.yaml",
        ],
        cwd=REPO,
        env=_env({"DETECTRON2_DATASETS": str(d2)}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert f"{d2 / 'rcdet_shapes'} does not exist" in line
    assert "`make data`" in line and "$DETECTRON2_DATASETS/rcdet_shapes" in line
