"""haraka_tw.dns against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import io
import socket
import time
from typing import Any

import dns.message
import dns.rcode
from twisted.internet import defer, reactor, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUDP
from twisted.logger import globalLogPublisher, textFileLogObserver
from twisted.python import log as legacy_log
from twisted.trial import unittest
from zope.interface import implementer

from haraka_tw.config import ConfigDirectory, ConfigError
from haraka_tw.dns import (
    DNSError,
    DNSServerError,
    DNSTimeout,
    NoAnswer,
    NXDomain,
    Resolver,
    parse_nameserver,
    system_nameservers,
)
from haraka_tw.logging import TwistdLogObserver
from tests.dnsserver import DNSServer, serve
from tests.support import temp_dir

ZONE = """
$ORIGIN example.test.
$TTL 300
@       MX  20 MX2.Example.TEST.
@       MX  10 mx1
@       TXT "v=spf1 " "-all"
@       TXT "caf\\195\\169"
mx1     A   192.0.2.1
mx1     A   192.0.2.2
mx1     AAAA 2001:db8:0:0::1
alias   CNAME alias2
alias2  CNAME mx1
dangling CNAME nowhere
a.deep  A   192.0.2.9
big     TXT "0123456789012345678901234567890123456789"
$ORIGIN 2.0.192.in-addr.arpa.
1       PTR MX1.example.test.
$ORIGIN 1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.
@       PTR mx1.example.test.
"""

FAST = 0.25  # seconds per try in the tests that wait for a timeout


def resolver(*servers: DNSServer, timeout: float = 2.0, attempts: int = 1) -> Resolver:
    """A Resolver on the global reactor that asks ``servers`` in order."""
    hosts = [("127.0.0.1", s.port) for s in servers]
    return Resolver(reactor, hosts, timeout=timeout, attempts=attempts)


def free_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def pause(seconds: float = 0.05) -> Deferred[None]:
    """Let the reactor run for a moment."""
    return task.deferLater(reactor, seconds, lambda: None)


def attempts_pending() -> list[Any]:
    """Delayed calls and readers the resolver left in the global reactor."""
    calls = [c for c in reactor.getDelayedCalls() if "dns" in repr(c.func).lower()]
    readers = []
    for selectable in reactor.getReaders() + reactor.getWriters():
        protocol = getattr(selectable, "protocol", None)
        protocol = getattr(protocol, "_wrappedProtocol", protocol)  # endpoints wrap TCP
        if type(protocol).__name__ in ("_UDPAttempt", "_TCPAttempt"):
            readers.append(selectable)
    return calls + readers


class LookupTests(unittest.TestCase):
    """Each lookup reads its type from a real answer."""

    def setUp(self) -> None:
        self.server = serve(self, ZONE)
        self.resolver = resolver(self.server)

    async def test_a(self) -> None:
        """lookup_a gives every IPv4 address."""
        self.assertEqual(
            sorted(await self.resolver.lookup_a("mx1.example.test")), ["192.0.2.1", "192.0.2.2"]
        )

    async def test_query_port_close_is_not_logged_under_twistd(self) -> None:
        """Twisted logs "(UDP Port N Closed)" for the port each query opens; twistd's log
        (TwistdLogObserver) leaves it out and writes every other line."""
        ours, theirs = io.StringIO(), io.StringIO()
        observers = [TwistdLogObserver(ours), textFileLogObserver(theirs)]
        for observer in observers:
            globalLogPublisher.addObserver(observer)
        try:
            await self.resolver.lookup_a("mx1.example.test")
            await pause()  # Twisted closes the port on the next turn
            legacy_log.msg("after the lookup")
        finally:
            for observer in observers:
                globalLogPublisher.removeObserver(observer)
        self.assertRegex(theirs.getvalue(), r"\(UDP Port \d+ Closed\)")
        self.assertNotIn("UDP Port", ours.getvalue())
        self.assertIn("after the lookup", ours.getvalue())

    async def test_aaaa(self) -> None:
        """lookup_aaaa gives IPv6 addresses in compressed form."""
        self.assertEqual(await self.resolver.lookup_aaaa("mx1.example.test"), ["2001:db8::1"])

    async def test_mx(self) -> None:
        """lookup_mx gives (preference, exchange), exchanges lower-case without the dot."""
        records = await self.resolver.lookup_mx("example.test")
        self.assertEqual(sorted(records), [(10, "mx1.example.test"), (20, "mx2.example.test")])

    async def test_txt(self) -> None:
        """lookup_txt joins each record's strings and decodes UTF-8."""
        records = await self.resolver.lookup_txt("example.test.")
        self.assertEqual(sorted(records), ["caf\u00e9", "v=spf1 -all"])

    async def test_ptr_v4(self) -> None:
        """lookup_ptr of an IPv4 address reads in-addr.arpa, lower-case."""
        self.assertEqual(await self.resolver.lookup_ptr("192.0.2.1"), ["mx1.example.test"])

    async def test_ptr_v6(self) -> None:
        """lookup_ptr of an IPv6 address reads ip6.arpa."""
        self.assertEqual(await self.resolver.lookup_ptr("2001:db8::1"), ["mx1.example.test"])

    async def test_ptr_not_an_ip(self) -> None:
        """lookup_ptr of something that is not an address fails with ValueError."""
        with self.assertRaises(ValueError):
            await self.resolver.lookup_ptr("mx1.example.test")

    async def test_cname_chain(self) -> None:
        """A CNAME chain in the answer is followed to the records asked for."""
        self.assertEqual(
            sorted(await self.resolver.lookup_a("alias.example.test")), ["192.0.2.1", "192.0.2.2"]
        )

    async def test_cname_chain_without_the_type(self) -> None:
        """A chain that ends at a name without the type is NoAnswer."""
        with self.assertRaises(NoAnswer):
            await self.resolver.lookup_mx("alias.example.test")

    async def test_cname_to_nowhere(self) -> None:
        """A chain that ends at a name that does not exist is NXDomain."""
        with self.assertRaises(NXDomain):
            await self.resolver.lookup_a("dangling.example.test")

    async def test_query_returns_the_message(self) -> None:
        """query gives the dnspython response, its answer holding the records."""
        response = await self.resolver.query("mx1.example.test", "A")
        self.assertIsInstance(response, dns.message.Message)
        self.assertEqual(response.rcode(), dns.rcode.NOERROR)
        self.assertEqual(len(response.answer[0]), 2)

    async def test_query_by_number(self) -> None:
        """query takes a numeric type as well as its name."""
        response = await self.resolver.query("mx1.example.test", 28)
        self.assertEqual(response.answer[0][0].address, "2001:db8::1")

    async def test_nxdomain(self) -> None:
        """A name that does not exist is NXDomain, naming the name and type."""
        with self.assertRaises(NXDomain) as caught:
            await self.resolver.lookup_a("nope.example.test")
        self.assertEqual(
            (caught.exception.name, caught.exception.rdtype), ("nope.example.test", "A")
        )
        self.assertIn("nope.example.test", str(caught.exception))

    async def test_no_data(self) -> None:
        """An existing name without the type is NoAnswer, not NXDomain."""
        with self.assertRaises(NoAnswer):
            await self.resolver.lookup_aaaa("big.example.test.")
        with self.assertRaises(NoAnswer):
            await self.resolver.lookup_mx("mx1.example.test")

    async def test_empty_non_terminal(self) -> None:
        """A name with only names below it exists: NoAnswer."""
        with self.assertRaises(NoAnswer):
            await self.resolver.lookup_a("deep.example.test")

    async def test_invalid_name(self) -> None:
        """A name that cannot be a domain name is NXDomain, without a query."""
        with self.assertRaises(NXDomain):
            await self.resolver.lookup_a("a" * 64 + ".example.test")
        with self.assertRaises(NXDomain):
            await self.resolver.lookup_a("a..example.test")
        self.assertEqual(self.server.queries, [])

    async def test_errors_are_dnserrors(self) -> None:
        """Every lookup failure is a DNSError."""
        for error in (NXDomain, NoAnswer, DNSTimeout, DNSServerError):
            self.assertTrue(issubclass(error, DNSError))
        with self.assertRaises(DNSError):
            await self.resolver.lookup_a("nope.example.test")


class FailureTests(unittest.TestCase):
    """Server errors, timeouts, truncation and noise."""

    async def test_servfail(self) -> None:
        """SERVFAIL is DNSServerError with the rcode; the server is not asked again."""
        server = serve(self, ZONE, servfail={"mx1.example.test"})
        with self.assertRaises(DNSServerError) as caught:
            await resolver(server, attempts=3).lookup_a("mx1.example.test")
        self.assertEqual(caught.exception.rcode, dns.rcode.SERVFAIL)
        self.assertEqual(len(server.queries), 1)

    async def test_servfail_for_one_type_only(self) -> None:
        """A behaviour keyed name/TYPE leaves the other types alone."""
        server = serve(self, ZONE, servfail={"mx1.example.test/AAAA"})
        r = resolver(server)
        self.assertEqual(sorted(await r.lookup_a("mx1.example.test")), ["192.0.2.1", "192.0.2.2"])
        with self.assertRaises(DNSServerError):
            await r.lookup_aaaa("mx1.example.test")

    async def test_refused_goes_to_the_next_nameserver(self) -> None:
        """REFUSED from the first nameserver: the second one answers."""
        first = serve(self, ZONE, refused={"mx1.example.test"})
        second = serve(self, ZONE)
        r = resolver(first, second)
        self.assertEqual(sorted(await r.lookup_a("mx1.example.test")), ["192.0.2.1", "192.0.2.2"])
        self.assertEqual((len(first.queries), len(second.queries)), (1, 1))

    async def test_timeout(self) -> None:
        """No answer: DNSTimeout after attempts * nameservers tries of timeout each."""
        server = serve(self, ZONE, timeout={"mx1.example.test"})
        started = time.monotonic()
        with self.assertRaises(DNSTimeout) as caught:
            await resolver(server, timeout=FAST, attempts=2).lookup_a("mx1.example.test")
        took = time.monotonic() - started
        self.assertEqual(len(server.queries), 2)
        self.assertGreaterEqual(took, 2 * FAST * 0.9)
        self.assertLess(took, 2 * FAST + 1.0)
        self.assertIn("no answer", str(caught.exception))

    async def test_timeout_then_the_next_nameserver(self) -> None:
        """A nameserver that does not answer is followed by one that does."""
        silent = serve(self, ZONE, timeout={"mx1.example.test"})
        working = serve(self, ZONE)
        r = resolver(silent, working, timeout=FAST)
        self.assertEqual(sorted(await r.lookup_a("mx1.example.test")), ["192.0.2.1", "192.0.2.2"])

    async def test_unreachable_nameserver_is_skipped_at_once(self) -> None:
        """A closed port (ICMP unreachable) fails that try at once, not after the timeout."""
        working = serve(self, ZONE)
        r = Resolver(reactor, [("127.0.0.1", free_udp_port()), ("127.0.0.1", working.port)])
        started = time.monotonic()
        self.assertEqual(sorted(await r.lookup_a("mx1.example.test")), ["192.0.2.1", "192.0.2.2"])
        self.assertLess(time.monotonic() - started, 1.0)

    async def test_only_unreachable_nameservers(self) -> None:
        """Every nameserver unreachable: DNSTimeout quickly, saying so."""
        r = Resolver(reactor, [("127.0.0.1", free_udp_port())], timeout=5.0)
        with self.assertRaises(DNSTimeout) as caught:
            await r.lookup_a("mx1.example.test")
        self.assertIn("unreachable", str(caught.exception))

    async def test_truncated_answer_is_asked_again_over_tcp(self) -> None:
        """A TC answer over UDP makes the resolver ask the same server over TCP."""
        server = serve(self, ZONE, truncate={"big.example.test"})
        records = await resolver(server).lookup_txt("big.example.test")
        self.assertEqual(records, ["0123456789012345678901234567890123456789"])
        self.assertEqual([q[0] for q in server.queries], ["udp", "tcp"])

    async def test_tcp_timeout(self) -> None:
        """No answer over TCP after a TC answer: DNSTimeout."""
        server = serve(self, ZONE, truncate={"big.example.test"}, timeout={"big.example.test"})
        with self.assertRaises(DNSTimeout):
            await resolver(server, timeout=FAST).lookup_txt("big.example.test")

    async def test_wrong_id_is_ignored(self) -> None:
        """A reply with another id is not taken for the answer."""
        server = serve(self, ZONE, spoof={"mx1.example.test"})
        self.assertEqual(
            sorted(await resolver(server).lookup_a("mx1.example.test")), ["192.0.2.1", "192.0.2.2"]
        )

    async def test_edns_refused_retries_without(self) -> None:
        """FORMERR to an EDNS query: asked again without EDNS, and answered."""
        server = serve(self, ZONE, formerr_edns=True)
        self.assertEqual(await resolver(server).lookup_aaaa("mx1.example.test"), ["2001:db8::1"])
        self.assertEqual([q[3] for q in server.queries], [True, False])

    async def test_ipv6_nameserver(self) -> None:
        """A nameserver on ::1 is asked over IPv6."""
        server = serve(self, ZONE, interface="::1")
        r = Resolver(reactor, [("::1", server.port)], timeout=2.0)
        self.assertEqual(await r.lookup_aaaa("mx1.example.test"), ["2001:db8::1"])


class CleanupTests(unittest.TestCase):
    """Nothing is left in the reactor, after an answer or a cancellation."""

    async def test_answered_query_leaves_nothing(self) -> None:
        """When a lookup fires, its port is closed and its timer cancelled."""
        server = serve(self, ZONE)
        await resolver(server).lookup_a("mx1.example.test")
        self.assertEqual(attempts_pending(), [])

    async def test_tcp_query_leaves_nothing(self) -> None:
        """When a lookup over TCP fires, its connection is closed."""
        server = serve(self, ZONE, truncate={"big.example.test"})
        await resolver(server).lookup_txt("big.example.test")
        self.assertEqual(attempts_pending(), [])
        self.assertEqual(reactor.getWriters(), [])

    async def test_cancel_while_waiting_for_udp(self) -> None:
        """Cancelling a lookup fails it with CancelledError and closes its port."""
        server = serve(self, ZONE, timeout={"mx1.example.test"})
        lookup = resolver(server, timeout=30).lookup_a("mx1.example.test")
        await pause()
        self.assertEqual(len(attempts_pending()), 2)  # the timer and the port
        lookup.cancel()
        with self.assertRaises(CancelledError):
            await lookup
        await pause()
        self.assertEqual(attempts_pending(), [])

    async def test_cancel_while_waiting_for_tcp(self) -> None:
        """Cancelling during the TCP retry aborts the connection."""
        server = serve(self, ZONE, truncate={"big.example.test"}, timeout={"big.example.test"})
        lookup = resolver(server, timeout=30).lookup_txt("big.example.test")
        while not [q for q in server.queries if q[0] == "tcp"]:
            await pause(0.01)
        self.assertEqual(len(attempts_pending()), 2)  # the timer and the connection
        lookup.cancel()
        with self.assertRaises(CancelledError):
            await lookup
        await pause()
        self.assertEqual(attempts_pending(), [])

    async def test_cancel_at_once(self) -> None:
        """Cancelling before the reactor runs at all is clean too."""
        server = serve(self, ZONE)
        lookups = [resolver(server).lookup_mx("example.test") for _ in range(3)]
        for lookup in lookups:
            lookup.cancel()
        results = await defer.DeferredList(lookups, consumeErrors=True)
        self.assertTrue(all(not ok and f.check(CancelledError) for ok, f in results))
        await pause()
        self.assertEqual(attempts_pending(), [])


class NameserverTests(unittest.SynchronousTestCase):
    """Nameserver entries, dns.ini and resolv.conf."""

    def test_parse_nameserver(self) -> None:
        """ip, ip:port, bare v6, [v6] and [v6]:port parse; the default port is 53."""
        cases = {
            "192.0.2.1": ("192.0.2.1", 53),
            " 192.0.2.1:5353 ": ("192.0.2.1", 5353),
            "2001:db8::1": ("2001:db8::1", 53),
            "[2001:db8::1]": ("2001:db8::1", 53),
            "[2001:DB8::1]:5300": ("2001:db8::1", 5300),
            "[::1]:53": ("::1", 53),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_nameserver(text), expected, text)

    def test_parse_nameserver_rejects(self) -> None:
        """Host names, bad ports and broken brackets are ValueError."""
        for text in (
            "dns.example",
            "192.0.2.1:0",
            "192.0.2.1:65536",
            "192.0.2.1:x",
            "[::1",
            "[::1]x",
            "",
            "300.1.1.1",
        ):
            with self.assertRaises(ValueError, msg=text):
                parse_nameserver(text)

    def config(self, text: str) -> ConfigDirectory:
        """A config directory holding dns.ini with ``text``."""
        base = temp_dir(self)
        (base / "dns.ini").write_text(text, encoding="utf-8")
        return ConfigDirectory([base])

    def test_from_config(self) -> None:
        """dns.ini nameservers (comma list), timeout and attempts are read."""
        config = self.config(
            "[main]\nnameservers = 192.0.2.1, 192.0.2.2:5353,[2001:db8::1]:54\n"
            "timeout = 0.5\nattempts = 3\n"
        )
        r = Resolver.from_config(config, reactor)
        self.assertEqual(
            r.nameservers, [("192.0.2.1", 53), ("192.0.2.2", 5353), ("2001:db8::1", 54)]
        )
        self.assertEqual((r.timeout, r.attempts), (0.5, 3))

    def test_from_config_list_lines(self) -> None:
        """nameservers[] lines work as well as a comma list."""
        config = self.config("nameservers[] = 192.0.2.1\nnameservers[] = [::1]:5353\n")
        r = Resolver.from_config(config, reactor)
        self.assertEqual(r.nameservers, [("192.0.2.1", 53), ("::1", 5353)])
        self.assertEqual((r.timeout, r.attempts), (5.0, 2))

    def test_from_config_empty_uses_the_system(self) -> None:
        """An empty nameservers key means resolv.conf's nameservers."""
        r = Resolver.from_config(self.config("[main]\nnameservers=\n"), reactor)
        self.assertEqual(r.nameservers, system_nameservers())

    def test_from_config_bad_nameserver(self) -> None:
        """A bad entry is a ConfigError naming dns.ini, the key and the entry."""
        config = self.config("[main]\nnameservers = 192.0.2.1, dns.example\n")
        with self.assertRaises(ConfigError) as caught:
            Resolver.from_config(config, reactor)
        text = str(caught.exception)
        self.assertIn("dns.ini", text)
        self.assertIn("nameservers", text)
        self.assertIn("dns.example", text)

    def test_from_config_bad_timeout(self) -> None:
        """A timeout that is not a positive number is a ConfigError naming the key."""
        for value in ("0", "-1", "soon", "nan", "inf"):
            with self.assertRaises(ConfigError) as caught:
                Resolver.from_config(self.config(f"timeout = {value}\n"), reactor)
            self.assertIn("dns.ini", str(caught.exception))
            self.assertIn("timeout", str(caught.exception))

    def test_from_config_bad_attempts(self) -> None:
        """attempts must be a whole number of at least 1."""
        for value in ("0", "1.5"):
            with self.assertRaises(ConfigError) as caught:
                Resolver.from_config(self.config(f"attempts = {value}\n"), reactor)
            self.assertIn("attempts", str(caught.exception))

    def test_shipped_dns_ini(self) -> None:
        """The shipped dns.ini parses to the system nameservers, 5 s and 2 attempts."""
        from haraka_tw.paths import default_config_dir

        r = Resolver.from_config(ConfigDirectory([default_config_dir()]), reactor)
        self.assertEqual((r.nameservers, r.timeout, r.attempts), (system_nameservers(), 5.0, 2))

    def test_system_nameservers(self) -> None:
        """A resolv.conf's nameserver lines are read in order, port 53."""
        path = temp_dir(self) / "resolv.conf"
        path.write_text("search example.test\nnameserver 192.0.2.53\nnameserver ::1\n")
        self.assertEqual(system_nameservers(str(path)), [("192.0.2.53", 53), ("::1", 53)])

    def test_system_nameservers_fallback(self) -> None:
        """No resolv.conf, or one without nameservers: 127.0.0.1:53."""
        missing = temp_dir(self) / "missing"
        self.assertEqual(system_nameservers(str(missing)), [("127.0.0.1", 53)])
        empty = temp_dir(self) / "resolv.conf"
        empty.write_text("search example.test\n")
        self.assertEqual(system_nameservers(str(empty)), [("127.0.0.1", 53)])

    def test_bad_arguments(self) -> None:
        """A timeout that is not positive or attempts below 1 are ValueError."""
        with self.assertRaises(ValueError):
            Resolver(reactor, [("127.0.0.1", 53)], timeout=0)
        with self.assertRaises(ValueError):
            Resolver(reactor, [("127.0.0.1", 53)], attempts=0)


class ClockTests(unittest.TestCase):
    """Timeouts run on the reactor's IReactorTime, so a task.Clock drives them."""

    async def test_clock_timeout(self) -> None:
        """With a Clock for time, the tries time out when the Clock says, not the wall."""
        clock = task.Clock()

        @implementer(IReactorTime, IReactorUDP, IReactorTCP)
        class Reactor:
            """The global reactor's UDP and TCP, the Clock's time."""

            def __getattr__(self, name: str) -> Any:
                timed = name in ("callLater", "seconds", "getDelayedCalls")
                return getattr(clock if timed else reactor, name)

        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes the query, never answers
        sink.bind(("127.0.0.1", 0))
        self.addCleanup(sink.close)
        r = Resolver(Reactor(), [sink.getsockname()], timeout=3600, attempts=2)  # type: ignore[arg-type]
        lookup = r.lookup_a("x.example.test")
        clock.advance(3600)
        clock.advance(3600)
        with self.assertRaises(DNSTimeout) as caught:
            await lookup
        self.assertIn("no answer in 3600 s", str(caught.exception))
        self.assertEqual(clock.getDelayedCalls(), [])


@implementer(IReactorTime, IReactorUDP, IReactorTCP)
class _ClockReactor:
    """The global reactor's UDP and TCP, a Clock's time."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock

    def __getattr__(self, name: str) -> Any:
        timed = name in ("callLater", "seconds", "getDelayedCalls")
        return getattr(self.clock if timed else reactor, name)


class CacheTests(unittest.TestCase):
    """A resolver with a cache asks a real server once per TTL and once per question."""

    def setUp(self) -> None:
        self.server = serve(self, ZONE, servfail={"broken.example.test"})
        self.clock = task.Clock()
        self.resolver = Resolver(
            _ClockReactor(self.clock),  # type: ignore[arg-type]
            [("127.0.0.1", self.server.port)],
            timeout=2,
            attempts=1,
            cache=True,
        )

    def asked(self, name: str, rdtype: str) -> int:
        """How many queries for name/rdtype reached the server."""
        return sum(1 for q in self.server.queries if (q[1].lower(), q[2]) == (name, rdtype))

    async def test_answers_kept_for_their_ttl(self) -> None:
        """The zone's TTL (300 s) decides: the same question is asked again only after it."""
        for _ in range(3):
            records = await self.resolver.lookup_mx("Example.TEST.")
        self.assertEqual(sorted(records), [(10, "mx1.example.test"), (20, "mx2.example.test")])
        self.assertEqual(self.asked("example.test.", "MX"), 1)
        self.clock.advance(299)
        await self.resolver.lookup_mx("example.test")
        self.assertEqual(self.asked("example.test.", "MX"), 1)
        self.clock.advance(1)
        await self.resolver.lookup_mx("example.test")
        self.assertEqual(self.asked("example.test.", "MX"), 2)

    async def test_types_are_kept_apart(self) -> None:
        """A, AAAA and MX of one name are three questions."""
        await self.resolver.lookup_a("mx1.example.test")
        self.assertEqual(await self.resolver.lookup_aaaa("mx1.example.test"), ["2001:db8::1"])
        self.assertEqual(len(self.server.queries), 2)

    async def test_negative_answers_kept_briefly(self) -> None:
        """NXDOMAIN and no-data answers are kept, for a minute at most."""
        for _ in range(2):
            with self.assertRaises(NXDomain):
                await self.resolver.lookup_a("nope.example.test")
            with self.assertRaises(NoAnswer):
                await self.resolver.lookup_aaaa("big.example.test")
        self.assertEqual(len(self.server.queries), 2)
        self.clock.advance(60)
        with self.assertRaises(NXDomain):
            await self.resolver.lookup_a("nope.example.test")
        self.assertEqual(len(self.server.queries), 3)

    async def test_failures_are_asked_again(self) -> None:
        """A SERVFAIL is not kept: the next lookup asks again."""
        for _ in range(2):
            with self.assertRaises(DNSServerError):
                await self.resolver.lookup_a("broken.example.test")
        self.assertEqual(self.asked("broken.example.test.", "A"), 2)

    async def test_one_query_for_lookups_at_once(self) -> None:
        """Lookups of one question made together share one query."""
        lookups = [self.resolver.lookup_a("mx1.example.test") for _ in range(5)]
        results = await defer.gatherResults(lookups)
        self.assertEqual([sorted(r) for r in results], [["192.0.2.1", "192.0.2.2"]] * 5)
        self.assertEqual(len(self.server.queries), 1)

    async def test_cancelling_every_lookup_closes_the_query(self) -> None:
        """Cancelling one of two lookups leaves the query; cancelling both closes it."""
        server = serve(self, ZONE, timeout={"mx1.example.test"})
        r = Resolver(reactor, [("127.0.0.1", server.port)], timeout=30, attempts=1, cache=True)
        first, second = (r.lookup_a("mx1.example.test") for _ in range(2))
        await pause()
        first.cancel()
        await pause()
        self.assertEqual(len(attempts_pending()), 2)  # the timer and the port
        second.cancel()
        for lookup in (first, second):
            with self.assertRaises(CancelledError):
                await lookup
        await pause()
        self.assertEqual(attempts_pending(), [])

    async def test_known(self) -> None:
        """known() gives what the cache holds, as the lookups give it, asking nobody."""
        r = self.resolver
        self.assertIsNone(r.known("example.test", "MX"))
        await r.lookup_mx("example.test")
        with self.assertRaises(NXDomain):
            await r.lookup_a("nope.example.test")
        asked = len(self.server.queries)
        self.assertEqual(
            sorted(r.known("EXAMPLE.test.", "MX")),  # type: ignore[arg-type]
            [(10, "mx1.example.test"), (20, "mx2.example.test")],
        )
        self.assertIsInstance(r.known("nope.example.test", "A"), NXDomain)
        self.assertIsNone(r.known("example.test", "A"))
        self.assertEqual(len(self.server.queries), asked)
        self.clock.advance(300)
        self.assertIsNone(r.known("example.test", "MX"))
        self.assertIsNone(Resolver(reactor, [("127.0.0.1", 53)]).known("example.test", "MX"))

    def test_from_config_caches(self) -> None:
        """The server's resolver (dns.ini) has a cache; a plain Resolver has none."""
        config = ConfigDirectory([temp_dir(self)])
        self.assertIsNotNone(Resolver.from_config(config, reactor).cache)
        self.assertIsNone(Resolver(reactor, [("127.0.0.1", 53)]).cache)


class CoreReverseLookupTests(unittest.TestCase):
    def test_core_rdns_uses_the_project_resolver(self) -> Deferred[None]:
        """The session's reverse lookup asks the project's resolver (dns.ini), cached."""
        from haraka_tw.smtp.rdns import ReverseLookup

        server = serve(
            self,
            "$ORIGIN in-addr.arpa.\n@ 300 IN SOA ns. h. 1 2 3 4 5\n"
            "7.113.0.203 300 IN PTR mail.example.org.\n",
            origin="in-addr.arpa.",
        )
        from twisted.internet import reactor

        resolver = Resolver(reactor, [("127.0.0.1", server.port)], timeout=2)
        lookup = ReverseLookup(reactor, hosts={}, resolver=resolver)
        d = lookup.lookup("203.0.113.7")

        def check(name: str | None) -> Deferred[str | None]:
            self.assertEqual(name, "mail.example.org")
            asked = len(server.queries)
            return lookup.lookup("203.0.113.7").addCallback(
                lambda again: self.assertEqual((again, len(server.queries)), (name, asked))
            )

        return d.addCallback(check)

    async def test_a_nameserver_that_does_not_answer_costs_the_rdns_timeout_once(self) -> None:
        """dns.ini [rdns] timeout: a PTR query nobody answers is given up on after it (not
        after [main]'s timeout and attempts), as no name; the failure is kept, so the next
        lookup of that address answers at once without asking."""
        from haraka_tw.smtp.rdns import ReverseLookup

        server = serve(
            self,
            "$ORIGIN in-addr.arpa.\n@ 300 IN SOA ns. h. 1 2 3 4 5\n",
            origin="in-addr.arpa.",
            timeout={"9.113.0.203.in-addr.arpa"},
        )
        base = temp_dir(self)
        (base / "dns.ini").write_text(
            f"[main]\nnameservers=127.0.0.1:{server.port}\ntimeout=5\nattempts=2\n"
            "[rdns]\ntimeout=0.3\n"
        )
        config = ConfigDirectory([base])
        lookup = ReverseLookup.from_config(config, reactor, Resolver.from_config(config, reactor))
        lookup._hosts = {}  # (this machine's /etc/hosts left out)
        started = time.monotonic()
        self.assertIsNone(await lookup.lookup("203.0.113.9"))
        took = time.monotonic() - started
        self.assertGreaterEqual(took, 0.27)
        self.assertLess(took, 2.0)
        self.assertEqual(len(server.queries), 1)
        self.assertIsNone(lookup.lookup_now("203.0.113.9"))  # (not a Deferred: kept)
        await pause(0.1)
        self.assertEqual(len(server.queries), 1)

    def test_rdns_settings(self) -> None:
        """[rdns] as shipped (etc/dns.ini) is 3 s and 600 s; cache_ttl 0 asks again for
        every lookup; a bad value is a ConfigError naming dns.ini and the key."""
        from haraka_tw.paths import default_config_dir
        from haraka_tw.smtp.rdns import ReverseLookup

        shipped = ReverseLookup.from_config(ConfigDirectory([default_config_dir()]), reactor)
        self.assertEqual((shipped.timeout, shipped.ttl), (3.0, 600.0))
        base = temp_dir(self)
        (base / "dns.ini").write_text("[rdns]\ncache_ttl=0\n")
        asked: list[str] = []

        class Counting:
            def lookup_ptr(self, ip: str) -> Deferred[list[str]]:
                asked.append(ip)
                return defer.succeed(["host.example"])

        clock = task.Clock()
        uncached = ReverseLookup.from_config(ConfigDirectory([base]), clock, Counting())
        uncached._hosts = {}  # (this machine's /etc/hosts left out)
        for _ in range(2):
            self.assertEqual(self.successResultOf(uncached.lookup("192.0.2.7")), "host.example")
        self.assertEqual(asked, ["192.0.2.7", "192.0.2.7"])
        for line, key in [
            ("timeout=soon", "[rdns] timeout"),
            ("timeout=0", "[rdns] timeout"),
            ("cache_ttl=-1", "[rdns] cache_ttl"),
        ]:
            (base / "dns.ini").write_text(f"[rdns]\n{line}\n")
            with self.assertRaises(ConfigError) as caught:
                ReverseLookup.from_config(ConfigDirectory([base]), reactor)
            self.assertIn("dns.ini", str(caught.exception))
            self.assertIn(key, str(caught.exception))

    def test_a_bad_rdns_setting_stops_the_start(self) -> None:
        """The server does not start on a bad [rdns] value, and says which."""
        from haraka_tw.server import HarakaServer, StartupError

        base = temp_dir(self)
        (base / "dns.ini").write_text("[rdns]\ntimeout=-2\n")
        with self.assertRaises(StartupError) as caught:
            HarakaServer.from_directory(base, reactor)
        self.assertIn("dns.ini", str(caught.exception))
        self.assertIn("dns.ini: [rdns] timeout: -2 is not a positive number", str(caught.exception))
