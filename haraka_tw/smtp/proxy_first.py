"""A PROXY header before TLS: implicit TLS listeners (port 465) behind a load balancer.

On a plain listener the session reads the PROXY header itself, before its banner. On an
implicit TLS listener the session sits above the TLS layer, and HAProxy's C{send-proxy}
puts the header in the clear ahead of the client's TLS handshake; TLS would take it for a
broken ClientHello. L{ProxyFirstFactory} goes under the TLS layer and, for connections
from connection.ini C{[haproxy] hosts}, reads the header first and only then lets TLS (and
so the session) begin. The session finds the header with L{proxy_header_below} and applies
it as it does on a plain port: connect_init, lookup_rdns and connect see the real client.

Nothing can be said to the client before TLS, so a trusted proxy that sends a malformed
header, or none within C{[haproxy] timeout}, is logged and disconnected without a reply
(on a plain port it gets a 421). A connection from any other host is passed to TLS as it
is: a PROXY header from it fails the handshake, so it cannot name a client. Every
connection of an implicit TLS listener passes through the wrapper, listed proxies or not
(a reload may list them later): a method call per read, next to TLS's own work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from haraka_tw.smtp.proxy import ProxyError, ProxyHeader, parse_proxy_header
from haraka_tw.smtp.settings import SessionSettings

__all__ = ["ProxyFirstFactory", "proxy_header_below"]


class _ProxyFirst(ProtocolWrapper):
    """One connection: from a trusted proxy, its PROXY header, then the wrapped protocol."""

    factory: ProxyFirstFactory
    proxy_header: ProxyHeader | None = None
    _waiting = False
    _timer: IDelayedCall | None = None

    def makeConnection(self, transport: ITransport) -> None:
        # As ProtocolWrapper's, but the wrapped protocol starts only once any header is in.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        peer = transport.getPeer()
        settings = self.factory.settings()
        if not settings.trusts_proxy(getattr(peer, "host", "")):
            self._begin()
            return
        self._waiting = True
        self._buffer = bytearray()
        self._timer = self.factory.reactor.callLater(settings.proxy_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if not self._waiting:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        try:
            header = parse_proxy_header(bytes(self._buffer))
        except ProxyError as e:
            self._refuse(f"bad PROXY header: {e}")
            return
        if header is None:
            return  # (the rest is still to come)
        rest = bytes(self._buffer[header.length :])
        self._buffer = bytearray()
        self._waiting = False
        self._cancel_timer()
        self.proxy_header = header
        self._begin()
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self._waiting:  # the wrapped protocol never began: nothing to tell it
            self._waiting = False
            self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]
            return
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _begin(self) -> None:
        """Start the wrapped protocol (TLS) on this connection."""
        self.wrappedProtocol.makeConnection(cast(ITransport, self))

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse("no PROXY header in time")

    def _refuse(self, why: str) -> None:
        self._cancel_timer()
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.factory.log(f"{why} from {getattr(peer, 'host', peer)} (implicit TLS): closing")
        self._buffer = bytearray()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class ProxyFirstFactory(WrappingFactory):
    """Wraps the factory of an implicit TLS listener (the TLS factory, over the session's)
    so that trusted proxies' connections give their PROXY header first.

    @param settings: the current session settings (read per connection, so a reload of
        connection.ini applies): C{proxy_hosts} and C{proxy_timeout}.
    @param log: takes a line about a refused connection.
    """

    protocol = _ProxyFirst

    def __init__(
        self,
        wrapped: IProtocolFactory,
        reactor: IReactorTime,
        settings: Callable[[], SessionSettings],
        log: Callable[[str], None],
    ) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self.settings = settings
        self.log = log


def proxy_header_below(transport: ITransport | None) -> ProxyHeader | None:
    """The PROXY header a L{ProxyFirstFactory} read under C{transport} (the session's
    transport is the TLS layer; the wrapper is below it), or None."""
    below: Any = transport
    for _ in range(4):  # TLS, then the wrapper; a few layers at most
        below = getattr(below, "transport", None)
        if below is None:
            return None
        if isinstance(below, _ProxyFirst):
            return below.proxy_header
    return None
