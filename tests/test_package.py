import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def test_import_without_detectron2_says_how_to_install_it():
    code = "import sys; sys.modules['detectron2'] = None; import rcdet"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert "ImportError: rcdet needs detectron2" in proc.stderr
    assert "sal-detectron2==0.7.2" in proc.stderr and "make setup" in proc.stderr


def test_loss_core_has_no_detectron2_import():
    import re

    for path in (
        "modeling/rince.py",
        "testing/rince_reference.py",
        "modeling/memory_queue.py",
        "modeling/contrastive_memory.py",
        "distributed.py",
        "ranking.py",
    ):
        with open(os.path.join(REPO, "rcdet", path)) as f:
            assert not re.search(r"^\s*(from|import)\s+detectron2", f.read(), re.M), path


def test_setup_py_does_not_require_detectron2():
    with open(os.path.join(REPO, "setup.py")) as f:
        text = f.read()
    requires = text[text.index("install_requires") : text.index("extras_require")]
    assert "detectron2" not in requires and "torch" not in requires


def test_detectron2_model_zoo_and_testing_import():
    """Both import pkg_resources, which only the pinned setuptools still ships without a warning."""
    code = (
        "from detectron2 import model_zoo; import detectron2.utils.testing; "
        "print(model_zoo.get_config_file('COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml'))"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(proc.stdout.strip())


LINT_PATHS = ["rcdet", "tools", "tests", "datasets/generate_shapes.py", "setup.py"]


@pytest.mark.parametrize(
    "tool, args",
    [
        ("black", ["--check", "--quiet"]),
        ("isort", ["--check-only", "--quiet"]),
        ("ruff", ["check"]),
    ],
)
def test_tree_is_formatted_and_lint_clean(tool, args):
    """What `make lint` checks, with the settings of pyproject.toml and setup.cfg."""
    binary = shutil.which(tool, path=os.path.dirname(sys.executable))
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed next to {sys.executable}; run `make setup`.")
        pytest.skip(f"{tool} is not installed in this environment (requirements.txt pins it)")
    proc = subprocess.run([binary, *args, *LINT_PATHS], capture_output=True, text=True, cwd=REPO)
    assert (
        proc.returncode == 0
    ), f"{tool} {' '.join(args)}: run `make format`.\n{proc.stdout}{proc.stderr}"
