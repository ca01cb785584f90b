"""Clients that leave in the middle: while a hook is pending, or right after the final dot.

The session must wind down quietly (no internal error) and the Maildir must never hold a
partial message: a message the client did not wait for may be stored or not, but if it is
stored it is whole.
"""

from __future__ import annotations

import gc
import socket
import weakref
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial import unittest

from haraka_tw.logging import Level
from tests.support import WireClient, maildir_messages, reply_code, start_server

SAMPLE = "tests.e2e.sample_plugin:Factory"
PLUGINS = f"{SAMPLE}\nrcpt_to.in_host_list\nqueue/maildir\n"
MESSAGE = b"From: <alice@x.test>\r\nSubject: leaving\r\n\r\n" + b"Body line.\r\n" * 200


class DisconnectTests(unittest.TestCase):
    def start(self, files: dict[str, str] | None = None) -> None:
        self.server, self.port = start_server(self, {"plugins": PLUGINS, **(files or {})})
        self.maildir = self.server.base / "maildir"  # type: ignore[attr-defined]
        self.serious: list[Any] = []

        def keep(connection: Any, record: Any) -> bool:
            if record.level <= Level.ERROR:
                self.serious.append(record)
            return True

        self.server.log.hook = keep

    def leave_while_pending(self, script: bytes, settle: float = 0.45) -> Any:
        """Open a transaction, send C{script} (which starts a slow hook), close at once;
        then give the hook time to answer."""

        def client() -> None:
            with WireClient(self.port) as c:
                c.command("EHLO client.test")
                c.send(script)

        d = deferToThread(client)
        d.addCallback(lambda _: task.deferLater(reactor, settle, lambda: None))
        return d.addCallback(self.check_quiet)

    def check_quiet(self, _: Any = None) -> None:
        self.assertEqual([r.message for r in self.serious], [])
        self.assertEqual(self.server.factory.sessions, set())

    def test_leave_while_mail_hook_pending(self) -> None:
        """A client gone while MAIL's hook is pending: no internal error."""
        self.start()
        return self.leave_while_pending(b"MAIL FROM:<cont.wait200@x.test>\r\n")

    def test_leave_while_rcpt_hook_pending(self) -> None:
        """A client gone while RCPT's hook is pending: no internal error."""
        self.start()
        return self.leave_while_pending(
            b"MAIL FROM:<alice@x.test>\r\nRCPT TO:<ok.wait200@example.com>\r\n"
        )

    def test_leave_while_data_post_hook_pending(self) -> None:
        """A client gone while data_post is pending: no internal error, nothing stored."""
        self.start()
        script = (
            b"MAIL FROM:<alice@x.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
            b"Subject: data_post=cont.wait200\r\n\r\nHi.\r\n.\r\n"
        )
        d = self.leave_while_pending(script)
        return d.addCallback(lambda _: self.assertEqual(maildir_messages(self.maildir), []))

    def test_leave_while_queue_hook_pending(self) -> None:
        """A client gone while the queue hook is pending: no internal error."""
        self.start()
        script = (
            b"MAIL FROM:<alice@x.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
            b"Subject: queue=ok.wait200\r\n\r\nHi.\r\n.\r\n"
        )
        return self.leave_while_pending(script)

    def test_leave_right_after_the_final_dot_never_stores_a_partial_message(self) -> None:
        """Clients that close right after the final dot: whatever is stored is whole."""
        self.start({"connection.ini": "[main]\nspool_after=0\n"})  # spool every body
        rounds = 60

        def client() -> None:
            for _ in range(rounds):
                with WireClient(self.port) as c:
                    c.command("EHLO client.test")
                    assert reply_code(c.command("MAIL FROM:<alice@x.test>")) == 250
                    assert reply_code(c.command("RCPT TO:<bob@example.com>")) == 250
                    assert reply_code(c.command("DATA")) == 354
                    c.send(MESSAGE + b".\r\n")
                    c.sock.shutdown(socket.SHUT_WR)  # gone without waiting for the 250

        def check(_: Any) -> None:
            stored = maildir_messages(self.maildir)
            partial = [len(m) for m in stored if not m.endswith(MESSAGE)]
            self.assertEqual(partial, [], f"{len(partial)} of {len(stored)} stored messages cut")
            self.check_quiet()

        d = deferToThread(client)
        d.addCallback(lambda _: task.deferLater(reactor, 0.3, lambda: None))
        return d.addCallback(check)

    def test_a_finished_session_is_freed_at_once(self) -> None:
        """Over a real socket, with the collector off: the ended session and its connection
        are freed (no cycle)."""
        self.start()
        gc.disable()
        self.addCleanup(gc.enable)
        held: list[weakref.ref[Any]] = []

        def client() -> None:
            with WireClient(self.port) as c:
                c.command("EHLO client.test")
                held.extend(
                    blockingCallFromThread(
                        reactor,
                        lambda: [
                            weakref.ref(o)
                            for s in self.server.factory.sessions
                            for o in (s, s.connection)
                        ],
                    )
                )
                assert reply_code(c.command("MAIL FROM:<alice@x.test>")) == 250
                assert reply_code(c.command("RCPT TO:<bob@example.com>")) == 250
                assert reply_code(c.command("DATA")) == 354
                assert reply_code(c.command(MESSAGE + b".")) == 250
                assert reply_code(c.command("QUIT")) == 221

        def check(_: Any) -> None:
            self.assertEqual(len(held), 2)
            self.assertEqual(len(maildir_messages(self.maildir)), 1)
            self.assertEqual([ref() for ref in held], [None, None], "outlived the client")
            self.check_quiet()

        d = deferToThread(client)
        d.addCallback(lambda _: task.deferLater(reactor, 0.3, lambda: None))
        return d.addCallback(check)
