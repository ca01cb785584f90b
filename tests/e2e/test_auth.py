"""SMTP AUTH end to end on real sockets: smtplib with each mechanism, swaks, AUTH after
STARTTLS, and auth_proxy / auth_bridge logging in to a second haraka_tw as their remote."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import WireClient, maildir_messages, reply_code, start_server
from tests.tls_certs import pki

USERS = "[users]\nmatt=test\nuser@example.com=secret\n"
FAST = "max_delay=0.2\n"  # failures answer within 0.2 s, so the tests stay quick
QUEUE = "rcpt_to.in_host_list\nqueue/maildir\n"


def flat_file_server(
    case: Any, core: str = "allow_cleartext=true\n", tls: bool = False
) -> tuple[Any, int]:
    """A server with auth/flat_file (matt/test, user@example.com/secret) on loopback."""
    files = {
        "plugins": ("tls\n" if tls else "") + "auth/flat_file\n" + QUEUE,
        "auth_flat_file.ini": f"[core]\n{FAST}{core}\n{USERS}",
    }
    if tls:
        p = pki()
        files["tls.ini"] = f"[main]\nkey={p.mx.key}\ncert={p.mx.cert}\n"
    return start_server(case, files)


def smtp(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo("client.test")
    return client


def auth_with(port: int, mechanism: str, user: str, password: str, initial: bool = True) -> Any:
    """smtplib's auth() with one mechanism: (code, text), or the SMTP error raised."""
    with smtp(port) as client:
        client.user, client.password = user, password
        method: Callable[..., str] = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        try:
            return client.auth(mechanism, method, initial_response_ok=initial)
        except smtplib.SMTPException as e:
            return e


class FlatFileTests(unittest.TestCase):
    def test_each_mechanism(self) -> Any:
        """smtplib logs in with PLAIN, LOGIN (with and without an initial response) and
        CRAM-MD5: 235 each time."""
        _server, port = flat_file_server(self)

        def run() -> list[Any]:
            return [
                auth_with(port, "PLAIN", "matt", "test"),
                auth_with(port, "PLAIN", "matt", "test", initial=False),
                auth_with(port, "LOGIN", "user@example.com", "secret"),
                auth_with(port, "LOGIN", "user@example.com", "secret", initial=False),
                auth_with(port, "CRAM-MD5", "matt", "test"),
            ]

        def check(results: list[Any]) -> None:
            for result in results:
                self.assertIsInstance(result, tuple, result)
                self.assertEqual(result[0], 235, result)

        return deferToThread(run).addCallback(check)

    def test_wrong_password(self) -> Any:
        """A wrong password: smtplib gets 535 (each mechanism)."""
        _server, port = flat_file_server(self)

        def run() -> list[Any]:
            return [auth_with(port, m, "matt", "nope") for m in ("PLAIN", "LOGIN", "CRAM-MD5")]

        def check(results: list[Any]) -> None:
            for result in results:
                self.assertIsInstance(result, smtplib.SMTPAuthenticationError)
                self.assertEqual(result.smtp_code, 535)

        return deferToThread(run).addCallback(check)

    def test_login_then_relay(self) -> Any:
        """After login() the client relays; the stored message says ESMTPA."""
        server, port = flat_file_server(self)
        maildir = server.base / "maildir"

        def run() -> None:
            with smtp(port) as client:
                client.login("user@example.com", "secret")
                client.sendmail(
                    "me@example.com", ["far@elsewhere.test"], b"Subject: hi\r\n\r\nx\r\n"
                )

        def check(_: None) -> None:
            # Relayed: not for the local Maildir, but queued for delivery to elsewhere.test.
            self.assertEqual(maildir_messages(maildir), [])
            [queued] = [p for p in (server.base / "queue").iterdir() if p.name[0].isdigit()]
            self.assertIn(b"with ESMTPA id", queued.read_bytes())

        return deferToThread(run).addCallback(check)

    def test_cleartext_refused(self) -> Any:
        """Without TLS and allow_cleartext: no AUTH in EHLO, and AUTH gets 538."""
        _server, port = flat_file_server(self, core="")

        def run() -> tuple[bool, bytes]:
            with smtp(port) as client:
                offered = client.has_extn("auth")
            with WireClient(port) as c:
                c.command("EHLO client.test")
                return offered, c.command("AUTH PLAIN AG1hdHQAdGVzdA==")

        def check(result: tuple[bool, bytes]) -> None:
            offered, reply = result
            self.assertFalse(offered)
            self.assertTrue(reply.startswith(b"538 5.7.11 "), reply)

        return deferToThread(run).addCallback(check)

    def test_disconnect_after_failures(self) -> Any:
        """The third failure is answered 535, then 421, and the server closes."""
        _server, port = flat_file_server(self)

        def run() -> tuple[list[int], bool]:
            with WireClient(port) as c:
                c.command("EHLO client.test")
                codes = [reply_code(c.command("AUTH PLAIN AG1hdHQAbm9wZQ==")) for _ in range(3)]
                codes.append(reply_code(c.reply()))
                return codes, c.at_eof()

        def check(result: tuple[list[int], bool]) -> None:
            self.assertEqual(result, ([535, 535, 535, 421], True))

        return deferToThread(run).addCallback(check)

    def test_swaks(self) -> Any:
        """swaks --auth PLAIN and LOGIN log in and deliver."""
        swaks = _swaks()
        _server, port = flat_file_server(self)

        def run() -> list[subprocess.CompletedProcess[bytes]]:
            return [_run_swaks(swaks, port, mechanism) for mechanism in ("PLAIN", "LOGIN")]

        def check(done: list[subprocess.CompletedProcess[bytes]]) -> None:
            for result in done:
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                self.assertIn(b"235 2.7.0 Authentication successful", result.stdout)

        return deferToThread(run).addCallback(check)


class AfterTLSTests(unittest.TestCase):
    """The default: AUTH is offered only after STARTTLS (the tls plugin)."""

    def test_starttls_then_login(self) -> Any:
        """EHLO in cleartext has no AUTH; after starttls() it has, and login() succeeds."""
        _server, port = flat_file_server(self, core="", tls=True)

        def run() -> tuple[bool, bool, Any]:
            with smtp(port) as client:
                before = client.has_extn("auth")
                context = ssl.create_default_context(cafile=str(pki().ca))
                client.starttls(context=context)
                client.ehlo("client.test")
                after = client.has_extn("auth")
                return before, after, client.login("matt", "test")

        def check(result: tuple[bool, bool, Any]) -> None:
            before, after, login = result
            self.assertEqual((before, after, login[0]), (False, True, 235))

        return deferToThread(run).addCallback(check)

    def test_starttls_inside_a_transaction_takes_relaying_back(self) -> Any:
        """Logged in (cleartext allowed), a transaction open, then STARTTLS: the login is
        gone, and so is the relaying it gave, for the connection too: after the new EHLO,
        a recipient elsewhere is refused (it was accepted, with any sender)."""
        _server, port = flat_file_server(self, core="allow_cleartext=true\n", tls=True)

        def run() -> tuple[int, int, int]:
            with smtp(port) as client:
                login = client.login("matt", "test")[0]
                client.mail("matt@example.com")
                client.starttls(context=ssl.create_default_context(cafile=str(pki().ca)))
                client.ehlo("client.test")
                client.mail("ceo@bank.test")
                return login, client.rcpt("victim@elsewhere.test")[0], client.rset()[0]

        def check(result: tuple[int, int, int]) -> None:
            login, rcpt, _ = result
            self.assertEqual((login, rcpt), (235, 550))

        return deferToThread(run).addCallback(check)

    def test_swaks_tls_auth(self) -> Any:
        """swaks --tls --auth logs in over STARTTLS and delivers."""
        swaks = _swaks(tls=True)
        server, port = flat_file_server(self, core="", tls=True)

        def run() -> subprocess.CompletedProcess[bytes]:
            return _run_swaks(swaks, port, "CRAM-MD5", "--tls")

        def check(done: subprocess.CompletedProcess[bytes]) -> None:
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            # An authenticated client relays: the message waits in the outbound queue.
            [queued] = [p for p in (server.base / "queue").iterdir() if p.name[0].isdigit()]
            self.assertIn(b"with ESMTPSA id", queued.read_bytes())

        return deferToThread(run).addCallback(check)


def _swaks(tls: bool = False) -> str:
    swaks = shutil.which("swaks")
    if swaks is None:
        raise unittest.SkipTest("swaks is not installed (scripts/system-packages.sh)")
    if tls:
        support = subprocess.run([swaks, "--support"], capture_output=True, check=False)
        if b"TLS not available" in support.stdout + support.stderr:
            raise unittest.SkipTest("swaks has no TLS here (Debian: libnet-ssleay-perl)")
    return swaks


def _run_swaks(swaks: str, port: int, mechanism: str, *extra: str) -> Any:
    argv = [swaks, "--server", "127.0.0.1", "--port", str(port), "--helo", "client.test"]
    argv += ["--from", "matt@x.test", "--to", "far@elsewhere.test", *extra]
    argv += ["--auth", mechanism, "--auth-user", "matt", "--auth-password", "test"]
    return subprocess.run(argv, capture_output=True, timeout=20, check=False)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, read, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_server(case: Any, hosts: str) -> tuple[Any, int]:
    """A server with auth/auth_proxy sending example.com users to C{hosts}."""
    ini = f"[core]\nallow_cleartext=true\n{FAST}\n[domains]\nexample.com={hosts}\n"
    return start_server(case, {"plugins": "auth/auth_proxy\n" + QUEUE, "auth_proxy.ini": ini})


class AuthProxyTests(unittest.TestCase):
    def test_remote_decides(self) -> Any:
        """Logins are checked on the remote haraka_tw: right 235, wrong 535; a user the
        remote knows only unqualified (matt) is accepted as matt@example.com."""
        _remote, remote_port = flat_file_server(self)
        _front, port = proxy_server(self, f"127.0.0.1:{remote_port}")

        def run() -> list[Any]:
            return [
                auth_with(port, "PLAIN", "user@example.com", "secret"),
                auth_with(port, "LOGIN", "user@example.com", "wrong"),
                auth_with(port, "LOGIN", "matt@example.com", "test"),
                auth_with(port, "PLAIN", "matt@other.test", "test"),
            ]

        def check(results: list[Any]) -> None:
            codes = [r[0] if isinstance(r, tuple) else r.smtp_code for r in results]
            self.assertEqual(codes, [235, 535, 235, 535])

        return deferToThread(run).addCallback(check)

    def test_next_host(self) -> Any:
        """A host that refuses connections is skipped for the next one."""
        _remote, remote_port = flat_file_server(self)
        _front, port = proxy_server(self, f"127.0.0.1:{closed_port()}, 127.0.0.1:{remote_port}")
        d = deferToThread(auth_with, port, "PLAIN", "user@example.com", "secret")
        return d.addCallback(lambda result: self.assertEqual(result[0], 235, result))

    def test_no_remote(self) -> Any:
        """No host answering: 454 4.7.0."""
        _front, port = proxy_server(self, f"127.0.0.1:{closed_port()}")
        d = deferToThread(auth_with, port, "PLAIN", "user@example.com", "secret")

        def check(result: Any) -> None:
            self.assertIsInstance(result, smtplib.SMTPAuthenticationError)
            self.assertEqual(result.smtp_code, 454)

        return d.addCallback(check)

    def test_starttls_to_remote(self) -> Any:
        """The remote offers AUTH only after STARTTLS: the proxy starts TLS, then logs in."""
        _remote, remote_port = flat_file_server(self, core="", tls=True)
        _front, port = proxy_server(self, f"127.0.0.1:{remote_port}")
        d = deferToThread(auth_with, port, "PLAIN", "user@example.com", "secret")
        return d.addCallback(lambda result: self.assertEqual(result[0], 235, result))


class AuthBridgeTests(unittest.TestCase):
    def test_bridge_logs_in_on_its_host(self) -> Any:
        """auth_bridge checks every user (with or without a domain) on smtp_bridge.ini's
        host: right 235, wrong 535."""
        _remote, remote_port = flat_file_server(self)
        files = {
            "plugins": "auth/auth_bridge\n" + QUEUE,
            "auth_bridge.ini": f"[core]\nallow_cleartext=true\n{FAST}",
            "smtp_bridge.ini": f"[main]\nhost=127.0.0.1\nport={remote_port}\n",
        }
        _front, port = start_server(self, files)

        def run() -> list[Any]:
            return [
                auth_with(port, "PLAIN", "matt", "test"),
                auth_with(port, "PLAIN", "user@example.com", "nope"),
            ]

        def check(results: list[Any]) -> None:
            self.assertEqual(results[0][0], 235, results[0])
            self.assertEqual(results[1].smtp_code, 535)

        return deferToThread(run).addCallback(check)
