"""The outbound queue: an interface, a durable directory of queue files, and a memory one.

L{IOutboundQueue} is what the service and the courier use. L{FileQueue} is the durable
queue: a L{QueueStore<haraka_tw.outbound.store.QueueStore>} (the queue directory's layout
and its synchronous disk work, which the C{haraka-tw queue} tools use directly) run in a
thread pool, answering with Deferreds, for the server. L{MemoryQueue} keeps the same files
in memory, for tests of the scheduler. The values they give out (L{QueueEntry} and the
rest) are in L{haraka_tw.outbound.entry}; this module re-exports them and L{QueueStore}.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from haraka_tw.config import ConfigDirectory
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
    QueueName,
    QueueRecipient,
    Todo,
    message_of,
    read_todo_from,
    write_queue_file,
)
from haraka_tw.outbound.store import QueueStore

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


def queue_dir_of(config: ConfigDirectory, cwd: Path | None = None) -> Path:
    """The queue directory a config names: what the server and C{haraka-tw queue} use.

    C{outbound.ini} C{[main] queue_dir}, else Haraka's single-line C{queue_dir} file, else
    C{var/queue}; a relative path is taken from the working directory (C{cwd}), as the
    queue/maildir plugin's path is.
    """
    main = config.get_ini("outbound.ini").get("main", {})
    value = main.get("queue_dir") or config.get_value("queue_dir", None) or "var/queue"
    return (cwd or Path.cwd()) / Path(str(value)).expanduser()


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

    def look(skip: Callable[[str], bool] | None = None) -> Deferred[Listing]:
        """While running: read every queue file as it is now, changing nothing (no clean-up,
        nothing set aside). A file being written by this process may show up in it before
        the caller that wrote it has the entry: see L{writes_settled}.

        @param skip: called (on any thread) with each queue file's id; the files it says
            yes to are not read (a rescan skips those it holds: reading thousands of files
            it knows slowed their delivery by half).
        """

    def writes_settled() -> Deferred[None]:
        """Fire once every write under way now (add, split, reschedule) has finished and
        the callbacks its caller had added have run."""

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
        """Take the queue directory (a worker: its partition of it) for this process;
        False if another process has it."""

    def unlock() -> None:
        """Release what L{lock} took (a no-op if not held)."""

    def post_control(action: str, args: dict[str, Any]) -> Deferred[None]:
        """Leave a request for the process that holds the lock (see L{Control})."""

    def take_controls() -> Deferred[list[Control]]:
        """The requests left so far, oldest first; each is removed as it is taken."""


# -- the server's view: Deferreds ------------------------------------------------------


class ThreadRunner(Protocol):
    """Runs a blocking function away from the reactor and answers with a Deferred."""

    def __call__(self, f: Callable[[], _T], /) -> Deferred[_T]: ...


def passing(result: _T, f: Callable[[Any], object], arg: Any) -> _T:
    """A Deferred callback that calls C{f(arg)} on the way and passes the result on."""
    f(arg)
    return result


def _defer_to_thread(f: Callable[[], _T], /) -> Deferred[_T]:
    return deferToThread(f)


@implementer(IOutboundQueue)
class FileQueue:
    """The durable queue: a L{QueueStore} whose disk work runs in the reactor's threads.

    @param clock: the time source for names and history (default: the wall clock).
    @param threads: how blocking work is run (default C{deferToThread}); tests may pass a
        function that runs it at once.
    @param partition: a worker's part of the queue (see L{QueueStore}); None: all of it.
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
        partition: Partition | None = None,
    ) -> None:
        now = clock.seconds if clock is not None else time.time
        self.store = QueueStore(
            queue_dir, now=now, fsync=fsync, hostname=hostname, log=log, partition=partition
        )
        self._threads: ThreadRunner = threads or _defer_to_thread
        self._trash: list[tuple[Path | None, QueueEntry]] = []  # discarded, to unlink
        self._emptying = False  # a batch of them is on a thread
        self._writes: set[Deferred[Any]] = set()  # writes on a thread, not yet finished

    @property
    def queue_dir(self) -> Path:
        return self.store.dir

    @property
    def partition(self) -> Partition | None:
        return self.store.partition

    def write(self, change: Callable[[QueueStore], _T]) -> Deferred[_T]:
        """Run C{change(store)} on a thread as one of the writes L{writes_settled} waits for
        (every add, split and reschedule is one; so is a bounce by the queue tools)."""
        d = self._threads(lambda: change(self.store))
        if not d.called:
            self._writes.add(d)
            d.addBoth(passing, self._writes.discard, d)
        return d

    def writes_settled(self) -> Deferred[None]:
        # A write leaves the set as it fires, before its caller's callbacks run; a waiter
        # added now runs after them (they were added when the write began).
        waiters: list[Deferred[None]] = []
        for d in list(self._writes):
            waiter: Deferred[None] = Deferred()
            d.addBoth(passing, waiter.callback, None)
            waiters.append(waiter)
        return DeferredList(waiters).addCallback(lambda _: None)

    def add(
        self, todo: Todo, message_chunks: Iterable[bytes], next_attempt: float | None = None
    ) -> Deferred[QueueEntry]:
        return self.write(lambda store: store.add(todo, message_chunks, next_attempt))

    def scan(self) -> Deferred[list[QueueEntry]]:
        return self._threads(self.store.scan)

    def look(self, skip: Callable[[str], bool] | None = None) -> Deferred[Listing]:
        return self._threads(lambda: self.store.listing(skip))

    def reschedule(
        self,
        entry: QueueEntry,
        next_attempt: float,
        attempts: int,
        last_error: str | None,
        dsn_delayed_sent: bool | None = None,
    ) -> Deferred[QueueEntry]:
        return self.write(
            lambda s: s.reschedule(entry, next_attempt, attempts, last_error, dsn_delayed_sent)
        )

    def split(
        self,
        entry: QueueEntry,
        recipients: Sequence[QueueRecipient],
        next_attempt: float | None = None,
    ) -> Deferred[QueueEntry]:
        return self.write(lambda store: store.split(entry, recipients, next_attempt))

    def remove(self, entry: QueueEntry) -> Deferred[None]:
        """At once, in the reactor's thread: the file is renamed into trash/ (a rename, where
        an unlink can wait on the disk; L{QueueStore.discard}), then unlinked on a worker
        thread, with the others discarded meanwhile. A file in trash/ is no longer queued:
        a restart removes what is left there."""
        try:
            discarded = self.store.discard(entry)
        except OSError as e:
            return fail(e)
        self._trash.append((discarded, entry))
        if not self._emptying:
            self._empty_trash()
        return succeed(None)

    def _empty_trash(self) -> None:
        batch, self._trash = self._trash, []
        self._emptying = True

        def emptied(result: object) -> None:
            self._emptying = False
            if isinstance(result, Failure):
                self.store.log(f"outbound queue: emptying trash/: {result.getErrorMessage()}")
            if self._trash:
                self._empty_trash()

        self._threads(lambda: self.store.empty_trash(batch)).addBoth(emptied)

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

    def look(self, skip: Callable[[str], bool] | None = None) -> Deferred[Listing]:
        return succeed(Listing(entries=[e for e in self.entries() if not (skip and skip(e.id))]))

    def writes_settled(self) -> Deferred[None]:
        return succeed(None)  # every write answers at once

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
            history=history[-HISTORY_KEPT:],
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
