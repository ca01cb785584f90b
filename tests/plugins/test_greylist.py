"""greylist over sockets: clients (their addresses given by a PROXY header from loopback)
greylisted with their state in a real redis-server, their reverse names served by a real
DNS server on loopback."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.plugins.greylist import host_id
from haraka_tw.server import StartupError
from tests.dnsserver import serve
from tests.plugins.test_dns_list import exchange
from tests.redis_server import (
    plugin_redis_connected,
    redis_command,
    start_redis,
    stop_with_the_test,
)
from tests.support import start_server

ZONE = """
8.7.6.5.in-addr.arpa.    300 IN PTR mx1.mail.example.net.
mx1.mail.example.net.    300 IN A   5.6.7.8
9.7.6.5.in-addr.arpa.    300 IN PTR liar.example.org.
liar.example.org.        300 IN A   192.0.2.99
"""
PERIODS = "[period]\nblack=1\ngrey=60\nwhite=3600\n"


def rcpt(
    port: int, ip: str, sender: str = "joe@sender.example", to: str = "you@example.com"
) -> bytes:
    """The reply to RCPT TO C{to} from client C{ip}."""
    commands = ["EHLO client.example", f"MAIL FROM:<{sender}>", f"RCPT TO:<{to}>"]
    return exchange(port, ip, *commands)[3]


class GreylistTests(TestCase):
    @inlineCallbacks
    def server(
        self, ini: str = PERIODS, redis_port: int = 0, **files: str
    ) -> Generator[Deferred[Any], Any, int]:
        """A server with greylist and a redis-server (or the given port, which may be
        closed), once greylist's Redis is connected when it can be (a client arriving
        sooner would meet Redis as down)."""
        dns = serve(self, ZONE)
        up = not redis_port
        self.redis_port = redis_port or start_redis(self).port
        server, port = start_server(
            self,
            {
                "plugins": "relay\ndns-list\ngreylist\nrcpt_to.in_host_list\nqueue/discard\n",
                "greylist.ini": ini,
                "redis.ini": f"[server]\nport={self.redis_port}\n",
                "host_list": "example.com\n",
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "relay_acl_allow": "10.1.0.0/16\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\nattempts=1\n",
                **files,
            },
        )
        stop_with_the_test(self, server)
        if up:
            yield plugin_redis_connected(server, "greylist")
        return port

    def redis_command(self, *args: Any) -> Deferred[Any]:
        return redis_command(self.redis_port, *args)

    @inlineCallbacks
    def test_a_retry_after_the_black_period_passes(self) -> Deferred[None]:
        """A new host is deferred (451 4.7.1), and again before the black period ends;
        after it, the retry passes, also from another address of the network (a pool of
        servers), and white lists that address: another sender from it passes at once,
        but not from a neighbour. The state is in Redis, with its expiries."""
        port = yield self.server()
        first = yield deferToThread(rcpt, port, "1.2.3.4")
        self.assertEqual(first, b"451 4.7.1 Greylisted. Please come back later.\r\n")
        again = yield deferToThread(rcpt, port, "1.2.3.4")
        self.assertEqual(again[:3], b"451")
        yield deferLater(reactor, 1.2, lambda: None)
        passed = yield deferToThread(rcpt, port, "1.2.3.77")
        self.assertEqual(passed[:3], b"250")
        other = yield deferToThread(rcpt, port, "1.2.3.77", "ann@else.example", "me@example.com")
        self.assertEqual(other[:3], b"250")
        neighbour = yield deferToThread(
            rcpt, port, "1.2.3.99", "ann@else.example", "me@example.com"
        )
        self.assertEqual(neighbour[:3], b"451")
        ttl = yield self.redis_command("TTL", "white:1.2.3.77")
        self.assertTrue(3500 < ttl <= 3600, ttl)
        keys = yield self.redis_command("KEYS", "*")
        for key in keys:
            self.assertGreater((yield self.redis_command("TTL", key)), 0, key)
        record = yield self.redis_command(
            "HGETALL", "grey:1.2.3.0/24:joe@sender.example:you@example.com"
        )
        fields = dict(zip(record[::2], record[1::2], strict=True))
        self.assertEqual(fields[b"tried"], b"2")

    @inlineCallbacks
    def test_hosts_named_by_their_confirmed_reverse_name(self) -> Deferred[None]:
        """A client whose reverse name resolves back to it counts as that name's domain
        (mx1.mail.example.net: mail.example.net); one whose name does not, as its
        network (an IPv4-mapped address as IPv4, IPv6 by its /64)."""
        port = yield self.server()
        yield deferToThread(rcpt, port, "5.6.7.8")
        yield deferToThread(rcpt, port, "5.6.7.9")
        yield deferToThread(rcpt, port, "::ffff:9.9.9.9")  # (an IPv4 client of a [::] listener)
        yield deferToThread(rcpt, port, "2a00:1450:4001:7::99")
        keys = yield self.redis_command("KEYS", "grey:*")
        self.assertEqual(
            sorted(keys),
            [
                b"grey:2a00%3a1450%3a4001%3a7%3a%3a/64:joe@sender.example:you@example.com",
                b"grey:5.6.7.0/24:joe@sender.example:you@example.com",
                b"grey:9.9.9.0/24:joe@sender.example:you@example.com",
                b"grey:mail.example.net:joe@sender.example:you@example.com",
            ],
        )

    @inlineCallbacks
    def test_a_client_named_by_xclient_counts_as_its_own_host(self) -> Deferred[None]:
        """After XCLIENT names another client on the same connection, that client's
        tries are counted for its own host (mail.example.net), not for the host of the
        address before it (1.2.3.0/24)."""
        plugins = "relay\nxclient\ndns-list\ngreylist\nrcpt_to.in_host_list\nqueue/discard\n"
        port = yield self.server(plugins=plugins, **{"xclient.hosts": "1.2.3.4\n"})
        transaction = ["MAIL FROM:<joe@sender.example>", "RCPT TO:<you@example.com>", "RSET"]
        commands = ["EHLO front.example", *transaction]
        commands += ["XCLIENT ADDR=5.6.7.8", "EHLO client.example", *transaction]
        replies = yield deferToThread(exchange, port, "1.2.3.4", *commands)
        codes = [reply[:3] for reply in replies]
        self.assertEqual((codes[3], codes[5], codes[8]), (b"451", b"220", b"451"), replies)
        keys = yield self.redis_command("KEYS", "grey:*")
        self.assertEqual(
            sorted(keys),
            [
                b"grey:1.2.3.0/24:joe@sender.example:you@example.com",
                b"grey:mail.example.net:joe@sender.example:you@example.com",
            ],
        )

    @inlineCallbacks
    def test_clients_not_greylisted(self) -> Deferred[None]:
        """Relaying clients, private addresses and the white lists in greylist.ini pass
        at once, without touching Redis."""
        ini = PERIODS + (
            "[ip_whitelist]\n203.0.113.0/24\n[envelope_whitelist]\nfriend.example\n"
            "[recipient_whitelist]\npostmaster@example.com\n"
        )
        port = yield self.server(ini)
        cases = [
            ("10.1.2.3", "joe@sender.example", "you@example.com"),
            ("192.168.1.9", "joe@sender.example", "you@example.com"),
            ("203.0.113.9", "joe@sender.example", "you@example.com"),
            ("1.2.3.4", "ann@friend.example", "you@example.com"),
            ("1.2.3.4", "joe@sender.example", "postmaster@example.com"),
        ]
        for ip, sender, to in cases:
            reply = yield deferToThread(rcpt, port, ip, sender, to)
            self.assertEqual(reply[:3], b"250", (ip, sender, to))
        self.assertEqual((yield self.redis_command("DBSIZE")), 0)

    @inlineCallbacks
    def test_redis_away(self) -> Deferred[None]:
        """With Redis away, a recipient is deferred (450 4.7.0) at once; with
        redis_down=accept it passes."""
        redis = start_redis(self)
        redis.stop()
        port = yield self.server(redis_port=redis.port)
        started = time.monotonic()
        reply = yield deferToThread(rcpt, port, "1.2.3.4")
        self.assertEqual(reply, b"450 4.7.0 Backend failure. Please, retry later.\r\n")
        self.assertLess(time.monotonic() - started, 2)
        port = yield self.server(PERIODS + "[main]\nredis_down=accept\n", redis_port=redis.port)
        reply = yield deferToThread(rcpt, port, "1.2.3.4")
        self.assertEqual(reply[:3], b"250")

    @inlineCallbacks
    def test_one_connection_shared_with_the_redis_plugin(self) -> Deferred[None]:
        """Listed with Haraka's redis plugin, greylist uses its connection (redis.ini);
        with a [redis] section of its own, a connection to that database."""
        redis = start_redis(self)
        files = {"redis.ini": f"[server]\nport={redis.port}\n"}
        server, _ = start_server(self, {"plugins": "redis\ngreylist\n", **files})
        plugins = {loaded.name: loaded.plugin for loaded in server.runner.plugins}
        self.addCleanup(plugins["redis"].shutdown)
        self.assertIs(plugins["greylist"].redis, plugins["redis"].client)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertTrue(plugins["redis"].client.connected)
        own = f"[redis]\nport={redis.port}\ndb=11\n"
        server, _ = start_server(self, {"plugins": "greylist\n", "greylist.ini": own, **files})
        greylist = server.runner.plugins[0].plugin
        self.addCleanup(greylist.shutdown)
        self.assertEqual((greylist.redis.port, greylist.redis.db), (redis.port, 11))

    def test_bad_settings_stop_start_up(self) -> None:
        """A black period not shorter than grey, an ip_whitelist entry that is not an
        address, or redis_down other than defer/accept stops start-up naming it."""
        for ini, words in (
            ("[period]\nblack=100\ngrey=100\n", "black (100) must be shorter than grey"),
            ("[ip_whitelist]\nnot-an-ip\n", "[ip_whitelist]: 'not-an-ip'"),
            ("[main]\nredis_down=maybe\n", "redis_down must be defer or accept"),
            ("[redis]\nport=none\n", "greylist.ini [redis]"),
        ):
            with self.assertRaises(StartupError) as raised:
                start_server(self, {"plugins": "greylist\n", "greylist.ini": ini})
            self.assertIn(words, str(raised.exception))


class HostIdTests(SynchronousTestCase):
    def test_host_ids(self) -> None:
        """A confirmed name gives its domain part; a dynamic-looking or listed dynamic
        name, or none, gives the /24 or /64."""
        self.assertEqual(host_id("192.0.2.1", "mail.example.com"), "example.com")
        self.assertEqual(host_id("192.0.2.1", "a.b.mx.example.co.uk"), "b.mx.example.co.uk")
        self.assertEqual(host_id("192.0.2.1", "c-192-0-2-1.isp.example"), "192.0.2.0/24")
        self.assertEqual(host_id("192.0.2.1", "h3221225985.isp.example"), "192.0.2.0/24")
        self.assertEqual(host_id("192.0.2.1", "vps1.sgvps.net", ("sgvps.net",)), "192.0.2.0/24")
        self.assertEqual(host_id("2001:db8::5", None), "2001:db8::/64")
