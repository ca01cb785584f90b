"""haraka_tw.outbound.mx against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.trial import unittest

from haraka_tw.config import ConfigDirectory, ConfigError
from haraka_tw.dns import Resolver
from haraka_tw.outbound.mx import MXAddress, MXError, MXHost, MXResolver
from tests.dnsserver import DNSServer, serve
from tests.support import temp_dir

# Public-looking addresses (the documentation ranges count as private to ipaddress).
ZONE = """
$TTL 300
$ORIGIN ordered.test.
@        MX 20 two
@        MX 10 one
@        MX 30 three
one      A 203.0.114.1
two      A 203.0.114.2
three    A 203.0.114.3
$ORIGIN equal.test.
@        MX 10 a
@        MX 10 b
@        MX 10 c
@        MX 10 d
@        MX 5 first
$ORIGIN implicit.test.
@        A 203.0.114.10
$ORIGIN implicit6.test.
@        AAAA 2a00:1450::10
$ORIGIN bare.test.
@        TXT "no mail here"
$ORIGIN nullmx.test.
@        MX 0 .
$ORIGIN mixednull.test.
@        MX 0 .
@        MX 10 mx
mx       A 203.0.114.20
$ORIGIN dual.test.
@        MX 10 mx1
@        MX 20 mx2
mx1      A 203.0.114.31
mx1      AAAA 2a00:1450::31
mx2      A 203.0.114.32
mx2      AAAA 2a00:1450::32
$ORIGIN local.test.
@        MX 10 loop
@        MX 20 lan
@        MX 30 public
loop     A 127.0.0.1
lan      A 10.1.2.3
lan      AAAA fe80::1
public   A 203.0.114.40
$ORIGIN alllocal.test.
@        MX 10 loop
loop     A 127.0.0.1
loop     AAAA ::1
$ORIGIN partial.test.
@        MX 10 broken
@        MX 20 missing
@        MX 30 good
broken   A 203.0.114.50
good     A 203.0.114.51
$ORIGIN dangling.test.
@        MX 10 gone1
@        MX 20 gone2
$ORIGIN nodata.test.
@        MX 10 mx
mx       TXT "no address"
$ORIGIN shared.test.
@        MX 10 mx1
@        MX 20 mx2
mx1      A 203.0.114.60
mx2      A 203.0.114.60
mx2      A 203.0.114.61
$ORIGIN dup.test.
@        MX 10 mx
@        MX 30 MX
mx       A 203.0.114.70
"""


def resolver_for(server: DNSServer, timeout: float = 2.0) -> Resolver:
    """A Resolver that asks only ``server``."""
    return Resolver(reactor, [("127.0.0.1", server.port)], timeout=timeout, attempts=1)


def ips(addresses: list[MXAddress]) -> list[str]:
    """The IPs of ``addresses``, in order."""
    return [a.ip for a in addresses]


class ResolveTests(unittest.TestCase):
    """MXResolver.resolve: the MX hosts of a domain, or why there are none."""

    def setUp(self) -> None:
        self.server = serve(
            self,
            ZONE,
            servfail={"fail.test", "bare.test/A"},
            timeout={"slow.test"},
        )
        self.mx = MXResolver(resolver_for(self.server, timeout=0.25), port=2525)

    async def assertMXError(self, domain: str, permanent: bool, enhanced: str) -> MXError:
        """resolve(domain) fails with that MXError; return it."""
        with self.assertRaises(MXError) as caught:
            await self.mx.resolve(domain)
        error = caught.exception
        self.assertEqual((error.permanent, error.enhanced), (permanent, enhanced), str(error))
        return error

    async def test_sorted_by_priority(self) -> None:
        """MX hosts come best first, on mx_port, marked from_dns."""
        hosts = await self.mx.resolve("ordered.test")
        self.assertEqual(
            hosts,
            [
                MXHost("one.ordered.test", 10, port=2525),
                MXHost("two.ordered.test", 20, port=2525),
                MXHost("three.ordered.test", 30, port=2525),
            ],
        )
        self.assertTrue(all(h.from_dns for h in hosts))

    async def test_domain_is_normalised(self) -> None:
        """Case, spaces and a final dot do not matter."""
        hosts = await self.mx.resolve(" Ordered.TEST. ")
        self.assertEqual(hosts[0].exchange, "one.ordered.test")

    async def test_equal_priorities_shuffled(self) -> None:
        """Equal priorities come in the rng's order; the priority order holds."""
        orders = set()
        for seed in range(12):
            mx = MXResolver(self.mx.resolver, rng=random.Random(seed))
            hosts = await mx.resolve("equal.test")
            self.assertEqual(hosts[0].exchange, "first.equal.test")
            self.assertEqual([h.priority for h in hosts], [5, 10, 10, 10, 10])
            orders.add(tuple(h.exchange for h in hosts[1:]))
            again = await MXResolver(self.mx.resolver, rng=random.Random(seed)).resolve(
                "equal.test"
            )
            self.assertEqual(hosts, again)  # the same seed gives the same order
        self.assertGreater(len(orders), 3)

    async def test_duplicate_exchange_kept_once(self) -> None:
        """An exchange listed twice is kept once, at its best priority."""
        self.assertEqual(await self.mx.resolve("dup.test"), [MXHost("mx.dup.test", 10, 2525)])

    async def test_implicit_mx(self) -> None:
        """No MX but an A record: the domain itself at priority 0."""
        self.assertEqual(
            await self.mx.resolve("implicit.test"), [MXHost("implicit.test", 0, port=2525)]
        )

    async def test_implicit_mx_aaaa_only(self) -> None:
        """No MX but an AAAA record: the implicit MX as well."""
        self.assertEqual(
            await self.mx.resolve("implicit6.test"), [MXHost("implicit6.test", 0, port=2525)]
        )

    async def test_no_mx_no_address(self) -> None:
        """No MX, A or AAAA: permanent 5.1.2."""
        self.server.servfail = frozenset()  # bare.test/A answers normally here
        await self.assertMXError("bare.test", True, "5.1.2")

    async def test_no_mx_address_lookup_fails(self) -> None:
        """No MX and the A lookup fails: temporary 4.4.3."""
        await self.assertMXError("bare.test", False, "4.4.3")

    async def test_nxdomain(self) -> None:
        """A domain that does not exist: permanent 5.1.2."""
        error = await self.assertMXError("nowhere.test", True, "5.1.2")
        self.assertIn("does not exist", str(error))

    async def test_null_mx(self) -> None:
        """A null MX (RFC 7505): permanent 5.1.10."""
        error = await self.assertMXError("nullmx.test", True, "5.1.10")
        self.assertIn("null MX", error.message)

    async def test_null_mx_among_others_is_dropped(self) -> None:
        """A '.' exchange among real ones is ignored; the real ones are used."""
        self.assertEqual(
            await self.mx.resolve("mixednull.test"), [MXHost("mx.mixednull.test", 10, 2525)]
        )

    async def test_servfail(self) -> None:
        """SERVFAIL on the MX lookup: temporary 4.4.3."""
        error = await self.assertMXError("fail.test", False, "4.4.3")
        self.assertIn("SERVFAIL", str(error))

    async def test_timeout(self) -> None:
        """No answer to the MX lookup: temporary 4.4.3."""
        await self.assertMXError("slow.test", False, "4.4.3")

    async def test_address_literal_v4(self) -> None:
        """[192.0.2.1] is that address, not from DNS, and asks nothing."""
        hosts = await self.mx.resolve("[192.0.2.1]")
        self.assertEqual(hosts, [MXHost("192.0.2.1", 0, port=2525, from_dns=False)])
        self.assertEqual(self.server.queries, [])

    async def test_address_literal_v6(self) -> None:
        """[IPv6:...] is that IPv6 address, canonical."""
        hosts = await self.mx.resolve("[IPv6:2001:DB8:0::1]")
        self.assertEqual(hosts, [MXHost("2001:db8::1", 0, port=2525, from_dns=False)])

    async def test_bad_address_literals(self) -> None:
        """A malformed literal is permanent 5.1.2."""
        for literal in ("[300.1.1.1]", "[2001:db8::1]", "[IPv6:192.0.2.1]", "[192.0.2.1", "[]"):
            await self.assertMXError(literal, True, "5.1.2")

    async def test_error_text(self) -> None:
        """str(MXError) is the status and the message."""
        error = MXError(False, "4.4.3", "DNS temporary failure")
        self.assertEqual(str(error), "4.4.3 DNS temporary failure")


class AddressTests(unittest.TestCase):
    """MXResolver.addresses: the addresses to try, in order."""

    def setUp(self) -> None:
        self.server = serve(self, ZONE, servfail={"broken.partial.test", "mx2.dual.test/AAAA"})
        self.resolver = resolver_for(self.server)
        self.logged: list[str] = []

    def mx(self, **options: object) -> MXResolver:
        """An MXResolver over the test server that logs into self.logged."""
        return MXResolver(self.resolver, log=self.logged.append, **options)  # type: ignore[arg-type]

    async def addresses(self, domain: str, **options: object) -> list[MXAddress]:
        """resolve then addresses for ``domain``."""
        mx = self.mx(**options)
        return await mx.addresses(await mx.resolve(domain))

    async def test_in_mx_order_v4_first(self) -> None:
        """Each MX in turn, IPv4 before IPv6 by default; an MX's failed AAAA is skipped."""
        found = await self.addresses("dual.test")
        self.assertEqual(ips(found), ["203.0.114.31", "2a00:1450::31", "203.0.114.32"])
        self.assertEqual(found[0].mx.exchange, "mx1.dual.test")
        self.assertEqual(found[2].mx.exchange, "mx2.dual.test")

    async def test_inet_prefer_v4(self) -> None:
        """inet_prefer v4 lists IPv4 first for each MX."""
        found = await self.addresses("dual.test", inet_prefer="v4")
        self.assertEqual(ips(found), ["203.0.114.31", "2a00:1450::31", "203.0.114.32"])

    async def test_inet_prefer_v6(self) -> None:
        """inet_prefer v6 lists IPv6 first for each MX; MX order still wins."""
        self.server.servfail = frozenset()
        found = await self.addresses("dual.test", inet_prefer="v6")
        self.assertEqual(
            ips(found), ["2a00:1450::31", "203.0.114.31", "2a00:1450::32", "203.0.114.32"]
        )

    def test_inet_prefer_checked(self) -> None:
        """An unknown inet_prefer is a ValueError."""
        with self.assertRaises(ValueError):
            MXResolver(self.resolver, inet_prefer="v5")

    async def test_local_addresses_skipped(self) -> None:
        """Loopback, private and link-local addresses are skipped and logged."""
        found = await self.addresses("local.test")
        self.assertEqual(ips(found), ["203.0.114.40"])
        self.assertEqual(len(self.logged), 1)
        for skipped in ("127.0.0.1", "10.1.2.3", "fe80::1"):
            self.assertIn(skipped, self.logged[0])

    async def test_local_addresses_allowed(self) -> None:
        """local_mx_ok keeps them, in order."""
        found = await self.addresses("local.test", local_mx_ok=True)
        self.assertEqual(ips(found), ["127.0.0.1", "10.1.2.3", "fe80::1", "203.0.114.40"])
        self.assertEqual(self.logged, [])

    async def test_only_local_addresses(self) -> None:
        """Every address local: temporary 4.4.4 that says why."""
        with self.assertRaises(MXError) as caught:
            await self.addresses("alllocal.test")
        self.assertEqual((caught.exception.permanent, caught.exception.enhanced), (False, "4.4.4"))
        self.assertIn("local_mx_ok", caught.exception.message)

    async def test_failed_mx_skipped(self) -> None:
        """An MX whose lookups fail or do not exist is skipped when another has addresses."""
        found = await self.addresses("partial.test")
        self.assertEqual(
            [(a.mx.exchange, a.ip) for a in found], [("good.partial.test", "203.0.114.51")]
        )

    async def test_every_mx_fails(self) -> None:
        """Only failing MX lookups: temporary 4.4.3."""
        hosts = [MXHost("broken.partial.test", 10), MXHost("missing.partial.test", 20)]
        with self.assertRaises(MXError) as caught:
            await self.mx().addresses(hosts)
        self.assertEqual((caught.exception.permanent, caught.exception.enhanced), (False, "4.4.3"))

    async def test_every_mx_nxdomain(self) -> None:
        """Every MX name NXDOMAIN: permanent 5.4.4."""
        with self.assertRaises(MXError) as caught:
            await self.addresses("dangling.test")
        self.assertEqual((caught.exception.permanent, caught.exception.enhanced), (True, "5.4.4"))

    async def test_mx_without_addresses(self) -> None:
        """MX names that exist without A or AAAA: temporary 4.4.4."""
        with self.assertRaises(MXError) as caught:
            await self.addresses("nodata.test")
        self.assertEqual((caught.exception.permanent, caught.exception.enhanced), (False, "4.4.4"))

    async def test_shared_address_listed_once(self) -> None:
        """An address of two MX hosts is listed once, for the better one."""
        found = await self.addresses("shared.test")
        self.assertEqual(
            [(a.mx.exchange, a.ip) for a in found],
            [("mx1.shared.test", "203.0.114.60"), ("mx2.shared.test", "203.0.114.61")],
        )

    async def test_address_literal(self) -> None:
        """An address literal gives its address without a lookup."""
        found = await self.addresses("[203.0.114.99]")
        self.assertEqual(
            found, [MXAddress(MXHost("203.0.114.99", 0, from_dns=False), "203.0.114.99")]
        )
        self.assertEqual(self.server.queries, [])

    async def test_local_address_literal(self) -> None:
        """A loopback literal is skipped unless local_mx_ok."""
        with self.assertRaises(MXError):
            await self.addresses("[127.0.0.1]")
        self.assertEqual(ips(await self.addresses("[127.0.0.1]", local_mx_ok=True)), ["127.0.0.1"])

    async def test_plugin_hosts_keep_their_settings(self) -> None:
        """Hosts from a get_mx plugin (IP or name) keep port, bind and the rest."""
        hosts = [
            MXHost("203.0.114.80", 0, port=24, using_lmtp=True, from_dns=False),
            MXHost("one.ordered.test", 5, port=587, auth_user="u", auth_pass="p"),
        ]
        found = await self.mx().addresses(hosts)
        self.assertEqual(
            found, [MXAddress(hosts[0], "203.0.114.80"), MXAddress(hosts[1], "203.0.114.1")]
        )

    async def test_no_hosts(self) -> None:
        """An empty host list is a temporary error, not a crash."""
        with self.assertRaises(MXError) as caught:
            await self.mx().addresses([])
        self.assertFalse(caught.exception.permanent)


class CachedTests(unittest.TestCase):
    """With the resolver's cache, the second route to a domain is the first one again,
    given at once and without a query (the path every message after the first takes)."""

    def setUp(self) -> None:
        self.server = serve(self, ZONE, servfail={"broken.partial.test"})
        resolver = Resolver(reactor, [("127.0.0.1", self.server.port)], timeout=2, cache=True)
        self.mx = MXResolver(resolver, port=2525, rng=random.Random(1))

    async def route(self, domain: str) -> Any:
        """The addresses of ``domain``, or its MXError as (permanent, enhanced, message)."""
        try:
            return await self.mx.addresses(await self.mx.resolve(domain))
        except MXError as e:
            return (e.permanent, e.enhanced, e.message)

    def route_now(self, domain: str) -> Any:
        """route() that must answer before the reactor runs."""
        d = Deferred.fromCoroutine(self.route(domain))
        self.assertTrue(d.called, domain)
        return d.result

    async def test_every_outcome_again_from_the_cache(self) -> None:
        """Hosts, implicit MX, NXDOMAIN, null MX, no address, local addresses: the same
        outcome the second time, at once, asking nothing."""
        domains = [
            "ordered.test",
            "equal.test",
            "implicit.test",
            "implicit6.test",
            "bare.test",
            "nowhere.test",
            "nullmx.test",
            "mixednull.test",
            "dual.test",
            "local.test",
            "alllocal.test",
            "dangling.test",
            "nodata.test",
            "shared.test",
            "dup.test",
            "[203.0.114.99]",
        ]
        for domain in domains:
            self.mx._rng = random.Random(1)
            first = await self.route(domain)
            asked = len(self.server.queries)
            self.mx._rng = random.Random(1)  # the same shuffle of equal priorities
            again = self.route_now(domain)
            self.assertEqual(again, first, domain)
            self.assertEqual(len(self.server.queries), asked, domain)

    async def test_failures_are_asked_again(self) -> None:
        """An MX whose lookup failed is asked again; the route stays the same."""
        first = await self.route("partial.test")
        asked = len(self.server.queries)
        self.assertEqual(await self.route("partial.test"), first)
        self.assertEqual(
            [q[1].lower() for q in self.server.queries[asked:]], ["broken.partial.test."] * 2
        )


class CancelTests(unittest.TestCase):
    """Cancelling resolve or addresses stops every lookup under it."""

    async def test_cancel_resolve(self) -> None:
        """A cancelled resolve fails with CancelledError and leaves nothing behind."""
        server = serve(self, ZONE, timeout={"ordered.test"})
        lookup = MXResolver(resolver_for(server, timeout=30)).resolve("ordered.test")
        await task.deferLater(reactor, 0.05, lambda: None)
        lookup.cancel()
        with self.assertRaises(CancelledError):
            await lookup

    async def test_cancel_addresses(self) -> None:
        """A cancelled addresses() cancels every A and AAAA lookup it started."""
        server = serve(self, ZONE, timeout={"one.ordered.test", "two.ordered.test"})
        mx = MXResolver(resolver_for(server, timeout=30))
        hosts = [MXHost("one.ordered.test", 10), MXHost("two.ordered.test", 20)]
        lookup = mx.addresses(hosts)
        await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(server.queries), 4)
        lookup.cancel()
        with self.assertRaises(CancelledError):
            await lookup
        await task.deferLater(reactor, 0.05, lambda: None)
        pending = [c for c in reactor.getDelayedCalls() if "dns" in repr(c.func).lower()]
        self.assertEqual(pending, [])


class ConfigTests(unittest.SynchronousTestCase):
    """MXResolver.from_config reads outbound.ini."""

    def config(self, text: str | None) -> ConfigDirectory:
        """A config directory with outbound.ini holding ``text`` (None: no file)."""
        base = temp_dir(self)
        if text is not None:
            (base / "outbound.ini").write_text(text, encoding="utf-8")
        return ConfigDirectory([base])

    def resolver(self) -> Resolver:
        """A resolver that is never asked anything here."""
        return Resolver(reactor, [("127.0.0.1", 53)])

    def test_defaults(self) -> None:
        """No outbound.ini: port 25, inet_prefer default, local_mx_ok off."""
        mx = MXResolver.from_config(self.config(None), self.resolver())
        self.assertEqual((mx.port, mx.inet_prefer, mx.local_mx_ok), (25, "default", False))

    def test_keys(self) -> None:
        """mx_port, inet_prefer and local_mx_ok are read."""
        text = "mx_port = 2525\ninet_prefer = v6\nlocal_mx_ok = true\n"
        mx = MXResolver.from_config(self.config(text), self.resolver())
        self.assertEqual((mx.port, mx.inet_prefer, mx.local_mx_ok), (2525, "v6", True))

    def test_bad_values(self) -> None:
        """A bad mx_port or inet_prefer is a ConfigError naming outbound.ini and the key."""
        for text, key in (
            ("mx_port = 0\n", "mx_port"),
            ("mx_port = smtp\n", "mx_port"),
            ("inet_prefer = ipv4\n", "inet_prefer"),
        ):
            with self.assertRaises(ConfigError) as caught:
                MXResolver.from_config(self.config(text), self.resolver())
            self.assertIn("outbound.ini", str(caught.exception))
            self.assertIn(key, str(caught.exception))


class PluginHostTests(unittest.TestCase):
    def test_plugin_hosts_on_local_addresses_are_kept(self) -> Any:
        """A get_mx host (from_dns=False) on a loopback address is used without local_mx_ok."""
        from twisted.internet import reactor

        from haraka_tw.dns import Resolver
        from haraka_tw.outbound.mx import MXHost, MXResolver

        mx = MXResolver(Resolver(reactor, [("127.0.0.1", 9)], timeout=1), local_mx_ok=False)
        d = mx.addresses([MXHost("127.0.0.1", 0, port=2525, from_dns=False, from_plugin=True)])
        return d.addCallback(lambda found: self.assertEqual([a.ip for a in found], ["127.0.0.1"]))
