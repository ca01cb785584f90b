"""queue/deliver: messages into the built-in outbound queue, over a real loopback server."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.codes import CONT
from haraka_tw.outbound.queue import QueueEntry
from haraka_tw.plugins.queue.deliver import Plugin
from haraka_tw.smtp.state import Notes
from tests.support import start_server


def send(port: int, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        s.rcpt(rcpt)
        return s.data(b"Subject: d\r\n\r\nbody\r\n")


class DeliverTests(TestCase):
    async def queued_after(self, plugins: str, rcpt: str) -> tuple[int, list[QueueEntry]]:
        server, port = start_server(self, {"plugins": plugins})
        code, _ = await deferToThread(send, port, rcpt)
        entries: list[QueueEntry] = await server.outbound.queue.scan()
        return code, entries

    async def test_inbound_mail_goes_to_the_outbound_queue(self) -> None:
        """queue hook: the message is in the outbound queue (fsynced) before the 250."""
        code, [entry] = await self.queued_after(
            "rcpt_to.in_host_list\nqueue/deliver\n", "bob@example.com"
        )
        self.assertEqual(code, 250)
        self.assertEqual(entry.todo.mail_from, "alice@client.test")
        self.assertEqual([r.address for r in entry.todo.rcpt_to], ["bob@example.com"])

    async def test_relayed_mail_is_left_to_the_core(self) -> None:
        """queue_outbound: CONT, and the core's outbound queue takes the message."""
        relaying = "tests.plugins.queue.test_smtp_forward:Relaying\n"
        code, [entry] = await self.queued_after(relaying + "queue/deliver\n", "x@far.test")
        self.assertEqual(code, 250)
        self.assertEqual(entry.todo.domain, "far.test")


class WantsTests(SynchronousTestCase):
    def test_other_queue_wanted(self) -> None:
        """A message whose queue.wants names another plugin is left alone."""
        plugin = Plugin()
        plugin.server_notes = {"outbound": object()}

        class Txn:
            rcpt_to = ["x"]
            notes = Notes(queue={"wants": "lmtp"})

        class Conn:
            transaction: Any = Txn()

        self.assertIs(plugin.hook_queue(Conn()), CONT)
        self.assertIs(plugin.hook_queue_outbound(Conn()), CONT)
