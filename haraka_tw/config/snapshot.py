"""What a config file looked like when it was read, and whether it still does.

A snapshot keeps the file's identity (inode, size, mtime, ctime) and a digest of its
bytes; a missing file is a snapshot too, so a file that appears later counts as a change.
Comparing stat results alone misses an edit that lands in the same clock tick as the read
and keeps the size (git's "racily clean" problem), so for a file modified within
:data:`RACY_WINDOW_NS` of being read, an unchanged stat is confirmed by re-reading it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from haraka_tw.config.errors import ConfigError

__all__ = ["RACY_WINDOW_NS", "FileSnapshot", "SnapshotReader", "check_snapshot", "stat_signature"]

RACY_WINDOW_NS = 2_000_000_000

Signature = tuple[int, int, int, int]


@dataclass(frozen=True)
class FileSnapshot:
    """One file's state at a read: ``signature`` and ``digest`` are None if it was missing."""

    signature: Signature | None
    digest: bytes | None
    racy: bool


_MISSING = FileSnapshot(None, None, racy=False)


def _signature(result: os.stat_result) -> Signature:
    return (result.st_ino, result.st_size, result.st_mtime_ns, result.st_ctime_ns)


def _is_racy(signature: Signature) -> bool:
    return signature[2] + RACY_WINDOW_NS >= time.time_ns()


def stat_signature(path: Path) -> Signature | None:
    """The file's current signature, or None if it is not a readable regular file."""
    try:
        result = path.stat()
    except OSError:
        return None
    return _signature(result) if _is_regular(result) else None


def _is_regular(result: os.stat_result) -> bool:
    return stat.S_ISREG(result.st_mode)


def _read(path: Path) -> tuple[FileSnapshot, bytes | None]:
    try:
        # Non-blocking, so a FIFO where a file should be cannot hang the reader.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as stream:
            result = os.fstat(stream.fileno())
            if not _is_regular(result):  # (a directory, a FIFO) in a file's place: a mistake
                kind = "a directory" if stat.S_ISDIR(result.st_mode) else "not a regular file"
                raise ConfigError(str(path), None, f"cannot read: {kind}")
            content = stream.read()
    except FileNotFoundError:
        if os.path.islink(path):  # (a link whose target is gone is no missing file)
            target = os.readlink(path)
            raise ConfigError(
                str(path), None, f"a link to {target}, which does not exist"
            ) from None
        return _MISSING, None
    except NotADirectoryError:  # (a file where a directory on the way should be)
        return _MISSING, None
    except PermissionError as error:
        parent = path.parent
        if not os.access(parent, os.X_OK):  # (the directory is at fault, not this name in it)
            raise ConfigError(
                str(parent), None, "cannot read the directory: permission denied"
            ) from None
        raise ConfigError(str(path), None, f"cannot read: {error.strerror or error}") from None
    except OSError as error:
        raise ConfigError(str(path), None, f"cannot read: {error.strerror or error}") from None
    signature = _signature(result)
    digest = hashlib.blake2b(content, digest_size=16).digest()
    return FileSnapshot(signature, digest, _is_racy(signature)), content


def check_snapshot(path: Path, snapshot: FileSnapshot) -> FileSnapshot | None:
    """None if ``path`` changed since ``snapshot``; else a snapshot to keep in its place.

    The returned snapshot may differ from the one given: a racy file that has since aged
    out of the window stops being re-read on every check.
    """
    signature = stat_signature(path)
    if signature != snapshot.signature:
        return None
    if not snapshot.racy:
        return snapshot
    try:
        fresh, _ = _read(path)
    except ConfigError:
        return None
    return fresh if fresh.digest == snapshot.digest else None


class SnapshotReader:
    """Reads files for one load and keeps a snapshot of every path it looked at, and the
    warnings its parsers had about them (``path:line: message``, for the caller to log)."""

    def __init__(self) -> None:
        self.snapshots: dict[Path, FileSnapshot] = {}
        self.warnings: list[tuple[Path, str]] = []

    def read(self, path: Path) -> bytes | None:
        """The file's bytes, or None if it does not exist; raises :class:`ConfigError`."""
        try:
            snapshot, content = _read(path)
        except ConfigError:
            # Remember the unreadable state too, so it is reported once, not on every check.
            self.snapshots[path] = FileSnapshot(stat_signature(path), None, racy=False)
            raise
        self.snapshots[path] = snapshot
        return content
