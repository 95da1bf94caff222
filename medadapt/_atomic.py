"""Atomic file output: write beside the target under a temporary name, flush to disk, rename over it.

A reader (or a crash) never sees half a file: the target holds either its old content or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_text", "image_format"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (by any library); on success it is flushed to disk
    and renamed to ``path``, on any exception removed. The temporary name ends in ``.tmp`` plus ``path``'s
    suffix; writers that pick a format from the extension need it given (``savefig(..., format=...)``) when
    ``path`` has none. The file gets ``mode`` less the umask (0o755 for a shared library)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def image_format(path: str | os.PathLike) -> str:
    """The picture format ``path``'s extension names (``"png"`` without one), for ``savefig(format=...)``."""
    return Path(path).suffix[1:].lower() or "png"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_output`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_file(path: str) -> None:
    """Flush ``path`` to disk (opened for writing: Windows' flush needs write access)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable where a directory can be opened (POSIX); elsewhere a no-op."""
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
