"""dkim over sockets: signatures checked against key records served by a real DNS server
on loopback, relayed mail signed on its way to a real SMTP peer (and checked there with
an independent verifier, dkimpy), and the key generator."""

from __future__ import annotations

import os
import smtplib
import stat
import time
from typing import Any

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.cli import main
from haraka_tw.codes import CONT, OK
from haraka_tw.interfaces import IMailHook, IQueueHook, IRcptHook
from haraka_tw.message import dkim
from haraka_tw.message.header import Header
from haraka_tw.plugins.dkim import Verdict
from haraka_tw.server import StartupError
from tests.dnsserver import serve
from tests.plugins.test_dns_list import until
from tests.smtp_peers import Peer, PeerScript
from tests.support import start_server, temp_dir

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
RECORD = dkim.public_record(KEY)
MESSAGE = (
    b"From: Joe <joe@example.com>\r\nTo: you@mx.test\r\nSubject: dinner\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\nMessage-ID: <1@example.com>\r\n\r\n"
    b"Are you hungry yet?\r\n"
)
NEXTHOP = '{ "nexthop": "127.0.0.1:PORT" }'
CAPTURED: list[tuple[bytes, list[dict[str, Any]]]] = []


def txt(name: str, record: str) -> str:
    """A zone line for C{record}, in strings of 200 (one TXT string holds at most 255)."""
    pieces = " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200))
    return f"{name} 300 IN TXT {pieces}\n"


ZONE = txt("sel._domainkey.example.com.", RECORD) + txt(
    "revoked._domainkey.example.com.", "v=DKIM1; k=rsa; p="
)


def signed_by_dkimpy(selector: bytes, message: bytes = MESSAGE) -> bytes:
    return dkimpy.sign(message, selector, b"example.com", PEM) + message


@implementer(IMailHook, IRcptHook, IQueueHook)
class Capture:
    """Test plugin: records a result of its own at MAIL (so the core makes the
    Authentication-Results header before data_post), takes every recipient, and keeps
    each message's header and DKIM notes."""

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Any:
        connection.transaction.auth_results("x-test=pass")
        return CONT

    def hook_rcpt(self, connection: Any, recipient: Any, params: Any) -> Any:
        return OK

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        CAPTURED.append((txn.header.to_bytes(), txn.notes.get("dkim_results")))
        return OK


def send(port: int, message: bytes, sender: str = "joe@example.com") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(sender, ["you@mx.test"], message)


class VerifyTests(TestCase):
    @inlineCallbacks
    def test_each_result_in_authentication_results(self) -> None:
        """pass, fail (a changed body), permerror (no key record; a revoked key),
        temperror (SERVFAIL) and none each reach the notes and the one
        Authentication-Results header, which the core makes again after data_post."""
        dns = serve(self, ZONE, servfail=["broken._domainkey.example.com"])
        CAPTURED.clear()
        _, port = start_server(
            self,
            {
                "plugins": "dkim\ntests.plugins.test_dkim:Capture\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\nattempts=1\n",
            },
        )
        messages = [
            signed_by_dkimpy(b"sel"),
            signed_by_dkimpy(b"sel").replace(b"hungry", b"angry"),
            signed_by_dkimpy(b"gone"),
            signed_by_dkimpy(b"revoked"),
            signed_by_dkimpy(b"broken"),
            MESSAGE,
        ]
        for message in messages:
            yield deferToThread(send, port, message)
        expected = [
            ("dkim=pass header.d=example.com header.s=sel", "pass"),
            ("dkim=fail (body hash did not verify) header.d=example.com", "fail"),
            (
                "dkim=permerror (no key for signature) header.d=example.com header.s=gone",
                "permerror",
            ),
            ("dkim=permerror (key revoked) header.d=example.com header.s=revoked", "permerror"),
            ("dkim=temperror (key unavailable: SERVFAIL) header.d=example.com", "temperror"),
            ("dkim=none", None),
        ]
        self.assertEqual(len(CAPTURED), len(expected))
        for (header, notes), (entry, result) in zip(CAPTURED, expected, strict=True):
            first = header.split(b"\r\n")[0].decode()
            self.assertTrue(first.startswith("Authentication-Results: mx.test; x-test=pass; "))
            self.assertIn(entry, first)
            self.assertEqual(header.count(b"Authentication-Results:"), 1)
            self.assertEqual([n["result"] for n in notes], [result] if result else [])

    @inlineCallbacks
    def test_headers_from_phish_spares_a_brands_own_signature(self) -> None:
        """A From naming a brand from another address is refused by headers' from_phish,
        unless a DKIM signature of the brand's domain passed and signed that From (dkim
        listed first): a From added above a genuine signed message is still refused."""
        dns = serve(self, ZONE)
        _, port = start_server(
            self,
            {
                "plugins": "dkim\nheaders\ntests.plugins.test_dkim:Capture\n",
                "headers.ini": "[reject]\nfrom_phish=true\n[phish_targets]\nexample=example.com\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\nattempts=1\n",
            },
        )
        phish = MESSAGE.replace(b"Joe <joe@example.com>", b"Example Support <help@other.test>")
        yield deferToThread(send, port, signed_by_dkimpy(b"sel", phish))
        # a genuine message of the brand with a From added on top, where readers show it
        # (signed by the brand without oversigning From, so that DKIM still passes)
        genuine = dkimpy.sign(MESSAGE, b"sel", b"example.com", PEM, include_headers=[b"from"])
        replayed = b"From: Example <help@other.test>\r\n" + genuine + MESSAGE
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            yield deferToThread(send, port, replayed)
        self.assertEqual(caught.exception.smtp_code, 550)
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            yield deferToThread(
                send, port, signed_by_dkimpy(b"sel", phish).replace(b"hungry", b"x")
            )
        self.assertEqual(caught.exception.smtp_code, 550)
        self.assertIn(b"impersonate example.com", caught.exception.smtp_error)


class SignTests(TestCase):
    def signing_server(self, plugins: str, acl: str, **files: str) -> tuple[Peer, int]:
        """A real SMTP peer, and a server signing for example.com (relay's ACL C{acl}),
        routing all outbound mail to that peer."""
        peer = Peer(PeerScript())
        peer_port = peer.start()
        self.addCleanup(peer.stop)
        _, port = start_server(
            self,
            {
                "plugins": plugins,
                "relay.ini": "[relay]\nacl=true\nforce_routing=true\n",
                "relay_acl_allow": acl,
                "relay_dest_domains.ini": f"[domains]\nany = {NEXTHOP}\n".replace(
                    "PORT", str(peer_port)
                ),
                "outbound.ini": "[main]\nqueue_dir={base}/queue\n",
                "dkim.ini": "[sign]\nenabled=true\n",
                "dkim/example.com/private": PEM.decode(),
                "dkim/example.com/selector": "sel\n",
                **files,
            },
        )
        return peer, port

    @inlineCallbacks
    def test_relayed_mail_is_signed_for_its_domain(self) -> None:
        """Relayed mail from a subdomain is signed with the parent domain's key (d= the
        parent), with Date and Message-ID added first and signed; dkimpy verifies it at
        the next hop. Mail from a domain without a key goes unsigned."""
        peer, port = self.signing_server("relay\ndkim\n", "127.0.0.1\n")
        bare = b"From: Joe <joe@mail.example.com>\r\nTo: you@far.example\r\nSubject: hi\r\n"
        bare += b"\r\nbody\r\n"
        yield deferToThread(send, port, bare, "joe@mail.example.com")
        yield deferToThread(send, port, bare.replace(b"mail.example.com", b"nokey.example"))
        yield until(lambda: len(peer.messages) == 2)
        signed, unsigned = sorted((m.data for m in peer.messages), key=lambda d: b"nokey" in d)
        self.assertTrue(
            signed.startswith(
                b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=sel;"
            )
        )
        header = Header.parse(signed.split(b"\r\n\r\n")[0] + b"\r\n")
        self.assertEqual((header.count("Date"), header.count("Message-Id")), (1, 1))
        listed = dkim.parse_signature(header.fields()[0][1], time.time()).headers
        for name in ("date", "message-id", "from", "subject", "to"):
            self.assertEqual(listed.count(name), 2, name)  # present once, oversigned once

        def dns(name: bytes, timeout: int = 5) -> bytes | None:
            return RECORD.encode() if name == b"sel._domainkey.example.com." else None

        self.assertTrue(dkimpy.verify(signed, dnsfunc=dns))
        self.assertFalse(dkimpy.verify(signed.replace(b"body", b"BODY"), dnsfunc=dns))
        self.assertNotIn(b"DKIM-Signature", unsigned)

    @inlineCallbacks
    def test_inbound_mail_is_never_signed(self) -> None:
        """Mail from a client that may not relay is not signed, even when queue/deliver
        puts it in the outbound queue (else anyone could get ``From: ceo@ourdomain``
        signed with our key)."""
        plugins = "relay\nrcpt_to.in_host_list\ndkim\nqueue/deliver\n"
        peer, port = self.signing_server(plugins, "192.0.2.1\n", host_list="mx.test\n")
        yield deferToThread(send, port, MESSAGE.replace(b"Date:", b"X-Date:"))
        yield until(lambda: len(peer.messages) == 1)
        self.assertNotIn(b"DKIM-Signature", peer.messages[0].data)

    def test_bad_config_stops_the_start(self) -> None:
        """A canonicalization that is not simple/relaxed stops start-up, naming dkim.ini."""
        with self.assertRaises(StartupError) as caught:
            start_server(
                self, {"plugins": "dkim\n", "dkim.ini": "[sign]\ncanonicalization=loose\n"}
            )
        self.assertIn("dkim.ini [sign] canonicalization", str(caught.exception))


class KeygenTests(SynchronousTestCase):
    def test_keygen_writes_a_key_and_its_record(self) -> None:
        """dkim-keygen writes a private key only its owner reads, the selector and the
        record (which publishes that key's public half); it never replaces a key."""
        config = temp_dir(self)
        self.assertEqual(main(["dkim-keygen", "Example.COM", "-c", str(config), "-s", "s1"]), 0)
        folder = config / "dkim" / "example.com"
        self.assertEqual(stat.S_IMODE(os.stat(folder / "private").st_mode), 0o600)
        self.assertEqual((folder / "selector").read_text(), "s1\n")
        key = dkim.load_private_key((folder / "private").read_bytes())
        dns_text = (folder / "dns").read_text()
        self.assertIn("s1._domainkey.example.com. IN TXT", dns_text)
        quoted = dns_text.split("( ")[1].split(" )")[0]  # "..." "..."
        self.assertEqual("".join(quoted.split('"')[1::2]), dkim.public_record(key))
        before = (folder / "private").read_bytes()
        self.assertEqual(main(["dkim-keygen", "example.com", "-c", str(config)]), 1)
        self.assertEqual((folder / "private").read_bytes(), before)
        self.assertEqual(main(["dkim-keygen", "../x", "-c", str(config)]), 1)
        self.assertEqual(os.listdir(config), ["dkim"])
        self.assertEqual(os.listdir(config / "dkim"), ["example.com"])


class VerdictTests(SynchronousTestCase):
    def test_entry_cannot_be_forged_from_a_reason(self) -> None:
        """A reason cannot close its comment and add a result of its own, and header.b
        (base64, with tspecials) is quoted (RFC 8601)."""
        verdict = Verdict("fail", "example.com", "sel", reason="x) dkim=pass (", b_prefix="a/b+=")
        self.assertEqual(
            verdict.auth_result(),
            'dkim=fail (x dkim=pass ) header.d=example.com header.s=sel header.b="a/b+="',
        )
