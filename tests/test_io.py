"""Atomic writes: a failed write leaves the previous folder intact; files get normal permissions."""

from __future__ import annotations

import os
import stat

import pytest

from peftkit.io import atomic_dir, atomic_write_text


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half-written")
            raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temp folder is left behind"


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "a") as tmp:
            fd = os.open(tmp / "private", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors' writer does
            os.close(fd)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    for path in (tmp_path / "a" / "private", tmp_path / "b.txt", tmp_path / "a"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & stat.S_IROTH, f"{path} is not readable by others: {oct(mode)}"
