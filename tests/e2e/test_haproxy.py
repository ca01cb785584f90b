"""The PROXY protocol end to end: a real HAProxy in front of the server, and raw headers.

connection.ini C{[haproxy] hosts[]} names the proxies. A connection from one of them gets
no banner until a PROXY header (v1 or v2) says who the client is; then connect_init,
lookup_rdns and connect run with the client's address, and plugins see it in
C{connection.remote}, the proxy in C{connection.proxy}, and the whole header in
C{connection.notes.proxy}. A header from any other host, a malformed header, or none
within C{[haproxy] timeout} seconds gets 421 and the connection is closed.

Clients connect from 127.0.0.5 (all of 127.0.0.0/8 is loopback on Linux) so the real
client differs from HAProxy's own 127.0.0.1. The plugin L{Recorder}, loaded as
C{tests.e2e.test_haproxy:Recorder}, writes down what its connection hooks saw; it also
names every client C{client.proxy.test} at lookup_rdns, so no test asks a DNS server.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from zope.interface import implementer

from haraka_tw.codes import CONT, OK
from haraka_tw.interfaces import (
    IConnectHook,
    IConnectInitHook,
    ILookupRdnsHook,
    IPluginContext,
    IRegistration,
)
from haraka_tw.smtp.proxy import parse_proxy_header
from tests.haproxy import (
    V2_SIGNATURE,
    HAProxy,
    SourcedClient,
    haproxy_path,
    v1_header,
    v2_header,
    v2_local,
)
from tests.support import maildir_messages, reply_code, start_server

RECORDER = "tests.e2e.test_haproxy:Recorder"
NOTES_KEY = "recorder.connections"
CLIENT_IP = "127.0.0.5"  # the real client, behind HAProxy
STRANGER_IP = "127.0.0.7"  # not a trusted proxy
TRUSTED = "[haproxy]\nhosts[]=127.0.0.1\n"
NO_HAPROXY = "haproxy is not installed (scripts/system-packages.sh installs it)"


HOSTNAME = "client.proxy.test"
SESSION_HOOKS = ["connect_init", "lookup_rdns", "connect"]


@implementer(IRegistration, IConnectInitHook, ILookupRdnsHook, IConnectHook)
class Recorder:
    """Writes down, per hook call, the addresses and PROXY details the connection shows;
    answers lookup_rdns with L{HOSTNAME}."""

    def register(self, context: IPluginContext) -> None:
        self.records: list[dict[str, Any]] = context.server_notes.setdefault(NOTES_KEY, [])

    def _record(self, hook: str, connection: Any) -> Any:
        notes_proxy = connection.notes.get("proxy")
        self.records.append(
            {
                "hook": hook,
                "uuid": connection.uuid,
                "remote": (connection.remote.ip, connection.remote.port),
                "local": (connection.local.ip, connection.local.port),
                "proxy": dict(connection.proxy),
                "notes_proxy": dict(notes_proxy) if notes_proxy is not None else None,
            }
        )
        return CONT

    def hook_connect_init(self, connection: Any) -> Any:
        return self._record("connect_init", connection)

    def hook_lookup_rdns(self, connection: Any) -> Any:
        self._record("lookup_rdns", connection)
        return OK, HOSTNAME

    def hook_connect(self, connection: Any) -> Any:
        return self._record("connect", connection)


class ProxyTestCase(unittest.TestCase):
    def start(self, connection_ini: str = TRUSTED, plugins: str = "") -> int:
        self.server, port = start_server(
            self, {"connection.ini": connection_ini, "plugins": f"{RECORDER}\n{plugins}"}
        )
        return port

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.server.notes.get(NOTES_KEY, []))

    def hooks_for(self, remote: tuple[str, int]) -> list[str]:
        """The hooks that saw C{remote} as the client, in order."""
        return [r["hook"] for r in self.records if r["remote"] == remote]

    def record(self, hook: str, remote: tuple[str, int]) -> dict[str, Any]:
        (found,) = [r for r in self.records if r["hook"] == hook and r["remote"] == remote]
        return found


class ThroughHAProxyTests(ProxyTestCase):
    """Clients from 127.0.0.5 through a real HAProxy: plugins see 127.0.0.5."""

    if haproxy_path() is None:
        skip = NO_HAPROXY

    def through(self, send_proxy: str, options: tuple[str, ...] = ()) -> Deferred[Any]:
        port = self.start()

        def client() -> tuple[tuple[str, int], int]:
            with (
                HAProxy(
                    [("127.0.0.1", port)], send_proxy=send_proxy, proxy_v2_options=options
                ) as hp,
                SourcedClient(hp.port, source_ip=CLIENT_IP) as c,
            ):
                self.assertEqual(reply_code(c.banner), 220, c.banner)
                self.assertEqual(reply_code(c.command("EHLO client.test")), 250)
                self.assertEqual(reply_code(c.command("QUIT")), 221)
                return c.address, hp.port

        d = deferToThread(client)
        d.addCallback(lambda result: self.check_session(*result))
        return d

    def check_session(self, client: tuple[str, int], frontend_port: int) -> None:
        """connect_init, lookup_rdns and connect each ran once, with the client's address; proxy
        and notes.proxy name HAProxy and the header; nothing ran with HAProxy's address."""
        self.assertEqual(client[0], CLIENT_IP)
        self.assertEqual(self.hooks_for(client), SESSION_HOOKS)
        self.assertEqual([r for r in self.records if r["remote"][0] == "127.0.0.1"], [])
        seen = self.record("connect", client)
        self.assertEqual(seen["local"], ("127.0.0.1", frontend_port))
        self.assertTrue(seen["proxy"]["allowed"])
        self.assertEqual(seen["proxy"]["ip"], "127.0.0.1")
        self.assertEqual(seen["proxy"]["type"], "haproxy")
        self.assertEqual(
            {k: seen["notes_proxy"][k] for k in ("src_ip", "src_port", "dst_ip", "dst_port")},
            {
                "src_ip": CLIENT_IP,
                "src_port": client[1],
                "dst_ip": "127.0.0.1",
                "dst_port": frontend_port,
            },
        )
        self.assertEqual(seen["notes_proxy"]["proxy_ip"], "127.0.0.1")
        self.assertEqual(seen["notes_proxy"]["type"], "haproxy")

    def test_send_proxy_v1(self) -> Deferred[Any]:
        """HAProxy send-proxy (v1): plugins see the client 127.0.0.5 and its port."""
        return self.through("send-proxy")

    def test_send_proxy_v2(self) -> Deferred[Any]:
        """HAProxy send-proxy-v2: plugins see the client 127.0.0.5 and its port."""
        return self.through("send-proxy-v2")

    def test_send_proxy_v2_with_crc_and_tlvs(self) -> Deferred[Any]:
        """send-proxy-v2 with a CRC32C and a unique-id TLV is accepted and checked."""
        return self.through("send-proxy-v2", ("crc32c", "unique-id"))

    def test_message_through_haproxy(self) -> Deferred[Any]:
        """A message relayed by HAProxy is accepted and its Received names the client."""
        port = self.start(plugins="rcpt_to.in_host_list\nqueue/maildir\n")
        maildir = self.server.base / "maildir"  # type: ignore[attr-defined]

        def client() -> None:
            with (
                HAProxy([("127.0.0.1", port)], send_proxy="send-proxy-v2") as hp,
                SourcedClient(hp.port, source_ip=CLIENT_IP) as c,
            ):
                self.assertEqual(reply_code(c.command("EHLO client.test")), 250)
                self.assertEqual(reply_code(c.command("MAIL FROM:<alice@x.test>")), 250)
                self.assertEqual(reply_code(c.command("RCPT TO:<bob@example.com>")), 250)
                self.assertEqual(reply_code(c.command("DATA")), 354)
                reply = c.command("Subject: via haproxy\r\n\r\nhello\r\n.")
                self.assertEqual(reply_code(reply), 250, reply)
                self.assertEqual(reply_code(c.command("QUIT")), 221)

        def check(_: object) -> None:
            (message,) = maildir_messages(maildir)
            received = message.split(b"\r\n\r\n", 1)[0].split(b"\nReceived:", 1)[0]
            self.assertIn(f"({HOSTNAME} [{CLIENT_IP}])".encode(), received)

        return deferToThread(client).addCallback(check)

    def test_sessions_through_haproxy_are_independent(self) -> Deferred[Any]:
        """Three clients through one HAProxy each get their own address, in parallel."""
        port = self.start()
        addresses: list[tuple[str, int]] = []

        def client() -> None:
            with HAProxy([("127.0.0.1", port)], send_proxy="send-proxy") as hp:
                clients = [SourcedClient(hp.port, source_ip=f"127.0.0.{n}") for n in (5, 6, 8)]
                for c in clients:
                    addresses.append(c.address)
                    self.assertEqual(reply_code(c.command("NOOP")), 250)
                for c in clients:
                    c.close()

        def check(_: object) -> None:
            for address in addresses:
                self.assertEqual(self.hooks_for(address), SESSION_HOOKS)

        return deferToThread(client).addCallback(check)


class DirectHeaderTests(ProxyTestCase):
    """Headers sent straight to the server by a test client, as a proxy would."""

    def test_v1_from_trusted_host(self) -> Deferred[Any]:
        """A v1 header from 127.0.0.1 sets remote and local; the banner follows it."""
        port = self.start()
        header = v1_header(("127.0.0.9", 4321), ("127.0.0.1", 25))

        def client() -> None:
            with SourcedClient(port, preamble=header) as c:
                self.assertEqual(reply_code(c.banner), 220, c.banner)
                self.assertEqual(reply_code(c.command("QUIT")), 221)

        def check(_: object) -> None:
            self.assertEqual(self.hooks_for(("127.0.0.9", 4321)), SESSION_HOOKS)
            seen = self.record("connect", ("127.0.0.9", 4321))
            self.assertEqual(seen["local"], ("127.0.0.1", 25))
            self.assertEqual(seen["notes_proxy"]["proto"], "TCP4")

        return deferToThread(client).addCallback(check)

    def test_v2_tcp6_from_trusted_host(self) -> Deferred[Any]:
        """A v2 header with IPv6 addresses gives the IPv6 client to plugins."""
        port = self.start()
        header = v2_header(("2001:db8::5", 50000), ("2001:db8::1", 25))

        def client() -> None:
            with SourcedClient(port, preamble=header) as c:
                self.assertEqual(reply_code(c.banner), 220, c.banner)

        def check(_: object) -> None:
            self.assertEqual(self.hooks_for(("2001:db8::5", 50000)), SESSION_HOOKS)

        return deferToThread(client).addCallback(check)

    def test_bytes_after_header_are_commands(self) -> Deferred[Any]:
        """A header and a command in one write: the command is answered after the banner."""
        port = self.start()
        header = v2_header(("127.0.0.9", 4321), ("127.0.0.1", 25))

        def client() -> None:
            with SourcedClient(port, preamble=header + b"EHLO client.test\r\nQUIT\r\n") as c:
                self.assertEqual(reply_code(c.banner), 220, c.banner)
                self.assertEqual(reply_code(c.reply()), 250)
                self.assertEqual(reply_code(c.reply()), 221)

        return deferToThread(client)

    def test_header_split_across_writes(self) -> Deferred[Any]:
        """A header that arrives a few bytes at a time is still read whole."""
        port = self.start()
        header = v2_header(("127.0.0.9", 4321), ("127.0.0.1", 25))

        def client() -> None:
            with SourcedClient(port, read_banner=False) as c:
                for i in range(0, len(header), 5):
                    c.send(header[i : i + 5])
                    time.sleep(0.02)
                self.assertEqual(reply_code(c.reply()), 220)

        def check(_: object) -> None:
            self.assertEqual(self.hooks_for(("127.0.0.9", 4321)), SESSION_HOOKS)

        return deferToThread(client).addCallback(check)

    def test_v2_local_keeps_proxy_address(self) -> Deferred[Any]:
        """A v2 LOCAL header (a health check) gets the banner; the proxy is the client."""
        port = self.start()

        def client() -> tuple[str, int]:
            with SourcedClient(port, preamble=v2_local()) as c:
                self.assertEqual(reply_code(c.banner), 220, c.banner)
                return c.address

        def check(address: tuple[str, int]) -> None:
            self.assertEqual(self.hooks_for(address), SESSION_HOOKS)

        return deferToThread(client).addCallback(check)

    def test_v2_unix_client_keeps_proxy_address(self) -> Deferred[Any]:
        """A v2 header for a client on the proxy's UNIX socket gets the banner; the client
        has no address but the proxy's (a socket path is no IP address), as for LOCAL."""
        port = self.start()

        def client() -> tuple[str, int]:
            preamble = v2_header("/run/client.sock", "/run/smtp.sock")
            with SourcedClient(port, preamble=preamble) as c:
                self.assertEqual(reply_code(c.banner), 220, c.banner)
                return c.address

        def check(address: tuple[str, int]) -> None:
            self.assertEqual(self.hooks_for(address), SESSION_HOOKS)

        return deferToThread(client).addCallback(check)

    def test_cidr_in_hosts(self) -> Deferred[Any]:
        """hosts[] takes CIDRs: 127.0.0.5 within 127.0.0.0/29 must send a header."""
        port = self.start("[haproxy]\nhosts[]=::1\nhosts[]=127.0.0.0/29\n")
        header = v1_header(("192.0.2.77", 1000), ("127.0.0.1", 25))

        def client() -> None:
            with SourcedClient(port, source_ip=CLIENT_IP, read_banner=False) as c:
                self.assertEqual(c.quiet(0.5), b"")  # no banner before the header
                c.send(header)
                self.assertEqual(reply_code(c.reply()), 220)

        def check(_: object) -> None:
            self.assertEqual(self.hooks_for(("192.0.2.77", 1000)), SESSION_HOOKS)

        return deferToThread(client).addCallback(check)

    def refused(self, source_ip: str, data: bytes, *, banner: bool) -> Deferred[Any]:
        """Send C{data} from C{source_ip}: the last reply is 421 and the server closes."""

        def client() -> tuple[str, int]:
            with SourcedClient(self.port, source_ip=source_ip, read_banner=False) as c:
                if banner:
                    self.assertEqual(reply_code(c.reply()), 220)
                c.send(data)
                text = c.quiet(5).decode("ascii", "replace")  # returns early at the close
                self.assertTrue(c.at_eof(1), f"the server did not close; it sent {text!r}")
                finals = [line for line in text.split("\r\n") if line[3:4] == " "]
                self.assertTrue(finals, "no reply before the close")
                self.assertEqual(finals[-1][:3], "421", text)
                if not banner:
                    self.assertEqual(len(finals), 1, text)  # no banner, only the 421
                return c.address

        return deferToThread(client)

    def untrusted(self, header: bytes) -> Deferred[Any]:
        """C{header} from 127.0.0.7: 421 and close; the stranger stays the client."""
        self.port = self.start()

        def check(address: tuple[str, int]) -> None:
            self.assertEqual(self.hooks_for(address), SESSION_HOOKS)
            self.assertEqual([r for r in self.records if r["remote"][0] == "192.0.2.66"], [])

        return self.refused(STRANGER_IP, header, banner=True).addCallback(check)

    def test_v1_from_untrusted_host(self) -> Deferred[Any]:
        """A v1 header from 127.0.0.7, not in hosts[], gets 421 and the close."""
        return self.untrusted(v1_header(("192.0.2.66", 1000), ("127.0.0.1", 25)))

    def test_v2_from_untrusted_host(self) -> Deferred[Any]:
        """A v2 header from 127.0.0.7, not in hosts[], gets 421 and the close."""
        return self.untrusted(v2_header(("192.0.2.66", 1000), ("127.0.0.1", 25)))

    def test_header_when_no_hosts_configured(self) -> Deferred[Any]:
        """With no [haproxy] hosts at all, a PROXY line is refused the same way."""
        self.port = self.start("")
        return self.refused(
            "127.0.0.1", v1_header(("192.0.2.66", 1), ("127.0.0.1", 25)), banner=True
        )

    def test_malformed_v1_from_trusted_host(self) -> Deferred[Any]:
        """A malformed v1 line from a trusted proxy gets 421 and the close, no banner."""
        self.port = self.start()
        return self.refused("127.0.0.1", b"PROXY TCP4 1.2.3.4 5.6.7.8 100\r\n", banner=False)

    def test_malformed_v2_from_trusted_host(self) -> Deferred[Any]:
        """A v2 header with a bad version byte from a trusted proxy gets 421, no banner."""
        self.port = self.start()
        return self.refused("127.0.0.1", V2_SIGNATURE + b"\x31\x11\x00\x0c", banner=False)

    def test_smtp_from_trusted_host(self) -> Deferred[Any]:
        """A trusted proxy that speaks SMTP instead of PROXY gets 421, no banner."""
        self.port = self.start()
        return self.refused("127.0.0.1", b"EHLO client.test\r\n", banner=False)

    def test_timeout(self) -> Deferred[Any]:
        """No header within [haproxy] timeout=1: 421 after about a second, then close."""
        port = self.start(TRUSTED + "timeout=1\n")

        def client() -> None:
            start = time.monotonic()
            with SourcedClient(port, read_banner=False) as c:
                reply = c.reply()
                took = time.monotonic() - start
                self.assertEqual(reply_code(reply), 421, reply)
                self.assertGreaterEqual(took, 0.8)
                self.assertLess(took, 4)
                self.assertTrue(c.at_eof(5))

        return deferToThread(client)

    def test_timeout_with_partial_header(self) -> Deferred[Any]:
        """Half a header and then silence: the timeout still answers 421."""
        port = self.start(TRUSTED + "timeout=1\n")

        def client() -> None:
            with SourcedClient(port, preamble=b"PROXY TCP4 1.2.", read_banner=False) as c:
                self.assertEqual(reply_code(c.reply()), 421)
                self.assertTrue(c.at_eof(5))

        return deferToThread(client)


class HAProxyHarnessTests(unittest.TestCase):
    """The harness itself, against a bare socket backend: what HAProxy really sends."""

    if haproxy_path() is None:
        skip = NO_HAPROXY

    def capture(self, send_proxy: str, options: tuple[str, ...] = ()) -> tuple[bytes, Any, Any]:
        """Connect from 127.0.0.5 through HAProxy to a bare backend; return the first
        bytes the backend read, the client's address and the frontend's port."""
        backend = socket.socket()
        self.addCleanup(backend.close)
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        backend.settimeout(10)
        got: list[bytes] = []

        def serve() -> None:
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while b"hello" not in data:
                    piece = conn.recv(4096)
                    if not piece:
                        break
                    data += piece
                got.append(data)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            HAProxy([backend.getsockname()], send_proxy=send_proxy, proxy_v2_options=options) as hp,
            socket.create_connection(
                ("127.0.0.1", hp.port), timeout=10, source_address=(CLIENT_IP, 0)
            ) as client,
        ):
            client.sendall(b"hello")
            address = client.getsockname()
            thread.join(10)
        return got[0], address, hp.port

    def test_v1_bytes(self) -> None:
        """send-proxy writes exactly the v1 line v1_header builds, then the client's bytes."""
        data, address, port = self.capture("send-proxy")
        header = v1_header(address, ("127.0.0.1", port))
        self.assertEqual(data, header + b"hello")

    def test_v2_bytes(self) -> None:
        """send-proxy-v2 writes exactly the v2 header v2_header builds."""
        data, address, port = self.capture("send-proxy-v2")
        header = v2_header(address, ("127.0.0.1", port))
        self.assertEqual(data, header + b"hello")

    def test_v2_tlvs_parse(self) -> None:
        """HAProxy's CRC32C and unique-id TLVs pass the parser's checks."""
        data, address, port = self.capture("send-proxy-v2", ("crc32c", "unique-id"))
        parsed = parse_proxy_header(data)
        assert parsed is not None
        self.assertEqual((parsed.source_ip, parsed.source_port), address)
        self.assertEqual((parsed.dest_ip, parsed.dest_port), ("127.0.0.1", port))
        self.assertEqual(parsed.tlvs[0x05], f"{address[0]}:{address[1]}".encode())
        self.assertIn(0x03, parsed.tlvs)
        self.assertEqual(data[parsed.length :], b"hello")

    def test_bad_config_reported(self) -> None:
        """A config haproxy -c rejects raises HAProxyError carrying haproxy's output."""
        from tests.haproxy import HAProxyError

        hp = HAProxy([("127.0.0.1", 1)], proxy_v2_options=("no-such-option",))
        with self.assertRaises(HAProxyError) as caught:
            hp.start()
        self.assertIn("no-such-option", str(caught.exception))
