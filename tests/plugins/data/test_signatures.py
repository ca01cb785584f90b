"""data.signatures: a body containing a listed string is refused."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.message.stream import CHUNK
from haraka_tw.smtp.settings import SessionSettings
from tests.plugins.loading import ENVELOPE, Loaded, accepting, load, session
from tests.support import start_server, temp_dir

REFUSED = "550 5.7.1 Mail body matched a known spam signature\r\n"


class SignaturesTests(SynchronousTestCase):
    def loaded(self, signatures: str = "cheap pills\n# a comment\nwin £100\n") -> Loaded:
        return load(self, ["data.signatures"], {"data.signatures": signatures})

    def reply(self, loaded: Loaded, message: str, settings: Any = None) -> str:
        s = session(*loaded.pairs(), accepting(), settings=settings)
        s.send(ENVELOPE + "DATA\r\n")
        return s.send(message + "\r\n.\r\n")

    def test_signature_in_body_refused(self) -> None:
        """A body containing a listed string (UTF-8 too) gets 550; a clean one 250."""
        loaded = self.loaded()
        self.assertEqual(self.reply(loaded, "Subject: hi\r\n\r\nbuy cheap pills now"), REFUSED)
        self.assertEqual(self.reply(loaded, "Subject: hi\r\n\r\nyou win £100"), REFUSED)
        self.assertTrue(self.reply(loaded, "Subject: hi\r\n\r\nlunch?").startswith("250 "))

    def test_header_not_searched(self) -> None:
        """Only the body is searched, as in Haraka: a signature in the Subject passes."""
        reply = self.reply(self.loaded(), "Subject: cheap pills\r\n\r\nhello")
        self.assertTrue(reply.startswith("250 "))

    def test_spooled_body_across_chunks(self) -> None:
        """A signature straddling two chunks of a body spooled to disk is found."""
        settings = SessionSettings(me="mx.test", spool_after=0, spool_dir=str(temp_dir(self)))
        filler = "x" * 70 + "\r\n"
        lead = filler * (CHUNK // len(filler))
        body = lead + "y" * (CHUNK - len(lead) - 5) + "cheap pills\r\n"
        self.assertEqual(self.reply(self.loaded(), "Subject: hi\r\n\r\n" + body, settings), REFUSED)

    def test_reload_and_empty_list(self) -> None:
        """An edited list applies after a reload; an empty list refuses nothing."""
        loaded = self.loaded("\n")
        self.assertTrue(self.reply(loaded, "\r\nfresh spam").startswith("250 "))
        loaded.write("data.signatures", "fresh spam\n")
        self.assertEqual(self.reply(loaded, "\r\nfresh spam"), REFUSED)


class SignaturesServerTests(TestCase):
    @inlineCallbacks
    def test_refused_over_a_socket(self) -> Deferred[None]:
        """Over a real socket with smtplib: the message with a signature is refused."""
        _, port = start_server(
            self,
            {
                "plugins": "data.signatures\nrcpt_to.in_host_list\nqueue/maildir\n",
                "host_list": "example.com\n",
                "data.signatures": "cheap pills\n",
            },
        )

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                try:
                    client.sendmail("a@client.test", ["b@example.com"], b"\r\ncheap pills\r\n")
                except smtplib.SMTPDataError as e:
                    return e.smtp_code, e.smtp_error
            return None

        self.assertEqual(
            (yield deferToThread(send)), (550, b"5.7.1 Mail body matched a known spam signature")
        )
