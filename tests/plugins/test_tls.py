"""The tls plugin on a transcript session: what EHLO offers, how STARTTLS is answered,
what is recorded after the handshake, and the requireAuthorized gate at MAIL.

The session's transport is a StringTransport: C{startTLS} is recorded instead of run, and
the handshake is completed by calling the protocol's C{handshakeCompleted} with a stand-in
for the OpenSSL connection. Real handshakes are in tests/test_tls.py and tests/e2e.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.codes import OK
from haraka_tw.config import ConfigDirectory
from haraka_tw.hooks.loader import PluginLoadError, load_plugins
from haraka_tw.paths import default_config_dir
from haraka_tw.tls import TLSConnectionCreator
from tests.support import ListLog, Session, plugin_with, temp_dir, write_config
from tests.tls_certs import pki

SESSION_PORT = 25  # the local port of tests.support.Session
CLIENT_NET = "192.0.2.0/24"  # holds tests.support.CLIENT_IP


class FakeHandle:
    """What the protocol reads from the OpenSSL connection after the handshake."""

    def __init__(self, cert: Any = None, verify: int = 0) -> None:
        self.cert = cert
        self.verify = verify

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_peer_certificate(self) -> Any:
        return self.cert

    def get_verify_result(self) -> int:
        return self.verify


def load_tls_plugin(case: Any, ini: str = "") -> tuple[str, object]:
    """The tls plugin, loaded through the real loader, with mx.test in tls.ini."""
    p = pki()
    directory = write_config(
        temp_dir(case) / "config",
        {"tls.ini": f"[main]\nkey={p.mx.key}\ncert={p.mx.cert}\nca={p.ca}\n{ini}"},
    )
    config = ConfigDirectory([default_config_dir(), directory])
    [loaded] = load_plugins(["tls"], config=config, log=ListLog(), server_notes={})
    return loaded.name, loaded.plugin


def accepting() -> tuple[str, object]:
    return ("accept", plugin_with({"rcpt": lambda c, r, p: OK, "queue": lambda c: OK}))


class TLSSession(Session):
    """A session whose transport records startTLS and can finish a handshake."""

    def __init__(self, case: Any, ini: str = "") -> None:
        super().__init__([load_tls_plugin(case, ini), accepting()])
        self.started: list[Any] = []
        self.transport.startTLS = self.started.append  # type: ignore[attr-defined]

    def handshake(self, handle: FakeHandle | None = None) -> None:
        self.transport.getHandle = lambda: handle or FakeHandle()  # type: ignore[attr-defined]
        self.proto.handshakeCompleted()


class AdvertiseTests(SynchronousTestCase):
    def test_ehlo_offers_starttls(self) -> None:
        """EHLO lists STARTTLS and marks it advertised."""
        s = TLSSession(self)
        self.assertRegex(s.send("EHLO client.test\r\n"), r"\r\n250[ -]STARTTLS\r\n")
        self.assertTrue(s.connection.tls.advertised)

    def test_not_offered_on_no_starttls_ports(self) -> None:
        """On a port in no_starttls_ports: no STARTTLS in EHLO, and STARTTLS is unknown."""
        s = TLSSession(self, f"no_starttls_ports[]={SESSION_PORT}\n")
        self.assertNotIn("STARTTLS", s.send("EHLO client.test\r\n"))
        self.assertEqual(s.codes("STARTTLS\r\n"), [500])
        self.assertEqual(s.started, [])

    def test_not_offered_to_no_tls_hosts(self) -> None:
        """A client in [no_tls_hosts] is not offered STARTTLS and cannot start it."""
        s = TLSSession(self, f"[no_tls_hosts]\n{CLIENT_NET}\n")
        self.assertNotIn("STARTTLS", s.send("EHLO client.test\r\n"))
        self.assertEqual(s.codes("STARTTLS\r\n"), [500])


class StartTLSTests(SynchronousTestCase):
    def test_refusals(self) -> None:
        """STARTTLS before EHLO: 503; with an argument: 501; TLS is not started."""
        s = TLSSession(self)
        self.assertEqual(s.send("STARTTLS\r\n"), "503 Send EHLO first\r\n")
        s.send("EHLO client.test\r\n")
        self.assertEqual(
            s.send("STARTTLS now\r\n"), "501 5.5.4 Syntax error (no parameters allowed)\r\n"
        )
        self.assertEqual(s.started, [])

    def test_starttls_discards_pipelined_and_records_after_handshake(self) -> None:
        """STARTTLS: 220, TLS started with the server's creator, the pipelined NOOP never
        answered; after the handshake, notes and results say what was agreed, EHLO no
        longer offers STARTTLS and a second STARTTLS gets 503."""
        s = TLSSession(self)
        s.send("EHLO client.test\r\n")
        self.assertEqual(s.send("STARTTLS\r\nNOOP\r\n"), "220 2.0.0 Ready to start TLS\r\n")
        [creator] = s.started
        self.assertIsInstance(creator, TLSConnectionCreator)
        self.assertFalse(creator.verify_clients)
        s.handshake()
        self.assertEqual(s.read(), "")  # the NOOP is gone
        conn = s.connection
        self.assertEqual(
            conn.notes["tls"],
            {
                "authorized": False,
                "authorizationError": None,
                "peerCertificate": None,
                "cipher": {"name": "TLS_AES_256_GCM_SHA384", "version": "TLSv1.3"},
            },
        )
        results = conn.results.get("tls")
        self.assertEqual(
            {k: results[k] for k in ("cipher", "version", "verified", "authorized")},
            {
                "cipher": "TLS_AES_256_GCM_SHA384",
                "version": "TLSv1.3",
                "verified": False,
                "authorized": False,
            },
        )
        self.assertEqual(s.codes("MAIL FROM:<a@client.test>\r\n"), [503])
        ehlo = s.send("EHLO client.test\r\n")
        self.assertTrue(ehlo.startswith("250-"), ehlo)
        self.assertNotIn("STARTTLS", ehlo)
        self.assertEqual(s.send("STARTTLS\r\n"), "503 5.5.1 TLS already active\r\n")

    def test_client_certificate_recorded(self) -> None:
        """A verified client certificate: authorized, with Node's peerCertificate fields."""
        s = TLSSession(self)
        s.send("EHLO client.test\r\nSTARTTLS\r\n")
        cert = x509.load_pem_x509_certificate(pki().client.cert_pem)
        s.handshake(FakeHandle(cert, 0))
        notes = s.connection.notes["tls"]
        self.assertTrue(notes["authorized"])
        self.assertEqual(notes["peerCertificate"]["subject"], {"CN": "client.test"})
        self.assertEqual(notes["peerCertificate"]["issuer"], {"CN": "haraka_tw test CA"})
        self.assertEqual(len(notes["peerCertificate"]["fingerprint256"]), 32 * 3 - 1)

    def test_unverified_client_certificate(self) -> None:
        """A client certificate that did not verify: recorded, not authorized."""
        s = TLSSession(self)
        s.send("EHLO client.test\r\nSTARTTLS\r\n")
        cert = x509.load_pem_x509_certificate(pki().rogue.cert_pem)
        s.handshake(FakeHandle(cert, 18))
        notes = s.connection.notes["tls"]
        self.assertFalse(notes["authorized"])
        self.assertIsNotNone(notes["authorizationError"])
        self.assertFalse(s.connection.results.get("tls")["verified"])

    def test_handshake_never_finishes(self) -> None:
        """The client leaves during the handshake: the failure is recorded, nothing
        escapes, and the session ends normally."""
        s = TLSSession(self)
        s.send("EHLO client.test\r\nSTARTTLS\r\n")
        s.proto.connectionLost(Failure(ConnectionLost("gone")))
        fail = s.connection.results.get("tls")["fail"]
        self.assertEqual(len(fail), 1)
        self.assertRegex(fail[0], r"^handshake: \S")  # (a reason, not an empty one)
        self.assertFalse(any("internal error" in m for m in s.log.messages()))

    def test_handshake_timeout_disconnects(self) -> None:
        """A client that starts TLS but never finishes the handshake is disconnected when
        the plugin's timeout runs out."""
        s = TLSSession(self)
        s.send("EHLO client.test\r\nSTARTTLS\r\n")
        self.assertFalse(s.closed)
        s.clock.advance(31)  # plugin_timeout is 30 s
        self.assertTrue(s.closed)
        self.assertEqual(
            s.connection.results.get("tls")["fail"],
            ["handshake: not finished within the plugin's timeout"],
        )

    def test_implicit_tls_recorded_at_ehlo(self) -> None:
        """A session that began in TLS (an implicit TLS port) is recorded at its first
        EHLO, which offers no STARTTLS."""
        s = TLSSession(self)
        s.handshake()
        self.assertIsNone(s.connection.results.get("tls"))
        self.assertNotIn("STARTTLS", s.send("EHLO client.test\r\n"))
        self.assertEqual(s.connection.results.get("tls")["version"], "TLSv1.3")


class RequireAuthorizedTests(SynchronousTestCase):
    def test_mail_needs_tls_then_a_verified_certificate(self) -> None:
        """On a requireAuthorized port: the creator verifies clients; MAIL in plaintext
        gets 530 "Must issue a STARTTLS command first"; after TLS with a verified
        certificate, MAIL is accepted."""
        s = TLSSession(self, f"requireAuthorized[]={SESSION_PORT}\n")
        s.send("EHLO client.test\r\n")
        self.assertEqual(
            s.send("MAIL FROM:<a@client.test>\r\n"),
            "530 5.7.0 Must issue a STARTTLS command first\r\n",
        )
        s.send("STARTTLS\r\n")
        [creator] = s.started
        self.assertTrue(creator.verify_clients)
        cert = x509.load_pem_x509_certificate(pki().client.cert_pem)
        s.handshake(FakeHandle(cert, 0))
        s.send("EHLO client.test\r\n")
        self.assertEqual(s.codes("MAIL FROM:<a@client.test>\r\n"), [250])

    def test_unverified_certificate_refused_at_mail(self) -> None:
        """On a requireAuthorized port, TLS without a verified certificate: MAIL gets 530."""
        s = TLSSession(self, f"requireAuthorized[]={SESSION_PORT}\n")
        s.send("EHLO client.test\r\nSTARTTLS\r\n")
        s.handshake()
        s.send("EHLO client.test\r\n")
        self.assertEqual(
            s.send("MAIL FROM:<a@client.test>\r\n"),
            "530 5.7.0 A verified client certificate is required\r\n",
        )


def test_register_names_the_missing_file(tmp_path: Path) -> None:
    """A tls.ini cert that does not exist stops the plugin from loading, naming the file."""
    missing = tmp_path / "missing.crt"
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "tls.ini").write_text(f"key={pki().mx.key}\ncert={missing}\n")
    config = ConfigDirectory([default_config_dir(), directory])
    with pytest.raises(PluginLoadError, match=str(missing)):
        load_plugins(["tls"], config=config, log=ListLog(), server_notes={})
