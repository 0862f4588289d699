"""Atomic file writes: what a user asked fastseq to write is never left half-written.

The bottom layer of fastseq's file output: :mod:`fastseq.data`, :mod:`fastseq.training`
and :mod:`fastseq.seq2seq` write through it. It imports nothing from fastseq.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Union


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import (os.umask is process-wide)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike]) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on success it is
    flushed, fsynced and renamed over ``path`` (``os.replace``), and the directory
    fsynced; on error it is removed. A crash (or SIGKILL) mid-write leaves any
    previous file at ``path`` intact, plus at most one stale ``.{name}.*.tmp``
    file, which :func:`remove_stale_tmp` deletes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_stale_tmp(path: Union[str, os.PathLike]) -> int:
    """Delete temporary files that an interrupted :func:`atomic_write` (or
    :func:`link_atomic`) of ``path`` left behind -- of every file in ``path``
    when it is a directory; returns how many. Call it only when no other
    process is writing there."""
    path = Path(path)
    if path.is_dir():
        pattern, where = ".*.tmp", path
    else:
        pattern, where = _tmp_prefix(path) + "*.tmp", path.parent
    if not where.is_dir():
        return 0
    n = 0
    for tmp in where.glob(pattern):
        try:
            tmp.unlink()
            n += 1
        except OSError:
            pass
    return n


def link_atomic(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> None:
    """Make ``dst`` name the same file as ``src`` (a hard link; a copy where links
    are not supported), replacing any previous ``dst`` atomically. No temporary
    file is left behind, also when ``dst`` already is a link to ``src``."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    # rename(2) does nothing when tmp and dst already are links to the same file.
    if tmp.exists():
        tmp.unlink()
