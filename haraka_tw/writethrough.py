"""TCP listeners whose connections send a write at once when nothing is waiting to go.

Twisted's TCP transport never sends in C{write}: it buffers the bytes, asks epoll to watch
the socket for writability, and sends on the reactor's next turn, then stops watching.
For SMTP, where every command is answered by one short reply that the socket can take at
once, that is two C{epoll_ctl} calls and a reactor turn per reply. With seven replies per
message (banner, HELO, MAIL, RCPT, DATA, the 250 and QUIT's 221) it cost about 0.08 ms of
the server's CPU per message, some 10%, measured with smtp-source over loopback.

L{WriteThroughServer} sends at once when its buffer is empty, and gives Twisted whatever
the socket did not take (or an error), so order and flow control stay Twisted's: once
anything is buffered, every later write queues behind it. TLS started on the connection
(STARTTLS) goes Twisted's way; the bytes of a TLS layer above (implicit TLS on 465) are
plain writes to this transport and are sent at once too.

Where haraka_tw runs the reactor's loop (L{dispatch_without_log_context}) and a poll
returns more than one event, a write made while the reactor hands those events out is
held, and each connection's held writes leave in one send when the last event has been
handled: replies go out in batches, as through Twisted's own buffer, but without its two
C{epoll_ctl} calls and extra turn. Measured with smtp-source, one message per connection,
interleaved runs against sending at once: at 20 and 100 sessions the server's system
time per message halved (0.18 -> 0.09 ms, 0.13 -> 0.06) and its rate rose 1.15-1.4
times. A poll with one event (one client at a time) sends at once: held to the end of
that one event, the reply waited for the session's bookkeeping after it and the client
idled meanwhile (0.86 times the rate). Held writes leave before what must follow them
(a close, a half-close, STARTTLS's handshake); an abort or a lost connection drops them,
as Twisted drops its buffer.

L{write_through_reactor} wraps a reactor for L{serverFromString}, so that the C{tcp:} and
C{tcp6:} endpoints it makes listen with these ports; every other call goes to the reactor.

L{dispatch_without_log_context} is for a process that haraka_tw owns (C{twistd haraka}, a
worker): the epoll reactor hands each event to its connection inside
C{log.callWithLogger}, which sets the legacy log's "system" for the call, about 2.3 us an
event and seven events a message. Events of these connections skip it (the core logs with
the session's uuid, not the legacy system); every other event is dispatched as before.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import PosixReactorBase
from twisted.python import log

__all__ = [
    "WriteThroughPort",
    "WriteThroughServer",
    "dispatch_without_log_context",
    "write_through_reactor",
]


class _Batch:
    """The poll whose events the reactor is handing out, and the connections holding
    writes until it ends (one reactor a process: haraka_tw's own)."""

    def __init__(self) -> None:
        self.open = False
        self.held: list[WriteThroughServer] = []

    def end(self) -> None:
        """The poll's events are handed out: send what each connection holds. (One by
        one off the list: should a release raise, the rest stay listed for the next.)"""
        self.open = False
        while self.held:
            self.held.pop()._release()


_batch = _Batch()


class WriteThroughServer(tcp.Server):
    """A server-side TCP connection that sends a write at once when nothing is buffered,
    or, while the reactor hands out a poll's events, holds it until they are handed out.

    Held writes go before what must follow them. A close or half-close (which Twisted
    makes once its buffer is sent) takes them into that buffer ahead of it; a pull
    producer's first write sends them; STARTTLS sends them before its handshake. More
    than C{bufferSize} held leaves at once, so a streaming producer is paused as Twisted
    would pause it.
    """

    _held: list[bytes] | None = None  # (writes held until the poll's batch ends)
    _held_size = 0

    def _sendable(self) -> bool:
        """Whether a write may go straight to the socket. Twisted's way whenever it must
        decide: bytes buffered already, TLS on this connection, closing (lose, abort or
        half-close), or a pull producer (which Twisted asks for more only from a send it
        made itself). The attributes are Twisted's FileDescriptor's and Connection's;
        tests/test_writethrough.py pins them."""
        return bool(
            self.connected
            and not self.disconnecting
            and not self._aborting
            and not self._writeDisconnecting
            and not self._writeDisconnected
            and not self.TLS
            and not self._tempDataLen
            and self.offset >= len(self.dataBuffer)
            and (self.producer is None or self.streamingProducer)
        )

    def write(self, data: bytes) -> None:
        if type(data) is bytes and data and self._sendable():
            held = self._held
            if held is None:
                if _batch.open:
                    self._held = [data]
                    self._held_size = len(data)
                    _batch.held.append(self)
                else:
                    self._send(data)
                return
            held.append(data)  # (behind what it holds, in a batch or not: never ahead)
            self._held_size += len(data)
            if self._held_size > self.bufferSize:
                self._release()
            return
        self._release()
        super().write(data)  # type: ignore[no-untyped-call]

    def _send(self, data: bytes) -> None:
        try:
            sent = self.socket.send(data)
        except OSError:  # EAGAIN, or an error Twisted's next send will report and close on
            sent = 0
        if sent != len(data):
            super().write(data[sent:])  # type: ignore[no-untyped-call]

    def _release(self) -> None:
        """Send what this connection holds, or give it to Twisted's buffer when Twisted
        must decide (nothing goes out on a lost or aborted connection)."""
        held = self._held
        if held is None:
            return
        self._held = None
        data = held[0] if len(held) == 1 else b"".join(held)
        if self._sendable():
            self._send(data)
        else:
            super().write(data)  # type: ignore[no-untyped-call]  # (dropped if lost or aborted)

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        self._release()
        super().startTLS(ctx, normal)  # type: ignore[no-untyped-call]

    def writeSequence(self, iovec: Any) -> None:
        data = b"".join(iovec)
        if data:
            self.write(data)


class WriteThroughPort(tcp.Port):
    """A TCP listening port whose connections are L{WriteThroughServer}s."""

    transport = WriteThroughServer


class _WriteThroughReactor:  # (a proxy: zope interface declarations are the reactor's)
    """A reactor whose C{listenTCP} makes L{WriteThroughPort}s; the rest is the reactor's."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> WriteThroughPort:
        listening = WriteThroughPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def write_through_reactor(reactor: Any) -> Any:
    """C{reactor}, but listening on TCP with L{WriteThroughPort}s (for L{serverFromString}).
    Another kind of reactor (a MemoryReactor in a test) is given back as it is."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor
    return _WriteThroughReactor(reactor)


# What Twisted's EPollReactor.doPoll reads, as the copy below does.
_MODEL = frozenset({"_poller", "poll", "_selectables", "_doReadOrWrite", "callWithLogger"})


def dispatch_without_log_context(reactor: Any) -> bool:
    """Let C{reactor} (if it is the epoll reactor) hand the events of L{WriteThroughServer}
    connections and L{WriteThroughPort}s to them directly, without C{log.callWithLogger},
    and hold the writes of L{WriteThroughServer}s until a poll's events are handed out
    when it returned more than one;
    True if it now does. Twisted's C{EPollReactor.doPoll} is the model, line for line; a
    Twisted whose doPoll no longer reads what the model reads keeps its own."""
    if (
        type(reactor) is not EPollReactor
        or not set(EPollReactor.doPoll.__code__.co_names) >= _MODEL
    ):
        return False  # (another reactor, or a Twisted whose doPoll is no longer the model)
    epoll: Any = reactor  # (its private attributes, as doPoll reads them)
    ours = (WriteThroughServer, WriteThroughPort)

    def do_poll(timeout: float | None) -> None:
        try:
            events = epoll._poller.poll(-1 if timeout is None else timeout, len(epoll._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = epoll._selectables
        dispatch = epoll._doReadOrWrite
        _batch.open = len(events) > 1
        try:
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                if isinstance(selectable, ours):
                    dispatch(selectable, fd, event)
                else:
                    log.callWithLogger(selectable, dispatch, selectable, fd, event)
        finally:
            _batch.end()

    epoll.doPoll = epoll.doIteration = do_poll
    return True
