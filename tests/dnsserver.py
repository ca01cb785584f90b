"""A real DNS server on loopback for the tests: UDP and TCP on one free port, from a zone text.

It answers as a recursive resolver would for the names in one zone (origin ``.`` by
default, so one zone text can hold ``example.test.`` and ``in-addr.arpa.`` names): the
CNAME chain followed inside the zone, NXDOMAIN for a name that does not exist (empty
non-terminals exist), NOERROR with no answer for a missing type.

Per-name behaviours override that. Each is a set of ``name`` (every type) or
``name/TYPE`` entries, the final dot optional: ``servfail`` and ``refused`` answer with
that rcode; ``truncate`` answers over UDP with an empty TC response (the answer comes over
TCP); ``timeout`` never answers (after ``truncate``, so a name in both hangs over TCP);
``spoof`` sends a reply with a wrong id first. ``formerr_edns`` answers FORMERR to any
query with EDNS, as old servers do. :attr:`DNSServer.queries` records
``(transport, name, type, edns)`` for each query.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.zone
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol


def _entries(names: Iterable[str]) -> frozenset[str]:
    out = set()
    for entry in names:
        name, _, rdtype = entry.partition("/")
        text = dns.name.from_text(name).to_text().lower()
        out.add(f"{text}/{rdtype.upper()}" if rdtype else text)
    return frozenset(out)


class DNSServer:
    """Answers queries for ``zone_text``; :meth:`start` listens, :meth:`stop` closes."""

    def __init__(
        self,
        zone_text: str,
        *,
        origin: str = ".",
        servfail: Iterable[str] = (),
        refused: Iterable[str] = (),
        timeout: Iterable[str] = (),
        truncate: Iterable[str] = (),
        spoof: Iterable[str] = (),
        formerr_edns: bool = False,
    ) -> None:
        self.zone = dns.zone.from_text(
            zone_text, origin=origin, relativize=False, check_origin=False
        )
        self.servfail, self.refused = _entries(servfail), _entries(refused)
        self.timeout, self.truncate, self.spoof = (
            _entries(timeout),
            _entries(truncate),
            _entries(spoof),
        )
        self.formerr_edns = formerr_edns
        self.queries: list[tuple[str, str, str, bool]] = []
        self.port = 0
        self._ports: list[Any] = []
        self._connections: set[_TCPConnection] = set()

    def start(self, reactor: Any, interface: str = "127.0.0.1") -> int:
        """Listen on ``interface``, UDP and TCP on the same free port; return the port."""
        for _ in range(20):
            udp = reactor.listenUDP(0, _UDPProtocol(self), interface=interface)
            port: int = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, _TCPFactory(self), interface=interface)
            except Exception:
                udp.stopListening()
                continue
            self._ports, self.port = [udp, tcp], port
            return port
        raise RuntimeError("no free port for both UDP and TCP")

    def stop(self) -> defer.Deferred[Any]:
        """Close the listeners and any open TCP connection; fires when all are closed."""
        closing = [defer.maybeDeferred(port.stopListening) for port in self._ports]
        for connection in list(self._connections):
            closing.append(connection.lost)
            connection.transport.abortConnection()  # type: ignore[attr-defined]
        self._ports = []
        return defer.gatherResults(closing)

    def answer(self, wire: bytes, transport: str) -> list[bytes]:
        """The datagrams or TCP messages to send back for the query ``wire``."""
        query = dns.message.from_wire(wire)
        question = query.question[0]
        qname, rdtype = question.name, question.rdtype
        type_text = dns.rdatatype.to_text(rdtype)
        self.queries.append((transport, qname.to_text(), type_text, query.edns >= 0))
        keys = {qname.to_text().lower(), f"{qname.to_text().lower()}/{type_text}"}
        response = dns.message.make_response(query)
        if self.formerr_edns and query.edns >= 0:
            response.use_edns(False)
            response.set_rcode(dns.rcode.FORMERR)
        elif keys & self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif keys & self.refused:
            response.set_rcode(dns.rcode.REFUSED)
        elif keys & self.truncate and transport == "udp":
            response.flags |= dns.flags.TC
        elif keys & self.timeout:
            return []
        else:
            self._resolve(response, qname, rdtype)
        replies = [response.to_wire()]
        if keys & self.spoof:
            response.id ^= 0x5A5A
            replies.insert(0, response.to_wire())
        return replies

    def _resolve(self, response: dns.message.Message, qname: dns.name.Name, rdtype: int) -> None:
        """Fill the answer section, following CNAMEs inside the zone."""
        for _ in range(8):
            node = self.zone.get_node(qname)
            if node is None:
                if not any(name.is_subdomain(qname) for name in self.zone.nodes):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return
            for wanted in (rdtype, dns.rdatatype.CNAME):
                rdataset = node.get_rdataset(dns.rdataclass.IN, wanted)  # type: ignore[arg-type]
                if rdataset is not None:
                    rrset = response.find_rrset(
                        response.answer, qname, dns.rdataclass.IN, wanted, create=True
                    )
                    rrset.update(rdataset)
                    break
            if rdataset is None or wanted == rdtype:
                return
            qname = rdataset[0].target


def serve(
    testcase: Any, zone_text: str, interface: str = "127.0.0.1", **behaviours: Any
) -> DNSServer:
    """A L{DNSServer} listening on the global reactor, stopped when the trial test ends."""
    from twisted.internet import reactor

    server = DNSServer(zone_text, **behaviours)
    server.start(reactor, interface)
    testcase.addCleanup(server.stop)
    return server


class _UDPProtocol(DatagramProtocol):
    noisy = False

    def __init__(self, server: DNSServer) -> None:
        self.server = server

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        for reply in self.server.answer(datagram, "udp"):
            self.transport.write(reply, addr)  # type: ignore[union-attr]


class _TCPConnection(Protocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.buffer = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.server._connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + length:
                return
            wire, self.buffer = self.buffer[2 : 2 + length], self.buffer[2 + length :]
            for reply in self.server.answer(wire, "tcp"):
                self.transport.write(struct.pack("!H", len(reply)) + reply)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.server._connections.discard(self)
        self.lost.callback(None)


class _TCPFactory(Factory):
    noisy = False

    def __init__(self, server: DNSServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> _TCPConnection:
        return _TCPConnection(self.server)
