"""One dataset root, one answer: `make data`, the tools and their error messages resolve the
built-in dataset's root in the same order ($RCDET_SHAPES_ROOT, $DETECTRON2_DATASETS, datasets/)."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from rcdet.data.shapes import default_root

ENVS = [
    {},
    {"DETECTRON2_DATASETS": "/data/d2"},
    {"DETECTRON2_DATASETS": "/data/d2", "RCDET_SHAPES_ROOT": "/data/shapes"},
    {"RCDET_SHAPES_ROOT": "/data/shapes"},
    {"DETECTRON2_DATASETS": ""},
]


def _env(variables):
    env = {k: v for k, v in os.environ.items() if k not in ("RCDET_SHAPES_ROOT", "DETECTRON2_DATASETS")}
    env.update(variables)
    return env


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("variables", ENVS, ids=lambda v: "+".join(f"{k}={v[k]}" for k in sorted(v)) or "unset")
def test_make_data_writes_where_the_tools_look(monkeypatch, variables):
    for key in ("RCDET_SHAPES_ROOT", "DETECTRON2_DATASETS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    root = default_root()
    # -n prints the recipe without running it (or the setup it depends on).
    proc = subprocess.run(["make", "-n", "--no-print-directory", "data"], cwd=REPO, env=_env(variables),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"generate_shapes.py --out {root};" in proc.stdout
    assert f"[ -f {root}/ImageSets/Main/test.txt ]" in proc.stdout


def test_missing_root_error_names_the_resolved_folder_and_make_data(tmp_path):
    d2 = tmp_path / "d2"
    d2.mkdir()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", "configs/shapes_rince.yaml"],
        cwd=REPO, env=_env({"DETECTRON2_DATASETS": str(d2)}), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert f"{d2 / 'rcdet_shapes'} does not exist" in line
    assert "`make data`" in line and "$DETECTRON2_DATASETS/rcdet_shapes" in line
