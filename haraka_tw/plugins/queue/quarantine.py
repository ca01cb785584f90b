"""queue/quarantine: keep a copy of the messages other plugins ask to quarantine.

A plugin asks by setting a note, on the connection or the transaction::

    connection.transaction.notes["quarantine"] = True        # or 1
    connection.transaction.notes["quarantine"] = "corpus"    # a sub-directory

(or C{queue.wants = "quarantine"}). The message, with LF line ends as Haraka writes it,
is saved as C{<quarantine_path>/[<sub-directory>/]YYYYMMDD/<transaction uuid>}: written
to C{<quarantine_path>/tmp/}, fsynced, hard-linked into place, the directory fsynced, the
temporary name removed; so only whole files ever appear. C{tmp/} is emptied when the
plugin loads. The path is C{transaction.notes.quarantined}.

What the hook then answers, as in Haraka, is C{quarantine_action} (a note on the
connection or transaction): absent, CONT (the message goes on to the next queue plugin:
this plugin only keeps a copy); a code (C{OK}: the message is taken and not delivered;
C{DENY}: refused), or a C{(code, message)} pair. Codes may be given by name ("OK").

A copy that cannot be written is a DENYSOFT (Haraka goes on without the copy), so a
message meant to be held is never delivered, nor lost, for want of disk.

quarantine.ini::

    [main]
    ; relative to the working directory
    quarantine_path=var/quarantine
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from haraka_tw.codes import CONT, DENYSOFT, Code, HookResult
from haraka_tw.fsync import fsync_dir
from haraka_tw.interfaces import IPluginContext, IQueueHook, IQueueOutboundHook, IRegistration
from haraka_tw.plugins.queue.forwarding import queue_wants

__all__ = ["QUARANTINE_INI", "Plugin", "Quarantine", "to_lf"]

QUARANTINE_INI = "quarantine.ini"
DEFAULT_PATH = "var/quarantine"


def to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks with every CRLF turned into LF, right across chunk boundaries."""
    held_cr = False
    for chunk in chunks:
        if held_cr:
            chunk = b"\r" + chunk
            held_cr = False
        if chunk.endswith(b"\r"):
            chunk, held_cr = chunk[:-1], True
        if chunk:
            yield chunk.replace(b"\r\n", b"\n")
    if held_cr:
        yield b"\r"


#: seconds after which a file in tmp/ is taken for what an interrupted save left (as
#: Maildir readers take 36 hours; a save takes seconds)
STALE_TMP = 3600.0


class Quarantine:
    """The quarantine directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    def clean_tmp(self, now: float | None = None) -> int:
        """Remove what an interrupted save left in tmp/: files older than C{STALE_TMP}
        seconds, so that a save in progress in another process (a worker, a server the
        CLI looks at) is never cut short. The number of files removed."""
        if not self.tmp.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - STALE_TMP
        count = 0
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):  # (another process took it)
                if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
                    count += 1
        return count

    def save(self, subdir: str, name: str, chunks: Iterable[bytes]) -> Path:
        """Write the message durably as C{subdir/name}; return its path. Blocking."""
        final_dir = self.path / subdir
        final = final_dir / name
        self.tmp.mkdir(parents=True, exist_ok=True)
        final_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / name
        try:
            with open(tmp, "xb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, final)
            fsync_dir(final_dir)
        finally:
            tmp.unlink(missing_ok=True)
        return final


def subdirectory(wanted: Any, today: datetime.date) -> str:
    """Where a message goes under the quarantine path: C{YYYYMMDD}, or C{<note>/YYYYMMDD}
    when the note names a sub-directory.

    @raise ValueError: for a sub-directory that is absolute or climbs out with "..".
    """
    dated = today.strftime("%Y%m%d")
    if wanted is True or isinstance(wanted, int) or not str(wanted).strip():
        return dated
    parts = Path(str(wanted).strip())
    if parts.is_absolute() or ".." in parts.parts:
        raise ValueError(f"quarantine sub-directory {str(wanted)!r} is not allowed")
    return str(parts / dated)


def _action(value: Any) -> Any:
    """quarantine_action as a hook answer: a code, a (code, message) pair, or names."""
    if isinstance(value, (list, tuple)) and value:
        code = _code(value[0])
        return HookResult(code, value[1] if len(value) > 1 else None)
    return HookResult(_code(value))


def _code(value: Any) -> Code:
    if isinstance(value, str):
        return Code[value.strip().upper()]
    return Code(int(value))


@implementer(IRegistration, IQueueHook, IQueueOutboundHook)
class Plugin:
    """queue/quarantine; see the module docstring."""

    name = "queue/quarantine"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.log = context.log
        self.config = context.config
        self.quarantine = Quarantine(self._path())
        removed = self.quarantine.clean_tmp()
        if removed:
            self.log.info(f"removed {removed} leftover files from {self.quarantine.tmp}")
        context.config.on_change(QUARANTINE_INI, self._reload)

    def _path(self) -> str:
        main = self.config.get_ini(QUARANTINE_INI)["main"]
        return str(main.get("quarantine_path") or DEFAULT_PATH)

    def _reload(self) -> None:
        self.quarantine = Quarantine(self._path())

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        if txn is None:
            return CONT
        wanted = connection.notes.get("quarantine") or txn.notes.get("quarantine")
        if not wanted and queue_wants(txn.notes) == "quarantine":
            wanted = True
        if not wanted:
            return CONT
        try:
            subdir = subdirectory(wanted, datetime.date.today())
        except ValueError as e:
            connection.logerror(f"{e}; saving under the date only", self.name)
            subdir = subdirectory(True, datetime.date.today())
        quarantine = self.quarantine
        stream = txn.message_stream
        abandoned = threading.Event()

        def save() -> Path:
            path = quarantine.save(subdir, txn.uuid, to_lf(stream.chunks()))
            if abandoned.is_set():  # timed out: the client was told 4xx and will retry
                path.unlink(missing_ok=True)
                raise TimeoutError("saved after the hook timed out; removed")
            return path

        def saved(path: Path) -> Any:
            txn.notes["quarantined"] = str(path)
            txn.results.add(self.name, **{"pass": str(path)})
            connection.loginfo(f"quarantined as {path}", self.name)
            action = connection.notes.get("quarantine_action") or txn.notes.get("quarantine_action")
            if not action:
                return CONT
            try:
                return _action(action)
            except (KeyError, ValueError, TypeError):
                connection.logerror(f"quarantine_action {action!r} is not a code", self.name)
                return CONT

        def failed(failure: Any) -> Any:
            connection.logerror(f"quarantine failed: {failure.getErrorMessage()}", self.name)
            return DENYSOFT, "Temporary storage failure, try again later"

        answer: Deferred[Any] = Deferred(canceller=lambda _: abandoned.set())

        def settle(result: Any) -> None:
            if not answer.called:
                answer.callback(result)

        deferToThread(save).addCallbacks(saved, failed).addCallback(settle)
        return answer

    hook_queue_outbound = hook_queue
