"""dns-list over sockets: clients (their addresses given by a PROXY header from loopback)
checked against block, allow and karma zones held by a real DNS server on loopback."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from haraka_tw.plugins.dns_list import query_name
from haraka_tw.server import StartupError
from tests.dnsserver import serve
from tests.haproxy import SourcedClient
from tests.plugins.loading import load
from tests.support import start_server

# Every zone lists 127.0.0.2 (its test point) unless it is broken on purpose.
BODY = """
2.0.0.127.bl           300 IN A 127.0.0.2
4.3.2.1.bl             300 IN A 127.0.0.4
5.3.2.1.bl             300 IN A 127.0.0.2
2.0.0.127.second       300 IN A 127.0.0.2
4.3.2.1.second         300 IN A 127.0.0.2
2.0.0.127.allow        300 IN A 127.0.0.2
5.3.2.1.allow          300 IN A 127.0.0.3
2.0.0.127.everyone     300 IN A 127.0.0.2
1.0.0.127.everyone     300 IN A 127.0.0.2
4.3.2.1.everyone       300 IN A 127.0.0.2
4.3.2.1.dead           300 IN A 127.0.0.2
2.0.0.127.hijack       300 IN A 127.0.0.2
4.3.2.1.hijack         300 IN A 192.0.2.1
2.0.0.127.karma        300 IN A 127.0.0.2
1.0.0.127.karma        300 IN A 127.0.0.1
7.3.2.1.karma          300 IN A 127.0.0.1
4.3.2.1.karma          300 IN A 127.0.0.2
2.0.0.127.slow         300 IN A 127.0.0.2
"""
ZONE = "$ORIGIN test.\n@ 300 IN SOA ns.test. admin.test. 1 60 60 60 60\n" + BODY
V6_CLIENT = "2a00:1450:4001::99"


def v6_record(zone: str) -> str:
    return f"{query_name(V6_CLIENT, zone)}. 300 IN A 127.0.0.2\n"


FULL_ZONE = (  # from the root: the test zones and ips.backscatterer.org
    ". 300 IN SOA ns.test. admin.test. 1 60 60 60 60\n$ORIGIN test.\n"
    + BODY
    + v6_record("bl.test")
    + "$ORIGIN ips.backscatterer.org.\n"
    + "2.0.0.127 300 IN A 127.0.0.2\n"
    + "4.3.2.1 300 IN A 127.0.0.2\n"
    + "5.3.2.1 300 IN A 127.0.0.2\n"
)


def exchange(port: int, client_ip: str, *commands: str) -> list[bytes]:
    """Connect as C{client_ip} (a PROXY header) and send C{commands}: the banner and the
    reply to each."""
    family = "TCP6" if ":" in client_ip else "TCP4"
    server_ip = "::1" if ":" in client_ip else "127.0.0.1"
    preamble = f"PROXY {family} {client_ip} {server_ip} 40000 25\r\n".encode()
    with SourcedClient(port, preamble=preamble, timeout=20) as client:
        return [client.banner] + [client.command(c) for c in commands]


class DNSListTests(TestCase):
    def server(self, ini: str, dns_timeout: float = 1.0, **behaviours: Any) -> int:
        dns = serve(self, FULL_ZONE, **behaviours)
        self.dns = dns
        self.lines: list[str] = []
        server, port = start_server(
            self,
            {
                "plugins": "dns-list\nrcpt_to.in_host_list\nqueue/discard\n",
                "dns-list.ini": ini,
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\n"
                f"timeout={dns_timeout}\nattempts=1\n",
            },
        )
        self.plugin = next(p.plugin for p in server.runner.plugins if p.name == "dns-list")
        self.addCleanup(self.plugin.shutdown)  # as the service does when it stops
        server.log.hook = lambda c, r: self.lines.append(f"{r.level.name} {r.message}") or True
        return port

    def self_tests_done(self) -> Deferred[None]:
        """Wait until the zones' start-up self-tests are over."""
        return until(lambda: not self.plugin._checking)

    @inlineCallbacks
    def test_listed_client_refused_unlisted_greeted(self) -> Deferred[None]:
        """A client listed on two zones gets 554 naming both, and the same 554 to every
        command; an unlisted one is greeted and its mail accepted."""
        port = self.server("[main]\nzones=bl.test, second.test\n[bl.test]\n127.0.0.4=XBL\n")
        yield self.self_tests_done()
        listed = yield deferToThread(
            exchange, port, "1.2.3.4", "EHLO client.example", "MAIL FROM:<a@example.org>"
        )
        text = b"host [1.2.3.4] is listed on "
        self.assertEqual(listed[0][:4] + listed[0][4:].split(text)[0], b"554 ")
        self.assertEqual(
            sorted(listed[0].split(text)[1].strip().split(b", ")), [b"bl.test", b"second.test"]
        )
        self.assertEqual([reply[:3] for reply in listed[1:]], [b"554", b"554"])
        greeted = yield deferToThread(
            exchange,
            port,
            "1.2.3.9",
            "EHLO client.example",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<b@example.com>",
        )
        self.assertEqual([reply[:3] for reply in greeted], [b"220", b"250", b"250", b"250"])

    @inlineCallbacks
    def test_allow_list_beats_block_list(self) -> Deferred[None]:
        """A client on an allow zone is greeted though a block zone lists it."""
        port = self.server("[main]\nzones=bl.test, allow.test\n[allow.test]\ntype=allow\n")
        yield self.self_tests_done()
        got = yield deferToThread(exchange, port, "1.2.3.5", "EHLO client.example")
        self.assertEqual([reply[:3] for reply in got], [b"220", b"250"])

    @inlineCallbacks
    def test_backscatterer_and_ok_mail(self) -> Deferred[None]:
        """[ips.backscatterer.org] enable: a bounce (or postmaster mail) from a host listed
        there gets 550 at MAIL, other senders 250. With ok_mail, an allow-listed client's
        MAIL is answered OK first, so the check does not run."""
        ini = (
            "[main]\nzones=allow.test\n[allow.test]\ntype=allow\n"
            "[ips.backscatterer.org]\nenable=true\n"
        )
        port = self.server(ini)
        yield self.self_tests_done()
        self.assertEqual(self.plugin.active, {"allow.test", "ips.backscatterer.org"})
        listed = b"550 5.7.1 Host unknown [{ip}] is listed by ips.backscatterer.org\r\n"
        for ip, sender, reply in [
            ("1.2.3.4", "<>", listed.replace(b"{ip}", b"1.2.3.4")),
            ("1.2.3.4", "<postmaster@example.org>", listed.replace(b"{ip}", b"1.2.3.4")),
            ("1.2.3.4", "<a@example.org>", b"250"),
            ("1.2.3.5", "<>", listed.replace(b"{ip}", b"1.2.3.5")),  # allow-listed, no ok_mail
        ]:
            got = yield deferToThread(exchange, port, ip, "EHLO c.example", f"MAIL FROM:{sender}")
            self.assertEqual(got[2][: len(reply)], reply, (ip, sender))
        port = self.server(ini + "[allow.test]\nok_mail=true\n")
        yield self.self_tests_done()
        got = yield deferToThread(exchange, port, "1.2.3.5", "EHLO c.example", "MAIL FROM:<>")
        self.assertEqual(got[2][:3], b"250")

    @inlineCallbacks
    def test_search_first_names_one_zone(self) -> Deferred[None]:
        """search=first refuses on the first listing answer, naming that zone only."""
        port = self.server("[main]\nzones=bl.test, second.test\nsearch=first\n")
        yield self.self_tests_done()
        (banner,) = yield deferToThread(exchange, port, "1.2.3.4")
        self.assertRegex(banner, rb"^554 host \[1\.2\.3\.4\] is listed on (bl|second)\.test\r\n$")

    @inlineCallbacks
    def test_zones_failing_their_self_test_are_not_used(self) -> Deferred[None]:
        """A zone listing 127.0.0.1 (it lists everyone) and one not listing 127.0.0.2 are
        set aside with a WARN; a client they list is greeted."""
        port = self.server("[main]\nzones=everyone.test, dead.test, bl.test\n")
        yield self.self_tests_done()
        self.assertEqual(self.plugin.active, {"bl.test"})
        warned = "\n".join(line for line in self.lines if line.startswith("WARN"))
        self.assertIn("zone everyone.test: 127.0.0.1, which no list may list, is listed", warned)
        self.assertIn("zone dead.test: 127.0.0.2, which every list must list, is not", warned)
        (banner,) = yield deferToThread(exchange, port, "1.2.3.9")
        self.assertEqual(banner[:4], b"220 ")

    @inlineCallbacks
    def test_lookup_failures_are_errors_not_passes(self) -> Deferred[None]:
        """A SERVFAIL on the client's name is recorded as an error and the client greeted;
        an answer outside 127/8 sets the zone aside."""
        port = self.server("[main]\nzones=bl.test, hijack.test\n", servfail=["9.3.2.1.bl.test"])
        yield self.self_tests_done()
        recorded: list[dict[str, Any]] = []
        self.plugin_results(recorded)
        got = yield deferToThread(exchange, port, "1.2.3.9")
        self.assertEqual(got[0][:4], b"220 ")
        self.assertRegex(" ".join(recorded[-1]["err"]), r"bl\.test: .*SERVFAIL")
        self.assertNotIn("bl.test", recorded[-1]["pass"])
        got = yield deferToThread(exchange, port, "1.2.3.4")
        self.assertEqual(got[0][:4], b"554 ")  # bl.test lists it; hijack.test's answer is void
        self.assertNotIn(b"hijack", got[0])
        self.assertNotIn("hijack.test", self.plugin.active)
        self.assertTrue(any("outside 127/8" in line for line in self.lines), self.lines)

    @inlineCallbacks
    def test_timeout_caps_the_check(self) -> Deferred[None]:
        """A zone whose answer does not come within timeout is left out (recorded as an
        error); the client is judged on the zones that answered."""
        port = self.server(
            "[main]\nzones=bl.test, second.test\ntimeout=0.5\n",
            dns_timeout=5.0,
            timeout=["4.3.2.1.second.test"],
        )
        yield self.self_tests_done()
        recorded: list[dict[str, Any]] = []
        self.plugin_results(recorded)
        start = time.monotonic()
        (banner,) = yield deferToThread(exchange, port, "1.2.3.4")
        self.assertLess(time.monotonic() - start, 4)
        self.assertEqual(banner, b"554 host [1.2.3.4] is listed on bl.test\r\n")
        self.assertEqual(recorded[-1]["err"], ["timeout after 0.5 s"])

    def plugin_results(self, into: list[dict[str, Any]]) -> None:
        """Keep each connection's dns-list results as its connect hook returns."""
        check = self.plugin._check

        def keeping(connection: Any) -> Any:
            def kept(result: Any) -> Any:
                into.append(dict(connection.results.get("dns-list")))
                return result

            outcome = check(connection)
            if isinstance(outcome, Deferred):
                return outcome.addCallback(kept)
            return kept(outcome)

        self.plugin._check = keeping

    @inlineCallbacks
    def test_ipv6_client(self) -> Deferred[None]:
        """An IPv6 client is looked up by nibbles; a zone with ipv6=false is skipped."""
        port = self.server("[main]\nzones=bl.test\n")
        yield self.self_tests_done()
        (banner,) = yield deferToThread(exchange, port, V6_CLIENT)
        self.assertEqual(banner, f"554 host [{V6_CLIENT}] is listed on bl.test\r\n".encode())
        port = self.server("[main]\nzones=bl.test\n[bl.test]\nipv6=false\n")
        yield self.self_tests_done()
        (banner,) = yield deferToThread(exchange, port, V6_CLIENT)
        self.assertEqual(banner[:4], b"220 ")

    @inlineCallbacks
    def test_karma_zone(self) -> Deferred[None]:
        """hostkarma: 127.0.0.1 is a pass, 127.0.0.2 a block hit."""
        port = self.server(
            "[main]\nzones=karma.test\n[karma.test]\ntype=karma\nloopback_is_rejected=true\n"
        )
        yield self.self_tests_done()
        (white,) = yield deferToThread(exchange, port, "1.2.3.7")
        (black,) = yield deferToThread(exchange, port, "1.2.3.4")
        self.assertEqual(white[:4], b"220 ")
        self.assertEqual(black, b"554 host [1.2.3.4] is listed on karma.test\r\n")

    @inlineCallbacks
    def test_reject_false_only_records(self) -> Deferred[None]:
        """A zone with reject=false records the hit and lets the client in."""
        port = self.server("[main]\nzones=bl.test\n[bl.test]\nreject=false\n")
        yield self.self_tests_done()
        recorded: list[dict[str, Any]] = []
        self.plugin_results(recorded)
        (banner,) = yield deferToThread(exchange, port, "1.2.3.4")
        self.assertEqual(banner[:4], b"220 ")
        self.assertEqual(recorded[-1]["fail"], ["bl.test"])

    @inlineCallbacks
    def test_connections_wait_for_the_start_up_tests(self) -> Deferred[None]:
        """A client arriving while a zone's self-test is still waiting on the nameserver
        is judged once the tests are over, not waved through."""
        port = self.server(
            "[main]\nzones=bl.test, slow.test\n", dns_timeout=1.0, timeout=["1.0.0.127.slow.test"]
        )
        start = time.monotonic()
        (banner,) = yield deferToThread(exchange, port, "1.2.3.4")
        self.assertEqual(banner, b"554 host [1.2.3.4] is listed on bl.test\r\n")
        self.assertGreater(time.monotonic() - start, 0.5)

    @inlineCallbacks
    def test_private_clients_are_not_checked(self) -> Deferred[None]:
        """A loopback client is not checked at all (no query is sent)."""
        port = self.server("[main]\nzones=bl.test\n")
        yield self.self_tests_done()
        (banner,) = yield deferToThread(exchange, port, "127.0.0.5")
        self.assertEqual(banner[:4], b"220 ")
        asked = [name for _, name, _, _ in self.dns.queries if name.endswith("bl.test.")]
        self.assertEqual(asked, ["2.0.0.127.bl.test.", "1.0.0.127.bl.test."])  # the self-test

    def test_bad_settings_stop_the_start(self) -> None:
        """A bad search word, type, zone name or periodic_checks stops start-up."""
        for ini, words in [
            ("[main]\nzones=bl.test\nsearch=some\n", "search"),
            ("[main]\nzones=bl.test\n[bl.test]\ntype=grey\n", "type"),
            ("[main]\nzones=bl..test\n", "zones"),
            ("[main]\nzones=bl.test\nperiodic_checks=often\n", "periodic_checks"),
        ]:
            with self.assertRaises(StartupError) as caught:
                start_server(self, {"plugins": "dns-list\n", "dns-list.ini": ini})
            self.assertIn("dns-list.ini", str(caught.exception))
            self.assertIn(words, str(caught.exception))


class PeriodicCheckTests(TestCase):
    @inlineCallbacks
    def test_zones_tested_again_every_period_and_on_change(self) -> Deferred[None]:
        """Every periodic_checks minutes, and when the file changes, the zones are tested
        again: a zone that starts listing 127.0.0.1 is set aside."""
        dns = serve(self, ZONE, origin="test.")
        loaded = load(
            self,
            ["dns-list"],
            {
                "dns-list.ini": "[main]\nzones=bl.test\nperiodic_checks=10\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=1\nattempts=1\n",
            },
        )
        plugin = loaded.plugin("dns-list")
        self.addCleanup(plugin.shutdown)
        clock = Clock()
        plugin.clock = clock
        plugin.resolver.cache = None  # every test asks the nameserver
        plugin.load()
        yield until(lambda: plugin.active == {"bl.test"})
        asked = len(dns.queries)
        dns.zone = DNSListPeriodic.everyone_listed()
        clock.advance(9 * 60)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(dns.queries), asked)
        clock.advance(60)
        yield until(lambda: plugin.active == set())
        self.assertGreater(len(dns.queries), asked)
        dns.zone = DNSListPeriodic.everyone_listed(fixed=True)
        loaded.write("dns-list.ini", "[main]\nzones=bl.test\nperiodic_checks=20\n")
        yield until(lambda: plugin.active == {"bl.test"})  # tested again at once, and passed
        self.assertTrue(
            any("zone bl.test: 127.0.0.1" in line for line in loaded.log.messages()),
            loaded.log.messages(),
        )


@inlineCallbacks
def until(condition: Any, timeout: float = 10.0) -> Any:
    """Wait (on the reactor) until C{condition()} holds; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not so after {timeout} s")
        yield deferLater(reactor, 0.02, lambda: None)


class DNSListPeriodic:
    @staticmethod
    def everyone_listed(fixed: bool = False) -> Any:
        import dns.zone

        text = ZONE if fixed else ZONE + "1.0.0.127.bl 300 IN A 127.0.0.2\n"
        return dns.zone.from_text(text, origin="test.", relativize=False, check_origin=False)
