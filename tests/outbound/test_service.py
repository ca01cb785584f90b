"""OutboundService against queue trouble: a scan that fails (not one bad file: those are
set aside) still leaves it delivering what arrives after; a message for several domains
is queued whole or not at all; a control request it cannot use is logged and left, not
an error that stops later ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.logging import Level
from haraka_tw.paths import default_config_dir
from haraka_tw.server import HarakaServer
from tests.support import ListLog, temp_dir, write_config

MESSAGE = b"From: a@x.test\r\nTo: b@one.test\r\nSubject: t\r\n\r\nbody\r\n"


class ServiceTests(TestCase):
    def server(self) -> tuple[HarakaServer, ListLog, Path]:
        """A server (not listening) whose outbound queue is in a directory of the test's;
        DNS goes to a closed port."""
        base = temp_dir(self)
        config = write_config(
            base / "config",
            {
                "outbound.ini": f"[main]\nqueue_dir={base}/queue\n",
                "dns.ini": "[main]\nnameservers=127.0.0.1:9\ntimeout=1\nattempts=1\n",
            },
        )
        log = ListLog()
        server = HarakaServer(ConfigDirectory([default_config_dir(), config]), reactor, log)
        return server, log, base

    def test_the_scheduler_runs_after_a_failed_scan(self) -> None:
        """The scan of the queue directory fails (an I/O error): a CRIT line says so, and
        the scheduler runs all the same, for what arrives from now on."""
        server, log, base = self.server()
        with mock.patch.object(
            type(server.outbound.queue), "scan", lambda q: fail(OSError(5, "I/O error"))
        ):
            server.outbound.start()
        self.addCleanup(server.outbound.stop)
        self.assertTrue(server.outbound.scheduler.running)
        self.assertEqual(
            log.messages(Level.CRIT),
            [
                f"outbound queue: scanning {base}/queue failed: [Errno 5] I/O error; new"
                " messages are delivered, the files already there wait for a restart"
            ],
        )

    def test_control_requests_with_bad_arguments_are_logged_and_left(self) -> None:
        """Requests with arguments of the wrong kind, or no known action, are each a WARN
        line; a good request after them is still carried out."""
        server, log, _ = self.server()
        server.outbound.control("flush", {"domain": 5})
        server.outbound.control("delete", {"ids": "1234"})
        server.outbound.control("bounce", {"ids": [1, 2]})
        server.outbound.control("frobnicate", {})
        server.outbound.control("flush", {"domain": "b.test"})
        self.assertEqual(
            log.messages(Level.WARN),
            [
                "queue control: flush {'domain': 5} ignored: domain is not text",
                "queue control: delete {'ids': '1234'} ignored: ids is not a list of queue ids",
                "queue control: bounce {'ids': [1, 2]} ignored: ids is not a list of queue ids",
                "queue control: frobnicate {} ignored: not an action (flush, delete, bounce)",
            ],
        )
        self.assertIn("outbound flush of b.test: 0", log.messages(Level.NOTICE))

    async def test_a_message_for_two_domains_is_queued_whole_or_not_at_all(self) -> None:
        """One queue file per domain: if the second cannot be written (a full disk), the
        first is taken back before the failure is reported, since the sender is told 4xx
        and will send the message again."""
        server, _, _ = self.server()
        await server.outbound.start()  # (its scan done: it would take the new file too)
        self.addCleanup(server.outbound.stop)
        queue: Any = server.outbound.queue
        original, calls = type(queue).add, []

        def add(q: Any, todo: Any, chunks: Any, next_attempt: Any = None) -> Any:
            calls.append(todo.domain)
            if len(calls) == 2:
                return fail(OSError(28, "No space left on device"))
            return original(q, todo, chunks, next_attempt)

        original_remove, removing = type(queue).remove, []

        def remove(q: Any, entry: Any) -> Deferred[None]:  # (finishes when the test says)
            done: Deferred[None] = Deferred()
            removing.append((entry, done))
            return done

        with (
            mock.patch.object(type(queue), "add", add),
            mock.patch.object(type(queue), "remove", remove),
        ):
            d: Deferred[Any] = server.outbound.send_email(
                "a@x.test", ["b@one.test", "c@two.test"], MESSAGE
            )
            failed: list[Any] = []
            d.addErrback(failed.append)
            while not removing:  # (the first file is written in a thread)
                await deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(failed, [])  # no answer before the file is taken back
            ((entry, done),) = removing
            await original_remove(queue, entry)
            done.callback(None)
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0].value.errno, 28)
        self.assertEqual(calls, ["one.test", "two.test"])
        self.assertEqual(queue.store.listing().entries, [])
