"""record_envelope_addresses: X-Envelope-From and X-Envelope-To in the stored message."""

from __future__ import annotations

import smtplib
from pathlib import Path

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.codes import DENY
from tests.plugins.loading import accepting, load, session
from tests.support import maildir_messages, plugin_with, start_server


class RecordEnvelopeTests(SynchronousTestCase):
    def stored_message(self, mail_from: str, rcpts: list[str], message: str) -> bytes:
        stored: list[bytes] = []
        refuse = (
            "refuse",
            plugin_with({"rcpt": lambda c, r, p: DENY if r.local == "no" else None}),
        )
        s = session(*load(self, ["record_envelope_addresses"]).pairs(), refuse, accepting(stored))
        s.send(f"EHLO client.test\r\nMAIL FROM:{mail_from}\r\n")
        s.send("".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n")
        self.assertEqual(s.codes(message + "\r\n.\r\n"), [250])
        return stored[0]

    def test_envelope_recorded(self) -> None:
        """The sender and each accepted recipient, in order, are added; refused ones not."""
        message = self.stored_message(
            "<a@client.test>",
            ["one@example.com", "no@example.com", "two@example.com"],
            "Subject: x\r\n\r\nbody",
        )
        header = message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        self.assertIn(
            b"X-Envelope-From: a@client.test\r\n"
            b"X-Envelope-To: one@example.com\r\n"
            b"X-Envelope-To: two@example.com\r\n",
            header,
        )
        self.assertNotIn(b"no@example.com", message)

    def test_null_sender_and_forged_fields(self) -> None:
        """The null sender is written <>; X-Envelope fields the client sent are removed."""
        message = self.stored_message(
            "<>", ["one@example.com"], "X-Envelope-To: boss@example.com\r\nSubject: x\r\n\r\nhi"
        )
        self.assertIn(b"X-Envelope-From: <>\r\n", message)
        self.assertNotIn(b"boss@example.com", message)


class RecordEnvelopeServerTests(TestCase):
    @inlineCallbacks
    def test_delivered_message_has_envelope(self) -> Deferred[None]:
        """Over a real socket, the message delivered to the Maildir carries the envelope."""
        server, port = start_server(
            self,
            {
                "plugins": "record_envelope_addresses\nrcpt_to.in_host_list\nqueue/maildir\n",
                "host_list": "example.com\n",
            },
        )
        base: Path = server.base  # type: ignore[attr-defined]

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@client.test", ["bcc@example.com"], b"Subject: x\r\n\r\nhi\r\n")

        yield deferToThread(send)
        (message,) = maildir_messages(base / "maildir")
        self.assertIn(b"X-Envelope-From: a@client.test\r\n", message)
        self.assertIn(b"X-Envelope-To: bcc@example.com\r\n", message)
