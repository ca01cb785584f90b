"""queue/maildir: deliver each accepted message into a Maildir, durably, before the 250.

maildir.ini::

    [main]
    ; relative paths are from the working directory
    path = var/maildir
    ; fsync the file and the new/ directory before answering OK
    fsync = true

The message (with its Received header) is written to C{tmp/}, fsynced, renamed into
C{new/}, and the directory fsynced; only then is the answer OK, so the client's 250 means
the message is on disk. Names follow the Maildir convention (time.MusecPpidQn.host), so
Python's C{mailbox.Maildir} and mail clients read the result.

The writes run in one thread of the plugin's own, not the reactor's pool: messages that
arrive while it works wait, and are taken next as a batch, with one fsync of C{new/} for
the batch and one call back into the reactor, where the descriptors are closed. With a
pool thread per message, each thread's every system call waited for the GIL behind the
busy reactor (a 0.3 ms delivery took 2.6 ms in the server), and the reactor paid a
Deferred, a context and a wake-up per message.

With fsync off, nothing waits for the disk: a message of up to C{INLINE_LIMIT} body bytes
held in memory is written and renamed by the reactor thread itself (page-cache writes,
tens of microseconds unless the kernel throttles dirty pages) and answered at once;
larger or spooled ones still go to the thread.

Only inbound mail (the queue hook) goes to the Maildir: relayed mail (queue_outbound) is
left to the outbound queue, which delivers it to its destination.

If the hook times out (the client is told 450 and will retry) while the write is still
running, the write's file is removed when it completes, so the retry does not deliver the
message twice (the removal is not fsynced: after a crash the file may come back).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import DENYSOFT, OK, Code
from haraka_tw.fsync import fsync_dir
from haraka_tw.interfaces import IPluginContext, IQueueHook, IRegistration, IShutdown

__all__ = ["INLINE_LIMIT", "BatchWriter", "Maildir", "Plugin"]

INLINE_LIMIT = 256 * 1024  # body bytes of an in-memory message the reactor writes (fsync off)
_BATCH_LIMIT = 64  # messages written together at most (each holds a descriptor meanwhile)

Written = tuple[int, str]  # a message in tmp/: its still open descriptor, and its path


class Maildir:
    """A Maildir directory that messages are delivered into. Its methods block: the
    plugin decides which thread runs them."""

    _counter = itertools.count(1)

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._tmp = os.path.join(self.path, "tmp")
        self._new = os.path.join(self.path, "new")

    def create(self) -> None:
        """Make tmp/, new/ and cur/ (mode 0700) if missing."""
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def unique_name(self) -> str:
        now = time.time()
        usec = int((now % 1) * 1_000_000)
        return f"{int(now)}.M{usec}P{os.getpid()}Q{next(self._counter)}.{self.host}"

    def deliver(self, chunks: Iterable[bytes]) -> str:
        """Write one message (synced if fsync is on); return its path in new/.

        @raise OSError: (or what C{chunks} raised) when it could not be stored.
        """
        written = self.write_tmp(chunks)
        try:
            (result,) = self.sync_batch([written])
        finally:
            os.close(written[0])
        if isinstance(result, Exception):
            raise result
        return result

    def write_tmp(self, chunks: Iterable[bytes]) -> Written:
        """Write the message into tmp/ and leave its descriptor open for L{sync_batch}. A
        write that fails leaves nothing behind. The directories are made on first use, so
        that under C{twistd -u/-g} they belong to the user the server runs as. (Strings,
        not pathlib: this runs once per message.)"""
        tmp = os.path.join(self._tmp, self.unique_name())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            self.create()
            fd = os.open(tmp, flags, 0o600)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return fd, tmp

    def sync_batch(self, written: Sequence[Written]) -> list[str | Exception]:
        """Move messages written by L{write_tmp} into new/: each file fsynced (when fsync
        is on) and renamed, then new/ fsynced once for them all. For each, its path in
        new/ or the exception that kept it out; the descriptors stay open (the caller
        closes them).

        A message whose fsync or rename fails is removed. If the fsync of new/ fails,
        every message renamed gets that error (its file stays in new/, unacknowledged:
        the client retries, so it may be delivered twice, never lost).
        """
        results: list[str | Exception] = []
        for fd, tmp in written:
            new = os.path.join(self._new, os.path.basename(tmp))
            try:
                if self.fsync:
                    os.fsync(fd)
                os.rename(tmp, new)
            except Exception as e:
                with contextlib.suppress(OSError):  # (the error that matters is e)
                    os.unlink(tmp)
                results.append(e)
            else:
                results.append(new)
        if self.fsync and any(isinstance(r, str) for r in results):
            try:
                fsync_dir(self._new)
            except OSError as e:
                results = [e if isinstance(r, str) else r for r in results]
        return results


class Abandoned(Protocol):
    """Told that a message's hook gave up waiting (a threading.Event will do)."""

    def is_set(self) -> bool: ...


class _GivenUp:
    """A flag set from the reactor thread and read by the writer; a threading.Event made a
    Condition and a lock for every message."""

    __slots__ = ("given_up",)

    def __init__(self) -> None:
        self.given_up = False

    def set(self) -> None:
        self.given_up = True

    def is_set(self) -> bool:
        return self.given_up


class _Entry:
    """One message for the writer thread, and what became of it."""

    __slots__ = ("abandoned", "chunks", "done", "result", "written")

    def __init__(self, chunks: Iterable[bytes], abandoned: Abandoned, done: Deferred[str]) -> None:
        self.chunks = chunks
        self.abandoned = abandoned
        self.done = done
        self.written: Written | None = None  # in tmp/, open until answered
        self.result: str | Exception | None = None  # None: given up on before its turn


class BatchWriter:
    """The thread that delivers into a L{Maildir}: what arrives while it works is taken
    next, as one batch (L{Maildir.write_tmp} each, then L{Maildir.sync_batch}), and
    answered with one call into the reactor. The thread starts with the first message and
    ends when stopped and idle; a message after that starts it again."""

    def __init__(self, maildir: Maildir, reactor: Any) -> None:
        self.maildir = maildir
        self._reactor = reactor
        self._waiting: list[_Entry] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, chunks: Iterable[bytes], abandoned: Abandoned) -> Deferred[str]:
        """Deliver a message; fires with its path in new/, or fails. If C{abandoned} is set
        by the time the write is done (the hook timed out), the file is removed again;
        set before the write begins, the message is not written at all."""
        done: Deferred[str] = Deferred()
        with self._wake:
            self._waiting.append(_Entry(chunks, abandoned, done))
            if self._thread is None:
                self._start()
            self._wake.notify()
        return done

    def stop(self) -> None:
        """Let the thread end once nothing waits (a later message starts it again)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._waiting and not self._stopping:
                        self._wake.wait()
                    if not self._waiting:
                        return
                    batch = self._waiting[:_BATCH_LIMIT]
                    del self._waiting[:_BATCH_LIMIT]
                try:
                    self._write(batch)
                except BaseException as e:  # a bug here must not leave the sessions waiting
                    # (a message already renamed stays in new/ unacknowledged: the client
                    # retries, so it may be delivered twice, never lost)
                    for entry in batch:
                        entry.result = Exception(f"maildir writer failed: {e!r}")
                    self._reactor.callFromThread(_answer, batch)
                    raise
                self._reactor.callFromThread(_answer, batch)
        finally:
            with self._wake:
                self._thread = None
                if self._waiting:  # (came as it ended: a thread of their own)
                    self._start()

    def _start(self) -> None:
        """A writer thread (the caller holds the lock)."""
        self._thread = threading.Thread(target=self._run, name="queue/maildir")
        self._thread.daemon = True  # an unanswered write dies with the process
        self._thread.start()

    def _write(self, batch: list[_Entry]) -> None:
        todo: list[tuple[_Entry, Written]] = []
        for entry in batch:
            if entry.abandoned.is_set():  # given up on before its turn: not written
                continue
            try:
                entry.written = self.maildir.write_tmp(entry.chunks)
            except Exception as e:
                entry.result = e
            else:
                todo.append((entry, entry.written))
        results = self.maildir.sync_batch([written for _, written in todo])
        for (entry, _), result in zip(todo, results, strict=True):
            entry.result = result


def _answer(batch: list[_Entry]) -> None:
    """In the reactor thread: close the files and answer each message. One whose hook
    timed out meanwhile (the client was told 450 and will retry) is removed. Each message
    is answered whatever befell the others."""
    for entry in batch:
        result = entry.result
        if entry.written is not None:
            fd, tmp = entry.written
            with contextlib.suppress(OSError):
                os.close(fd)
            if isinstance(result, Exception):  # (still in tmp/ if a bug stopped the thread)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        if result is None:
            result = TimeoutError("the hook timed out before the message was written")
        elif isinstance(result, str) and entry.abandoned.is_set():
            try:
                os.unlink(result)
            except OSError as e:
                result = e
            else:
                result = TimeoutError("delivery finished after the hook timed out; removed")
        if isinstance(result, Exception):
            entry.done.errback(Failure(result))
        else:
            entry.done.callback(result)


@implementer(IRegistration, IQueueHook, IShutdown)
class Plugin:
    name = "queue/maildir"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.log = context.log
        ini = context.config.get_ini("maildir.ini", booleans=["+main.fsync"])
        main = ini["main"]
        self.maildir = Maildir(
            str(main.get("path") or "var/maildir"), bool(main.get("fsync", True))
        )
        reactor = context.reactor
        if not IReactorFromThreads.providedBy(reactor):  # (None, or a Clock in a test)
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.writer = BatchWriter(self.maildir, reactor)
        self.log.info(f"delivering to the Maildir {self.maildir.path.absolute()}")

    def shutdown(self) -> None:
        self.writer.stop()

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        stream = txn.message_stream

        def delivered(path: str) -> Code:
            connection.loginfo(f"delivered to {path}", self.name)
            txn.notes["maildir_path"] = path
            return OK

        def failed(failure: Any) -> tuple[Code, str]:
            self.log.error(f"maildir delivery failed: {failure.getErrorMessage()}", connection)
            return DENYSOFT, "Temporary storage failure, try again later"

        if not self.maildir.fsync and not stream.spooled and stream.body_size <= INLINE_LIMIT:
            try:  # nothing to wait for: the reactor writes it now
                path = self.maildir.deliver(stream.chunks())
            except Exception:
                return failed(Failure())
            return delivered(path)

        abandoned = _GivenUp()
        answer: Deferred[Any] = Deferred(canceller=lambda _: abandoned.set())

        def settle(result: Any) -> None:
            if not answer.called:  # else the runner gave up on us (timeout) already
                answer.callback(result)

        # The session waits for this answer, so nothing else touches the stream meanwhile.
        written = self.writer.submit(stream.chunks(), abandoned)
        written.addCallbacks(delivered, failed).addCallback(settle)
        return answer
