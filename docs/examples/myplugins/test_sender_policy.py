"""sender_policy over a real socket: the tutorial's config, a real server, smtplib.

Run with ``PYTHONPATH=. trial myplugins`` from the directory that holds myplugins/ and
config/.
"""

from __future__ import annotations

import shutil
import smtplib
import tempfile
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from haraka_tw.server import HarakaServer
from haraka_tw.service import HarakaService

CONFIG = Path(__file__).resolve().parent.parent / "config"


class SenderPolicyTests(unittest.TestCase):
    """What a client sees from a server running the tutorial's config."""

    def setUp(self) -> None:
        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp, True)
        config = tmp / "config"
        shutil.copytree(CONFIG, config)
        # Deliver into the test's own directory, not ./var/maildir.
        (config / "maildir.ini").write_text(f"[main]\npath={tmp / 'maildir'}\n")
        self.maildir = tmp / "maildir"
        server = HarakaServer.from_directory(config, reactor)
        service = HarakaService(
            server, ["tcp:0:interface=127.0.0.1"], watch_interval=0, handle_sighup=False
        )
        service.startService()
        self.addCleanup(service.stopService)  # stop listening, let sessions finish
        self.port = service.ports[0].getHost().port

    def mail_from(self, sender: str) -> tuple[int, bytes]:
        """EHLO and MAIL FROM in a new session (blocking: run it in a thread)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.ehlo("client.test")
            return client.mail(sender)

    def test_blocklisted_sender(self) -> None:
        """A sender in sender_blocklist gets 550 and reject_message."""
        d = deferToThread(self.mail_from, "Spammer@bad.example")
        d.addCallback(
            self.assertEqual,
            (550, b"5.7.1 Mail from <Spammer@bad.example> is not accepted here"),
        )
        return d

    def test_deferred_domain(self) -> None:
        """A sender from a defer_domains domain gets 450, after the tarpit."""
        started = time.monotonic()
        d = deferToThread(self.mail_from, "alice@slow.example")

        def check(reply: tuple[int, bytes]) -> None:
            self.assertEqual(
                reply,
                (450, b"4.7.1 Mail from <alice@slow.example> is deferred, please try again later"),
            )
            self.assertGreaterEqual(time.monotonic() - started, 1.0)

        return d.addCallback(check)

    def test_other_sender_delivered(self) -> None:
        """Any other sender is left to the next plugins: the message is delivered."""

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                return client.sendmail(
                    "bob@good.example", ["carol@example.com"], b"Subject: hi\r\n\r\nHello.\r\n"
                )

        def check(refused: dict[str, tuple[int, bytes]]) -> None:
            self.assertEqual(refused, {})
            self.assertEqual(len(list((self.maildir / "new").iterdir())), 1)

        return deferToThread(send).addCallback(check)
