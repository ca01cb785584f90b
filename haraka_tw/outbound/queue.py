"""The outbound queue: an interface, a durable directory of queue files, and a memory one.

The queue directory::

    <name>                 queue files (L{haraka_tw.outbound.qfile}); Haraka's are adopted
    error.<name>           files that could not be read, set aside (never deleted)
    tmp/                   files being written; what is left here at start is removed
    state/<id>.json        per-file delivery history (see below), written atomically
    control/*.json         requests from C{haraka-tw queue} for the running server
    .lock                  flock held by the running server (it holds the pid)

A queue file appears under its name only complete: it is written in tmp/, fsynced,
renamed in, and the directory fsynced before the caller hears of it. After that the file
is never rewritten: a retry renames it (new next attempt and failure count in the name),
and the history of failures lives in a small sidecar, C{state/<id>.json}, keyed by the
part of the name that a retry does not change (L{QueueName.id}). The name is the
authority on when and how many; the sidecar holds ``history`` (time, attempt, error of
each failure, the last 50) and ``dsn_delayed_sent``. A sidecar without its queue file (a
crash between the two) is removed by L{QueueStore.scan}.

L{QueueStore} does the disk work synchronously (the C{haraka-tw queue} tools use it
directly); L{FileQueue} runs it in a thread pool and answers with Deferreds, for the
server. L{MemoryQueue} keeps the same files in memory, for tests of the scheduler.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import random
import re
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import Interface, implementer

from haraka_tw.config import ConfigDirectory
from haraka_tw.outbound.qfile import (
    QueueFileError,
    QueueName,
    QueueRecipient,
    Todo,
    message_of,
    message_reader,
    read_todo,
    read_todo_from,
    write_queue_file,
)

__all__ = [
    "Attempt",
    "Control",
    "FileQueue",
    "IOutboundQueue",
    "Listing",
    "MemoryQueue",
    "QueueEntry",
    "QueueEntryMissing",
    "QueueStore",
    "queue_dir_of",
]

_T = TypeVar("_T")
_logger = Logger(namespace="haraka_tw.outbound.queue")
_HISTORY_KEPT = 50
_ACTION = re.compile(r"[a-z][a-z_]{0,30}\Z")
_HARAKA_TMP = "__tmp__."


def _log_to_twisted(message: str) -> None:
    _logger.warn("{message}", message=message)


def queue_dir_of(config: ConfigDirectory, cwd: Path | None = None) -> Path:
    """The queue directory a config names: what the server and C{haraka-tw queue} use.

    C{outbound.ini} C{[main] queue_dir}, else Haraka's single-line C{queue_dir} file, else
    C{var/queue}; a relative path is taken from the working directory (C{cwd}), as the
    queue/maildir plugin's path is.
    """
    main = config.get_ini("outbound.ini").get("main", {})
    value = main.get("queue_dir") or config.get_value("queue_dir", None) or "var/queue"
    return (cwd or Path.cwd()) / Path(str(value)).expanduser()


class QueueEntryMissing(LookupError):
    """The entry's queue file is gone (removed by a control request or another process)."""


@dataclass(frozen=True)
class Attempt:
    """One failed delivery attempt, as the sidecar keeps it."""

    time: float
    attempt: int
    error: str


@dataclass(frozen=True)
class QueueEntry:
    """A queue file as read: its name, where it is, what it holds, its history.

    C{size} is the whole file's size in bytes; the message starts at C{message_offset}.
    """

    name: QueueName
    path: Path
    todo: Todo
    size: int
    message_offset: int
    history: tuple[Attempt, ...] = ()

    @property
    def id(self) -> str:
        """The identity that survives rescheduling (L{QueueName.id})."""
        return self.name.id

    @property
    def filename(self) -> str:
        return self.name.format()

    @property
    def attempts(self) -> int:
        return self.name.attempts

    @property
    def next_attempt(self) -> float:
        return self.name.next_attempt

    @property
    def last_error(self) -> str | None:
        """The error of the latest failed attempt, if any."""
        return self.history[-1].error if self.history else None

    @property
    def message_size(self) -> int:
        return self.size - self.message_offset


@dataclass(frozen=True)
class Control:
    """A request C{haraka-tw queue} left for the running server.

    Actions: ``flush`` (args ``domain``: str or None), ``delete`` and ``bounce`` (args
    ``ids``: a list of L{QueueEntry.id}).
    """

    action: str
    args: dict[str, Any]
    posted: float
    name: str = ""


@dataclass
class Listing:
    """A read-only look at a queue directory."""

    entries: list[QueueEntry] = field(default_factory=list)
    #: (path, why) of queue files that cannot be read
    bad: list[tuple[Path, str]] = field(default_factory=list)
    #: error.* files set aside earlier
    set_aside: list[Path] = field(default_factory=list)


class IOutboundQueue(Interface):
    """Where outbound messages wait: one file per message and destination domain.

    Methods that touch the disk answer with a Deferred; their failures are the
    exceptions named (wrapped in the Deferred), never raised at the call.
    """

    def add(
        todo: Todo, message_chunks: Iterable[bytes], next_attempt: float | None = None
    ) -> Deferred[QueueEntry]:
        """Store a new message; fire once it is durably in the queue.

        @param todo: the envelope; C{todo.queue_time} (0: now) becomes the arrival time.
        @param message_chunks: the raw CRLF message; consumed in a worker thread, so the
            caller must not use it until the Deferred fires.
        @param next_attempt: epoch seconds of the first attempt; default now.
        @return: a Deferred firing with the new entry (attempts 0), or failing with
            OSError when it could not be stored (nothing is left behind then).
        """

    def scan() -> Deferred[list[QueueEntry]]:
        """At start-up (with the lock held): clean up and list every queue file.

        Leftover temporary files are removed; files that cannot be read are renamed
        C{error.<name>} and logged; sidecars without a file are removed.
        @return: the readable entries, soonest next attempt first.
        """

    def reschedule(
        entry: QueueEntry,
        next_attempt: float,
        attempts: int,
        last_error: str | None,
        dsn_delayed_sent: bool | None = None,
    ) -> Deferred[QueueEntry]:
        """Set when to try next and how many attempts failed; record C{last_error}.

        @param last_error: appended to the history as this failure's error; None (a
            flush, a send_email DELAY) records nothing.
        @param dsn_delayed_sent: when not None, remembered for the entry.
        @return: the entry under its new name; fails with L{QueueEntryMissing} if the
            file is gone.
        """

    def split(
        entry: QueueEntry,
        recipients: Sequence[QueueRecipient],
        next_attempt: float | None = None,
    ) -> Deferred[QueueEntry]:
        """A new queue file with the same message, envelope and history but only
        C{recipients}; the caller then reschedules or removes the original.

        @param next_attempt: default the original's.
        @return: the new entry (same arrival and attempts); fails with
            L{QueueEntryMissing} if the original is gone.
        """

    def remove(entry: QueueEntry) -> Deferred[None]:
        """Delete the queue file and its sidecar; a file already gone is not an error."""

    def load_message(entry: QueueEntry) -> Iterator[bytes]:
        """The message bytes, streamed in chunks (read on demand, in the caller's thread)."""

    def lock() -> bool:
        """Take the queue directory for this process; False if another process has it."""

    def unlock() -> None:
        """Release what L{lock} took (a no-op if not held)."""

    def post_control(action: str, args: dict[str, Any]) -> Deferred[None]:
        """Leave a request for the process that holds the lock (see L{Control})."""

    def take_controls() -> Deferred[list[Control]]:
        """The requests left so far, oldest first; each is removed as it is taken."""


# -- the directory, synchronously ---------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(prefix: str = "") -> str:
    tag = "".join(random.choices(string.ascii_letters + string.digits, k=8))
    return f"{prefix}{time.time_ns()}.{os.getpid()}.{threading.get_ident()}.{tag}"


class QueueStore:
    """A queue directory, read and changed synchronously (run it in a thread).

    @param now: the clock for new names and history (epoch seconds).
    @param fsync: sync files and directories (turn off only for throwaway tests).
    @param log: receives one line per noteworthy event (set-aside files, clean-ups).
    """

    def __init__(
        self,
        queue_dir: str | os.PathLike[str],
        *,
        now: Callable[[], float] = time.time,
        fsync: bool = True,
        hostname: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.dir = Path(queue_dir)
        self.tmp = self.dir / "tmp"
        self.state = self.dir / "state"
        self.control = self.dir / "control"
        self.now = now
        self.fsync = fsync
        self.hostname = hostname
        self.log = log or _log_to_twisted
        self._lock_fd: int | None = None

    # -- helpers ---------------------------------------------------------------------

    def ensure_dirs(self) -> None:
        """Make the queue directory and its subdirectories (mode 0700) if missing."""
        for d in (self.dir, self.tmp, self.state, self.control):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _sync_dir(self, path: Path) -> None:
        if self.fsync:
            _fsync_dir(path)

    def _write_durably(self, final: Path, write: Callable[[int], None]) -> None:
        """Write a file via tmp/: write(fd), fsync, rename to C{final}, fsync its dir."""
        self.ensure_dirs()
        tmp = self.tmp / _unique(final.name + ".")
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
                for a in history[-_HISTORY_KEPT:]
            ],
            "dsn_delayed_sent": dsn_sent,
        }
        blob = json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape")
        self._write_durably(self._state_path(entry_id), lambda fd: _write_all(fd, blob))

    def _load(self, path: Path) -> QueueEntry:
        """Read one queue file and its sidecar. @raise QueueFileError: if unreadable."""
        name = QueueName.parse(path.name)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
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
        name = QueueName.new(
            arrival=todo.queue_time,
            next_attempt=self.now() if next_attempt is None else next_attempt,
            hostname=self.hostname,
        )
        return self._write_queue_file(name, todo, message_chunks)

    def listing(self) -> Listing:
        """Read every queue file without changing anything."""
        out = Listing()
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return out
        for filename in names:
            path = self.dir / filename
            if filename.startswith("error."):
                out.set_aside.append(path)
                continue
            if filename.startswith((".", _HARAKA_TMP)) or not path.is_file():
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
            self.log(f"outbound queue: removing unfinished temporary file {leftover.name}")
            leftover.unlink(missing_ok=True)
        for path in sorted(self.dir.glob(_HARAKA_TMP + "*")):
            self.log(f"outbound queue: removing Haraka's unfinished file {path.name}")
            path.unlink(missing_ok=True)
        for filename in sorted(os.listdir(self.dir)):
            path = self.dir / filename
            skip = filename.startswith((".", "error."))
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
            if sidecar.name[: -len(".json")] not in live:
                sidecar.unlink(missing_ok=True)
        return listing.entries

    def find(self, ident: str) -> QueueEntry | None:
        """The entry whose id or file name is C{ident}, or None.

        @raise QueueFileError: if that file exists but cannot be read.
        """
        for path in self.dir.glob("*_*"):
            if path.name.startswith(("error.", ".", _HARAKA_TMP)):
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
        return replace(entry, name=name, path=path, history=history[-_HISTORY_KEPT:])

    def split(
        self,
        entry: QueueEntry,
        recipients: Sequence[QueueRecipient],
        next_attempt: float | None = None,
    ) -> QueueEntry:
        """See L{IOutboundQueue.split}."""
        if not recipients:
            raise ValueError("split needs at least one recipient")
        name = QueueName.new(
            arrival=entry.name.arrival,
            next_attempt=entry.next_attempt if next_attempt is None else next_attempt,
            attempts=entry.attempts,
            hostname=self.hostname,
        )
        todo = replace(entry.todo, rcpt_to=list(recipients), message_size=None)
        if entry.history or todo.dsn_delayed_sent:
            self._write_state(name.id, entry.history, todo.dsn_delayed_sent)
        try:
            chunks = message_reader(entry.path, entry.message_offset)
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

    def load_message(self, entry: QueueEntry) -> Iterator[bytes]:
        """See L{IOutboundQueue.load_message}."""
        return message_reader(entry.path, entry.message_offset)

    # -- the lock --------------------------------------------------------------------

    def lock(self) -> bool:
        """See L{IOutboundQueue.lock}. The lock file records the holder's pid."""
        if self._lock_fd is not None:
            return True
        self.ensure_dirs()
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
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


def _is_queue_name(filename: str) -> bool:
    try:
        QueueName.parse(filename)
    except QueueFileError:
        return False
    return True


def _id_of(filename: str) -> str | None:
    try:
        return QueueName.parse(filename).id
    except QueueFileError:
        return None


# -- the server's view: Deferreds ------------------------------------------------------


class ThreadRunner(Protocol):
    """Runs a blocking function away from the reactor and answers with a Deferred."""

    def __call__(self, f: Callable[[], _T], /) -> Deferred[_T]: ...


def _defer_to_thread(f: Callable[[], _T], /) -> Deferred[_T]:
    return deferToThread(f)


@implementer(IOutboundQueue)
class FileQueue:
    """The durable queue: a L{QueueStore} whose disk work runs in the reactor's threads.

    @param clock: the time source for names and history (default: the wall clock).
    @param threads: how blocking work is run (default C{deferToThread}); tests may pass a
        function that runs it at once.
    """

    def __init__(
        self,
        queue_dir: str | os.PathLike[str],
        *,
        clock: IReactorTime | None = None,
        threads: ThreadRunner | None = None,
        fsync: bool = True,
        hostname: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        now = clock.seconds if clock is not None else time.time
        self.store = QueueStore(queue_dir, now=now, fsync=fsync, hostname=hostname, log=log)
        self._threads: ThreadRunner = threads or _defer_to_thread

    @property
    def queue_dir(self) -> Path:
        return self.store.dir

    def add(
        self, todo: Todo, message_chunks: Iterable[bytes], next_attempt: float | None = None
    ) -> Deferred[QueueEntry]:
        return self._threads(lambda: self.store.add(todo, message_chunks, next_attempt))

    def scan(self) -> Deferred[list[QueueEntry]]:
        return self._threads(self.store.scan)

    def reschedule(
        self,
        entry: QueueEntry,
        next_attempt: float,
        attempts: int,
        last_error: str | None,
        dsn_delayed_sent: bool | None = None,
    ) -> Deferred[QueueEntry]:
        return self._threads(
            lambda: self.store.reschedule(
                entry, next_attempt, attempts, last_error, dsn_delayed_sent
            )
        )

    def split(
        self,
        entry: QueueEntry,
        recipients: Sequence[QueueRecipient],
        next_attempt: float | None = None,
    ) -> Deferred[QueueEntry]:
        return self._threads(lambda: self.store.split(entry, recipients, next_attempt))

    def remove(self, entry: QueueEntry) -> Deferred[None]:
        return self._threads(lambda: self.store.remove(entry))

    def load_message(self, entry: QueueEntry) -> Iterator[bytes]:
        return self.store.load_message(entry)

    def lock(self) -> bool:
        return self.store.lock()

    def unlock(self) -> None:
        self.store.unlock()

    def post_control(self, action: str, args: dict[str, Any]) -> Deferred[None]:
        def post() -> None:
            self.store.post_control(action, args)

        return self._threads(post)

    def take_controls(self) -> Deferred[list[Control]]:
        return self._threads(self.store.take_controls)


# -- in memory, for tests ----------------------------------------------------------------


@implementer(IOutboundQueue)
class MemoryQueue:
    """The queue in a dict: the same file format and names, no disk, answers at once.

    C{held_elsewhere} makes L{lock} answer False, as if a server held the queue.
    """

    def __init__(self, *, clock: IReactorTime | None = None, hostname: str = "memory") -> None:
        self._now = clock.seconds if clock is not None else time.time
        self.hostname = hostname
        self.files: dict[str, tuple[QueueEntry, bytes]] = {}
        self.controls: list[Control] = []
        self.locked = False
        self.held_elsewhere = False

    def entries(self) -> list[QueueEntry]:
        """Every entry, soonest next attempt first."""
        found = [e for e, _ in self.files.values()]
        return sorted(found, key=lambda e: (e.next_attempt, e.name.arrival, e.id))

    def message(self, entry: QueueEntry) -> bytes:
        """The whole message of an entry."""
        return b"".join(self.load_message(entry))

    def _store(
        self, name: QueueName, todo: Todo, chunks: Iterable[bytes], history: tuple[Attempt, ...]
    ) -> QueueEntry:
        buf = io.BytesIO()
        write_queue_file(buf, todo, chunks)
        blob = buf.getvalue()
        read, offset = read_todo_from(io.BytesIO(blob), name.format(), len(blob))
        read.dsn_delayed_sent = todo.dsn_delayed_sent
        entry = QueueEntry(name, Path("/memory") / name.format(), read, len(blob), offset, history)
        self.files[name.id] = (entry, blob)
        return entry

    def add(
        self, todo: Todo, message_chunks: Iterable[bytes], next_attempt: float | None = None
    ) -> Deferred[QueueEntry]:
        if not todo.queue_time:
            todo.queue_time = self._now()
        name = QueueName.new(
            todo.queue_time,
            self._now() if next_attempt is None else next_attempt,
            hostname=self.hostname,
        )
        return succeed(self._store(name, todo, message_chunks, ()))

    def scan(self) -> Deferred[list[QueueEntry]]:
        return succeed(self.entries())

    def reschedule(
        self,
        entry: QueueEntry,
        next_attempt: float,
        attempts: int,
        last_error: str | None,
        dsn_delayed_sent: bool | None = None,
    ) -> Deferred[QueueEntry]:
        if entry.id not in self.files:
            return fail(QueueEntryMissing(entry.filename))
        current, blob = self.files[entry.id]
        history = entry.history
        if last_error is not None:
            history = (*history, Attempt(self._now(), attempts, last_error))
        name = entry.name.rescheduled(next_attempt, attempts)
        if dsn_delayed_sent is not None:
            current.todo.dsn_delayed_sent = dsn_delayed_sent
        new = replace(
            current,
            name=name,
            path=current.path.with_name(name.format()),
            history=history[-_HISTORY_KEPT:],
        )
        self.files[entry.id] = (new, blob)
        return succeed(new)

    def split(
        self,
        entry: QueueEntry,
        recipients: Sequence[QueueRecipient],
        next_attempt: float | None = None,
    ) -> Deferred[QueueEntry]:
        if entry.id not in self.files:
            return fail(QueueEntryMissing(entry.filename))
        if not recipients:
            return fail(ValueError("split needs at least one recipient"))
        current, _ = self.files[entry.id]
        name = QueueName.new(
            current.name.arrival,
            current.next_attempt if next_attempt is None else next_attempt,
            current.attempts,
            hostname=self.hostname,
        )
        todo = replace(current.todo, rcpt_to=list(recipients), message_size=None)
        return succeed(self._store(name, todo, self.load_message(current), current.history))

    def remove(self, entry: QueueEntry) -> Deferred[None]:
        self.files.pop(entry.id, None)
        return succeed(None)

    def load_message(self, entry: QueueEntry) -> Iterator[bytes]:
        if entry.id not in self.files:
            raise QueueEntryMissing(entry.filename)
        return message_of(self.files[entry.id][1])

    def lock(self) -> bool:
        if self.held_elsewhere:
            return False
        self.locked = True
        return True

    def unlock(self) -> None:
        self.locked = False

    def post_control(self, action: str, args: dict[str, Any]) -> Deferred[None]:
        self.controls.append(Control(action, dict(args), self._now()))
        return succeed(None)

    def take_controls(self) -> Deferred[list[Control]]:
        taken, self.controls = self.controls, []
        return succeed(taken)
