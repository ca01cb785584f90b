"""OutboundService against queue trouble: a scan that fails (not one bad file: those are
set aside) still leaves it delivering what arrives after; a message for several domains
is queued whole or not at all; a control request it cannot use is logged and left, not
an error that stops later ones."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.logging import Level
from haraka_tw.outbound.qfile import QueueName, QueueRecipient, Todo
from haraka_tw.outbound.service import RESCAN_SETTLED
from haraka_tw.outbound.store import QueueStore
from haraka_tw.paths import default_config_dir
from haraka_tw.server import HarakaServer
from tests.outbound.test_queue import HeldThreads, run_now
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
                " messages are delivered, the files already there wait for a flush or a restart"
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


class RescanTests(TestCase):
    """A flush re-reads the queue directory: a file moved in while the server runs is
    delivered without a restart, and no file is ever attempted twice."""

    def setUp(self) -> None:
        self.server, self.log, self.base = ServiceTests.server(self)  # type: ignore[arg-type]
        self.outbound = self.server.outbound
        self.attempts: list[str] = []
        self.in_flight: list[Deferred[None]] = []
        self.other = QueueStore(self.base / "elsewhere", log=lambda line: None)

        def attempt(entry: Any) -> Deferred[None]:
            self.attempts.append(entry.id)
            self.in_flight.append(Deferred())  # in flight until the test ends
            return self.in_flight[-1]

        self.outbound.scheduler.attempt = attempt

    def moved_in(self, domain: str = "one.test") -> Any:
        """A queue file written elsewhere on the same disk and renamed into the queue."""
        todo = Todo(
            domain=domain,
            mail_from="a@x.test",
            rcpt_to=[QueueRecipient(f"b@{domain}")],
            uuid="MOVED",
            queue_time=0,
        )
        entry = self.other.add(todo, [MESSAGE], next_attempt=time.time() + 3600)
        target = self.base / "queue" / entry.filename
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.rename(entry.path, target)
        settled = time.time() - RESCAN_SETTLED - 1  # (a file just written may be half copied)
        os.utime(target, (settled, settled))
        return entry

    async def started(self) -> None:
        await self.outbound.start()
        self.addCleanup(self.outbound.stop)
        self.addCleanup(lambda: [d.callback(None) for d in self.in_flight])  # (runs first)
        await turn()

    async def stopped(self) -> None:
        await self.outbound.stop()
        await turn()

    async def test_a_flush_takes_a_file_moved_in_and_makes_it_due(self) -> None:
        """Not seen until a flush; then scheduled, due now though its file says an hour,
        and attempted once; the log names it. A second flush takes nothing more."""
        await self.started()
        entry = self.moved_in()
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.attempts, [])
        self.outbound.flush()
        taken = await self.outbound.rescan()  # (after the flush's own, which took it)
        self.assertEqual(taken, 0)
        await wait_for(lambda: self.attempts == [entry.id])
        self.assertIn(
            f"outbound queue: 1 file(s) found on re-reading {self.base}/queue: {entry.id}",
            self.log.messages(Level.NOTICE),
        )
        self.assertEqual(await self.outbound.rescan(), 0)
        self.assertEqual(self.attempts, [entry.id])

    async def test_a_rescan_does_not_read_the_files_it_holds(self) -> None:
        """A file the scheduler holds is not read again (on a flush, reading thousands of
        files it knew slowed their delivery by a third): one spoilt after it was taken is
        not reported as unreadable."""
        await self.started()
        entry = self.moved_in()
        self.assertEqual(await self.outbound.rescan(), 1)
        (self.base / "queue" / entry.filename).write_bytes(b"\0\0\0\x05{bad")
        self.assertEqual(await self.outbound.rescan(), 0)
        self.assertEqual([m for m in self.log.messages(Level.WARN) if "cannot read" in m], [])

    async def test_a_flush_of_one_domain_leaves_the_others_files_at_their_time(self) -> None:
        """A rescan for one.test (flush one.test): a moved-in file for another domain is
        scheduled all the same (it is in the queue), at the time its name says."""
        await self.started()
        entry = self.moved_in("two.test")
        self.assertEqual(await self.outbound.rescan("one.test"), 1)
        self.assertTrue(self.outbound.scheduler.holds(entry.id))
        self.assertEqual(self.outbound.scheduler.pending(), {"two.test": 1})
        ((due, _, _),) = self.outbound.scheduler._domains["two.test"].heap
        self.assertEqual(due, entry.next_attempt)
        self.assertEqual(self.attempts, [])

    async def test_a_file_the_queue_tools_are_bouncing_is_not_taken(self) -> None:
        """haraka-tw queue bounce X, begun while a rescan waits for another write: X is
        still on disk while its report is written, but it is the bounce's, not a new
        delivery's."""
        await self.started()
        entry = self.moved_in()
        work: list[tuple[Any, Deferred[Any]]] = []  # each piece of disk work, begun on demand

        def lazy(f: Any) -> Deferred[Any]:
            work.append((f, Deferred()))
            return work[-1][1]

        def run(index: int) -> None:
            f, d = work[index]
            d.callback(f())

        self.outbound.queue._threads = lazy
        taken: list[int] = []
        self.outbound.rescan().addCallback(taken.append)  # work[0]: the listing
        queued = self.outbound.send_email("a@x.test", ["b@two.test"], MESSAGE)  # work[1]
        write, written = work[1]
        new_file = write()  # on disk; the writer not told yet
        run(0)  # the rescan has read X, and waits for that write
        self.outbound.control("bounce", {"ids": [entry.id]})  # work[2]: its listing
        run(2)  # work[3]: the bounce, not begun
        self.assertEqual(len(work), 4)
        written.callback(new_file)  # the writer schedules it; the rescan goes on
        (queued_entry,) = await queued
        self.assertEqual(taken, [0])  # X is the bounce's
        await wait_for(lambda: self.attempts)
        self.assertEqual(self.attempts, [queued_entry.id])
        run(3)
        self.assertEqual(self.outbound._bouncing, set())

    async def test_a_file_changed_just_now_waits_for_the_next_flush(self) -> None:
        """A file whose time is recent may still be being copied in (a Haraka file has no
        size of its own to check): left, with a line saying so."""
        await self.started()
        entry = self.moved_in()
        os.utime(self.base / "queue" / entry.filename)  # (now)
        self.assertEqual(await self.outbound.rescan(), 0)
        self.assertIn(
            f"outbound queue: {entry.filename} changed in the last 10s (still being copied?):"
            " left for the next flush",
            self.log.messages(Level.INFO),
        )

    async def test_a_burst_of_flushes_shares_one_waiting_rescan(self) -> None:
        """Flushes while a rescan reads wait for one more rescan between them, not one
        each: a burst of SIGHUPs on a large queue is not a backlog of directory reads."""
        await self.started()
        threads = HeldThreads()
        self.outbound.queue._threads = threads
        taken: list[int] = []
        for _ in range(5):
            self.outbound.rescan().addCallback(taken.append)
        self.moved_in()
        threads.fire(0)
        self.assertEqual(len(threads.held), 2)  # the four waiting share one read
        threads.fire(1)
        self.assertEqual(taken, [0, 1, 1, 1, 1])

    async def test_an_entry_left_for_a_restart_is_not_taken(self) -> None:
        """An attempt that failed by a bug leaves its entry for a restart (it may have
        reached some recipients): a flush does not try it again."""
        await self.started()
        self.outbound.scheduler.attempt = lambda entry: fail(RuntimeError("a bug"))
        entry = self.moved_in()
        self.assertEqual(await self.outbound.rescan(), 1)
        await wait_for(lambda: self.outbound.scheduler._parked)
        self.flushLoggedErrors()
        self.assertEqual(await self.outbound.rescan(), 0)
        self.assertTrue(self.outbound.scheduler.holds(entry.id))

    async def test_a_flush_while_a_rescan_reads_is_not_lost(self) -> None:
        """A file moved in after a rescan has read the directory is taken by the rescan of
        the next flush, which waits for the first to finish rather than being dropped."""
        await self.started()
        threads = HeldThreads()
        self.outbound.queue._threads = threads
        taken: list[int] = []
        self.outbound.rescan().addCallback(taken.append)  # has read: nothing there
        entry = self.moved_in()
        self.outbound.rescan().addCallback(taken.append)
        self.assertEqual(len(threads.held), 1)  # one at a time
        threads.fire(0)
        self.assertEqual(len(threads.held), 2)
        threads.fire(1)
        self.assertEqual(taken, [0, 1])
        self.assertTrue(self.outbound.scheduler.holds(entry.id))

    async def test_a_file_being_written_is_left_to_its_writer(self) -> None:
        """A new message whose file is on disk when the rescan reads, but whose writer has
        not scheduled it yet: the rescan waits for that write, then leaves the file to it,
        so it is attempted once."""
        await self.started()
        threads = HeldThreads()
        self.outbound.queue._threads = threads
        queued = self.outbound.send_email("a@x.test", ["b@one.test"], MESSAGE)
        taken: list[int] = []
        self.outbound.rescan().addCallback(taken.append)
        threads.fire(1)  # the listing is read: it holds the new file
        self.assertEqual(len(threads.held[1][1].entries), 1)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(taken, [])  # waiting for the write
        self.assertEqual(self.attempts, [])
        threads.fire(0)  # the write is handed back: the service schedules it
        (entry,) = await queued
        self.assertEqual(taken, [0])
        await wait_for(lambda: self.attempts)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.attempts, [entry.id])

    async def test_a_file_in_flight_or_gone_is_not_taken(self) -> None:
        """An entry being delivered is skipped; one whose file went (delivered, or renamed
        by a retry: the old name is gone either way) between the listing and the adoption
        is skipped too."""
        await self.started()
        busy = self.moved_in()
        gone = self.moved_in()
        threads = HeldThreads()
        self.outbound.queue._threads = threads
        rescan = self.outbound.rescan()
        (self.base / "queue" / gone.filename).unlink()
        threads.fire(0)
        self.assertEqual(await rescan, 1)
        await wait_for(lambda: self.attempts == [busy.id])
        self.outbound.queue._threads = run_now
        self.assertEqual(await self.outbound.rescan(), 0)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.attempts, [busy.id])

    async def test_an_unreadable_file_is_logged_and_left(self) -> None:
        """A file that does not read (still being copied in, say) is a WARN naming it and
        stays where it is, for the next flush or the restart to judge."""
        await self.started()
        torn = self.base / "queue" / QueueName.new(time.time(), time.time()).format()
        torn.write_bytes(b'\0\0\0\x10{"dom')
        self.assertEqual(await self.outbound.rescan(), 0)
        self.assertTrue(torn.exists())
        (warning,) = [m for m in self.log.messages(Level.WARN) if torn.name in m]
        self.assertIn(f"outbound queue: cannot read {torn.name} (", warning)
        self.assertTrue(warning.endswith("); left where it is"), warning)

    async def test_nothing_is_read_before_the_start_up_scan_or_after_stop(self) -> None:
        """Before start (the scan takes everything then) and after stop, a rescan reads
        nothing and takes nothing."""
        self.moved_in()
        threads = HeldThreads()
        queue: Any = self.outbound.queue
        real, queue._threads = queue._threads, threads
        self.assertEqual(await self.outbound.rescan(), 0)
        queue._threads = real
        await self.started()
        await self.stopped()
        self.assertFalse(self.outbound.owner)
        queue._threads = threads
        self.assertEqual(await self.outbound.rescan(), 0)
        self.assertEqual(threads.held, [])  # not read

    async def test_after_a_failed_scan_a_flush_takes_the_files_already_there(self) -> None:
        """The start-up scan failed (an I/O error): the files it missed go on a flush."""
        entry = self.moved_in()
        with mock.patch.object(
            type(self.outbound.queue), "scan", lambda q: fail(OSError(5, "I/O error"))
        ):
            await self.started()
        self.assertEqual(self.attempts, [])
        self.assertEqual(await self.outbound.rescan(), 1)
        await wait_for(lambda: self.attempts == [entry.id])

    async def test_a_stop_while_the_listing_is_read_takes_nothing(self) -> None:
        """Stopped between reading the directory and scheduling: nothing is scheduled."""
        await self.started()
        self.moved_in()
        threads = HeldThreads()
        self.outbound.queue._threads = threads
        taken: list[int] = []
        self.outbound.rescan().addCallback(taken.append)
        await self.stopped()
        threads.fire(0)
        self.assertEqual(taken, [0])
        self.assertEqual(self.outbound.scheduler.pending(), {})


def result_of_listing(outbound: Any) -> Any:
    return outbound.queue.store.listing()


async def turn() -> None:
    """Let the reactor turn once. (An await right after a Deferred fired runs inside that
    Deferred's callbacks: a stop() awaited there would return before it has run.)"""
    await deferLater(reactor, 0, lambda: None)


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    """Spin the reactor until C{condition()} holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await deferLater(reactor, 0.01, lambda: None)
