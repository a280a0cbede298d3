"""Atomic file writes: a crash never leaves a half-written result or checkpoint behind."""
from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

try:
    import fcntl
except ImportError:  # not on Unix: snapshots are plain copies
    fcntl = None

FICLONE = 0x40049409  # Linux ioctl: make dst a copy-on-write clone of src


def atomic_write(path: os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _clone(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``: a copy-on-write clone where the file system has them, else a full copy.

    Never a hard link: a file damaged in place (a full disk, a crashed copy) must not damage its snapshots.
    """
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            if fcntl is not None:
                fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())  # btrfs, XFS, ...: blocks shared until changed
                return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def atomic_copy(src: os.PathLike, dst: os.PathLike) -> Path:
    """Put an independent snapshot of ``src`` at ``dst`` atomically (a clone where cheap, else a copy)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        _clone(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def atomic_write_text(path: os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_csv(path: os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write dict rows as CSV atomically; the columns are the union of the rows' keys, in order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
