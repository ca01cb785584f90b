"""One request, one answer, over a stream socket: how content scanners are asked.

spamd, clamd and rspamd (asked with C{Connection: close}) all take a connection, read a
request (a few lines, then the message), answer, and close. L{exchange} does that part
for them (L{haraka_tw.spamd}, L{haraka_tw.clamd}, L{haraka_tw.rspamd}): it connects
within C{connect_timeout} (over TLS if asked), writes the request's pieces a
chunk at a time as the socket takes them (a pull producer, so a spooled message is never
copied whole into the transport's buffer), reads the answer to at most C{limit} bytes, and
gives it once the peer closes, all within C{timeout}. A peer that answers and closes while
the request is still being written (clamd over its size limit) still has its answer read.

L{parse_address} reads where such a service listens: C{host}, C{host:port},
C{[IPv6]:port}, a bare IPv6 address, or a Unix socket's C{/path}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, TimeoutError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IPullProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "Address",
    "RequestUnreadable",
    "ServiceError",
    "ServiceTimeout",
    "ServiceUnreachable",
    "chained",
    "exchange",
    "parse_address",
]

_HOST_PORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]\s/]+))(?::(\d{1,5}))?$")


class ServiceError(Exception):
    """The service could not be asked, or its answer is not one."""


class ServiceUnreachable(ServiceError):
    """No connection could be made (refused, no route, no such host)."""


class RequestUnreadable(ServiceError):
    """The request could not be read (the spool file): no fault of the service's."""


class ServiceTimeout(ServiceError):
    """The service took too long: to take the connection (C{connecting}), or to answer."""

    def __init__(self, message: str, connecting: bool) -> None:
        super().__init__(message)
        self.connecting = connecting


@dataclass(frozen=True)
class Address:
    """Where a service listens: a host (name or address) and port, or a Unix socket."""

    host: str = "localhost"
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        if self.path:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def parse_address(text: str, default_port: int) -> Address:
    """C{host}, C{host:port}, C{[v6]:port}, C{v6:port} (an IPv6 address, a colon and
    digits: the last part is the port, as Haraka reads it), a bare IPv6 address, a port
    alone (on this machine) or C{/path} (a C{:NNN} file mode after it, which Haraka's
    configs may carry, is dropped); ValueError saying what is wrong."""
    text = text.strip()
    if text.startswith("/"):
        return Address(path=re.sub(r":[0-7]{3}$", "", text))
    if text.isdigit():
        text = f"localhost:{text}"
    if text.count(":") > 1 and not text.startswith("["):
        host, _, tail = text.rpartition(":")
        if tail.isdigit() and _is_ipv6(host):
            text = f"[{host}]:{tail}"
        elif _is_ipv6(text):
            return Address(host=text, port=default_port)
    match = _HOST_PORT.match(text)
    if match is None:
        raise ValueError(f"not a host, host:port, [IPv6]:port or /path: {text!r}")
    port = int(match.group(3)) if match.group(3) else default_port
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return Address(host=match.group(1) or match.group(2), port=port)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def chained(first: bytes, rest: Iterable[bytes]) -> Generator[bytes, None, None]:
    """C{first}, then C{rest}'s pieces; closing it closes C{rest} (a generator reading the
    spool file lets go of the file)."""
    try:
        yield first
        yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()


@implementer(IPullProducer)
class _Sender:
    """Writes the request's pieces a chunk at a time, as the transport asks for more."""

    def __init__(self, protocol: _Exchange, pieces: Iterator[bytes]) -> None:
        self.protocol = protocol
        self.pieces = pieces

    def resumeProducing(self) -> None:
        transport: Any = self.protocol.transport
        if transport is None:
            return
        try:
            piece = next(self.pieces, None)
            while piece == b"":  # (an empty write would not ask for the next piece)
                piece = next(self.pieces, None)
        except Exception as e:  # (the spool file could not be read)
            self.protocol.give_up(RequestUnreadable(f"reading the message failed: {e}"))
            return
        if piece is None:
            transport.unregisterProducer()
            return
        transport.write(piece)

    def stopProducing(self) -> None:
        self.protocol.close_request()


class _Exchange(Protocol):
    def __init__(self, request: Iterator[bytes], limit: int, name: str) -> None:
        self.request = request
        self.limit = limit
        self.name = name
        self.buffer = bytearray()
        self.done: Deferred[bytes] = Deferred(self._cancelled)
        self.error: ServiceError | None = None

    def _cancelled(self, _: Deferred[bytes]) -> None:
        """Whoever waits has stopped waiting (the hook's own timeout): hang up."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(_Sender(self, self.request), False)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > self.limit:
            self.give_up(ServiceError(f"{self.name}'s answer is longer than {self.limit} bytes"))

    def give_up(self, error: ServiceError) -> None:
        """End the exchange with C{error} (the connection is cut)."""
        if self.error is None:
            self.error = error
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def close_request(self) -> None:
        """Let go of the request (a generator reading the spool file closes it)."""
        close = getattr(self.request, "close", None)
        if close is not None:
            close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.close_request()
        if self.done.called:
            return
        if self.error is not None:
            self.done.errback(self.error)
        elif not self.buffer and not reason.check(ConnectionDone):
            self.done.errback(
                ServiceError(f"{self.name} hung up without answering: {reason.getErrorMessage()}")
            )
        else:
            self.done.callback(bytes(self.buffer))


def exchange(
    reactor: Any,
    address: Address,
    request: Iterable[bytes],
    *,
    name: str,
    limit: int,
    timeout: float,
    connect_timeout: float,
    tls: IOpenSSLClientConnectionCreator | None = None,
) -> Deferred[bytes]:
    """Send C{request} (its pieces in order) to the service C{name} at C{address}; its
    answer, read until it closes the connection. ServiceTimeout past C{timeout} seconds
    in all (or C{connect_timeout} to connect), ServiceError for anything else. With
    C{tls}, the connection is TLS from its first byte (a failed handshake or certificate
    check is a ServiceError)."""
    protocol = _Exchange(iter(request), limit, name)

    def too_slow() -> None:
        if protocol.transport is None:
            protocol.error = ServiceTimeout(
                f"{name} at {address} took no connection within {timeout:g} s", connecting=True
            )
            connecting.cancel()
            return
        protocol.give_up(
            ServiceTimeout(f"{name} at {address} did not answer within {timeout:g} s", False)
        )

    def unreachable(failure: Failure) -> Failure:
        if failure.check(ServiceError):
            return failure
        if protocol.error is not None:
            raise protocol.error
        if failure.check(defer.CancelledError, ConnectingCancelledError):
            raise defer.CancelledError()  # by the caller: not a verdict on the service
        if failure.check(TimeoutError):
            raise ServiceTimeout(
                f"{name} at {address} took no connection within {connect_timeout:g} s", True
            )
        raise ServiceUnreachable(f"cannot reach {name} at {address}: {failure.getErrorMessage()}")

    def over(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        protocol.close_request()  # (also when no connection was made)
        return result

    timer = reactor.callLater(timeout, too_slow)
    endpoint = address.endpoint(reactor, connect_timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    connecting = connectProtocol(endpoint, protocol)
    answer: Deferred[bytes] = connecting.addCallback(lambda _: protocol.done)
    return answer.addErrback(unreachable).addBoth(over)
