"""TLS end to end: STARTTLS and implicit TLS on real sockets, with real clients.

The clients are C{openssl s_client} (SNI, implicit TLS, TLS spoken to a plaintext port),
Python's smtplib and ssl modules, and swaks. The certificates come from
L{tests.tls_certs}: the server has C{mx.test} (tls.ini) and C{other.test} /
C{*.wild.test} (tls/other.pem). The plugin L{Probe}, loaded as
C{tests.e2e.test_tls:Probe}, writes down at MAIL what the session knew about its TLS.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import smtplib
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from zope.interface import implementer

from haraka_tw.codes import CONT
from haraka_tw.interfaces import IMailHook, IPluginContext, IRegistration
from haraka_tw.service import HarakaService
from tests.support import (
    REPO_ROOT,
    WireClient,
    maildir_messages,
    reply_code,
    start_server,
    temp_dir,
    write_config,
)
from tests.tls_certs import PKI, Issued, pki

PROBE = "tests.e2e.test_tls:Probe"
NOTES_KEY = "probe.tls"
PLUGINS = f"tls\n{PROBE}\nrcpt_to.in_host_list\nqueue/maildir\n"
MESSAGE = b"From: <a@x.test>\r\nTo: <b@example.com>\r\nSubject: tls\r\n\r\nover TLS\r\n"
SUBJECT = re.compile(r"^subject=.*CN\s*=\s*([^,\s/]+)", re.M)
TWISTD = Path(sys.executable).parent / "twistd"


@implementer(IRegistration, IMailHook)
class Probe:
    """Records, at MAIL, the session's TLS state, notes.tls and the tls plugin's results."""

    def register(self, context: IPluginContext) -> None:
        self.seen: list[dict[str, Any]] = context.server_notes.setdefault(NOTES_KEY, [])

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Any:
        tls = connection.tls
        self.seen.append(
            {
                "enabled": tls.enabled,
                "verified": tls.verified,
                "cipher": tls.cipher,
                "version": tls.version,
                "peer": tls.peer_certificate is not None,
                "notes": connection.notes.get("tls"),
                "results": connection.results.get("tls"),
            }
        )
        return CONT


def tls_files(p: PKI, ini: str = "", plugins: str = PLUGINS) -> dict[str, str]:
    """Config files: the tls plugin with mx.test in tls.ini and other.test in tls/."""
    return {
        "plugins": plugins,
        "tls.ini": f"[main]\nkey={p.mx.key}\ncert={p.mx.cert}\nca={p.ca}\n{ini}",
        "tls/other.pem": p.other.bundle.read_text(),
    }


def start_tls_server(case: Any, ini: str = "", **kw: Any) -> tuple[Any, int, Path]:
    """A STARTTLS server on a loopback port: (server, port, maildir)."""
    files = tls_files(pki(), ini, **kw)
    server, port = start_server(case, files)
    return server, port, server.base / "maildir"  # type: ignore[attr-defined]


def start_service(
    case: Any, files: Mapping[str, str], endpoints: Sequence[str]
) -> tuple[HarakaService, Path]:
    """A HarakaService (so smtp.ini and implicit TLS listeners apply), started; stopped in
    cleanup. Returns it and its maildir."""
    base = temp_dir(case)
    all_files = {"maildir.ini": f"[main]\npath={base / 'maildir'}\nfsync=false\n"}
    all_files["me"] = "mx.test\n"
    all_files.update(files)
    config = write_config(base / "config", all_files)
    service = HarakaService.from_directory(config, endpoints, watch_interval=0, handle_sighup=False)
    service.server.log.hook = lambda c, r: True  # quiet
    service.startService()

    def stop() -> Any:
        for session in list(service.server.factory.sessions):
            session.transport.abortConnection()
        return service.stopService()

    case.addCleanup(stop)
    return service, base / "maildir"


def bound_port(service: HarakaService, index: int = 0) -> int:
    return int(service.ports[index].getHost().port)


def client_context(cert: Issued | None = None) -> ssl.SSLContext:
    """A client context trusting the test CA, with a client certificate if given."""
    ctx = ssl.create_default_context(cafile=str(pki().ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def s_client(
    args: Sequence[str], script: bytes, until: bytes = b"\n221 ", timeout: float = 8
) -> str:
    """Run C{openssl s_client} with C{args}, send C{script}, read until C{until} has come
    (or the server closed, or C{timeout}), then close its input so it ends. Returns all it
    printed (stdout and stderr)."""
    argv = ["openssl", "s_client", "-CAfile", str(pki().ca), "-nocommands", "-crlf", *args]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()

    def read(stop: Callable[[], bool], seconds: float) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + seconds
        while not stop() and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([proc.stdout], [], [], left)
            piece = os.read(proc.stdout.fileno(), 65536) if ready else b""
            if not piece:
                return
            out.extend(piece)

    try:
        proc.stdin.write(script)
        proc.stdin.flush()
        read(lambda: until in out, timeout)
        proc.stdin.close()  # s_client ends at the end of its input
        read(lambda: False, 5)
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return out.decode("utf-8", "replace")


SMTP_SCRIPT = (
    b"EHLO client.test\n"
    b"MAIL FROM:<a@x.test>\n"
    b"RCPT TO:<b@example.com>\n"
    b"DATA\n"
    b"Subject: from s_client\n\nhello\n.\n"
    b"QUIT\n"
)


def starttls_ehlo(port: int, context: ssl.SSLContext) -> smtplib.SMTP:
    """An smtplib session after EHLO, STARTTLS and EHLO again."""
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
    smtp.ehlo("client.test")
    smtp.starttls(context=context)
    smtp.ehlo("client.test")
    return smtp


class StartTLSTests(unittest.TestCase):
    def test_s_client_sni_picks_the_certificate(self) -> None:
        """s_client -starttls smtp: SNI mx.test gets mx.test's certificate, other.test and
        x.wild.test get other.test's, no SNI the default; each completes a transaction."""
        _server, port, maildir = start_tls_server(self)

        def run() -> dict[str, str]:
            out = {}
            for name in ("mx.test", "other.test", "x.wild.test", None):
                sni = ["-servername", name] if name else ["-noservername"]
                args = ["-starttls", "smtp", "-connect", f"127.0.0.1:{port}", *sni]
                out[str(name)] = s_client(args, SMTP_SCRIPT)
            return out

        def check(out: dict[str, str]) -> None:
            expected = {"mx.test": "mx.test", "other.test": "other.test"}
            expected.update({"x.wild.test": "other.test", "None": "mx.test"})
            for name, text in out.items():
                m = SUBJECT.search(text)
                self.assertIsNotNone(m, text)
                assert m is not None
                self.assertEqual(m.group(1), expected[name], name)
                self.assertIn("Verify return code: 0 (ok)", text)
                self.assertIn("250 2.0.0 Message Queued", text, text)
            stored = maildir_messages(maildir)
            self.assertEqual(len(stored), 4)
            self.assertIn(b"with ESMTPS id", stored[0])

        return deferToThread(run).addCallback(check)

    def test_smtplib_starttls_received_says_esmtps_and_cipher(self) -> None:
        """smtplib starttls() then sendmail: the stored Received says ESMTPS with the TLS
        version and cipher; the plugin recorded them in notes and results."""
        server, port, maildir = start_tls_server(self)

        def run() -> tuple[str, str]:
            with starttls_ehlo(port, client_context()) as smtp:
                self.assertNotIn("starttls", smtp.esmtp_features)  # not offered twice
                smtp.sendmail("a@x.test", ["b@example.com"], MESSAGE)
                sock: Any = smtp.sock
                return sock.version(), sock.cipher()[0]

        def check(agreed: tuple[str, str]) -> None:
            version, cipher = agreed
            [stored] = maildir_messages(maildir)
            received = stored.split(b"\r\nFrom:")[0].decode()
            self.assertIn("with ESMTPS id", received)
            self.assertIn(f"tls {version} {cipher}", received)
            [seen] = server.notes[NOTES_KEY]
            self.assertEqual((seen["version"], seen["cipher"]), (version, cipher))
            self.assertEqual(seen["notes"]["cipher"], {"name": cipher, "version": version})
            self.assertEqual(seen["results"]["cipher"], cipher)
            self.assertFalse(seen["results"]["verified"])

        return deferToThread(run).addCallback(check)

    def test_pipelined_plaintext_after_starttls_is_never_answered(self) -> None:
        """STARTTLS\\r\\nNOOP\\r\\n in one write: only the 220 comes back; inside TLS nothing
        answers the NOOP, MAIL before a new EHLO gets 503, and EHLO then works."""
        _server, port, _maildir = start_tls_server(self)

        def run() -> tuple[bytes, bytes, bytes, bytes]:
            with WireClient(port) as c:
                c.command("EHLO client.test")
                c.send(b"STARTTLS\r\nNOOP\r\n")
                ready = c.reply()
                tls = client_context().wrap_socket(c.sock, server_hostname="mx.test")
                tls.settimeout(0.5)
                try:
                    early = tls.recv(4096)  # the NOOP's 250 would arrive here
                except TimeoutError:
                    early = b""
                tls.settimeout(5)
                tls.sendall(b"MAIL FROM:<a@x.test>\r\n")
                mail = tls.recv(4096)
                tls.sendall(b"EHLO client.test\r\n")
                ehlo = tls.recv(4096)
                tls.close()
                return ready, early, mail, ehlo

        def check(got: tuple[bytes, bytes, bytes, bytes]) -> None:
            ready, early, mail, ehlo = got
            self.assertEqual(ready, b"220 2.0.0 Ready to start TLS\r\n")
            self.assertEqual(early, b"")
            self.assertEqual(reply_code(mail), 503)
            self.assertEqual(reply_code(ehlo), 250)

        return deferToThread(run).addCallback(check)

    @inlineCallbacks
    def test_clients_whose_commands_come_in_one_poll(self) -> Any:
        """Three clients' EHLO and STARTTLS reach the server in one poll, and later their
        QUITs (a reply written while a poll's other events wait is held until they are
        handed out): each gets its EHLO reply and 220 in the clear, completes TLS, sends
        a message, then gets its 221 and the end of the connection."""
        _server, port, maildir = start_tls_server(self)
        clients = yield gatherResults([deferToThread(WireClient, port) for _ in range(3)])
        for c in clients:
            self.addCleanup(c.close)
            c.send(b"EHLO client.test\r\nSTARTTLS\r\n")  # (the reactor waits for all three)

        def secure(c: WireClient) -> tuple[bytes, bytes, ssl.SSLSocket]:
            ehlo, ready = c.replies(2)
            tls = client_context().wrap_socket(c.sock, server_hostname="mx.test")
            tls.settimeout(10)
            for line in (b"EHLO client.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@example.com>"):
                tls.sendall(line + b"\r\n")
                self.assertEqual(reply_code(tls.recv(4096)), 250, line)
            tls.sendall(b"DATA\r\n")
            self.assertEqual(reply_code(tls.recv(4096)), 354)
            tls.sendall(MESSAGE + b".\r\n")
            self.assertEqual(reply_code(tls.recv(4096)), 250)
            return ehlo, ready, tls

        secured = yield gatherResults([deferToThread(secure, c) for c in clients])
        for ehlo, ready, tls in secured:
            self.addCleanup(tls.close)
            self.assertIn(b"250 STARTTLS\r\n", ehlo)
            self.assertEqual(ready, b"220 2.0.0 Ready to start TLS\r\n")
            tls.sendall(b"QUIT\r\n")  # (the reactor waits for all three)

        def to_the_end(tls: ssl.SSLSocket) -> bytes:
            got = bytearray()
            while piece := tls.recv(4096):
                got += piece
            return bytes(got)

        ends = yield gatherResults([deferToThread(to_the_end, tls) for _, _, tls in secured])
        for end in ends:
            self.assertEqual(reply_code(end), 221)
            self.assertTrue(end.endswith(b"\r\n") and end.count(b"\r\n") == 1, end)
        self.assertEqual(len(maildir_messages(maildir)), 3)

    def test_quit_inside_tls_closes_promptly(self) -> None:
        """QUIT inside TLS: the 221, then the server ends TLS and the connection at once
        (not after the close grace)."""
        _server, port, _maildir = start_tls_server(self)

        def run() -> tuple[bytes, float]:
            with WireClient(port) as c:
                c.command("EHLO client.test")
                c.command("STARTTLS")
                with client_context().wrap_socket(c.sock, server_hostname="mx.test") as tls:
                    tls.settimeout(3)
                    tls.sendall(b"QUIT\r\n")
                    started = time.monotonic()
                    got = bytearray()
                    try:
                        while piece := tls.recv(4096):
                            got += piece
                    except (TimeoutError, OSError):
                        pass
                    return bytes(got), time.monotonic() - started

        def check(got: tuple[bytes, float]) -> None:
            reply, waited = got
            self.assertEqual(reply_code(reply), 221)
            self.assertLess(waited, 2)

        return deferToThread(run).addCallback(check)

    def test_swaks_tls_delivers(self) -> None:
        """swaks --tls delivers a message that is stored with ESMTPS."""
        swaks = shutil.which("swaks")
        if swaks is None:
            raise unittest.SkipTest("swaks is not installed (scripts/system-packages.sh)")
        _server, port, maildir = start_tls_server(self)
        argv = [swaks, "--server", "127.0.0.1", "--port", str(port), "--tls"]
        argv += ["--from", "a@x.test", "--to", "b@example.com", "--helo", "client.test"]

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(argv, capture_output=True, timeout=15, check=False)

        def check(done: subprocess.CompletedProcess[bytes]) -> None:
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            [stored] = maildir_messages(maildir)
            self.assertIn(b"with ESMTPS id", stored)

        return deferToThread(run).addCallback(check)


class ClientCertificateTests(unittest.TestCase):
    """requestCert (the default) asks; requireAuthorized ports demand a verified one."""

    def deliver(self, port: int, cert: Issued | None) -> Deferred[Any]:
        def run() -> Any:
            try:
                with starttls_ehlo(port, client_context(cert)) as smtp:
                    return smtp.sendmail("a@x.test", ["b@example.com"], MESSAGE)
            except (ssl.SSLError, smtplib.SMTPException, OSError) as e:
                return e

        return deferToThread(run)

    @inlineCallbacks
    def test_request_cert_records_verification(self) -> Any:
        """Without requireAuthorized, a CA-signed client certificate is verified and a
        self-signed one is accepted but recorded as not verified."""
        server, port, maildir = start_tls_server(self)
        good = yield self.deliver(port, pki().client)
        rogue = yield self.deliver(port, pki().rogue)
        self.assertEqual((good, rogue), ({}, {}))
        signed, selfsigned = server.notes[NOTES_KEY]
        self.assertTrue(signed["verified"])
        self.assertTrue(signed["results"]["authorized"])
        self.assertEqual(signed["notes"]["peerCertificate"]["subject"]["CN"], "client.test")
        self.assertFalse(selfsigned["verified"])
        self.assertTrue(selfsigned["peer"])
        self.assertFalse(selfsigned["notes"]["authorized"])
        self.assertEqual(len(maildir_messages(maildir)), 2)

    @inlineCallbacks
    def test_require_authorized_refuses_unverified_clients(self) -> Any:
        """On a requireAuthorized port: a CA-signed client certificate delivers (verified);
        no certificate, a self-signed or an expired one fails the handshake; plaintext MAIL
        gets 530."""
        server, port, maildir = start_tls_server(self)
        # The port is only known now: name it in tls.ini, and reload.
        tls_ini = (server.base / "config" / "tls.ini").read_text()  # type: ignore[attr-defined]
        (server.base / "config" / "tls.ini").write_text(  # type: ignore[attr-defined]
            tls_ini + f"requireAuthorized[]={port}\n"
        )
        self.assertIn("tls.ini", server.config.reload())
        good = yield self.deliver(port, pki().client)
        self.assertEqual(good, {})
        for cert in (None, pki().rogue, pki().expired):
            refused = yield self.deliver(port, cert)
            self.assertIsInstance(refused, (ssl.SSLError, smtplib.SMTPException, OSError), cert)

        def plaintext() -> bytes:
            with WireClient(port) as c:
                c.command("EHLO client.test")
                return c.command("MAIL FROM:<a@x.test>")

        mail = yield deferToThread(plaintext)
        self.assertTrue(mail.startswith(b"530 5.7.0"), mail)
        [seen] = server.notes[NOTES_KEY]
        self.assertTrue(seen["verified"])
        self.assertEqual(len(maildir_messages(maildir)), 1)


class MinVersionTests(unittest.TestCase):
    def handshake(self, port: int, maximum: ssl.TLSVersion, minimum: Any = None) -> Deferred[Any]:
        def run() -> Any:
            ctx = client_context()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, on purpose
                ctx.maximum_version = maximum
                if minimum is not None:
                    ctx.minimum_version = minimum
            if minimum is not None:
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            try:
                with starttls_ehlo(port, ctx) as smtp:
                    return smtp.sock.version()  # type: ignore[union-attr]
            except (ssl.SSLError, smtplib.SMTPException, OSError) as e:
                return e

        return deferToThread(run)

    @inlineCallbacks
    def test_min_version_tls13(self) -> Any:
        """minVersion=TLSv1.3: a client that stops at TLS 1.2 fails; TLS 1.3 works."""
        _server, port, _maildir = start_tls_server(self, "minVersion=TLSv1.3\n")
        old = yield self.handshake(port, ssl.TLSVersion.TLSv1_2)
        self.assertIsInstance(old, (ssl.SSLError, OSError, smtplib.SMTPException))
        new = yield self.handshake(port, ssl.TLSVersion.TLSv1_3)
        self.assertEqual(new, "TLSv1.3")

    @inlineCallbacks
    def test_default_refuses_tls11(self) -> Any:
        """The default minVersion (TLSv1.2) refuses a TLS 1.1 client and takes TLS 1.2."""
        _server, port, _maildir = start_tls_server(self)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, on purpose
                probe.minimum_version = ssl.TLSVersion.TLSv1_1
                probe.maximum_version = ssl.TLSVersion.TLSv1_1
            probe.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as e:
            raise unittest.SkipTest(f"this OpenSSL cannot make a TLS 1.1 client: {e}") from e
        old = yield self.handshake(port, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)
        self.assertIsInstance(old, (ssl.SSLError, OSError, smtplib.SMTPException))
        self.assertIn("alert protocol version", str(old))  # the server refused, not us
        new = yield self.handshake(port, ssl.TLSVersion.TLSv1_2)
        self.assertEqual(new, "TLSv1.2")


class ImplicitTLSTests(unittest.TestCase):
    def test_tls_listen_entry_s_client_and_esmtpsa(self) -> None:
        """A tls:127.0.0.1:0 listen entry speaks TLS from the first byte: s_client gets the
        banner inside TLS, EHLO has no STARTTLS; an authenticated session's Received says
        ESMTPSA with the cipher."""
        files = tls_files(
            pki(),
            plugins=f"tls\n{PROBE}\ntests.e2e.test_tls:Authed\n"
            "rcpt_to.in_host_list\nqueue/maildir\n",
        )
        files["smtp.ini"] = "[main]\nlisten=tls:127.0.0.1:0\n"
        service, maildir = start_service(self, files, ["tls:tcp:0:interface=127.0.0.1"])
        port = bound_port(service)

        def run() -> str:
            args = ["-connect", f"127.0.0.1:{port}", "-servername", "mx.test"]
            return s_client(args, SMTP_SCRIPT)

        def check(out: str) -> None:
            self.assertIn("Verify return code: 0 (ok)", out)
            self.assertRegex(out, r"\n220 mx\.test ESMTP")
            self.assertNotIn("STARTTLS", out)
            self.assertIn("250 2.0.0 Message Queued", out)
            [stored] = maildir_messages(maildir)
            self.assertRegex(stored, rb"with ESMTPSA id [^\r\n]+\r\n\tenvelope-from <a@x\.test>")
            self.assertRegex(stored, rb"\r\n\ttls TLSv1\.3 TLS_[A-Z0-9_]+;")
            [seen] = service.server.notes[NOTES_KEY]
            self.assertTrue(seen["enabled"])
            self.assertEqual(seen["results"]["version"], "TLSv1.3")

        return deferToThread(run).addCallback(check)

    def test_smtps_port_without_plugin(self) -> None:
        """A plain listener on smtps_port is TLS too, even without the tls plugin (the
        service loads tls.ini itself); smtplib.SMTP_SSL delivers."""
        from tests.support import free_port

        port = free_port()
        files = tls_files(pki(), plugins="rcpt_to.in_host_list\nqueue/maildir\n")
        files["smtp.ini"] = f"[main]\nsmtps_port={port}\n"
        _service, maildir = start_service(self, files, [f"tcp:{port}:interface=127.0.0.1"])

        def run() -> Any:
            with smtplib.SMTP_SSL("127.0.0.1", port, context=client_context(), timeout=10) as s:
                s.ehlo("client.test")
                return s.sendmail("a@x.test", ["b@example.com"], MESSAGE)

        def check(refused: Any) -> None:
            self.assertEqual(refused, {})
            [stored] = maildir_messages(maildir)
            self.assertIn(b"with ESMTPS id", stored)

        return deferToThread(run).addCallback(check)


@implementer(IMailHook)
class Authed:
    """Marks every session as authenticated (as an auth plugin would) at MAIL."""

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Any:
        connection.notes["auth_user"] = "alice"
        return CONT


class PlaintextPortTests(unittest.TestCase):
    def test_tls_client_on_plaintext_port(self) -> None:
        """TLS spoken to a plaintext port: s_client ends at once (no hang), and a raw
        ClientHello gets a 5xx in the clear and then the connection is closed."""
        _server, port = start_server(self, {})

        def run() -> tuple[subprocess.CompletedProcess[bytes], bytes, bool]:
            argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "x"]
            done = subprocess.run(argv, input=b"", capture_output=True, timeout=10, check=False)
            hello = bytearray()
            ctx = ssl.create_default_context()
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.test")
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                hello += outgoing.read()
            with WireClient(port) as c:
                c.send(bytes(hello))
                reply = c.reply()
                return done, reply, c.at_eof(5)

        def check(got: tuple[subprocess.CompletedProcess[bytes], bytes, bool]) -> None:
            done, reply, closed = got
            self.assertNotEqual(done.returncode, 0)
            self.assertEqual(reply_code(reply) // 100, 5, reply)
            self.assertTrue(closed)

        return deferToThread(run).addCallback(check)


class StartupTests(unittest.TestCase):
    def test_twistd_stops_naming_the_missing_key(self) -> None:
        """twistd -n haraka --config DIR with a tls.ini key that does not exist exits
        non-zero, and says which file."""
        if not TWISTD.exists():
            raise unittest.SkipTest(f"no twistd next to {sys.executable}")
        base = temp_dir(self)
        missing = base / "nowhere" / "tls_key.pem"
        config = write_config(
            base / "config",
            {
                "plugins": "tls\n",
                "tls.ini": f"key={missing}\ncert={pki().mx.cert}\n",
                "smtp.ini": "[main]\nlisten=127.0.0.1:0\n",
            },
        )
        argv = [str(TWISTD), "-n", "--pidfile=", "haraka", "--config", str(config)]
        env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                argv, cwd=base, env=env, capture_output=True, timeout=20, check=False
            )

        def check(done: subprocess.CompletedProcess[bytes]) -> None:
            self.assertNotEqual(done.returncode, 0)
            self.assertIn(str(missing), (done.stdout + done.stderr).decode())

        return deferToThread(run).addCallback(check)
