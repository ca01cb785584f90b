"""The one DNS resolver of haraka_tw: dnspython messages carried by Twisted, no threads.

dnspython builds each query and parses each answer; Twisted carries them. A query goes
over UDP from a fresh ephemeral port (so every query has a random source port as well as
a random id), connected to the nameserver so only its datagrams arrive; a datagram that
does not parse or does not answer the question (wrong id, wrong question) is ignored. An
answer with the TC bit set is asked again over TCP. Queries carry EDNS0 with a 1232-byte
payload; a nameserver that answers FORMERR or NOTIMP to that is asked once more without.

Nameservers are tried in turn, ``attempts`` rounds, as resolv.conf's ``timeout`` and
``attempts`` options mean them: each try waits ``timeout`` seconds, so a lookup gives up
after at most ``timeout * attempts * len(nameservers)`` seconds (plus TCP after a TC).
A nameserver that answers SERVFAIL, REFUSED or another error rcode is not asked again for
that query; one that refuses the datagram (ICMP unreachable) is skipped at once.

Answers are read as dnspython's stub resolver reads them: the CNAME chain in the answer
is followed (``Message.resolve_chaining``); NXDOMAIN raises :class:`NXDomain`, NOERROR
without records of the type :class:`NoAnswer`, no usable answer :class:`DNSTimeout` or
:class:`DNSServerError`. A name that is not a valid domain name (an empty label, a label
over 63 octets) cannot exist and raises :class:`NXDomain` too.

Every Deferred may be cancelled: its timer is stopped and its socket closed. A lookup's
Deferred fires only once its sockets are closed, so nothing is left in the reactor.

A resolver made with ``cache=True`` (as :meth:`Resolver.from_config` makes the server's)
keeps answers for their TTL and asks a question already on its way only once
(:class:`haraka_tw.dnscache.AnswerCache`).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.rrset
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.python.failure import Failure

from haraka_tw.config.errors import ConfigError
from haraka_tw.config.formats import ini_number
from haraka_tw.dnscache import AnswerCache, Cached

if TYPE_CHECKING:
    from haraka_tw.config import ConfigDirectory

__all__ = [
    "DNSError",
    "DNSServerError",
    "DNSTimeout",
    "NXDomain",
    "Nameserver",
    "NoAnswer",
    "Resolver",
    "parse_nameserver",
    "system_nameservers",
]

Nameserver = tuple[str, int]
"""A nameserver: an IP address (IPv4 or IPv6, no brackets) and a port."""

EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation on common paths
FALLBACK_NAMESERVER: Nameserver = ("127.0.0.1", 53)


# -- errors -------------------------------------------------------------------------------


class DNSError(Exception):
    """A lookup failed. ``name`` and ``rdtype`` (``"MX"``) say which; ``message`` why."""

    def __init__(self, name: str, rdtype: str, message: str) -> None:
        super().__init__(name, rdtype, message)
        self.name = name
        self.rdtype = rdtype
        self.message = message

    def __str__(self) -> str:
        return f"{self.rdtype} lookup of {self.name}: {self.message}"


class NXDomain(DNSError):
    """The name does not exist (NXDOMAIN), or is not a valid domain name."""


class NoAnswer(DNSError):
    """The name exists (NOERROR) but has no records of the type asked for."""


class DNSTimeout(DNSError):
    """No nameserver answered in time (or every one was unreachable)."""


class DNSServerError(DNSError):
    """The nameservers answered with an error: SERVFAIL, REFUSED, FORMERR, ... (``rcode``)."""

    def __init__(self, name: str, rdtype: str, rcode: dns.rcode.Rcode, message: str) -> None:
        super().__init__(name, rdtype, message)
        self.rcode = rcode


# -- nameservers --------------------------------------------------------------------------


def parse_nameserver(text: str) -> Nameserver:
    """``ip``, ``ip:port``, ``v6``, ``[v6]`` or ``[v6]:port`` -> (ip, port); ValueError if not."""
    text = text.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not ip, ip:port or [ipv6]:port")
        port = rest[1:] if rest else port
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r}: {port!r} is not a port number")
    return str(address), int(port)


def system_nameservers(path: str = "/etc/resolv.conf") -> list[Nameserver]:
    """The nameservers a resolv.conf names (dnspython reads it); 127.0.0.1:53 if none."""
    try:
        system = dns.resolver.Resolver(filename=path, configure=True)
    except (dns.exception.DNSException, OSError):
        return [FALLBACK_NAMESERVER]
    found: list[Nameserver] = []
    for server in system.nameservers:
        if isinstance(server, dns.nameserver.Do53Nameserver):
            found.append((server.address, server.port))
        elif isinstance(server, str):
            try:
                found.append((str(ipaddress.ip_address(server)), system.port))
            except ValueError:
                continue  # a DNS-over-HTTPS URL: not for us
    return found or [FALLBACK_NAMESERVER]


# -- the resolver -------------------------------------------------------------------------


class Resolver:
    """Asks ``nameservers`` (default: resolv.conf's) and reads the answers.

    ``reactor`` must provide IReactorUDP, IReactorTCP and IReactorTime. With ``cache``,
    answers are kept for their TTL (``self.cache``, an :class:`AnswerCache`).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        nameservers: Sequence[Nameserver] | None = None,
        timeout: float = 5.0,
        attempts: int = 2,
        cache: bool = False,
    ) -> None:
        self.clock = IReactorTime(reactor)
        self.udp = IReactorUDP(reactor)
        self.tcp = IReactorTCP(reactor)
        self.nameservers: list[Nameserver] = (
            list(nameservers) if nameservers else system_nameservers()
        )
        if timeout <= 0 or attempts < 1:
            raise ValueError("timeout must be positive and attempts at least 1")
        self.timeout = timeout
        self.attempts = attempts
        self.cache: AnswerCache[tuple[str, int], _Answer] | None = (
            AnswerCache(self.clock, copy_error=_fresh) if cache else None
        )

    @classmethod
    def from_config(cls, config: ConfigDirectory, reactor: IReactorTime) -> Resolver:
        """A resolver as dns.ini [main] says: ``nameservers``, ``timeout``, ``attempts``.

        ``nameservers`` is a comma-separated list of ``ip``, ``ip:port``, ``[ipv6]`` or
        ``[ipv6]:port`` (``nameservers[]`` lines work too); empty means resolv.conf's.
        A bad entry raises :class:`ConfigError` naming the file and key. Its answers are
        cached.
        """
        main = config.get_ini("dns.ini")["main"]
        where = str(config.path("dns.ini") or "dns.ini")
        raw = main.get("nameservers", "")
        items = raw if isinstance(raw, list) else [raw]
        entries = [e.strip() for item in items for e in str(item).split(",") if e.strip()]
        try:
            nameservers = [parse_nameserver(entry) for entry in entries]
        except ValueError as e:
            raise ConfigError(where, None, f"[main] nameservers: {e}") from None
        try:
            timeout = ini_number(main, "timeout", 5.0, zero_ok=False)
            attempts = ini_number(main, "attempts", 2, zero_ok=False)
        except ValueError as e:
            raise ConfigError(where, None, str(e)) from None
        if attempts != int(attempts):
            raise ConfigError(where, None, f"[main] attempts: {attempts!r} is not a whole number")
        return cls(
            reactor, nameservers or None, timeout=timeout, attempts=int(attempts), cache=True
        )

    # -- lookups ----------------------------------------------------------------------

    def query(self, name: str, rdtype: str | int) -> Deferred[dns.message.Message]:
        """The response to ``name``/``rdtype``, which has records of that type.

        Fails with :class:`NXDomain`, :class:`NoAnswer`, :class:`DNSTimeout` or
        :class:`DNSServerError` (all :class:`DNSError`).
        """
        return self._answer(name, rdtype).addCallback(lambda answer: answer[0])

    def lookup_mx(self, name: str) -> Deferred[list[tuple[int, str]]]:
        """(preference, exchange) pairs in DNS order; exchanges lower-case, no final dot.

        The root exchange of a null MX (RFC 7505) reads ``"."``.
        """
        return self._records(name, "MX").addCallback(_mx_records)

    def lookup_a(self, name: str) -> Deferred[list[str]]:
        """The IPv4 addresses of ``name``, in DNS order."""
        return self._records(name, "A").addCallback(_a_records)

    def lookup_aaaa(self, name: str) -> Deferred[list[str]]:
        """The IPv6 addresses of ``name`` (compressed form), in DNS order."""
        return self._records(name, "AAAA").addCallback(_aaaa_records)

    def known(self, name: str, rdtype: str) -> list[Any] | DNSError | None:
        """What the cache holds for ``name`` and ``rdtype`` (``"MX"``, ``"A"`` or
        ``"AAAA"``), at once and without asking anyone: the records as ``lookup_<type>``
        gives them, a negative answer (:class:`NXDomain`, :class:`NoAnswer`) as a value,
        or None when nothing is kept (no cache, never asked, expired).
        """
        if self.cache is None:
            return None
        number, records = _RECORDS[rdtype]
        held = self.cache.peek((name.lower().rstrip(".") or ".", number))
        if held is None:
            return None
        if isinstance(held, Exception):
            error = _fresh(held)
            return error if isinstance(error, DNSError) else None
        return records(held[1])

    def lookup_ptr(self, ip: str) -> Deferred[list[str]]:
        """The names of address ``ip`` (lower-case, no final dot); ValueError if not an IP."""
        try:
            reverse = dns.reversename.from_address(ip).to_text()
        except (ValueError, dns.exception.SyntaxError):
            return defer.fail(ValueError(f"{ip!r} is not an IP address"))
        return self._records(reverse, "PTR").addCallback(
            lambda rrset: [_host(rd.target) for rd in rrset if isinstance(rd, PTR)]
        )

    def lookup_txt(self, name: str) -> Deferred[list[str]]:
        """Each TXT record of ``name``, its strings joined, decoded as UTF-8 (errors replaced)."""
        return self._records(name, "TXT").addCallback(
            lambda rrset: [
                b"".join(rd.strings).decode("utf-8", "replace")
                for rd in rrset
                if isinstance(rd, TXT)
            ]
        )

    # -- machinery --------------------------------------------------------------------

    def _records(self, name: str, rdtype: str) -> Deferred[dns.rrset.RRset]:
        return self._answer(name, rdtype).addCallback(lambda answer: answer[1])

    def _answer(self, name: str, rdtype: str | int) -> Deferred[_Answer]:
        rdtype = dns.rdatatype.RdataType.make(rdtype)
        if self.cache is None:
            return self._ask(name, rdtype).addCallback(_unwrap)
        key = (name.lower().rstrip(".") or ".", int(rdtype))
        return self.cache.ask(key, lambda: self._ask(name, rdtype))

    def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> Deferred[Cached[_Answer]]:
        type_text = dns.rdatatype.to_text(rdtype)
        try:
            request = dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            return defer.fail(NXDomain(name, type_text, f"not a valid domain name ({e})"))
        exchange = _Exchange(self, request, name, type_text)
        return exchange.start().addCallback(_read_answer, name, type_text)


_Answer = tuple[dns.message.Message, dns.rrset.RRset]


def _mx_records(rrset: dns.rrset.RRset) -> list[tuple[int, str]]:
    return [(rd.preference, _host(rd.exchange)) for rd in rrset if isinstance(rd, MX)]


def _a_records(rrset: dns.rrset.RRset) -> list[str]:
    return [rd.address for rd in rrset if isinstance(rd, A)]


def _aaaa_records(rrset: dns.rrset.RRset) -> list[str]:
    return [rd.address for rd in rrset if isinstance(rd, AAAA)]


_RECORDS: dict[str, tuple[int, Callable[[dns.rrset.RRset], list[Any]]]] = {
    "MX": (dns.rdatatype.MX, _mx_records),
    "A": (dns.rdatatype.A, _a_records),
    "AAAA": (dns.rdatatype.AAAA, _aaaa_records),
}


def _unwrap(result: Cached[_Answer]) -> _Answer:
    if isinstance(result.value, Exception):
        raise result.value
    return result.value


def _fresh(error: Exception) -> Exception:
    """A new exception like a kept negative answer (NXDomain, NoAnswer), for one asker."""
    if isinstance(error, NXDomain | NoAnswer):
        return type(error)(error.name, error.rdtype, error.message)
    return error


def _host(name: dns.name.Name) -> str:
    """A domain name as text: lower-case, no final dot (the root stays ``"."``)."""
    return name.to_text(omit_final_dot=True).lower()


def _read_answer(response: dns.message.QueryMessage, name: str, rdtype: str) -> Cached[_Answer]:
    """The answer, or the negative answer (NXDomain, NoAnswer), with how long it may be
    kept; raises L{DNSError} for an answer that cannot be used."""
    nxdomain = response.rcode() == dns.rcode.NXDOMAIN
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException as e:
        if nxdomain:  # whatever else it says
            return Cached(NXDomain(name, rdtype, "the name does not exist"), 0)
        if isinstance(e, dns.message.ChainTooLong):
            raise DNSError(name, rdtype, "CNAME chain too long") from None
        raise DNSError(name, rdtype, f"unusable answer ({e})") from None
    if nxdomain:
        return Cached(NXDomain(name, rdtype, "the name does not exist"), chain.minimum_ttl)
    if chain.answer is None:
        return Cached(NoAnswer(name, rdtype, "no records of that type"), chain.minimum_ttl)
    return Cached((response, chain.answer), chain.minimum_ttl)


# -- one query, over the nameservers in turn ----------------------------------------------


class _Exchange:
    """One query sent to the nameservers in turn until one answers it."""

    def __init__(
        self, resolver: Resolver, request: dns.message.QueryMessage, name: str, rdtype: str
    ) -> None:
        self._resolver = resolver
        self._request = request
        self._wire = request.to_wire()
        self._name, self._rdtype = name, rdtype
        self._schedule = [ns for _ in range(resolver.attempts) for ns in resolver.nameservers]
        self._rejected: set[Nameserver] = set()  # answered with an error rcode
        self._problems: list[str] = []
        self._rcode: dns.rcode.Rcode | None = None
        self._attempt: _UDPAttempt | _TCPAttempt | None = None
        self._timer: IDelayedCall | None = None
        self._closing: list[Deferred[None]] = []
        self._done = False
        self.deferred: Deferred[dns.message.QueryMessage] = Deferred(self._cancel)

    def start(self) -> Deferred[dns.message.QueryMessage]:
        self._next()
        return self.deferred

    # -- attempts ---------------------------------------------------------------------

    def _next(self) -> None:
        while self._schedule:
            nameserver = self._schedule.pop(0)
            if nameserver not in self._rejected:
                self._send(_UDPAttempt(self, nameserver))
                return
        if self._rcode is not None:
            error: DNSError = DNSServerError(
                self._name, self._rdtype, self._rcode, "; ".join(self._problems)
            )
        else:
            error = DNSTimeout(self._name, self._rdtype, "; ".join(self._problems))
        self._finish(Failure(error))

    def _send(self, attempt: _UDPAttempt | _TCPAttempt) -> None:
        self._attempt = attempt
        self._timer = self._resolver.clock.callLater(
            self._resolver.timeout, self._timed_out, attempt
        )
        if isinstance(attempt, _UDPAttempt):
            attempt.start(self._resolver.udp, self._wire)
        else:
            attempt.start(self._resolver.tcp, self._wire, self._resolver.timeout)

    def _retire(self) -> None:
        """Stop the current attempt: its timer and its socket."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            self._closing.append(attempt.close())

    def _timed_out(self, attempt: _UDPAttempt | _TCPAttempt) -> None:
        self._timer = None
        self.failed(attempt, f"no answer in {self._resolver.timeout:g} s")

    # -- what the attempts report -----------------------------------------------------

    def failed(self, attempt: _UDPAttempt | _TCPAttempt, reason: str) -> None:
        """``attempt`` got no answer; go on with the next nameserver."""
        if attempt is not self._attempt:
            return
        self._problems.append(f"{_where(attempt.nameserver)}: {reason}")
        self._retire()
        self._next()

    def received(self, attempt: _UDPAttempt | _TCPAttempt, wire: bytes) -> None:
        """``attempt`` got ``wire``: an answer, a truncated one, or noise."""
        if attempt is not self._attempt:
            return
        tcp = isinstance(attempt, _TCPAttempt)
        try:
            response = dns.message.from_wire(wire)
        except Exception:
            if not tcp and self._truncated_header(wire):
                self._retry_over_tcp(attempt)
            elif tcp:
                self.failed(attempt, "unparseable answer")
            return  # UDP noise: keep waiting for the real answer
        if not (
            isinstance(response, dns.message.QueryMessage) and self._request.is_response(response)
        ):
            if tcp:
                self.failed(attempt, "an answer to another question")
            return
        if response.flags & dns.flags.TC and not tcp:
            self._retry_over_tcp(attempt)
            return
        rcode = response.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            self._finish(response)
        elif rcode in (dns.rcode.FORMERR, dns.rcode.NOTIMP) and self._request.edns >= 0:
            self._without_edns(attempt)
        else:
            self._rcode = rcode
            self._rejected.add(attempt.nameserver)
            self.failed(attempt, dns.rcode.to_text(rcode))

    def _truncated_header(self, wire: bytes) -> bool:
        """A response header with our id and TC set, its records cut off."""
        if len(wire) < 4:
            return False
        ident, flags = struct.unpack("!HH", wire[:4])
        return ident == self._request.id and bool(flags & dns.flags.QR and flags & dns.flags.TC)

    def _retry_over_tcp(self, attempt: _UDPAttempt | _TCPAttempt) -> None:
        self._retire()
        self._send(_TCPAttempt(self, attempt.nameserver))

    def _without_edns(self, attempt: _UDPAttempt | _TCPAttempt) -> None:
        """The nameserver does not take EDNS: ask it again, and from now on, without."""
        self._request.use_edns(False)
        self._wire = self._request.to_wire()
        self._retire()
        self._schedule.insert(0, attempt.nameserver)
        self._next()

    # -- the end ----------------------------------------------------------------------

    def _finish(self, result: dns.message.QueryMessage | Failure) -> None:
        """Close every socket, then fire with ``result``."""
        self._done = True
        self._retire()
        closing, self._closing = self._closing, []

        def fire(_: object) -> None:
            if self.deferred.called:  # cancelled while the sockets closed
                return
            if isinstance(result, Failure):
                self.deferred.errback(result)
            else:
                self.deferred.callback(result)

        defer.gatherResults(closing).addCallback(fire)

    def _cancel(self, _: Deferred[dns.message.QueryMessage]) -> None:
        if not self._done:
            self._done = True
            self._retire()


def _where(nameserver: Nameserver) -> str:
    host, port = nameserver
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _UDPAttempt(DatagramProtocol):
    """One datagram to one nameserver, from a fresh ephemeral port connected to it."""

    noisy = False

    def __init__(self, exchange: _Exchange, nameserver: Nameserver) -> None:
        self.exchange = exchange
        self.nameserver = nameserver
        self._port: IListeningPort | None = None

    def start(self, reactor: IReactorUDP, wire: bytes) -> None:
        host, port = self.nameserver
        try:
            self._port = reactor.listenUDP(
                0, self, interface="::" if ":" in host else "", maxPacketSize=65535
            )
            self.transport.connect(host, port)  # type: ignore[union-attr]
            self.transport.write(wire, None)  # type: ignore[union-attr]
        except Exception as e:
            self.exchange.failed(self, f"cannot send ({e})")

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.exchange.received(self, datagram)

    def connectionRefused(self) -> None:
        self.exchange.failed(self, "port unreachable")

    def stopProtocol(self) -> None:
        # The port closed under us: with epoll an ICMP error on a connected socket
        # (EPOLLERR without EPOLLIN) closes the port instead of calling connectionRefused.
        if self._port is not None:
            self._port = None
            self.exchange.failed(self, "port unreachable")

    def close(self) -> Deferred[None]:
        port, self._port = self._port, None
        closed = port.stopListening() if port is not None else None
        return closed if isinstance(closed, Deferred) else defer.succeed(None)


class _TCPAttempt(Protocol):
    """The query again over TCP (after a truncated UDP answer); reports once closed."""

    def __init__(self, exchange: _Exchange, nameserver: Nameserver) -> None:
        self.exchange = exchange
        self.nameserver = nameserver
        self._buffer = b""
        self._wire = b""
        self._answer: bytes | None = None
        self._connecting: Deferred[Protocol] | None = None
        self._closed: Deferred[None] = Deferred()

    def start(self, reactor: IReactorTCP, wire: bytes, timeout: float) -> None:
        host, port = self.nameserver
        self._wire = wire
        endpoint = (
            TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
            if ":" in host
            else TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        )
        self._connecting = connecting = connectProtocol(endpoint, self)
        connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, _: Protocol) -> None:
        self._connecting = None

    def _not_connected(self, failure: Failure) -> None:
        self._connecting = None
        self._set_closed()
        self.exchange.failed(self, f"TCP: {failure.getErrorMessage()}")

    def connectionMade(self) -> None:
        self.transport.write(struct.pack("!H", len(self._wire)) + self._wire)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= 2 and self._answer is None:
            (length,) = struct.unpack("!H", self._buffer[:2])
            if len(self._buffer) >= 2 + length:
                self._answer = self._buffer[2 : 2 + length]
                self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._set_closed()
        if self._answer is not None:
            self.exchange.received(self, self._answer)
        else:
            self.exchange.failed(self, "TCP connection closed before the answer")

    def close(self) -> Deferred[None]:
        if self._connecting is not None:
            self._connecting.cancel()
        elif not self._closed.called and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return self._closed

    def _set_closed(self) -> None:
        if not self._closed.called:
            self._closed.callback(None)
