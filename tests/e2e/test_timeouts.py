"""Plugin timeouts over a real socket: a hook that never answers gets a 4xx in time.

The sample plugin answers the directive C{hang} with a Deferred that never fires (or,
C{hang.coroutine}, a coroutine that never returns); the
server's C{plugin_timeout} (or the plugin's own C{<name>.timeout} file) must answer for it
with DENYSOFT "plugin timeout", and the session must go on.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.haproxy import v1_header
from tests.support import WireClient, maildir_messages, reply_code, start_server

SAMPLE = "tests.e2e.sample_plugin:Factory"
PLUGINS = f"{SAMPLE}\nrcpt_to.in_host_list\nqueue/maildir\n"


def timed(client: WireClient, data: bytes) -> tuple[bytes, float]:
    """Send C{data}; the next reply and the seconds it took to come."""
    start = time.monotonic()
    client.send(data)
    reply = client.reply()
    return reply, time.monotonic() - start


class PluginTimeoutTests(unittest.TestCase):
    def start(self, files: dict[str, str]) -> int:
        server, port = start_server(self, {"plugins": PLUGINS, **files})
        self.maildir = server.base / "maildir"  # type: ignore[attr-defined]
        return port

    def test_plugin_timeout_answers_a_hung_mail_hook(self) -> None:
        """plugin_timeout 2: a MAIL hook that never answers gets 450 after about 2 s."""
        port = self.start({"plugin_timeout": "2\n"})

        def client() -> None:
            with WireClient(port) as c:
                c.command("EHLO client.test")
                reply, took = timed(c, b"MAIL FROM:<hang@x.test>\r\n")
                self.assertEqual(reply, b"450 4.7.1 plugin timeout\r\n")
                self.assertGreaterEqual(took, 1.9)
                self.assertLess(took, 3.5)
                # The session goes on: the next transaction is served normally.
                self.assertEqual(reply_code(c.command("MAIL FROM:<alice@x.test>")), 250)
                self.assertEqual(reply_code(c.command("QUIT")), 221)

        return deferToThread(client)

    def test_per_plugin_timeout_shorter_than_plugin_timeout(self) -> None:
        """<plugin>.timeout 1 beats plugin_timeout 30: a hung async RCPT hook gets 450 in ~1 s."""
        port = self.start({"plugin_timeout": "30\n", f"{SAMPLE}.timeout": "1\n"})

        def client() -> None:
            with WireClient(port) as c:
                c.command("EHLO client.test")
                self.assertEqual(reply_code(c.command("MAIL FROM:<alice@x.test>")), 250)
                reply, took = timed(c, b"RCPT TO:<hang.coroutine@example.com>\r\n")
                self.assertEqual(reply, b"450 4.7.1 plugin timeout\r\n")
                self.assertGreaterEqual(took, 0.9)
                self.assertLess(took, 2.5)
                self.assertEqual(reply_code(c.command("RCPT TO:<bob@example.com>")), 250)
                self.assertEqual(reply_code(c.command("QUIT")), 221)

        return deferToThread(client)

    def test_per_plugin_timeout_longer_than_plugin_timeout(self) -> None:
        """<plugin>.timeout 2 overrides plugin_timeout 1: a hung queue hook gets 450 in ~2 s."""
        port = self.start({"plugin_timeout": "1\n", f"{SAMPLE}.timeout": "2\n"})

        def client() -> None:
            with WireClient(port) as c:
                c.command("EHLO client.test")
                self.assertEqual(reply_code(c.command("MAIL FROM:<alice@x.test>")), 250)
                self.assertEqual(reply_code(c.command("RCPT TO:<bob@example.com>")), 250)
                self.assertEqual(reply_code(c.command("DATA")), 354)
                reply, took = timed(c, b"Subject: queue=hang\r\n\r\nHello.\r\n.\r\n")
                self.assertEqual(reply, b"450 4.3.0 plugin timeout\r\n")
                self.assertGreaterEqual(took, 1.9)
                self.assertLess(took, 3.5)
                self.assertEqual(reply_code(c.command("QUIT")), 221)

        def check(_: Any) -> None:
            self.assertEqual(maildir_messages(self.maildir), [])

        return deferToThread(client).addCallback(check)


def read_until(sock: socket.socket, enough: Callable[[bytes], bool]) -> bytes:
    """What C{sock} sends until C{enough} of it has come.

    @raise ConnectionError: if the server closes before that.
    """
    got = b""
    while not enough(got):
        chunk = sock.recv(512)
        if not chunk:
            raise ConnectionError(f"closed after {got!r}")
        got += chunk
    return got


class ReverseLookupTimeoutTests(unittest.TestCase):
    def test_a_silent_nameserver_delays_the_banner_by_the_rdns_timeout_once(self) -> None:
        """A client (here named by a PROXY header) whose PTR query goes unanswered gets its
        banner after dns.ini [rdns] timeout, is taken as having no name, and is served; its
        next connection is answered at once (the failure is kept)."""
        from tests.dnsserver import serve

        dns = serve(
            self,
            "$ORIGIN in-addr.arpa.\n@ 300 IN SOA ns. h. 1 2 3 4 5\n",
            origin="in-addr.arpa.",
            timeout={"9.113.0.203.in-addr.arpa"},
        )
        server, port = start_server(
            self,
            {
                "plugins": "rcpt_to.in_host_list\nqueue/maildir\n",
                "host_list": "example.test\n",
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=5\n"
                "[rdns]\ntimeout=0.5\n",
            },
        )
        proxy = v1_header(("203.0.113.9", 40000), ("127.0.0.1", 25))

        def client() -> list[float]:
            waits = []
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    started = time.monotonic()
                    s.sendall(proxy)
                    banner = s.recv(512)
                    waits.append(time.monotonic() - started)
                    self.assertTrue(banner.startswith(b"220 "), banner)
                    s.sendall(
                        b"HELO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                        b"RCPT TO:<bob@example.test>\r\nDATA\r\n"
                    )
                    got = read_until(s, lambda got: got.count(b"\r\n") >= 4)
                    self.assertIn(b"354 ", got)
                    s.sendall(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
                    rest = read_until(s, lambda rest: b"221 " in rest)
                    self.assertTrue(rest.startswith(b"250 "), rest)
            return waits

        def check(waits: list[float]) -> None:
            self.assertGreaterEqual(waits[0], 0.45)
            self.assertLess(waits[0], 2.5)  # (not [main] timeout's 5 s)
            self.assertLess(waits[1], 0.45)  # (under the 0.5 s a lookup would take)
            self.assertEqual(len(dns.queries), 1)
            messages = maildir_messages(server.base / "maildir")  # type: ignore[attr-defined]
            self.assertEqual(len(messages), 2)
            for message in messages:
                self.assertIn(b"from client.test ([203.0.113.9])", message)  # (no name)

        return deferToThread(client).addCallback(check)
