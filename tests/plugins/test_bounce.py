"""bounce over sockets: bounces (MAIL FROM:<>) sent with smtplib, checked against the
message they return, with SPF records served by a real DNS server on loopback."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.codes import OK
from haraka_tw.interfaces import IQueueHook
from haraka_tw.message.body import BodyParser
from haraka_tw.message.header import Header
from haraka_tw.plugins.bounce import message_ids, relay_addresses
from tests.dnsserver import serve
from tests.support import start_server

ZONE = 'example.com. 300 IN TXT "v=spf1 ip4:1.2.3.0/24 -all"\n'
KEPT: list[Any] = []


def dsn(
    received_ip: str,
    message_id: str,
    *,
    rfc822_headers: bool = False,
    relays: tuple[str, ...] = (),
    attachment: bool = False,
) -> bytes:
    """A bounce (multipart/report) returning a message that left from C{received_ip}
    with Message-ID C{message_id}, as message/rfc822 or as text/rfc822-headers; C{relays}
    are later hops it passed (the last first); C{attachment} sends it as one
    (Content-Disposition: attachment)."""
    hops = "".join(
        f"Received: from relay{n} ([{ip}]) by next{n}.far.example\r\n"
        for n, ip in enumerate(relays)
    )
    original = hops + (
        f"Received: from mail.example.com (mail.example.com\r\n"
        f"\t[{received_ip}]) by mx.far.example with ESMTP id 1\r\n"
        f"Received: from laptop ([10.0.0.5]) by mail.example.com\r\n"
        f"Message-ID: <{message_id}>\r\nFrom: ann@example.com\r\nSubject: hello\r\n"
    )
    kind = "text/rfc822-headers" if rfc822_headers else "message/rfc822"
    if attachment:
        kind += '\r\nContent-Disposition: attachment; filename="original.eml"'
    return (
        "From: MAILER-DAEMON@far.example\r\nTo: ann@example.com\r\nSubject: Undelivered\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.far.example\r\n\r\nFinal-Recipient: rfc822; x@far.example\r\n"
        f"Action: failed\r\nStatus: 5.1.1\r\n\r\n--B\r\nContent-Type: {kind}\r\n\r\n"
        f"{original}\r\nhello\r\n--B--\r\n"
    ).encode()


@implementer(IQueueHook)
class Keep:
    """Test plugin: keeps each message's bounce results."""

    def hook_queue(self, connection: Any) -> Any:
        KEPT.append(connection.transaction.results.get("bounce"))
        return OK


class BounceTests(TestCase):
    def server(self, ini: str = "", plugins: str = "bounce\n") -> int:
        dns = serve(self, ZONE)
        KEPT.clear()
        _, port = start_server(
            self,
            {
                "plugins": f"{plugins}rcpt_to.in_host_list\n{__name__}:Keep\n",
                "bounce.ini": ini,
                "host_list": "example.com\n",
                "bounce_bad_rcpt": "noreply@example.com\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\nattempts=1\n",
            },
        )
        return port

    def bounce(
        self, port: int, message: bytes, recipients: tuple[str, ...] = ("ann@example.com",)
    ) -> Deferred[tuple[int, bytes]]:
        """Send C{message} from <>; the reply to DATA (or to the refused command)."""

        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                try:
                    client.sendmail("", list(recipients), message)
                except smtplib.SMTPResponseException as e:
                    return e.smtp_code, e.smtp_error
                except smtplib.SMTPRecipientsRefused as e:
                    return next(iter(e.recipients.values()))
            return 250, b""

        return deferToThread(send)

    @inlineCallbacks
    def test_a_genuine_bounce_passes_every_check(self) -> Deferred[None]:
        """A bounce to one address, returning our message (our Message-ID, sent from an
        address our SPF record allows), passes, in either DSN form."""
        port = self.server("[reject]\nnon_local_msgid=true\nbounce_spf=true\n")
        for form in (False, True):
            got = yield self.bounce(port, dsn("1.2.3.4", "abc@example.com", rfc822_headers=form))
            self.assertEqual(got[0], 250, got)
        for results in KEPT:
            self.assertEqual(
                results["pass"],
                ["bad_rcpt", "single_recipient", "Message-ID valid domain", "bounce_spf"],
            )
            self.assertEqual(results["isa"], "yes")

    @inlineCallbacks
    def test_backscatter_refused_when_configured(self) -> Deferred[None]:
        """A bounce of a message we never sent: refused for its foreign Message-ID with
        [reject] non_local_msgid, for its hops our SPF record does not allow with
        [reject] bounce_spf; by default only recorded."""
        spoofed = dsn("5.6.7.8", "x@spammer.example")
        port = self.server("[reject]\nnon_local_msgid=true\n")
        got = yield self.bounce(port, spoofed)
        self.assertEqual(
            got, (550, b"5.7.1 bounce Message-ID with non-local domain, I didn't send it")
        )
        port = self.server("[reject]\nbounce_spf=true\n")
        got = yield self.bounce(port, spoofed)
        self.assertEqual(got, (550, b"5.7.1 Invalid bounce (spoofed sender)"))
        port = self.server()
        got = yield self.bounce(port, spoofed)
        self.assertEqual(got[0], 250)
        self.assertEqual(KEPT[0]["fail"], ["Message-ID non-local domain", "bounce_spf"])

    @inlineCallbacks
    def test_more_hops_than_checked_is_a_skip(self) -> Deferred[None]:
        """A returned message with more than 10 public hops, the first 10 not allowed by
        our SPF record, is no spoofed bounce: the oldest hop (ours) is not checked, so
        bounce_spf is skipped, not failed, and [reject] bounce_spf lets it through."""
        relays = tuple(f"5.6.7.{n}" for n in range(1, 11))
        port = self.server("[reject]\nbounce_spf=true\n")
        got = yield self.bounce(port, dsn("1.2.3.4", "abc@example.com", relays=relays))
        self.assertEqual(got[0], 250, got)
        self.assertEqual(KEPT[0]["fail"], [])
        self.assertEqual(KEPT[0]["skip"], ["bounce_spf"])
        self.assertIn("more than 10 hops", KEPT[0]["msg"])

    @inlineCallbacks
    def test_a_returned_message_sent_as_an_attachment_is_a_skip(self) -> Deferred[None]:
        """A bounce that attaches the returned message (Content-Disposition: attachment),
        in either form, which is not read, is no bounce without a Message-ID: the check
        is skipped, and [reject] non_local_msgid lets it through."""
        port = self.server("[reject]\nnon_local_msgid=true\nbounce_spf=true\n")
        for form in (False, True):
            message = dsn("1.2.3.4", "abc@example.com", rfc822_headers=form, attachment=True)
            got = yield self.bounce(port, message)
            self.assertEqual(got[0], 250, got)
        for results in KEPT:
            self.assertEqual(results["fail"], [])
            self.assertEqual(results["skip"], ["Message-ID", "bounce_spf"])
            self.assertIn("returned message is an attachment", results["msg"])

    @inlineCallbacks
    def test_envelope_checks(self) -> Deferred[None]:
        """A bounce to two recipients is refused at DATA (554); one to an address in
        bounce_bad_rcpt at RCPT (550); with reject.all_bounces, every bounce at MAIL."""
        port = self.server()
        message = dsn("1.2.3.4", "abc@example.com")
        got = yield self.bounce(port, message, ("ann@example.com", "bob@example.com"))
        self.assertEqual(got, (554, b"5.7.1 this bounce message has too many recipients"))
        got = yield self.bounce(port, message, ("noreply@example.com",))
        self.assertEqual(got, (550, b"5.7.1 noreply@example.com does not accept bounces"))
        port = self.server("[reject]\nall_bounces=true\n")
        got = yield self.bounce(port, message)
        self.assertEqual(got, (550, b"5.7.1 Bounces not accepted here"))

    @inlineCallbacks
    def test_return_path(self) -> Deferred[None]:
        """With [reject] empty_return_path, a Return-Path of <> passes and an address is
        refused (RFC 3834), also with headers (which removes Return-Path) listed first."""
        ini = "[reject]\nempty_return_path=true\n"
        bad = b"Return-Path: <x@far.example>\r\n" + dsn("1.2.3.4", "a@example.com")
        for plugins in ("bounce\n", "headers\nbounce\n"):
            port = self.server(ini, plugins)
            ok = yield self.bounce(port, b"Return-Path: <>\r\n" + dsn("1.2.3.4", "a@example.com"))
            self.assertEqual(ok[0], 250)
            got = yield self.bounce(port, bad)
            self.assertEqual(got, (550, b"5.7.1 bounce with non-empty Return-Path (RFC 3834)"))


class ExtractTests(SynchronousTestCase):
    def test_fields_of_the_returned_message(self) -> None:
        """The returned message's Message-ID domains and the public addresses of its
        Received fields (private ones left out), folded lines read whole."""
        message = dsn("1.2.3.4", "abc@Example.COM")
        head, _, rest = message.partition(b"\r\n\r\n")
        parser = BodyParser(Header.parse(head + b"\r\n"))
        parser.feed(rest)
        parser.close()
        body = parser.body
        self.assertEqual(message_ids(body), ["example.com"])
        self.assertEqual(relay_addresses(body), ["1.2.3.4"])
