"""Embedding: HarakaService as a child of an application's own MultiService, in-process."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from haraka_tw.service import HarakaService
from tests.support import (
    WireClient,
    maildir_messages,
    reply_code,
    temp_dir,
    wait_for_refusal,
    write_config,
)

MESSAGE = b"From: <alice@x.test>\r\nSubject: embedded\r\n\r\nHello from inside.\r\n"


class EmbeddingTests(unittest.TestCase):
    def setUp(self) -> None:
        base = temp_dir(self)
        self.maildir = base / "maildir"
        config = write_config(
            base / "config",
            {
                "maildir.ini": f"[main]\npath={self.maildir}\nfsync=false\n",
                "me": "mx.test\n",
                "smtp.ini": "[main]\nforce_shutdown_timeout=2\n",
            },
        )
        self.parent = MultiService()
        self.service = HarakaService.from_directory(config, ["tcp:0:interface=127.0.0.1"])
        self.service.setServiceParent(self.parent)
        self.parent.privilegedStartService()
        self.parent.startService()
        self.addCleanup(self.stop_parent)
        self.port = self.service.ports[0].getHost().port

    def stop_parent(self) -> Any:
        if self.parent.running:
            return self.parent.stopService()
        return None

    def test_child_service_accepts_a_message(self) -> None:
        """Started as a child of a MultiService, the service accepts mail into its Maildir."""

        def client() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                return smtp.sendmail("alice@x.test", ["bob@example.com"], MESSAGE)

        def check(refused: dict[str, Any]) -> None:
            self.assertEqual(refused, {})
            stored = maildir_messages(self.maildir)
            self.assertEqual(len(stored), 1)
            self.assertTrue(stored[0].endswith(MESSAGE))

        return deferToThread(client).addCallback(check)

    @defer.inlineCallbacks
    def test_stop_closes_listeners_and_drains_sessions(self) -> Any:
        """stopService closes the listener, lets an open session finish, then closes it."""
        client = yield deferToThread(WireClient, self.port)
        self.addCleanup(client.close)
        reply = yield deferToThread(client.command, "EHLO client.test")
        self.assertEqual(reply_code(reply), 250)
        reply = yield deferToThread(client.command, "MAIL FROM:<alice@x.test>")
        self.assertEqual(reply_code(reply), 250)

        stopping = self.parent.stopService()
        self.assertFalse(stopping.called)  # a session is open: it drains first
        refused = yield deferToThread(wait_for_refusal, self.port, 5)
        self.assertTrue(refused, "still accepting connections after stopService")

        def finish() -> tuple[bytes, bytes, bytes, bool]:
            rcpt = client.command("RCPT TO:<bob@example.com>")
            client.command("DATA")
            client.send(MESSAGE + b".\r\n")
            queued = client.reply()
            closing = client.reply()  # 421 at force_shutdown_timeout
            return rcpt, queued, closing, client.at_eof(2)

        rcpt, queued, closing, eof = yield deferToThread(finish)
        self.assertEqual(reply_code(rcpt), 250)
        self.assertEqual(reply_code(queued), 250)
        self.assertEqual(reply_code(closing), 421)
        self.assertTrue(eof)
        yield stopping
        self.assertEqual(self.service.server.factory.sessions, set())
        self.assertEqual(len(maildir_messages(self.maildir)), 1)
