"""Writes that never leave half a file: a crash mid-write keeps the previous file, or none.

Reports, caches and run markers are read back by resumable tools (the OOD statistics cache,
tools/compare_methods.py), so a truncated file would be taken for a finished one.
"""

import io
import json
import os
import tempfile

import numpy as np

__all__ = ["atomic_write", "write_json_atomic", "save_npz_atomic", "save_figure_atomic"]


def _current_umask() -> int:
    # os.umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file 0600; reports and caches must be as readable as any
            # file open() would create, so give it the mode the umask allows.
            os.fchmod(f.fileno(), 0o666 & ~_current_umask())
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, data) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def save_npz_atomic(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def save_figure_atomic(path: str, fig, **savefig_kwargs) -> None:
    """Save a matplotlib figure in the format its extension names; the figure stays open."""
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(path)[1][1:] or "png", **savefig_kwargs)
    atomic_write(path, buf.getvalue())
