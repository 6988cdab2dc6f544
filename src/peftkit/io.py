"""Atomic file and folder writes: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside `path` for a writer that opens files itself; on success it is
    fsynced and renamed over `path`, on error it vanishes.

    Example:
        >>> with atomic_file("model.gguf") as tmp:
        ...     writer = GGUFWriter(tmp, "llama")  # ... writes and closes tmp
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _fsync_tree(root: Path) -> None:
    """fsync every file (and give it normal permissions: safetensors writes files 0600)."""
    mode = 0o666 & ~_umask()
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(dirpath) / name, mode)
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` whole, on error it vanishes.

    A reader never sees a half-written folder: either the old one or the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = _old_name(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_interrupted_writes(folder: str | Path, names: Iterable[str] | None = None) -> None:
    """Tidy what killed atomic writes left in `folder` (only for these `names`; None: any): temp files
    and folders go, and a folder caught between its two renames (gone, `.NAME.old` present) comes back.
    """
    folder, wanted = Path(folder), None if names is None else set(names)
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.tmp"):  # `.NAME.<random>.tmp`
        if wanted is None or tmp.name[1 : -len(".tmp")].rsplit(".", 1)[0] in wanted:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    for old in folder.glob(".*.old"):
        target = old.with_name(old.name[1 : -len(".old")])
        if wanted is not None and target.name not in wanted:
            continue
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)
    _fsync_dir(folder)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc`, or an error that led to it, is a full disk or an exceeded quota.

    Measured on a full tmpfs: `open().write` raises OSError(ENOSPC); `torch.save` into a Python file
    raises a RuntimeError whose `__context__` is that OSError; safetensors raises SafetensorError
    with "No space left on device (os error 28)" in its message.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(os.strerror(code) in str(current) for code in DISK_FULL_ERRNOS):
            return True
        current = current.__cause__ or current.__context__
    return False
