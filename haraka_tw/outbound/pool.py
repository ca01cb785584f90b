"""Connection reuse: a bounded set of sessions per destination, carrying message after message.

Sessions are kept per L{Destination} (address, port, HELO name, LMTP, TLS policy,
credentials, source address), so TLS and AUTH are done once for many messages. A delivery
asks for a L{Lease}: an idle session to reuse, or leave to open a new connection. At most
C{max_connections} sessions to one destination exist at once (busy, idle or being opened,
outbound.ini C{pool_concurrency_max}, Haraka's meaning); a delivery beyond that waits, in
order, for one of them to finish its message and takes that session over at once. So a
burst of messages for one server goes out over a few connections, back to back, instead of
a connection (banner, EHLO, STARTTLS, QUIT) per message.

The client (L{deliver<haraka_tw.outbound.client.deliver>}) sends RSET before a message on a
reused session, in the same write as the envelope when the server offers PIPELINING: it
clears anything left open and proves the connection still works (Postfix checks cached
sessions the same way). A session whose RSET fails is dropped and a new connection made in
its place. A session goes back after a message when it is still in step with its server;
it waits idle for C{idle_timeout} seconds (outbound.ini C{pool_timeout}) for the next
message. An idle session past its time, one that carried C{max_messages}, or one still idle
at L{ConnectionPool.close} gets QUIT.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from haraka_tw.config.formats import ini_count, ini_number

if TYPE_CHECKING:
    from haraka_tw.outbound.client import ClientSession, Destination

__all__ = ["ConnectionPool", "Lease", "PoolSettings"]


@dataclass(frozen=True)
class PoolSettings:
    """outbound.ini C{pool_concurrency_max} and C{pool_timeout}; either 0 turns reuse off
    (every message its own connection, as Haraka)."""

    max_connections: int = 10
    idle_timeout: float = 50.0

    @property
    def enabled(self) -> bool:
        return self.max_connections > 0 and self.idle_timeout > 0

    @classmethod
    def from_ini(cls, main: Mapping[str, Any]) -> PoolSettings:
        """From outbound.ini [main]; ValueError names a key whose value is not usable."""
        default = cls()
        where = "outbound.ini [main]"
        count = ini_count(main, "pool_concurrency_max", default.max_connections, where)
        return cls(count, ini_number(main, "pool_timeout", default.idle_timeout, True, where))


class Lease:
    """One delivery's right to a session of C{destination}: C{session} is an idle one to
    reuse, or None to open a new connection in its place.

    Give a session back with L{ConnectionPool.keep}; L{ConnectionPool.end} ends the lease
    otherwise (the session was closed, or none could be made).
    """

    __slots__ = ("_settled", "destination", "session")

    def __init__(self, destination: Destination, session: ClientSession | None) -> None:
        self.destination = destination
        self.session = session
        self._settled = False


@dataclass(eq=False)
class _Idle:
    session: ClientSession
    timer: IDelayedCall | None = None

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class ConnectionPool:
    """Sessions by destination, at most C{max_connections} each; see the module docstring.

    @param clock: for the idle timers.
    @param idle_timeout: seconds an unused session is kept.
    @param max_connections: sessions to one destination at once (at least 1).
    @param max_messages: transactions after which a session is closed rather than kept.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        idle_timeout: float = PoolSettings.idle_timeout,
        max_connections: int = PoolSettings.max_connections,
        max_messages: int = 100,
    ) -> None:
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.max_connections = max(1, max_connections)
        self.max_messages = max_messages
        self._idle: dict[Destination, list[_Idle]] = {}
        self._open: dict[Destination, int] = {}  # sessions busy, idle or being opened
        self._waiting: dict[Destination, deque[Deferred[Lease]]] = {}
        self._closing: set[Deferred[None]] = set()
        self.closed = False

    def configure(self, settings: PoolSettings) -> None:
        """New limits (outbound.ini reloaded); sessions already open stay."""
        self.idle_timeout = settings.idle_timeout
        self.max_connections = max(1, settings.max_connections)
        for destination in list(self._waiting):
            while self._waiting.get(destination) and self.open(destination) < self.max_connections:
                self._open[destination] = self.open(destination) + 1
                self._hand(destination, None)

    def __len__(self) -> int:
        """The number of idle sessions."""
        return sum(len(entries) for entries in self._idle.values())

    def open(self, destination: Destination) -> int:
        """Sessions of C{destination} now: busy, idle or being opened."""
        return self._open.get(destination, 0)

    def waiting(self, destination: Destination) -> int:
        """Deliveries waiting for a session of C{destination}."""
        return len(self._waiting.get(destination, ()))

    # -- leases ------------------------------------------------------------------------------

    def lease(self, destination: Destination) -> Deferred[Lease]:
        """A lease on a session of C{destination}: an idle one, else leave to open one, else
        (all C{max_connections} busy) the first session given back. Cancelling the
        Deferred leaves the queue."""
        entries = self._idle.get(destination)
        while entries:
            entry = entries.pop()
            entry.stop()
            if not entries:
                del self._idle[destination]
            if entry.session.usable:
                return succeed(Lease(destination, entry.session))
            self._quit(entry.session)
            self._free(destination)
            entries = self._idle.get(destination)
        if self.open(destination) < self.max_connections:
            self._open[destination] = self.open(destination) + 1
            return succeed(Lease(destination, None))
        queue = self._waiting.setdefault(destination, deque())
        waiter: Deferred[Lease] = Deferred(lambda d: self._give_up(destination, d))
        queue.append(waiter)
        return waiter

    def keep(self, lease: Lease, session: ClientSession) -> bool:
        """Take C{session} back after a message: the next waiting delivery gets it, or it
        waits idle. False (nothing kept) when it should be closed instead; the caller
        closes it and calls L{end}."""
        if (
            lease._settled
            or self.closed
            or not session.usable
            or session.transactions >= self.max_messages
        ):
            return False
        lease._settled = True
        destination = session.destination
        if self._waiting.get(destination):
            self._hand(destination, session)
            return True
        entry = _Idle(session)
        entry.timer = self._clock.callLater(self.idle_timeout, self._expire, entry)
        self._idle.setdefault(destination, []).append(entry)
        session.proto.closed().addCallback(lambda _: self._forget(entry))
        return True

    def end(self, lease: Lease) -> None:
        """The lease is over without a session kept: its place goes to the next waiting
        delivery. Ending a lease twice, or one whose session was kept, does nothing."""
        if lease._settled:
            return
        lease._settled = True
        self._free(lease.destination)

    def close(self) -> Deferred[None]:
        """QUIT every idle session and keep none from now on; fires when all are closed."""
        self.closed = True
        for entries in list(self._idle.values()):
            for entry in list(entries):
                self._remove(entry)
                self._quit(entry.session)
                self._free(entry.session.destination)
        waiting = list(self._closing)
        return DeferredList(waiting, consumeErrors=True).addCallback(lambda _: None)

    # -- internals ---------------------------------------------------------------------------

    def _hand(self, destination: Destination, session: ClientSession | None) -> None:
        """The first waiting delivery takes a place (and C{session}, if any)."""
        queue = self._waiting[destination]
        waiter = queue.popleft()
        if not queue:
            del self._waiting[destination]
        waiter.callback(Lease(destination, session))

    def _free(self, destination: Destination) -> None:
        """A session of C{destination} is gone: a waiting delivery may open another."""
        if self._waiting.get(destination):
            self._hand(destination, None)
            return
        count = self.open(destination) - 1
        if count > 0:
            self._open[destination] = count
        else:
            self._open.pop(destination, None)

    def _give_up(self, destination: Destination, waiter: Deferred[Lease]) -> None:
        queue = self._waiting.get(destination)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[destination]

    def _expire(self, entry: _Idle) -> None:
        if self._remove(entry):
            self._quit(entry.session)
            self._free(entry.session.destination)

    def _forget(self, entry: _Idle) -> None:
        """The server closed an idle session: drop it."""
        if self._remove(entry):
            self._free(entry.session.destination)

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
