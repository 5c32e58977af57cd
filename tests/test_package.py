import os
import subprocess
import sys

from conftest import REPO


def test_import_without_detectron2_says_how_to_install_it():
    code = "import sys; sys.modules['detectron2'] = None; import rcdet"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert "ImportError: rcdet needs detectron2" in proc.stderr
    assert "sal-detectron2==0.7.2" in proc.stderr and "make setup" in proc.stderr


def test_loss_core_has_no_detectron2_import():
    import re

    for path in ("modeling/rince.py", "modeling/rince_reference.py", "modeling/memory_queue.py", "modeling/contrastive_memory.py", "distributed.py", "ranking.py"):
        with open(os.path.join(REPO, "rcdet", path)) as f:
            assert not re.search(r"^\s*(from|import)\s+detectron2", f.read(), re.M), path


def test_setup_py_does_not_require_detectron2():
    with open(os.path.join(REPO, "setup.py")) as f:
        text = f.read()
    requires = text[text.index("install_requires") : text.index("extras_require")]
    assert "detectron2" not in requires and "torch" not in requires
