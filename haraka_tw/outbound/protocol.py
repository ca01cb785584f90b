"""The I/O half of the outbound client: one TCP (or TLS) connection to an SMTP/LMTP server.

L{SMTPClientProtocol} knows nothing about the SMTP dialogue; L{dialogue} and L{client} drive
it. It offers:

- L{reply}: a Deferred of the next whole reply, with a per-phase timeout. Replies that
  arrive before anyone asks are queued, so a pipelined batch is written once and its
  replies are taken one by one, in order; only one Deferred is ever outstanding.
- L{start_tls}: STARTTLS's handshake, firing when it completes.
- L{send_body}: the message, dot-stuffed as it streams, under the transport's flow
  control (a pull producer: the next 64 KiB is read only when the socket took the last),
  with the RFC 5321 data-block timeout between writes.
- L{close} / L{abort}: both fire once the connection is really gone, so a finished
  delivery leaves nothing on the reactor.

A lost connection, a timeout or a malformed reply fails whatever is outstanding (or the
next request) with a temporary L{DeliveryError} naming the phase. Cancelling an
outstanding Deferred aborts the connection. A timeout of None sets no timer: the caller
bounds the whole dialogue (as the auth plugins' remote login check does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPullProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.outbound.delivery import DeliveryError, Phase
from haraka_tw.outbound.dotstuff import DotStuffer
from haraka_tw.outbound.tls_client import ClientTLS
from haraka_tw.outbound.wire import ReplyError, ReplyReader
from haraka_tw.smtp.replies import Reply

__all__ = ["WRITE_SIZE", "SMTPClientProtocol", "TLSHandshakeError"]

WRITE_SIZE = 64 * 1024  # the most message bytes read and written per turn of the producer


class TLSHandshakeError(DeliveryError):
    """The STARTTLS handshake (or the certificate check) failed; the connection is gone."""


class _Wait:
    """The one outstanding request: its Deferred, phase and timer; C{handshake} when it
    waits for the TLS handshake rather than a reply."""

    def __init__(
        self,
        deferred: Deferred[Any],
        phase: Phase,
        timer: IDelayedCall | None,
        handshake: bool = False,
    ) -> None:
        self.deferred = deferred
        self.phase = phase
        self.timer: IDelayedCall | None = timer
        self.handshake = handshake

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """One outbound connection; see the module docstring."""

    def __init__(self, clock: IReactorTime | None = None, tls: ClientTLS | None = None) -> None:
        """``clock``: for the timeouts (None only when every timeout asked for is None);
        ``tls``: for a connection that is TLS from the start, whose handshake it checks."""
        self._clock = clock
        self._tls = tls
        self._reader = ReplyReader()
        self._replies: deque[Reply] = deque()
        self._wait: _Wait | None = None
        self._body: _BodyProducer | None = None
        self._broken: str | None = None  # why the connection is unusable (lost, bad reply)
        self._closed: list[Deferred[None]] = []
        self.lost = False
        self._tls_next = False  # STARTTLS sent: its reply ends the plaintext
        self._plaintext_over = False  # that reply came; the rest waits for the handshake
        self.secured = False
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Connected, nothing unread and nothing half-received: ready for a command."""
        return (
            not self.lost
            and self._broken is None
            and not self._tls_next
            and not self._plaintext_over
            and self._wait is None
            and self._body is None
            and not self._replies
            and self._reader.idle
        )

    def take_reply(self) -> Reply | None:
        """A reply received but not yet asked for, if any."""
        return self._replies.popleft() if self._replies else None

    # -- requests ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write ``data`` now (ignored once the connection is lost)."""
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def command(self, line: bytes, phase: Phase, timeout: float | None) -> Deferred[Reply]:
        """Write one command line and return its reply."""
        self.write(line)
        return self.reply(phase, timeout)

    def reply(self, phase: Phase, timeout: float | None) -> Deferred[Reply]:
        """The next reply; fails with a temporary L{DeliveryError} if the connection is
        lost, the reply is malformed or does not come within ``timeout`` seconds."""
        if self._wait is not None:
            raise RuntimeError("a reply is already awaited")
        if self._replies:
            return succeed(self._replies.popleft())
        if self._broken is not None:
            return fail(DeliveryError(phase, self._broken))
        d: Deferred[Reply] = Deferred(self._cancel)
        self._wait = _Wait(d, phase, self._timer(phase, timeout, f"no {phase} reply"))
        return d

    def starttls(self, timeout: float | None) -> Deferred[Reply]:
        """Send STARTTLS and return its reply; nothing the server sends after that reply
        in plaintext is read. On a 220 call L{start_tls}, else L{resume_plaintext}."""
        self._tls_next = True
        return self.command(b"STARTTLS\r\n", "starttls", timeout)

    def resume_plaintext(self) -> None:
        """STARTTLS was refused: read plaintext again."""
        self._tls_next = self._plaintext_over = False

    def start_tls(self, tls: ClientTLS, timeout: float | None) -> Deferred[None]:
        """Start TLS (after the server's 220 to STARTTLS); fires when the handshake is done
        and the certificate passed L{ClientTLS.check}.

        @return: fails with L{TLSHandshakeError} if the handshake or the verification fails.
        """
        if self._broken is not None:
            return fail(TLSHandshakeError("starttls", self._broken))
        self._replies.clear()  # nothing sent in plaintext after the 220 counts (RFC 3207 4.2)
        self._reader = ReplyReader()
        self._tls_next = self._plaintext_over = False
        self._tls = tls
        d: Deferred[None] = Deferred(self._cancel)
        timer = self._timer("starttls", timeout, "no TLS handshake")
        self._wait = _Wait(d, "starttls", timer, handshake=True)
        self.transport.startTLS(tls)  # type: ignore[union-attr]
        return d

    def send_body(self, chunks: Iterable[bytes], block_timeout: float | None) -> Deferred[int]:
        """Stream ``chunks`` dot-stuffed, then the terminator; fires with the bytes sent."""
        if self._broken is not None:
            return fail(DeliveryError("data", self._broken))
        body = _BodyProducer(self, iter(chunks), block_timeout)
        self._body = body
        self.transport.registerProducer(body, False)  # type: ignore[union-attr]
        return body.done

    def closed(self) -> Deferred[None]:
        """Fires once the connection is lost (at once if it already is, or never was made)."""
        if self.lost or self.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        return d

    def close(self, timeout: float | None = None) -> Deferred[None]:
        """Close after pending writes (dropping it if that takes over ``timeout`` seconds);
        fires once closed."""
        if self.lost or self.transport is None:
            return succeed(None)
        self.transport.loseConnection()
        d = self.closed()
        if timeout is not None:
            timer = self._call_later(timeout, self.abort)

            def closed(result: None) -> None:
                if timer.active():
                    timer.cancel()

            d.addCallback(closed)
        return d

    def abort(self) -> Deferred[None]:
        """Drop the connection now; fires once closed."""
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return self.closed()

    # -- Twisted callbacks ---------------------------------------------------------------

    def connectionMade(self) -> None:
        # Every write is a whole pipelined batch or a block of the message, so Nagle's
        # algorithm would only hold back the last small write (the ending dot, a QUIT)
        # until the server's delayed ACK: 40 ms a message on Linux.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)

    def dataReceived(self, data: bytes) -> None:
        if self._broken is not None or self._plaintext_over:
            return  # broken, or plaintext after the reply to STARTTLS: never read
        try:
            replies = self._reader.feed(data, last=self._tls_next)
        except ReplyError as e:
            self._replies.clear()
            self._break(f"bad reply: {e}")
            self.abort()
            return
        if replies and self._tls_next:
            self._tls_next = False
            self._plaintext_over = True
        self._replies.extend(replies)
        wait = self._wait
        if wait is not None and self._replies and not wait.handshake:
            self._wait = None
            wait.stop_timer()
            wait.deferred.callback(self._replies.popleft())

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        if self.lost or self._broken is not None or transport is None:
            return
        handle = transport.getHandle()
        try:
            if self._tls is not None:
                self._tls.check(handle)
        except Exception as e:
            self._break(f"certificate verification failed: {e}")
            self.abort()
            return
        self.secured = True
        self.tls_cipher = handle.get_cipher_name()
        self.tls_version = handle.get_protocol_version_name()
        wait = self._wait
        if wait is not None and wait.handshake:
            self._wait = None
            wait.stop_timer()
            wait.deferred.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._break(f"connection lost: {reason.getErrorMessage()}")
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    # -- internals -----------------------------------------------------------------------

    def _break(self, why: str) -> None:
        """Mark the connection unusable and fail what is outstanding with ``why``."""
        if self._broken is None:
            self._broken = why
        wait, self._wait = self._wait, None
        if wait is not None:
            wait.stop_timer()
            if wait.handshake:
                wait.deferred.errback(
                    TLSHandshakeError(wait.phase, f"TLS handshake failed: {self._broken}")
                )
            else:
                wait.deferred.errback(DeliveryError(wait.phase, self._broken))
        body, self._body = self._body, None
        if body is not None:
            body.fail(DeliveryError("data", self._broken))

    def _timer(self, phase: Phase, timeout: float | None, what: str) -> IDelayedCall | None:
        if timeout is None:
            return None

        def expire() -> None:
            self._break(f"{what} within {timeout:g}s (timeout)")
            self.abort()

        return self._call_later(timeout, expire)

    def _call_later(self, delay: float, call: Any) -> IDelayedCall:
        if self._clock is None:
            raise RuntimeError("a timeout needs the protocol to have a clock")
        return self._clock.callLater(delay, call)

    def _cancel(self, d: Deferred[Any]) -> None:
        """A caller cancelled the outstanding Deferred: drop the connection."""
        if self._wait is not None and self._wait.deferred is d:
            self._wait.stop_timer()
            self._wait = None
        if self._body is not None and self._body.done is d:
            self._body.stop_timer()
            self._body = None
        if self._broken is None:
            self._broken = "cancelled"
        self.abort()

    def _body_finished(self, body: _BodyProducer) -> None:
        if self._body is body:
            self._body = None


@implementer(IPullProducer)
class _BodyProducer:
    """Writes the stuffed message each time the transport asks for more."""

    def __init__(
        self, proto: SMTPClientProtocol, chunks: Iterator[bytes], block_timeout: float | None
    ) -> None:
        self._proto = proto
        self._chunks = chunks
        self._pending = memoryview(b"")
        self._stuffer = DotStuffer()
        self._block_timeout = block_timeout
        self._timer: IDelayedCall | None = None
        self.done: Deferred[int] = Deferred(proto._cancel)

    def stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def fail(self, error: Exception) -> None:
        self.stop_timer()
        if not self.done.called:
            self.done.errback(error)

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        self.stop_timer()
        self._timer = self._proto._timer(
            "data", self._block_timeout, "the server took no message data"
        )
        try:
            piece, last = self._next()
        except Exception as e:  # the message source failed: a local, temporary problem
            self._proto._break(f"reading the message failed: {e!r}")
            self._proto.abort()
            return
        transport: Any = self._proto.transport
        if not last:
            transport.write(self._stuffer.feed(piece))
            return
        # The end goes with the last piece: one write, not one more turn of the reactor.
        transport.unregisterProducer()
        transport.write(self._stuffer.feed(piece) + self._stuffer.close())
        self.stop_timer()
        self._proto._body_finished(self)
        self.done.callback(self._stuffer.size)

    def stopProducing(self) -> None:
        self.stop_timer()  # the connection is going; connectionLost fails C{done}

    def _next(self) -> tuple[bytes, bool]:
        """Up to L{WRITE_SIZE} bytes of message, and whether the message ends with them."""
        out: list[bytes] = []
        size = 0
        while size < WRITE_SIZE:
            if not self._pending:
                chunk = next(self._chunks, None)
                if chunk is None:
                    return b"".join(out), True
                self._pending = memoryview(chunk)
                continue
            take = self._pending[: WRITE_SIZE - size]
            self._pending = self._pending[len(take) :]
            out.append(bytes(take))
            size += len(take)
        return b"".join(out), False
