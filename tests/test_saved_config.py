"""
The config that training saves (OUTPUT_DIR/config.yaml) is reusable. For a held-out run it
names the derived splits, which a new process has not registered: the derivation must recognise
them and register them again instead of deriving from them a second time.
"""

import os
import stat
import subprocess
import sys

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import REPO, tiny_cfg
from rcdet.config import ConfigError

TRAIN_SPLIT = "rcdet_shapes_trainval__minus_ring+triangle_drop_images"
TEST_SPLIT = "rcdet_shapes_test__minus_ring+triangle_ood_test"
TINY = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
        "MODEL.RCDET.QUEUE_SIZE", "64"]


def run_tool(tool, *argv, shapes_root):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", tool), *argv],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, RCDET_SHAPES_ROOT=shapes_root),
        preexec_fn=lambda: os.umask(0o022),
    )


def _forget(*names):
    """What a new process sees: only the base splits are registered."""
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_derived_split_names_are_registered_again(tiny_shapes):
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml")
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == ((TRAIN_SPLIT,), (TEST_SPLIT,))
    expected = {name: DatasetCatalog.get(name) for name in (TRAIN_SPLIT, TEST_SPLIT)}
    _forget(TRAIN_SPLIT, TEST_SPLIT)

    again = tiny_cfg("configs/shapes_rince_ood.yaml", "DATASETS.TRAIN", f"('{TRAIN_SPLIT}',)",
                     "DATASETS.TEST", f"('{TEST_SPLIT}',)")
    assert (again.DATASETS.TRAIN, again.DATASETS.TEST) == ((TRAIN_SPLIT,), (TEST_SPLIT,))
    for name in (TRAIN_SPLIT, TEST_SPLIT):
        assert DatasetCatalog.get(name) == expected[name]
        meta = MetadataCatalog.get(name)
        assert meta.held_out_classes == ["ring", "triangle"] and len(meta.thing_classes) == 7
        assert meta.base_dataset in ("rcdet_shapes_trainval", "rcdet_shapes_test")
    assert any(d["ood_annotations"] for d in expected[TEST_SPLIT])


def test_derived_split_that_contradicts_the_held_out_classes_is_an_error(tiny_shapes):
    other = "rcdet_shapes_trainval__minus_disc_drop_images"
    with pytest.raises(ConfigError) as e:
        tiny_cfg("configs/shapes_rince_ood.yaml", "DATASETS.TRAIN", f"('{other}',)")
    msg = str(e.value)
    assert f"DATASETS.TRAIN '{other}'" in msg and "MODEL.RCDET.OOD.HELD_OUT_CLASSES" in msg
    assert "'rcdet_shapes_trainval'" in msg


def test_derived_split_of_an_unregistered_base_is_an_error(tiny_shapes):
    with pytest.raises(ConfigError, match="'rcdet_shapes_nope' is not a registered dataset"):
        tiny_cfg("configs/shapes_rince_ood.yaml", "DATASETS.TRAIN", "('rcdet_shapes_nope__minus_ring+triangle_drop_images',)")


@pytest.fixture(scope="module")
def held_out_run(tiny_shapes, tmp_path_factory):
    """2 iterations of the held-out demo config through tools/train_net.py, which saves config.yaml."""
    out = tmp_path_factory.mktemp("held_out_run")
    proc = run_tool("train_net.py", "--config-file", "configs/shapes_rince_ood.yaml", *TINY, "OUTPUT_DIR", str(out),
                    shapes_root=tiny_shapes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "config.yaml") as f:
        saved = f.read()
    assert TRAIN_SPLIT in saved and TEST_SPLIT in saved
    return out


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_train_net_eval_only_with_the_saved_config(held_out_run, tiny_shapes):
    proc = run_tool("train_net.py", "--config-file", str(held_out_run / "config.yaml"), "--eval-only",
                    "MODEL.WEIGHTS", str(held_out_run / "model_final.pth"), "OUTPUT_DIR", str(held_out_run / "eval"),
                    shapes_root=tiny_shapes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copypaste: AP,AP50,AP75" in proc.stdout


def test_benchmark_ood_with_the_saved_config_writes_readable_reports(held_out_run, tiny_shapes):
    out = held_out_run / "ood"
    proc = run_tool("benchmark_ood.py", "--config-file", str(held_out_run / "config.yaml"), "--output", str(out),
                    "MODEL.WEIGHTS", str(held_out_run / "model_final.pth"), shapes_root=tiny_shapes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Report:" in proc.stdout
    # Under umask 022 every report, plot and the statistics cache is 0644, not mkstemp's 0600.
    written = [out / name for name in os.listdir(out)] + list(held_out_run.glob("ood_stats_*.npz"))
    assert {p.name for p in written} >= {"ood_report.json", "ood_report.csv", "roc.png", "ood_scores.npz"}
    assert any(p.name.startswith("ood_stats_") for p in written)
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(0o644) for p in written}


def test_analyze_embeddings_with_the_saved_config(held_out_run, tiny_shapes):
    out = held_out_run / "analysis"
    proc = run_tool("analyze_embeddings.py", "--config-file", str(held_out_run / "config.yaml"), "--output", str(out),
                    "--no-tsne", "MODEL.WEIGHTS", str(held_out_run / "model_final.pth"), shapes_root=tiny_shapes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "analysis.json").is_file() and _mode(out / "analysis.json") == 0o644
