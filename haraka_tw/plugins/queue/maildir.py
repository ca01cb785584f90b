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
Python's C{mailbox.Maildir} and mail clients read the result. The write runs in a thread:
the reactor keeps serving other sessions while the disk syncs.

Only inbound mail (the queue hook) goes to the Maildir: relayed mail (queue_outbound) is
left to the outbound queue, which delivers it to its destination.

If the hook times out (the client is told 450 and will retry) while the write is still
running, the write's file is removed when it completes, so the retry does not deliver the
message twice.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from haraka_tw.codes import DENYSOFT, OK, Code
from haraka_tw.fsync import fsync_dir
from haraka_tw.interfaces import IPluginContext, IQueueHook, IRegistration

__all__ = ["Maildir", "Plugin"]


class Maildir:
    """A Maildir directory that messages are delivered into."""

    _counter = itertools.count(1)

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def create(self) -> None:
        """Make tmp/, new/ and cur/ (mode 0700) if missing."""
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def unique_name(self) -> str:
        now = time.time()
        usec = int((now % 1) * 1_000_000)
        return f"{int(now)}.M{usec}P{os.getpid()}Q{next(self._counter)}.{self.host}"

    def deliver(self, chunks: Any) -> Path:
        """Write the message; return its path in new/. Blocking: run it in a thread.

        The directories are made on first use, so that under C{twistd -u/-g} they belong
        to the user the server runs as, not to root.
        """
        name = self.unique_name()
        tmp = self.path / "tmp" / name
        new = self.path / "new" / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            self.create()
            fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.rename(tmp, new)
            if self.fsync:
                fsync_dir(self.path / "new")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return new


@implementer(IRegistration, IQueueHook)
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
        self.log.info(f"delivering to the Maildir {self.maildir.path.absolute()}")

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        stream = txn.message_stream

        def delivered(path: Path) -> Code:
            connection.loginfo(f"delivered to {path}", self.name)
            txn.notes["maildir_path"] = str(path)
            return OK

        def failed(failure: Any) -> tuple[Code, str]:
            self.log.error(f"maildir delivery failed: {failure.getErrorMessage()}", connection)
            return DENYSOFT, "Temporary storage failure, try again later"

        abandoned = threading.Event()

        def write() -> Path:
            # The session waits for this answer, so nothing else touches the stream meanwhile.
            path = self.maildir.deliver(stream.chunks())
            if abandoned.is_set():  # timed out: the client was told 450 and will retry
                path.unlink(missing_ok=True)
                raise TimeoutError("delivery finished after the hook timed out; removed")
            return path

        answer: Deferred[Any] = Deferred(canceller=lambda _: abandoned.set())

        def settle(result: Any) -> None:
            if not answer.called:  # else the runner gave up on us (timeout) already
                answer.callback(result)

        deferToThread(write).addCallbacks(delivered, failed).addCallback(settle)
        return answer
