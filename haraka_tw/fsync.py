"""Making a file's name durable: after a file is created, renamed or linked in a directory,
the directory itself must be fsynced before the name survives a crash."""

from __future__ import annotations

import os

__all__ = ["fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the directory at ``path`` (blocking: run it in a thread).

    @raise OSError: when the directory cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
