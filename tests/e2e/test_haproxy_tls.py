"""The PROXY protocol in front of an implicit TLS listener (port 465 behind HAProxy).

The header comes in the clear, before the client's TLS handshake: from a host in
connection.ini C{[haproxy] hosts} it is read first, then TLS begins and the session sees
the client the header names. From any other host the bytes go to TLS as they are. Real
sockets throughout: a raw client (header, then Python's ssl over the same socket), and a
real HAProxy in TCP mode passing the client's TLS through with C{send-proxy(-v2)}.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from haraka_tw.service import HarakaService
from tests.e2e.test_haproxy import (
    CLIENT_IP,
    HOSTNAME,
    NO_HAPROXY,
    NOTES_KEY,
    RECORDER,
    SESSION_HOOKS,
    STRANGER_IP,
    TRUSTED,
)
from tests.e2e.test_tls import bound_port, client_context, start_service, tls_files
from tests.haproxy import HAProxy, connect_from, haproxy_path, v1_header, v2_header
from tests.support import WireClient, maildir_messages, reply_code
from tests.tls_certs import pki

CLAIMED = ("192.0.2.9", 40001)  # the client a header names, when no real one is behind it


class TLSClient(WireClient):
    """A L{WireClient} over TLS on a socket that may have sent a PROXY header first."""

    def __init__(self, port: int, source_ip: str, preamble: bytes = b"") -> None:
        raw = connect_from(source_ip, port)
        if preamble:
            raw.sendall(preamble)
        self.sock = client_context().wrap_socket(raw, server_hostname="mx.test")
        self.timeout = 10.0
        self._buf = bytearray()
        self.banner = self.reply()


def closed_without_tls(port: int, source_ip: str, preamble: bytes) -> bool:
    """Whether, after C{preamble}, the server closes the connection with nothing sent."""
    with connect_from(source_ip, port) as raw:
        raw.sendall(preamble)
        raw.settimeout(10)
        try:
            return raw.recv(1) == b""
        except ConnectionResetError:
            return True


class ImplicitTLSCase(unittest.TestCase):
    """An implicit TLS listener with connection.ini [haproxy] hosts = 127.0.0.1."""

    def start(self, connection_ini: str = TRUSTED) -> int:
        files = tls_files(pki(), plugins=f"tls\n{RECORDER}\nrcpt_to.in_host_list\nqueue/maildir\n")
        files["connection.ini"] = connection_ini
        files["smtp.ini"] = "[main]\nlisten=tls:127.0.0.1:0\n"
        self.service: HarakaService
        self.service, self.maildir = start_service(self, files, ["tls:tcp:0:interface=127.0.0.1"])
        self.log: list[str] = []
        self.service.server.log.hook = lambda _, record: self.log.append(record.message) or True
        return bound_port(self.service)

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.service.server.notes.get(NOTES_KEY, []))

    def hooks_for(self, remote: tuple[str, int]) -> list[str]:
        return [r["hook"] for r in self.records if r["remote"] == remote]

    def session(self, port: int, source_ip: str, preamble: bytes = b"") -> None:
        """A whole TLS session: banner, EHLO (no STARTTLS inside TLS), QUIT."""
        with TLSClient(port, source_ip, preamble) as c:
            self.assertEqual(reply_code(c.banner), 220, c.banner)
            ehlo = c.command("EHLO client.test")
            self.assertEqual(reply_code(ehlo), 250, ehlo)
            self.assertNotIn(b"STARTTLS", ehlo)
            self.assertEqual(reply_code(c.command("QUIT")), 221)


class ProxyBeforeTLSTests(ImplicitTLSCase):
    """Raw clients: the header written by the test, then TLS on the same socket."""

    def check_claimed(self, version: int) -> None:
        """The connect hooks saw the header's client, and the proxy as the proxy."""
        self.assertEqual(self.hooks_for(CLAIMED), SESSION_HOOKS)
        self.assertEqual([r for r in self.records if r["remote"][0] == "127.0.0.1"], [])
        (seen,) = [r for r in self.records if r["hook"] == "connect"]
        self.assertTrue(seen["proxy"]["allowed"])
        self.assertEqual((seen["proxy"]["ip"], seen["proxy"]["version"]), ("127.0.0.1", version))
        self.assertEqual(seen["notes_proxy"]["src_ip"], CLAIMED[0])

    def test_v1_header_then_tls(self) -> Deferred[Any]:
        """From a trusted proxy: a v1 header in the clear, then TLS; plugins see the client."""
        port = self.start()
        header = v1_header(CLAIMED, ("127.0.0.1", port))
        d = deferToThread(self.session, port, "127.0.0.1", header)
        return d.addCallback(lambda _: self.check_claimed(1))

    def test_v2_header_then_tls(self) -> Deferred[Any]:
        """The same with a binary v2 header."""
        port = self.start()
        header = v2_header(CLAIMED, ("127.0.0.1", port))
        d = deferToThread(self.session, port, "127.0.0.1", header)
        return d.addCallback(lambda _: self.check_claimed(2))

    def test_untrusted_host_speaks_tls_at_once(self) -> Deferred[Any]:
        """A client not in [haproxy] hosts needs no header: TLS from the first byte."""
        port = self.start()

        def check(_: object) -> None:
            stranger = [r for r in self.records if r["remote"][0] == STRANGER_IP]
            self.assertEqual([r["hook"] for r in stranger], SESSION_HOOKS)
            self.assertFalse(stranger[-1]["proxy"]["allowed"])

        return deferToThread(self.session, port, STRANGER_IP).addCallback(check)

    def test_header_from_untrusted_host_fails_the_handshake(self) -> Deferred[Any]:
        """A PROXY header from an untrusted host goes to TLS, which refuses it: it names
        nobody, and no hook runs for the client it claims."""
        port = self.start()
        header = v1_header(CLAIMED, ("127.0.0.1", port))

        def client() -> None:
            with self.assertRaises((ssl.SSLError, ConnectionError, socket.timeout)):
                TLSClient(port, STRANGER_IP, header)

        def check(_: object) -> None:
            self.assertEqual(self.hooks_for(CLAIMED), [])

        return deferToThread(client).addCallback(check)

    def test_malformed_header_from_trusted_host_is_dropped(self) -> Deferred[Any]:
        """A trusted proxy's malformed header: closed at once, nothing sent, and logged."""
        port = self.start()

        def check(closed: bool) -> None:
            self.assertTrue(closed)
            self.assertEqual(self.records, [])
            self.assertTrue(any("bad PROXY header" in line for line in self.log), self.log)

        d = deferToThread(closed_without_tls, port, "127.0.0.1", b"PROXY TCP4 nonsense\r\n")
        return d.addCallback(check)

    def test_no_header_in_time_from_trusted_host(self) -> Deferred[Any]:
        """A trusted proxy that sends nothing is closed after [haproxy] timeout."""
        port = self.start(TRUSTED + "timeout=0.5\n")

        def check(closed: bool) -> None:
            self.assertTrue(closed)
            self.assertTrue(any("no PROXY header in time" in line for line in self.log))

        d = deferToThread(closed_without_tls, port, "127.0.0.1", b"")
        return d.addCallback(check)


class ThroughHAProxyTLSTests(ImplicitTLSCase):
    """A real HAProxy passes the client's TLS through to port 465 with a PROXY header."""

    if haproxy_path() is None:
        skip = NO_HAPROXY

    def through(self, send_proxy: str) -> Deferred[Any]:
        port = self.start()

        def client() -> tuple[str, int]:
            with (
                HAProxy([("127.0.0.1", port)], send_proxy=send_proxy) as hp,
                TLSClient(hp.port, CLIENT_IP) as c,
            ):
                self.assertEqual(reply_code(c.banner), 220, c.banner)
                self.assertEqual(reply_code(c.command("EHLO client.test")), 250)
                self.assertEqual(reply_code(c.command("MAIL FROM:<alice@x.test>")), 250)
                self.assertEqual(reply_code(c.command("RCPT TO:<bob@example.com>")), 250)
                self.assertEqual(reply_code(c.command("DATA")), 354)
                reply = c.command("Subject: via haproxy over TLS\r\n\r\nhello\r\n.")
                self.assertEqual(reply_code(reply), 250, reply)
                self.assertEqual(reply_code(c.command("QUIT")), 221)
                ip, client_port = c.sock.getsockname()[:2]
                return str(ip), int(client_port)

        def check(client: tuple[str, int]) -> None:
            self.assertEqual(self.hooks_for(client), SESSION_HOOKS)
            (message,) = maildir_messages(self.maildir)
            received = message.split(b"\nReceived:", 1)[0]
            self.assertIn(f"({HOSTNAME} [{CLIENT_IP}])".encode(), received)
            self.assertIn(b"ESMTPS", received)

        return deferToThread(client).addCallback(check)

    def test_send_proxy_v2_over_tls(self) -> Deferred[Any]:
        """send-proxy-v2 to the TLS port: the message is taken over TLS, and plugins and
        the Received header name the real client 127.0.0.5."""
        return self.through("send-proxy-v2")

    def test_send_proxy_v1_over_tls(self) -> Deferred[Any]:
        """The same with send-proxy (v1)."""
        return self.through("send-proxy")
