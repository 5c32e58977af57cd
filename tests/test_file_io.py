"""rcdet.file_io: atomic writes get the umask's mode and never leave a partial or temporary file."""

import contextlib
import json
import os
import stat

import numpy as np
import pytest

from rcdet import file_io
from rcdet.file_io import atomic_write, save_figure_atomic, save_npz_atomic, write_json_atomic


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, mask, mode):
    with umask(mask):
        write_json_atomic(str(tmp_path / "metrics.json"), {"AP": 1.0})
        save_npz_atomic(str(tmp_path / "stats.npz"), a=np.arange(3))
        atomic_write(str(tmp_path / "ood_report.csv"), b"name,auroc\n")
        # Replacing an existing file gives the new one the umask's mode too.
        write_json_atomic(str(tmp_path / "metrics.json"), {"AP": 2.0})
    for name in ("metrics.json", "stats.npz", "ood_report.csv"):
        assert _mode(tmp_path / name) == mode, name


def test_umask_is_left_unchanged(tmp_path):
    with umask(0o027):
        write_json_atomic(str(tmp_path / "a.json"), [])
        assert os.umask(0o027) == 0o027


def test_interrupt_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ood_report.json"
    write_json_atomic(str(path), {"version": 1})

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(file_io.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(str(path), {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["ood_report.json"]


def test_interrupt_during_the_write_leaves_no_file(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class InterruptedFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def write(self, data):
            self.f.write(data[: len(data) // 2])  # half of it reached the disk
            raise KeyboardInterrupt

    monkeypatch.setattr(
        file_io.os, "fdopen", lambda fd, mode: InterruptedFile(real_fdopen(fd, mode))
    )
    with pytest.raises(KeyboardInterrupt):
        save_npz_atomic(str(tmp_path / "ood_stats.npz"), a=np.arange(1000))
    assert os.listdir(tmp_path) == []


def test_figures_are_saved_whole_in_the_format_of_their_extension(tmp_path, monkeypatch):
    import matplotlib.figure

    fig = matplotlib.figure.Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [0, 1])
    save_figure_atomic(str(tmp_path / "roc.png"), fig, dpi=50)
    save_figure_atomic(str(tmp_path / "roc.pdf"), fig)
    assert (tmp_path / "roc.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "roc.pdf").read_bytes().startswith(b"%PDF")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # Interrupted while rendering: the previous figure stays, no temporary file is left.
    before = (tmp_path / "roc.png").read_bytes()
    monkeypatch.setattr(fig, "savefig", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_figure_atomic(str(tmp_path / "roc.png"), fig)
    assert (tmp_path / "roc.png").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["roc.pdf", "roc.png"]
