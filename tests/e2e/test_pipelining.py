"""Pipelining over a real socket with slow asynchronous hooks (RFC 2920).

The sample plugin answers each MAIL and RCPT after the delay its address names
(C{cont.wait400@example.com} answers CONT after 400 ms), so later commands' hooks would
finish first if the server ran them side by side. Replies must still come back one per
command, in command order.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import WireClient, maildir_messages, reply_code, start_server

SAMPLE = "tests.e2e.sample_plugin:Factory"
PLUGINS = f"{SAMPLE}\nrcpt_to.in_host_list\nqueue/maildir\n"

# The first recipient is the slowest; one is refused, by a plugin that also waits.
RECIPIENTS = [
    ("<cont.wait400@example.com>", b"250 2.1.5 recipient <cont.wait400@example.com> OK\r\n"),
    ("<cont.wait50@example.com>", b"250 2.1.5 recipient <cont.wait50@example.com> OK\r\n"),
    (
        "<deny.wait200@example.com>",
        b"550 5.7.1 delivery to <deny.wait200@example.com> denied\r\n",
    ),
    ("<cont.sync@example.com>", b"250 2.1.5 recipient <cont.sync@example.com> OK\r\n"),
    ("<ok.coroutine@example.com>", b"250 2.1.5 recipient <ok.coroutine@example.com> OK\r\n"),
]
BODY = b"From: <alice@x.test>\r\nSubject: pipelined\r\n\r\nHello, in order.\r\n"


class PipeliningTests(unittest.TestCase):
    def setUp(self) -> None:
        server, self.port = start_server(self, {"plugins": PLUGINS})
        self.maildir = server.base / "maildir"  # type: ignore[attr-defined]

    def test_one_write_batch_replies_in_command_order(self) -> None:
        """MAIL, five RCPTs and DATA in one write: replies in order despite hook delays."""

        def client() -> None:
            with WireClient(self.port) as c:
                ehlo = c.command("EHLO client.test")
                self.assertIn(b"250-PIPELINING\r\n", ehlo)
                batch = b"MAIL FROM:<cont.wait300@x.test>\r\n"
                batch += b"".join(f"RCPT TO:{rcpt}\r\n".encode() for rcpt, _ in RECIPIENTS)
                batch += b"DATA\r\n"
                c.send(batch)
                self.assertEqual(c.reply(), b"250 2.1.0 sender <cont.wait300@x.test> OK\r\n")
                for _, expected in RECIPIENTS:
                    self.assertEqual(c.reply(), expected)
                self.assertEqual(reply_code(c.reply()), 354)
                c.send(BODY + b".\r\n")
                self.assertEqual(reply_code(c.reply()), 250)
                self.assertEqual(reply_code(c.command("QUIT")), 221)
                self.assertTrue(c.at_eof())

        def check(_: Any) -> None:
            stored = maildir_messages(self.maildir)
            self.assertEqual(len(stored), 1)
            self.assertTrue(stored[0].endswith(BODY))

        return deferToThread(client).addCallback(check)

    def test_commands_sent_while_a_hook_is_pending_wait_their_turn(self) -> None:
        """Commands that arrive while MAIL's hook is pending are answered after it, in order."""

        def client() -> None:
            with WireClient(self.port) as c:
                c.command("EHLO client.test")
                start = time.monotonic()
                c.send(b"MAIL FROM:<cont.wait500@x.test>\r\n")
                self.assertEqual(c.quiet(0.15), b"")  # the hook is still pending
                c.send(
                    b"RCPT TO:<cont.wait10@example.com>\r\n"
                    b"RCPT TO:<cont.sync@example.com>\r\n"
                    b"NOOP\r\n"
                    b"DATA\r\n"
                )
                self.assertEqual(c.reply(), b"250 2.1.0 sender <cont.wait500@x.test> OK\r\n")
                self.assertGreaterEqual(time.monotonic() - start, 0.45)
                self.assertEqual(c.reply(), b"250 2.1.5 recipient <cont.wait10@example.com> OK\r\n")
                self.assertEqual(c.reply(), b"250 2.1.5 recipient <cont.sync@example.com> OK\r\n")
                self.assertEqual(c.reply(), b"250 2.0.0 OK\r\n")
                self.assertEqual(reply_code(c.reply()), 354)
                # QUIT pipelined behind the final dot waits for the slow data_post hook.
                c.send(
                    b"From: <alice@x.test>\r\nSubject: data_post=cont.wait300\r\n\r\nHi.\r\n"
                    b".\r\nQUIT\r\n"
                )
                self.assertEqual(c.quiet(0.15), b"")
                self.assertEqual(reply_code(c.reply()), 250)
                self.assertEqual(reply_code(c.reply()), 221)
                self.assertTrue(c.at_eof())

        def check(_: Any) -> None:
            self.assertEqual(len(maildir_messages(self.maildir)), 1)

        return deferToThread(client).addCallback(check)

    def test_input_held_past_the_pause_bound_is_all_answered(self) -> None:
        """300 KB pipelined behind a pending hook (past the 256 KiB pause) all get replies."""
        padded_noop = b"NOOP " + b"x" * 500 + b"\r\n"
        count = 600  # about 300 KB

        def client() -> list[bytes]:
            with WireClient(self.port) as c:
                c.command("EHLO client.test")
                replies: list[bytes] = []

                def read() -> None:  # read while writing, so neither side's buffer fills up
                    replies.extend(c.replies(count + 2))

                reader = threading.Thread(target=read)
                reader.start()
                c.send(
                    b"MAIL FROM:<cont.wait300@x.test>\r\n"
                    + padded_noop * count
                    + b"RCPT TO:<bob@example.com>\r\n"
                )
                reader.join(30)
                self.assertFalse(reader.is_alive(), f"only {len(replies)} replies came")
                self.assertEqual(reply_code(c.command("QUIT")), 221)
                return replies

        def check(replies: list[bytes]) -> None:
            self.assertEqual(replies[0], b"250 2.1.0 sender <cont.wait300@x.test> OK\r\n")
            self.assertEqual(replies[1:-1], [b"250 2.0.0 OK\r\n"] * count)
            self.assertEqual(replies[-1], b"250 2.1.5 recipient <bob@example.com> OK\r\n")

        return deferToThread(client).addCallback(check)
