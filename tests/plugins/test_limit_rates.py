"""limit's rates over sockets: clients (their addresses given by a PROXY header from
loopback) counted in a real redis-server, per connection, sender, recipient and client;
and the rate values and lookups as units."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.codes import CONT
from haraka_tw.config.ini import parse_ini
from haraka_tw.ratelimit import Rate, RateTable
from haraka_tw.redis import RedisClient
from haraka_tw.smtp.connection import Connection, Local, Remote
from haraka_tw.smtp.state import Results
from tests.haproxy import proxied
from tests.plugins.loading import load
from tests.redis_server import (
    plugin_redis_connected,
    redis_command,
    start_redis,
    stop_with_the_test,
)
from tests.support import free_port, start_server


def connect(port: int, client_ip: str) -> bytes:
    """The banner a client at C{client_ip} gets (then QUIT, if it was greeted)."""
    with proxied(port, client_ip) as client:
        if client.banner.startswith(b"220"):
            client.command("QUIT")
        else:
            assert client.at_eof(), "refused but not closed"
        return client.banner


def recipients(port: int, client_ip: str, sender: str, *to: str) -> list[bytes]:
    """The replies to RCPT TO each of C{to}, from C{sender}."""
    with proxied(port, client_ip) as client:
        client.command("EHLO client.example")
        client.command(f"MAIL FROM:<{sender}>")
        replies = [client.command(f"RCPT TO:<{address}>") for address in to]
        client.command("QUIT")
        return replies


class RateServerTests(TestCase):
    @inlineCallbacks
    def server(self, ini: str, redis: bool = True, own_redis: bool = False) -> Deferred[int]:
        """A server with limit (C{ini}) and a redis-server (or a closed port), once limit's
        Redis is connected (a client arriving sooner would not be counted)."""
        self.redis_port = start_redis(self).port if redis else free_port()
        if own_redis:  # (limit.ini's own Redis; redis.ini names a closed port)
            ini += f"\n[redis]\nport={self.redis_port}\ndb=1\n"
        server, port = start_server(
            self,
            {
                "plugins": "limit\nrcpt_to.in_host_list\nqueue/discard\n",
                "limit.ini": ini,
                "redis.ini": f"[server]\nport={free_port() if own_redis else self.redis_port}\n",
                "host_list": "example.com\n",
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
            },
        )
        stop_with_the_test(self, server)
        if redis:
            yield plugin_redis_connected(server, "limit")
        return port

    def redis_command(self, *args: Any) -> Deferred[Any]:
        return redis_command(self.redis_port, *args)

    @inlineCallbacks
    def test_connections_per_client(self) -> Deferred[None]:
        """[rate_conn]: a client's connection past the rate gets 421 and is closed; other
        clients are counted apart, a network's clients together, a key of 0 is no limit.
        The count's key expires."""
        port = yield self.server(
            "[rate_conn]\nenabled=true\ndefault=2/1m\n9.9.9.0/24=1\n5.6.7.8=0\n"
        )
        banners = []
        for _ in range(3):
            banners.append((yield deferToThread(connect, port, "1.2.3.4")))
        self.assertEqual([b[:3] for b in banners], [b"220", b"220", b"421"])
        self.assertEqual(banners[2], b"421 connection rate limit exceeded\r\n")
        self.assertEqual((yield deferToThread(connect, port, "1.2.3.5"))[:3], b"220")
        self.assertEqual((yield deferToThread(connect, port, "9.9.9.1"))[:3], b"220")
        self.assertEqual((yield deferToThread(connect, port, "9.9.9.2"))[:3], b"421")
        for _ in range(4):
            self.assertEqual((yield deferToThread(connect, port, "5.6.7.8"))[:3], b"220")
        ttl = yield self.redis_command("TTL", "rate_conn:1.2.3.4")
        self.assertTrue(0 < ttl <= 120, ttl)
        self.assertEqual((yield self.redis_command("EXISTS", "rate_conn:9.9.9.0/24")), 1)
        self.assertEqual((yield self.redis_command("EXISTS", "rate_conn:5.6.7.8")), 0)

    @inlineCallbacks
    def test_own_redis_counts_from_the_first_connection(self) -> Deferred[None]:
        """With limit.ini [redis], the connection is made at start: the first client is
        counted, so the second is over a rate of one."""
        port = yield self.server("[rate_conn]\nenabled=true\ndefault=1/1m\n", own_redis=True)
        self.assertEqual((yield deferToThread(connect, port, "1.2.3.4"))[:3], b"220")
        self.assertEqual((yield deferToThread(connect, port, "1.2.3.4"))[:3], b"421")

    @inlineCallbacks
    def test_recipients_per_sender_and_recipient(self) -> Deferred[None]:
        """[rate_rcpt_sender] and [rate_rcpt]: the recipient past a rate gets 450 4.7.0
        and the session goes on; [rate_rcpt_null]: bounces to one recipient. Each count
        expires with its window."""
        port = yield self.server(
            "[rate_rcpt_sender]\nenabled=true\ndefault=2/1m\nelse.example=0\n"
            "[rate_rcpt]\nenabled=true\ndefault=3/1m\n"
            "[rate_rcpt_null]\nenabled=true\ndefault=1/1h\n"
        )
        replies = yield deferToThread(
            recipients, port, "1.2.3.4", "Joe@Sender.example", "a@example.com", "b@example.com",
            "c@example.com",
        )  # fmt: skip
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"450"])
        self.assertEqual(replies[2], b"450 4.7.0 rcpt rate limit exceeded\r\n")
        ttl = yield self.redis_command("TTL", "rate_rcpt_sender:joe@sender.example")
        self.assertTrue(0 < ttl <= 60, ttl)
        others = yield deferToThread(
            recipients, port, "1.2.3.4", "ann@else.example", *["a@example.com"] * 3
        )  # (else.example's senders have no rate; c@ above was refused for its sender first)
        self.assertEqual([r[:3] for r in others[:2]], [b"250", b"250"])
        self.assertEqual(others[2], b"450 4.7.0 rate limit exceeded\r\n")  # a@: the 4th
        bounces = yield deferToThread(recipients, port, "1.2.3.9", "", "d@example.com")
        again = yield deferToThread(recipients, port, "5.6.7.8", "", "d@example.com")
        self.assertEqual(
            (bounces[0][:3], again[0]), (b"250", b"450 4.7.0 null recip rate limit\r\n")
        )
        ttl = yield self.redis_command("TTL", "rate_rcpt_null:d@example.com")
        self.assertTrue(3500 < ttl <= 3600, ttl)
        refused = yield deferToThread(recipients, port, "1.2.3.4", "x@y.example", "a@far.test")
        self.assertEqual(refused[0][:3], b"550")  # (not ours: no count is made for it)
        self.assertEqual((yield self.redis_command("EXISTS", "rate_rcpt:a@far.test")), 0)

    @inlineCallbacks
    def test_recipients_per_client_checked_at_next_connection(self) -> Deferred[None]:
        """[rate_rcpt_host]: a client's recipients are counted as they come and none is
        refused; its next connection past the rate gets 421 and is closed."""
        port = yield self.server("[rate_rcpt_host]\nenabled=true\ndefault=2/1m\n")
        replies = yield deferToThread(
            recipients, port, "1.2.3.4", "joe@sender.example", "a@example.com", "b@example.com",
            "c@example.com",
        )  # fmt: skip
        self.assertEqual([r[:3] for r in replies], [b"250"] * 3)
        banner = yield deferToThread(connect, port, "1.2.3.4")
        self.assertEqual(banner, b"421 recipient rate limit exceeded\r\n")
        self.assertEqual((yield deferToThread(connect, port, "1.2.3.5"))[:3], b"220")

    @inlineCallbacks
    def test_redis_away_enforces_nothing(self) -> Deferred[None]:
        """With no Redis answering, no rate is enforced and no client waits or is deferred."""
        port = yield self.server(
            "[rate_conn]\nenabled=true\ndefault=1/1m\n[rate_rcpt]\nenabled=true\ndefault=1/1m\n",
            redis=False,
        )
        for _ in range(3):
            self.assertEqual((yield deferToThread(connect, port, "1.2.3.4"))[:3], b"220")
        replies = yield deferToThread(
            recipients, port, "1.2.3.4", "joe@sender.example", "a@example.com", "a@example.com"
        )
        self.assertEqual([r[:3] for r in replies], [b"250", b"250"])


class RateTests(SynchronousTestCase):
    def test_values(self) -> None:
        """N is N a minute; N/P is seconds; units s, m, h, d in any case."""
        for text, rate in (
            ("5", Rate(5, 60)),
            (5, Rate(5, 60)),
            ("5/30", Rate(5, 30)),
            ("5/10m", Rate(5, 600)),
            ("50/1H", Rate(50, 3600)),
            ("0/1d", Rate(0, 86400)),
        ):
            self.assertEqual(Rate.parse(text, "x"), rate, text)

    def test_bad_values_named(self) -> None:
        """A value that is no rate names its section and key (Haraka's plugin left such a
        count without an expiry, blocking the client for good)."""
        for value in ("5/5min", "five", "5/0", "-1", "5 / 5m", True, "1/9999999999999d"):
            with self.assertRaises(ValueError) as caught:
                RateTable.from_ini({"rate_rcpt": {"default": value}}, "rate_rcpt")
            self.assertIn("limit.ini [rate_rcpt] default", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            RateTable.from_ini({"rate_conn": {"10.0.0.0/33": "5"}}, "rate_conn")
        self.assertIn("limit.ini [rate_conn] 10.0.0.0/33", str(caught.exception))

    def table(self, text: str, name: str = "rate_conn") -> RateTable:
        return RateTable.from_ini(parse_ini(text, "limit.ini"), name)

    def test_client_lookups(self) -> None:
        """The address (IPv6 in any spelling), then the narrowest network, then Haraka's
        octet prefixes, then the reverse name and the domains above it, then history,
        then default: a shared count for a network, prefix or name, one per address
        otherwise; 0 is no limit."""
        table = self.table(
            "[rate_conn]\ndefault=9\n2001:DB8:0::1=1\n10.0.0.0/8=2\n10.1.0.0/16=3\n"
            "192.0.2=4\nexample.net=5\n198.51.100.7=0\n::ffff:198.51.100.9=0\n"
            "::ffff:203.0.113.0/120=6\n"
            "[rate_conn_history]\nenabled=true\nbad=1/1h\n"
        )
        cases = [
            ("2001:db8::1", None, ("rate_conn:2001:db8::1", Rate(1))),
            ("10.1.2.3", None, ("rate_conn:10.1.0.0/16", Rate(3))),
            ("10.9.2.3", None, ("rate_conn:10.0.0.0/8", Rate(2))),
            ("192.0.2.77", None, ("rate_conn:192.0.2", Rate(4))),
            ("::ffff:192.0.2.77", None, ("rate_conn:192.0.2", Rate(4))),  # (a [::] listener)
            ("203.0.113.1", "mx.Mail.Example.NET.", ("rate_conn:::ffff:203.0.113.0/120", Rate(6))),
            ("203.0.114.1", "mx.Mail.Example.NET.", ("rate_conn:example.net", Rate(5))),
            ("203.0.114.1", None, ("rate_conn:203.0.114.1", Rate(9))),
            ("198.51.100.9", None, None),  # (a key written IPv4-mapped)
            ("2001:db8:1:2::5", None, ("rate_conn:2001:db8:1:2::/64", Rate(9))),
            ("198.51.100.7", "mx.example.net", None),
        ]
        for ip, host, expected in cases:
            self.assertEqual(table.for_client(ip, host), expected, ip)
        results = Results()
        results.add("karma", history=-2)
        self.assertEqual(
            table.for_client("203.0.114.1", None, results), ("rate_conn:203.0.114.1", Rate(1, 3600))
        )

    def test_address_lookups(self) -> None:
        """The address (any case), then its domain and the domains above it, then default
        (a count per address)."""
        table = self.table(
            "[rate_rcpt]\ndefault=9\nboss@example.com=0\nexample.org=2\na/b@example.com=0\n",
            "rate_rcpt",
        )
        self.assertIsNone(table.for_address("a/b@example.com"))  # (an address, not a network)
        self.assertIsNone(table.for_address("Boss@Example.com"))
        self.assertEqual(table.for_address("a@mx.example.org"), ("rate_rcpt:example.org", Rate(2)))
        self.assertEqual(table.for_address("A@b.test"), ("rate_rcpt:a@b.test", Rate(9)))
        self.assertIsNone(self.table("[rate_rcpt]\n", "rate_rcpt").for_address("a@b.test"))


class RateCheckTests(SynchronousTestCase):
    def plugin(self, ini: str) -> Any:
        loaded = load(self, ["limit"], {"limit.ini": ini})
        return loaded, loaded.plugin("limit")

    def test_checks_take_one_redis_timeout_in_all(self) -> None:
        """A rate check whose Redis does not answer ends after one redis.ini timeout in
        all (its commands wait for one another), enforcing nothing."""
        _, limit = self.plugin("[recipients]\nenabled=true\nmax=5\n")
        limit.clock = Clock()
        limit.redis = RedisClient(limit.clock, "127.0.0.1", free_port(), timeout=2)
        conn = Connection(Remote("192.0.2.9"), Local())

        async def stuck() -> Any:
            await Deferred()  # (a Redis that never answers, however many commands)

        answered: list[Any] = []
        limit._rate_checked(conn, stuck()).addCallback(answered.append)
        limit.clock.advance(1.9)
        self.assertEqual(answered, [])
        limit.clock.advance(0.2)
        self.assertEqual(answered, [CONT])
        self.assertEqual(conn.results.get("limit")["err"], ["rates: no answer from Redis in 2 s"])

    def test_reload_with_a_bad_redis_changes_nothing(self) -> None:
        """A limit.ini that turns a rate on with a [redis] that cannot be used is refused
        whole: the limits in force stay."""
        loaded, limit = self.plugin("[recipients]\nenabled=true\nmax=5\n")
        before = limit.limits
        loaded.write(
            "limit.ini", "[rate_rcpt]\nenabled=true\ndefault=1/1m\n[redis]\nport=notaport\n"
        )
        self.assertIs(limit.limits, before)
        self.assertIsNone(limit.redis)
