"""Connection reuse: idle outbound sessions kept for the next message to the same place.

A session goes back to the pool after a message when it is still in step with its server;
it is kept for C{idle_timeout} seconds under its L{Destination} (address, port, HELO name,
LMTP, TLS policy, credentials, source address), so TLS and AUTH are done once for many
messages. The next L{deliver<haraka_tw.outbound.client.deliver>} to that destination takes
it and sends RSET first, which both clears any transaction left open and proves the
connection still works (Postfix checks cached sessions the same way); if RSET fails, a new
connection is made. An idle session past its time, over C{max_messages}, or still idle at
L{ConnectionPool.close} gets QUIT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime

if TYPE_CHECKING:
    from haraka_tw.outbound.client import ClientSession, Destination

__all__ = ["ConnectionPool"]


@dataclass(eq=False)
class _Idle:
    session: ClientSession
    timer: IDelayedCall | None = None

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class ConnectionPool:
    """Idle sessions by destination; see the module docstring.

    @param clock: for the idle timers.
    @param idle_timeout: seconds an unused session is kept.
    @param max_idle: idle sessions kept per destination.
    @param max_messages: transactions after which a session is closed rather than kept.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        idle_timeout: float = 5.0,
        max_idle: int = 1,
        max_messages: int = 100,
    ) -> None:
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_messages = max_messages
        self._idle: dict[Destination, list[_Idle]] = {}
        self._closing: set[Deferred[None]] = set()
        self.closed = False

    def __len__(self) -> int:
        """The number of idle sessions."""
        return sum(len(entries) for entries in self._idle.values())

    def take(self, destination: Destination) -> ClientSession | None:
        """An idle session for ``destination`` (removed from the pool), if there is one."""
        entries = self._idle.get(destination)
        while entries:
            entry = entries.pop()
            entry.stop()
            if not entries:
                del self._idle[destination]
            if entry.session.usable:
                return entry.session
            self._quit(entry.session)
        return None

    def give(self, session: ClientSession) -> bool:
        """Keep ``session`` idle; False (and nothing kept) when it should be closed instead."""
        entries = self._idle.get(session.destination, [])
        if (
            self.closed
            or not session.usable
            or session.transactions >= self.max_messages
            or len(entries) >= self.max_idle
        ):
            return False
        entry = _Idle(session)
        entry.timer = self._clock.callLater(self.idle_timeout, self._expire, entry)
        self._idle.setdefault(session.destination, []).append(entry)
        session.proto.closed().addCallback(lambda _: self._forget(entry))
        return True

    def close(self) -> Deferred[None]:
        """QUIT every idle session and keep none from now on; fires when all are closed."""
        self.closed = True
        for entries in list(self._idle.values()):
            for entry in list(entries):
                self._remove(entry)
                self._quit(entry.session)
        waiting = list(self._closing)
        return DeferredList(waiting, consumeErrors=True).addCallback(lambda _: None)

    def _expire(self, entry: _Idle) -> None:
        if self._remove(entry):
            self._quit(entry.session)

    def _forget(self, entry: _Idle) -> None:
        """The server closed an idle session: drop it."""
        self._remove(entry)

    def _remove(self, entry: _Idle) -> bool:
        entry.stop()
        key = entry.session.destination
        entries = self._idle.get(key, [])
        if entry not in entries:
            return False
        entries.remove(entry)
        if not entries:
            del self._idle[key]
        return True

    def _quit(self, session: ClientSession) -> None:
        d: Deferred[None] = Deferred.fromCoroutine(session.quit())
        self._closing.add(d)

        def done(result: Any) -> None:
            self._closing.discard(d)

        d.addBoth(done)
