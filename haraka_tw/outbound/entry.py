"""What the outbound queue holds and gives out: a L{QueueEntry} per queue file (its name,
envelope and failure history), L{Control} requests and a L{Listing}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haraka_tw.outbound.qfile import QueueName, Todo

__all__ = ["HISTORY_KEPT", "Attempt", "Control", "Listing", "QueueEntry", "QueueEntryMissing"]

#: the failed attempts a queue file's history keeps (the latest)
HISTORY_KEPT = 50


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
