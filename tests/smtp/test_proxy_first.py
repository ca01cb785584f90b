"""ProxyFirstFactory on its own (StringTransport, task.Clock): the PROXY header a trusted
proxy sends before TLS, read before the wrapped protocol starts. The end-to-end tests, with
TLS and a real HAProxy, are in tests/e2e/test_haproxy_tls.py."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from haraka_tw.smtp.proxy_first import ProxyFirstFactory, proxy_header_below
from haraka_tw.smtp.settings import SessionSettings
from tests.haproxy import v1_header, v2_header, v2_local

PROXY = "127.0.0.1"
HELLO = b"\x16\x03\x01 a TLS ClientHello"
TRUSTING = SessionSettings(proxy_hosts=(ipaddress.ip_network(PROXY),), proxy_timeout=5.0)


class Wrapped(Protocol):
    """Stands for the TLS layer: records what reaches it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.made = False
        self.lost = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class Case:
    """One factory, and connections made through it."""

    def __init__(self, settings: SessionSettings = TRUSTING) -> None:
        self.clock = Clock()
        self.settings = settings
        self.logged: list[str] = []
        self.factory = ProxyFirstFactory(
            Factory.forProtocol(Wrapped), self.clock, lambda: self.settings, self.logged.append
        )

    def connect(self, peer: str = PROXY) -> tuple[Any, StringTransport, Wrapped]:
        address = IPv4Address("TCP", peer, 40000)
        transport = StringTransport(peerAddress=address)
        proto = self.factory.buildProtocol(address)
        proto.makeConnection(transport)
        return proto, transport, proto.wrappedProtocol


def test_header_first_then_the_rest_goes_on() -> None:
    """From a trusted proxy the wrapped protocol starts once the header is in, with the
    bytes that followed it; the header is found below it."""
    case = Case()
    proto, transport, wrapped = case.connect()
    header = v1_header(("192.0.2.9", 40001), ("127.0.0.1", 465))
    proto.dataReceived(header[:10])
    assert not wrapped.made
    proto.dataReceived(header[10:] + HELLO)
    assert wrapped.made and wrapped.received == [HELLO]
    found = proxy_header_below(wrapped)  # (wrapped.transport is the wrapper)
    assert found is not None and (found.source_ip, found.source_port) == ("192.0.2.9", 40001)
    assert case.clock.getDelayedCalls() == []  # the header timer is gone
    assert not transport.disconnecting


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_chunking_gives_the_same_result(cuts: list[int]) -> None:
    """A v2 header and the bytes after it, cut anywhere: the same header, the same bytes."""
    data = v2_header(("192.0.2.9", 40001), ("127.0.0.1", 465), [(0x05, b"id-1")]) + HELLO
    case = Case()
    proto, _, wrapped = case.connect()
    at = 0
    for cut in cuts:
        proto.dataReceived(data[at : at + cut])
        at += cut
    proto.dataReceived(data[at:])
    assert b"".join(wrapped.received) == HELLO
    found = proxy_header_below(wrapped)
    assert found is not None and found.version == 2 and found.source_ip == "192.0.2.9"


def test_local_header_keeps_the_proxy() -> None:
    """A v2 LOCAL header (a health check) starts the connection as the proxy's own."""
    proto, _, wrapped = Case().connect()
    proto.dataReceived(v2_local() + HELLO)
    found = proxy_header_below(wrapped)
    assert wrapped.made and found is not None and found.local


def test_untrusted_host_goes_straight_through() -> None:
    """Any other host: the wrapped protocol starts at once and gets the bytes unchanged,
    a PROXY header included (TLS refuses it); no header is found, no timer runs."""
    case = Case()
    proto, _, wrapped = case.connect("127.0.0.7")
    assert wrapped.made
    header = v1_header(("192.0.2.9", 40001), ("127.0.0.1", 465))
    proto.dataReceived(header)
    assert wrapped.received == [header]
    assert proxy_header_below(wrapped) is None
    assert case.clock.getDelayedCalls() == []


def test_bad_header_is_dropped_and_logged() -> None:
    """A trusted proxy's malformed header: aborted, logged, the wrapped protocol never
    started."""
    case = Case()
    proto, transport, wrapped = case.connect()
    proto.dataReceived(b"PROXY TCP4 nonsense\r\n")
    assert transport.disconnected
    assert not wrapped.made
    assert case.logged and "bad PROXY header" in case.logged[0] and PROXY in case.logged[0]
    assert case.clock.getDelayedCalls() == []


def test_no_header_in_time() -> None:
    """Nothing within [haproxy] timeout: aborted and logged."""
    case = Case()
    _, transport, wrapped = case.connect()
    case.clock.advance(4.9)
    assert not transport.disconnected
    case.clock.advance(0.2)
    assert transport.disconnected and not wrapped.made
    assert "no PROXY header in time" in case.logged[0]


def test_lost_while_waiting() -> None:
    """The proxy goes away before its header: the timer goes, the wrapped protocol, never
    started, is not told."""
    case = Case()
    proto, _, wrapped = case.connect()
    proto.connectionLost(Failure(ConnectionError("gone")))
    assert case.clock.getDelayedCalls() == []
    assert not wrapped.made and not wrapped.lost


def test_settings_are_read_per_connection() -> None:
    """A reload that lists the proxy applies to the next connection."""
    case = Case(SessionSettings())
    _, _, first = case.connect()
    assert first.made  # not trusted yet: straight through
    case.settings = TRUSTING
    _, _, second = case.connect()
    assert not second.made  # now it owes a header
