"""The queue directory, read and changed synchronously: L{QueueStore}.

The queue directory::

    <name>                 queue files (L{haraka_tw.outbound.qfile}); Haraka's are adopted
    error.<name>           files that could not be read, set aside (never deleted)
    tmp/                   files being written; what is left here at start is removed
    trash/                 files of delivered messages, waiting to be unlinked (removed at
                           start too)
    state/<id>.json        per-file delivery history (see below), written atomically
    control/*.json         requests from C{haraka-tw queue} for the running server
    .lock                  flock held by the running server (it holds the pid)
    .lock.<i>              with smtp.ini nodes: flock held by the worker delivering
                           partition <i> (L{haraka_tw.outbound.partition})

A queue file appears under its name only complete: it is written in tmp/, fsynced,
renamed in, and the directory fsynced before the caller hears of it. After that the file
is never rewritten: a retry renames it (new next attempt and failure count in the name),
and the history of failures lives in a small sidecar, C{state/<id>.json}, keyed by the
part of the name that a retry does not change (L{QueueName.id}). The name is the
authority on when and how many; the sidecar holds ``history`` (time, attempt, error of
each failure, the last 50) and ``dsn_delayed_sent``. A sidecar without its queue file (a
crash between the two) is removed by L{QueueStore.scan}.

A store given a L{Partition} (a worker's, with smtp.ini nodes) sees only that partition's
files: it lists, scans, cleans up after, finds and locks those alone, and names the files it
writes so that they fall in it. Without one (a single process, the tools) it sees them all.

The C{haraka-tw queue} tools use it directly; the server runs it in a thread pool through
L{FileQueue<haraka_tw.outbound.queue.FileQueue>}.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from haraka_tw.fsync import fsync_dir
from haraka_tw.outbound.entry import (
    HISTORY_KEPT,
    Attempt,
    Control,
    Listing,
    QueueEntry,
    QueueEntryMissing,
)
from haraka_tw.outbound.partition import Partition
from haraka_tw.outbound.qfile import (
    QueueFileError,
    QueueName,
    QueueRecipient,
    Todo,
    message_reader,
    open_queue_file,
    read_todo,
    read_todo_from,
    write_queue_file,
)

__all__ = ["QueueStore"]

_logger = Logger(namespace="haraka_tw.outbound.queue")
_ACTION = re.compile(r"[a-z][a-z_]{0,30}\Z")
_HARAKA_TMP = "__tmp__."


def _log_to_twisted(message: str) -> None:
    _logger.warn("{message}", message=message)


def _unique(prefix: str = "") -> str:
    tag = "".join(random.choices(string.ascii_letters + string.digits, k=8))
    return f"{prefix}{time.time_ns()}.{os.getpid()}.{threading.get_ident()}.{tag}"


class QueueStore:
    """A queue directory, read and changed synchronously (run it in a thread).

    @param now: the clock for new names and history (epoch seconds).
    @param fsync: sync files and directories (turn off only for throwaway tests).
    @param log: receives one line per noteworthy event (set-aside files, clean-ups).
    @param partition: the part of the queue this store is for (a worker's); None: all of it.
    """

    def __init__(
        self,
        queue_dir: str | os.PathLike[str],
        *,
        now: Callable[[], float] = time.time,
        fsync: bool = True,
        hostname: str | None = None,
        log: Callable[[str], None] | None = None,
        partition: Partition | None = None,
    ) -> None:
        self.dir = Path(queue_dir)
        self.tmp = self.dir / "tmp"
        self.trash = self.dir / "trash"
        self.state = self.dir / "state"
        self.control = self.dir / "control"
        self.now = now
        self.fsync = fsync
        self.hostname = hostname
        self.log = log or _log_to_twisted
        self.partition = partition
        self._lock_fd: int | None = None
        # Marks this store's own temporary files: scan() must never remove a file that is
        # being written right now (a message arriving while the queue is scanned at start).
        self.token = "".join(random.choices(string.ascii_letters + string.digits, k=12))

    # -- helpers ---------------------------------------------------------------------

    def ensure_dirs(self) -> None:
        """Make the queue directory and its subdirectories (mode 0700) if missing."""
        for d in (self.dir, self.tmp, self.state, self.control):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def owns(self, filename: str) -> bool:
        """Whether a queue file name (or C{error.}, Haraka's C{__tmp__.} name) is this
        store's to act on: always without a partition; else if its id falls in the
        partition. A name that is no queue name is partition 0's, so that one worker
        reports it."""
        if self.partition is None:
            return True
        for prefix in ("error.", _HARAKA_TMP):
            filename = filename.removeprefix(prefix)
        entry_id = _id_of(filename)
        if entry_id is None:
            return self.partition.index == 0
        return self.partition.owns(entry_id)

    def _new_name(self, arrival: float, next_attempt: float, attempts: int = 0) -> QueueName:
        """A fresh name in this store's partition (drawn again until it falls in it)."""
        while True:
            name = QueueName.new(arrival, next_attempt, attempts, hostname=self.hostname)
            if self.partition is None or self.partition.owns(name.id):
                return name

    def _owns_temporary(self, filename: str) -> bool:
        """Whether a file left in tmp/ is this store's to remove: always without a
        partition; else a queue file or sidecar of the partition. (A tmp name is the final
        name, then the writer's token and four more dotted parts: L{_write_durably}.)"""
        if self.partition is None:
            return True
        final = filename.rsplit(".", 5)[0]
        entry_id = _id_of(final) or final.removesuffix(".json")
        return _is_entry_id(entry_id) and self.partition.owns(entry_id)

    def _sync_dir(self, path: Path) -> None:
        if self.fsync:
            fsync_dir(path)

    def _write_durably(self, final: Path, write: Callable[[int], None]) -> None:
        """Write a file via tmp/: write(fd), fsync, rename to C{final}, fsync its dir."""
        self.ensure_dirs()
        tmp = self.tmp / _unique(f"{final.name}.{self.token}.")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                write(fd)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._sync_dir(final.parent)

    def _write_queue_file(self, name: QueueName, todo: Todo, chunks: Iterable[bytes]) -> QueueEntry:
        path = self.dir / name.format()

        def write(fd: int) -> None:
            with os.fdopen(fd, "wb", closefd=False) as f:
                write_queue_file(f, todo, chunks)

        self._write_durably(path, write)
        # Read back what is on disk: the entry is exactly what a later scan will see.
        read, offset = read_todo(path)
        return QueueEntry(name, path, read, path.stat().st_size, offset)

    def _state_path(self, entry_id: str) -> Path:
        return self.state / f"{entry_id}.json"

    def _read_state(self, entry_id: str) -> tuple[tuple[Attempt, ...], bool]:
        path = self._state_path(entry_id)
        try:
            data = json.loads(path.read_bytes())
            history = tuple(
                Attempt(float(a["time"]), int(a["attempt"]), str(a["error"]))
                for a in data.get("history", [])
            )
            return history, bool(data.get("dsn_delayed_sent", False))
        except FileNotFoundError:
            return (), False
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.log(f"outbound queue: ignoring unreadable state {path}: {e}")
            return (), False

    def _write_state(self, entry_id: str, history: Sequence[Attempt], dsn_sent: bool) -> None:
        data = {
            "history": [
                {"time": a.time, "attempt": a.attempt, "error": a.error}
                for a in history[-HISTORY_KEPT:]
            ],
            "dsn_delayed_sent": dsn_sent,
        }
        blob = json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape")
        self._write_durably(self._state_path(entry_id), lambda fd: _write_all(fd, blob))

    def _load(self, path: Path) -> QueueEntry:
        """Read one queue file and its sidecar. @raise QueueFileError: if unreadable."""
        name = QueueName.parse(path.name)
        f, size = open_queue_file(path)
        try:
            with f:
                todo, offset = read_todo_from(f, str(path), size)
        except OSError as e:
            raise QueueFileError(path, f"cannot read: {e.strerror or e}") from None
        history, dsn_sent = self._read_state(name.id)
        todo.dsn_delayed_sent = todo.dsn_delayed_sent or dsn_sent
        return QueueEntry(name, path, todo, size, offset, history)

    # -- operations ------------------------------------------------------------------

    def add(
        self, todo: Todo, message_chunks: Iterable[bytes], next_attempt: float | None = None
    ) -> QueueEntry:
        """See L{IOutboundQueue.add}."""
        if not todo.queue_time:
            todo.queue_time = self.now()
        name = self._new_name(todo.queue_time, self.now() if next_attempt is None else next_attempt)
        return self._write_queue_file(name, todo, message_chunks)

    def listing(self, skip: Callable[[str], bool] | None = None) -> Listing:
        """Read every queue file without changing anything (those whose id C{skip} says
        yes to are left unread and unlisted)."""
        out = Listing()
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return out
        for filename in names:
            path = self.dir / filename
            if filename.startswith(".") or not self.owns(filename):
                continue
            if filename.startswith("error."):
                out.set_aside.append(path)
                continue
            if filename.startswith(_HARAKA_TMP) or not path.is_file():
                continue
            if skip is not None and _skipped(filename, skip):
                continue
            try:
                out.entries.append(self._load(path))
            except QueueFileError as e:
                # Not a queue name (scan logs those), or removed while we looked: skip.
                if _is_queue_name(filename) and path.exists():
                    out.bad.append((path, e.reason))
        out.entries.sort(key=lambda e: (e.next_attempt, e.name.arrival, e.id))
        return out

    def scan(self) -> list[QueueEntry]:
        """See L{IOutboundQueue.scan}."""
        self.ensure_dirs()
        for leftover in sorted(self.tmp.iterdir()):
            if f".{self.token}." in leftover.name or not self._owns_temporary(leftover.name):
                continue  # ours, being written now; or another partition's
            self.log(f"outbound queue: removing unfinished temporary file {leftover.name}")
            leftover.unlink(missing_ok=True)
        self.trash.mkdir(mode=0o700, exist_ok=True)  # here, not for every file written
        for leftover in sorted(self.trash.iterdir()):
            if self.owns(leftover.name):
                leftover.unlink(missing_ok=True)  # delivered before a stop or a crash
        for path in sorted(self.dir.glob(_HARAKA_TMP + "*")):
            if self.owns(path.name):
                self.log(f"outbound queue: removing Haraka's unfinished file {path.name}")
                path.unlink(missing_ok=True)
        for filename in sorted(os.listdir(self.dir)):
            path = self.dir / filename
            skip = filename.startswith((".", "error.")) or not self.owns(filename)
            if not skip and path.is_file() and not _is_queue_name(filename):
                self.log(f"outbound queue: ignoring {filename}: not a queue file name")
        listing = self.listing()
        for path, why in listing.bad:
            target = path.with_name("error." + path.name)
            try:
                os.rename(path, target)
                self.log(f"outbound queue: set aside {path.name} as {target.name}: {why}")
            except OSError as e:
                self.log(f"outbound queue: cannot set aside {path.name} ({why}): {e}")
        if listing.bad:
            self._sync_dir(self.dir)
        kept = [p.name for p, _ in listing.bad] + [p.name[6:] for p in listing.set_aside]
        live = {e.id for e in listing.entries} | {_id_of(n) for n in kept}
        for sidecar in sorted(self.state.glob("*.json")):
            entry_id = sidecar.name[: -len(".json")]
            mine = self.partition is None or self.partition.owns(entry_id)
            if mine and entry_id not in live:
                sidecar.unlink(missing_ok=True)
        return listing.entries

    def find(self, ident: str) -> QueueEntry | None:
        """The entry whose id or file name is C{ident}, or None.

        @raise QueueFileError: if that file exists but cannot be read.
        """
        for path in self.dir.glob("*_*"):
            if path.name.startswith(("error.", ".", _HARAKA_TMP)) or not self.owns(path.name):
                continue
            if ident in (path.name, _id_of(path.name)):
                return self._load(path)
        return None

    def reschedule(
        self,
        entry: QueueEntry,
        next_attempt: float,
        attempts: int,
        last_error: str | None,
        dsn_delayed_sent: bool | None = None,
    ) -> QueueEntry:
        """See L{IOutboundQueue.reschedule}."""
        if not entry.path.exists():
            raise QueueEntryMissing(entry.filename)
        history = entry.history
        if last_error is not None:
            history = (*history, Attempt(self.now(), attempts, last_error))
        dsn_sent = entry.todo.dsn_delayed_sent if dsn_delayed_sent is None else dsn_delayed_sent
        if history != entry.history or dsn_sent != entry.todo.dsn_delayed_sent:
            self._write_state(entry.id, history, dsn_sent)
        name = entry.name.rescheduled(next_attempt, attempts)
        path = self.dir / name.format()
        if path != entry.path:
            try:
                os.rename(entry.path, path)
            except FileNotFoundError:
                raise QueueEntryMissing(entry.filename) from None
            self._sync_dir(self.dir)
        entry.todo.dsn_delayed_sent = dsn_sent
        return replace(entry, name=name, path=path, history=history[-HISTORY_KEPT:])

    def split(
        self,
        entry: QueueEntry,
        recipients: Sequence[QueueRecipient],
        next_attempt: float | None = None,
    ) -> QueueEntry:
        """See L{IOutboundQueue.split}."""
        if not recipients:
            raise ValueError("split needs at least one recipient")
        name = self._new_name(
            entry.name.arrival,
            entry.next_attempt if next_attempt is None else next_attempt,
            entry.attempts,
        )
        todo = replace(entry.todo, rcpt_to=list(recipients), message_size=None)
        if entry.history or todo.dsn_delayed_sent:
            self._write_state(name.id, entry.history, todo.dsn_delayed_sent)
        try:
            chunks = message_reader(entry.path, entry.message_offset, entry.message_size)
            new = self._write_queue_file(name, todo, chunks)
        except FileNotFoundError:
            self._state_path(name.id).unlink(missing_ok=True)
            raise QueueEntryMissing(entry.filename) from None
        return replace(new, history=entry.history)

    def remove(self, entry: QueueEntry) -> None:
        """See L{IOutboundQueue.remove}."""
        entry.path.unlink(missing_ok=True)
        self._sync_dir(self.dir)
        self._state_path(entry.id).unlink(missing_ok=True)

    def discard(self, entry: QueueEntry) -> Path | None:
        """Take an entry out of the queue at once: its file is renamed into trash/, to be
        unlinked later (L{empty_trash}). A rename frees no disk blocks, so it does not wait
        on the disk as an unlink can (a millisecond a file on a filesystem mounted with
        discard). Not fsynced: a discard lost in a crash brings the file back, and the
        message goes out again (a duplicate, never a loss; Haraka's unlink is not fsynced
        either). Returns the file's path in trash/, or None if it was gone already."""
        target = self.trash / entry.path.name
        try:
            os.rename(entry.path, target)
        except FileNotFoundError:
            if not entry.path.exists():
                return None
            self.trash.mkdir(mode=0o700, exist_ok=True)  # trash/ itself was missing
            os.rename(entry.path, target)
        return target

    def empty_trash(self, discarded: Sequence[tuple[Path | None, QueueEntry]]) -> None:
        """Unlink what L{discard} put in trash/, and those entries' sidecars; one that
        cannot be unlinked does not stop the others (a restart empties trash/).

        @raise OSError: naming how many were left and the first reason.
        """
        failed: list[str] = []
        for path, entry in discarded:
            try:
                if path is not None:
                    path.unlink(missing_ok=True)
                if entry.history or entry.todo.dsn_delayed_sent:  # else it has no sidecar
                    self._state_path(entry.id).unlink(missing_ok=True)
            except OSError as e:
                failed.append(f"{entry.id}: {e}")
        if failed:
            raise OSError(f"{len(failed)} left in trash/ until the next start ({failed[0]})")

    def load_message(self, entry: QueueEntry) -> Iterator[bytes]:
        """See L{IOutboundQueue.load_message}."""
        return message_reader(entry.path, entry.message_offset, entry.message_size)

    # -- the lock --------------------------------------------------------------------

    def lock(self) -> bool:
        """See L{IOutboundQueue.lock}: C{.lock}, or with a partition, the partition's
        C{.lock.<i>}. The lock file records the holder's pid."""
        if self._lock_fd is not None:
            return True
        self.ensure_dirs()
        name = ".lock" if self.partition is None else self.partition.lock_name
        fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        """See L{IOutboundQueue.unlock}."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # closing the descriptor releases the flock

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the lock, while held. A copy passed to another process
        (a worker) shares the lock: it is released when the last copy is closed."""
        return self._lock_fd

    def lock_holder(self) -> int | None:
        """The pid written by the last holder of the lock, if it says one."""
        try:
            text = (self.dir / ".lock").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    # -- control requests ------------------------------------------------------------

    def post_control(self, action: str, args: dict[str, Any]) -> Path:
        """See L{IOutboundQueue.post_control}; returns the control file's path."""
        if not _ACTION.match(action):
            raise ValueError(f"bad control action {action!r}")
        posted = self.now()
        # Named by the wall clock in nanoseconds, so that names sort in posting order.
        name = f"{time.time_ns():020d}-{_unique()[-8:]}-{action}.json"
        blob = json.dumps({"action": action, "args": args, "posted": posted}).encode()
        path = self.control / name
        self._write_durably(path, lambda fd: _write_all(fd, blob))
        return path

    def take_controls(self) -> list[Control]:
        """See L{IOutboundQueue.take_controls}."""
        try:
            names = sorted(n for n in os.listdir(self.control) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        out: list[Control] = []
        for filename in names:
            if filename.startswith("error."):
                continue
            path = self.control / filename
            try:
                data = json.loads(path.read_bytes())
                control = Control(
                    str(data["action"]), dict(data["args"]), float(data["posted"]), filename
                )
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.log(f"outbound queue: setting aside unreadable control {filename}: {e}")
                with contextlib.suppress(OSError):
                    os.rename(path, self.control / ("error." + filename))
                continue
            path.unlink(missing_ok=True)
            out.append(control)
        if names:
            self._sync_dir(self.control)
        return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _skipped(filename: str, skip: Callable[[str], bool]) -> bool:
    try:
        return skip(QueueName.parse(filename).id)
    except QueueFileError:
        return False  # (not a queue name: _load reports it)


def _is_queue_name(filename: str) -> bool:
    try:
        QueueName.parse(filename)
    except QueueFileError:
        return False
    return True


def _is_entry_id(text: str) -> bool:
    """Whether C{text} has the shape of L{QueueName.id}: arrival, pid, rand, counter, host."""
    parts = text.split("_")
    if len(parts) != 5:
        return False
    arrival, pid, rand, counter, host = parts
    numbers = (arrival, pid, counter)
    return all(p.isascii() and p.isdigit() for p in numbers) and bool(rand and host)


def _id_of(filename: str) -> str | None:
    try:
        return QueueName.parse(filename).id
    except QueueFileError:
        return None
