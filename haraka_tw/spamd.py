"""A client of SpamAssassin's spamd: one request per connection, SPAMC/1.5.

The request is a line (C{HEADERS SPAMC/1.5}), header lines (C{Content-length}, C{User})
and a blank line, then the message, exactly C{Content-length} bytes. spamd answers with a
status line (C{SPAMD/1.1 0 EX_OK}), header lines (C{Spam: True ; 15.2 / 5.0},
C{Content-length}) and a body: for C{HEADERS}, the message's header as SpamAssassin
rewrote it; for C{SYMBOLS}, the names of the tests that hit; for C{CHECK}, nothing.

The message is written as the spool holds it, a chunk at a time as the socket takes it
(a pull producer), so a large message is never copied whole into the transport's buffer.
The reply is read to at most C{MAX_REPLY} bytes and within the caller's time limit;
anything else (a refused connection, a status other than 0, a reply cut short or too
long, no C{Spam:} line) is a L{SpamdError} saying what happened.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IPullProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "DEFAULT_PORT",
    "MAX_REPLY",
    "SpamdAddress",
    "SpamdError",
    "SpamdReply",
    "SpamdTimeout",
    "check",
    "parse_address",
]

DEFAULT_PORT = 783
MAX_REPLY = 256 * 1024
PROTOCOL = "SPAMC/1.5"
_STATUS = re.compile(rb"^SPAMD/(\d+)\.(\d+) +(\d+) *(.*)$")
_SPAM = re.compile(
    r"^(true|false|yes|no) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)$", re.IGNORECASE
)
_HOST_PORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]\s]+))(?::(\d{1,5}))?$")


class SpamdError(Exception):
    """spamd could not be asked, or did not answer as the protocol says."""


class SpamdTimeout(SpamdError):
    """spamd took too long: to take the connection (C{connecting}), or to answer."""

    def __init__(self, message: str, connecting: bool) -> None:
        super().__init__(message)
        self.connecting = connecting


@dataclass(frozen=True)
class SpamdAddress:
    """Where spamd listens: a host (name or address) and port, or a Unix socket's path."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
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


def parse_address(text: str) -> SpamdAddress:
    """C{host}, C{host:port}, C{[v6]:port} or C{/path}; ValueError saying what is wrong."""
    text = text.strip()
    if text.startswith("/"):
        return SpamdAddress(path=text)
    if text.count(":") > 1 and not text.startswith("["):
        return SpamdAddress(host=text)  # a bare IPv6 address
    match = _HOST_PORT.match(text)
    if match is None:
        raise ValueError(f"not a host, host:port, [IPv6]:port or /path: {text!r}")
    port = int(match.group(3)) if match.group(3) else DEFAULT_PORT
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return SpamdAddress(host=match.group(1) or match.group(2), port=port)


@dataclass(frozen=True)
class SpamdReply:
    """spamd's answer: the verdict of its C{Spam:} line, and the body."""

    is_spam: bool
    score: float
    threshold: float
    body: bytes

    def header_fields(self) -> list[tuple[str, str]]:
        """The fields of a C{HEADERS} body as (name, value), a folded value with its folds
        as C{"\\n"} and the continuation line's leading white space (a line of white space
        alone is dropped: it would end a header it is written into)."""
        fields: list[tuple[str, str]] = []
        for line in self.body.decode("utf-8", "replace").split("\n"):
            line = line.rstrip("\r")
            if not line:
                break  # the end of the header
            if line[:1] in (" ", "\t"):
                if fields and line.strip():
                    name, value = fields[-1]
                    fields[-1] = (name, f"{value}\n{line}")
                continue
            name, colon, value = line.partition(":")
            if colon and name and " " not in name and "\t" not in name:
                fields.append((name, value.strip()))
        return fields

    def symbols(self) -> list[str]:
        """The tests of a C{SYMBOLS} body."""
        text = self.body.decode("ascii", "replace").strip()
        return [name for name in re.split(r"[,\s]+", text) if name]


def parse_reply(data: bytes) -> SpamdReply:
    """A whole reply of spamd; SpamdError when it is not one."""
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    status = _STATUS.match(first)
    if status is None:
        shown = first[:80].decode("ascii", "replace")
        raise SpamdError(f"spamd's reply is not SPAMD/x.y: {shown!r}")
    if status.group(3) != b"0":  # (an error is the status line alone)
        text = status.group(4).decode("ascii", "replace").strip()[:80]
        raise SpamdError(f"spamd answered {int(status.group(3))} {text}".rstrip())
    head, blank, body = data.partition(b"\r\n\r\n")
    if not blank:
        head, blank, body = data.partition(b"\n\n")
    if not blank:
        raise SpamdError("spamd's reply ended before its header did")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    spam = length = None
    for line in lines[1:]:
        name, _, value = line.decode("ascii", "replace").partition(":")
        name = name.strip().lower()
        if name == "spam":
            spam = _SPAM.match(value.strip())
            if spam is None:
                raise SpamdError(f"spamd's Spam line is not understood: {value.strip()[:80]!r}")
        elif name == "content-length":
            if not value.strip().isdigit():
                raise SpamdError(f"spamd's Content-length is not a number: {value.strip()[:40]!r}")
            length = int(value)
    if spam is None:
        raise SpamdError("spamd's reply has no Spam line")
    if length is not None:
        if len(body) < length:
            raise SpamdError(f"spamd's reply was cut short ({len(body)} of {length} bytes)")
        body = body[:length]
    return SpamdReply(
        is_spam=spam.group(1).lower() in ("true", "yes"),
        score=float(spam.group(2)),
        threshold=float(spam.group(3)),
        body=body,
    )


@implementer(IPullProducer)
class _Sender:
    """Writes the request's pieces a chunk at a time, as the transport asks for more."""

    def __init__(self, protocol: _SpamdProtocol, pieces: Iterator[bytes]) -> None:
        self.protocol = protocol
        self.pieces = pieces

    def resumeProducing(self) -> None:
        transport: Any = self.protocol.transport
        if transport is None:
            return
        try:
            piece = next(self.pieces, None)
        except Exception as e:  # (the spool file could not be read)
            self.protocol.give_up(SpamdError(f"reading the message failed: {e}"))
            return
        if piece is None:
            transport.unregisterProducer()
            return
        transport.write(piece)

    def stopProducing(self) -> None:
        self.pieces = iter(())


class _SpamdProtocol(Protocol):
    def __init__(self, request: Iterator[bytes], limit: int) -> None:
        self.request = request
        self.limit = limit
        self.buffer = bytearray()
        self.done: Deferred[SpamdReply] = Deferred()
        self.error: SpamdError | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(_Sender(self, self.request), False)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > self.limit:
            self.give_up(SpamdError(f"spamd's reply is longer than {self.limit} bytes"))

    def give_up(self, error: SpamdError) -> None:
        """End the exchange with C{error} (the connection is cut)."""
        if self.error is None:
            self.error = error
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if self.error is not None:
            self.done.errback(self.error)
            return
        try:
            reply = parse_reply(bytes(self.buffer))
        except SpamdError as e:
            self.done.errback(e)
        else:
            self.done.callback(reply)


def check(
    reactor: Any,
    address: SpamdAddress,
    message: Iterable[bytes],
    length: int,
    *,
    command: str = "HEADERS",
    user: str = "",
    timeout: float = 30.0,
    connect_timeout: float = 10.0,
) -> Deferred[SpamdReply]:
    """Ask spamd about C{message} (its pieces, C{length} bytes in all), within
    C{timeout} seconds in all; SpamdError when it cannot say."""
    head = [f"{command} {PROTOCOL}", f"Content-length: {length}"]
    if user:
        head.append(f"User: {user}")
    start = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8")
    protocol = _SpamdProtocol(itertools.chain((start,), message), MAX_REPLY)

    def too_slow() -> None:
        if protocol.transport is None:
            protocol.error = SpamdTimeout(
                f"spamd at {address} took no connection within {timeout:g} s", connecting=True
            )
            connecting.cancel()
            return
        protocol.give_up(
            SpamdTimeout(f"spamd at {address} did not answer within {timeout:g} s", False)
        )

    timer = reactor.callLater(timeout, too_slow)

    def connected(_: object) -> Deferred[SpamdReply]:
        return protocol.done

    def unreachable(failure: Failure) -> Failure:
        if failure.check(SpamdError):
            return failure
        if protocol.error is not None:
            raise protocol.error
        if failure.check(TimeoutError, defer.CancelledError):
            raise SpamdTimeout(
                f"spamd at {address} took no connection within {connect_timeout:g} s", True
            )
        raise SpamdError(f"cannot reach spamd at {address}: {failure.getErrorMessage()}")

    def over(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    connecting = connectProtocol(address.endpoint(reactor, connect_timeout), protocol)
    answer: Deferred[SpamdReply] = connecting.addCallback(connected)
    return answer.addErrback(unreachable).addBoth(over)
