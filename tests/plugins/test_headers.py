"""headers over sockets: messages with good and bad header fields, sent with smtplib to a
real server; a recorder plugin keeps what the checks wrote in the results."""

from __future__ import annotations

import smtplib
from email.utils import formatdate
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from haraka_tw.codes import OK
from haraka_tw.interfaces import IQueueHook
from haraka_tw.server import StartupError
from tests.support import start_server

RESULTS: list[dict[str, Any]] = []
REJECT_ALL = (
    "[reject]\nduplicate_singular=true\nmissing_required=true\ninvalid_date=true\nfrom_phish=true\n"
)


@implementer(IQueueHook)
class Recorder:
    """Test plugin: keeps the headers results of each message that reaches the queue."""

    def hook_queue(self, connection: Any) -> Any:
        RESULTS.append(dict(connection.transaction.results.get("headers") or {}))
        return OK


def message(*fields: str, date: str | None = None) -> bytes:
    lines = [f"Date: {date or formatdate()}", "From: Alice <alice@sender.example>", *fields]
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()


def send(port: int, body: bytes, sender: str = "alice@sender.example") -> tuple[int, str]:
    """Send one message to b@example.com; the reply to its end of DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.example")
        client.mail(sender)
        client.rcpt("b@example.com")
        code, text = client.data(body)
        return code, text.decode()


class HeadersTests(TestCase):
    def server(self, ini: str = "") -> int:
        RESULTS.clear()
        _, port = start_server(
            self,
            {
                "plugins": "headers\nrcpt_to.in_host_list\ntests.plugins.test_headers:Recorder\n",
                "headers.ini": ini,
            },
        )
        return port

    @inlineCallbacks
    def replies(self, port: int, *bodies: bytes) -> Deferred[list[tuple[int, str]]]:
        got = []
        for body in bodies:
            got.append((yield deferToThread(send, port, body)))
        return got

    @inlineCallbacks
    def test_refusals_when_told_to(self) -> Deferred[None]:
        """With the rejects on: a good message is queued; a repeated Subject, a missing
        Date, a Date too old, in the future or no date at all, a brand in From from
        elsewhere, and a Delivered-To naming the recipient (on by default) get 550."""
        port = self.server(REJECT_ALL + "[phish_targets]\npaypal=paypal.com\n")
        got = yield self.replies(
            port,
            message("Subject: hi"),
            message("Subject: one", "subject: two"),
            b"From: a@sender.example\r\n\r\nbody\r\n",
            message(date="Mon, 1 Jan 2001 00:00:00 +0000"),
            message(date="Mon, 1 Jan 2091 00:00:00 +0000"),
            message(date="yesterday-ish"),
            message("Reply-To: PayPa1 Support <help@sender.example>"),
            message("Delivered-To: B@example.com"),
        )
        self.assertEqual(
            [text if code != 250 else code for code, text in got],
            [
                250,
                "5.7.1 Only one Subject header allowed. See RFC 5322, Section 3.6",
                "5.7.1 Required header 'Date' missing",
                "5.7.1 The Date header is too old",
                "5.7.1 The Date header is too far in the future",
                "5.7.1 The Date header is not a valid date",
                250,  # the brand is in Reply-To, not From
                "5.7.1 Invalid Delivered-To header content",
            ],
        )
        got = yield self.replies(port, message().replace(b"Alice", b"PayPa1 Support"))
        self.assertEqual(got, [(550, "5.7.1 Phishing message appears to impersonate paypal.com")])

    @inlineCallbacks
    def test_defaults_record_and_let_by(self) -> Deferred[None]:
        """With the shipped settings, only delivered_to refuses: other failures are
        recorded, with Haraka's labels."""
        port = self.server()
        got = yield self.replies(
            port,
            message("Subject: one", "Subject: two", "X-Mailer: Mutt/2.2", "X-Mailman-Version: 3"),
        )
        self.assertEqual(got[0][0], 250)
        (results,) = RESULTS
        self.assertIn("duplicate:Subject", results["fail"])
        self.assertIn("UA(Mutt/2.2)", results["pass"])
        self.assertIn("MLM(mailman)", results["pass"])
        self.assertIn("from_match", results["pass"])
        self.assertIn("direct-to-mx(too few Received(1))", results["fail"])

    @inlineCallbacks
    def test_from_match_and_inbound_return_path(self) -> Deferred[None]:
        """A From in the sender's domain is a domain match, another domain a failure; an
        inbound Return-Path is removed before the message is queued."""
        port = self.server()
        yield deferToThread(
            send, port, message("Return-Path: <x@y.example>"), "bob@mail.sender.example"
        )
        yield deferToThread(send, port, message(), "bob@elsewhere.example")
        self.assertIn("from_match(domain)", RESULTS[0]["pass"])
        self.assertIn("Return-Path", RESULTS[0]["pass"])
        self.assertIn("from_match(elsewhere.example / sender.example)", RESULTS[1]["fail"])

    def test_older_name_and_bad_settings(self) -> None:
        """data.headers loads the same plugin; a bad number stops start-up, naming the file."""
        server, _ = start_server(self, {"plugins": "data.headers\n"})
        self.assertEqual([p.name for p in server.runner.plugins], ["data.headers"])
        with self.assertRaises(StartupError) as caught:
            start_server(
                self, {"plugins": "headers\n", "headers.ini": "date_past_days=fortnight\n"}
            )
        self.assertIn("headers.ini", str(caught.exception))
        self.assertIn("date_past_days", str(caught.exception))
