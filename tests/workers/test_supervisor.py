"""WorkerSupervisor on a task.Clock with a fake launcher: start, restart with backoff,
control messages, stop with SIGTERM then SIGKILL."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from haraka_tw.logging import Level
from haraka_tw.workers.supervisor import (
    IWorkerEvents,
    IWorkerLauncher,
    WorkerSupervisor,
    describe_exit,
)
from tests.support import ListLog


@implementer(IWorkerLauncher)
class FakeLauncher:
    """Records what the supervisor asks; the test plays the workers' side."""

    def __init__(self) -> None:
        self.launched: list[int] = []
        self.signals: list[tuple[int, int]] = []
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.reachable = True
        self.events: IWorkerEvents | None = None

    def launch(self, index: int, events: IWorkerEvents) -> None:
        self.launched.append(index)
        self.events = events

    def signal(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))

    def send(self, index: int, message: dict[str, Any]) -> bool:
        if self.reachable:
            self.sent.append((index, message))
        return self.reachable


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.launcher = FakeLauncher()
        self.log = ListLog()
        self.supervisor = WorkerSupervisor(
            self.launcher,
            self.clock,
            self.log,
            2,
            stop_timeout=30,
            restart_delay=lambda n: 0.5 * 2**n,
        )

    def start_both(self) -> None:
        self.supervisor.start()
        self.supervisor.started(0, 100)
        self.supervisor.started(1, 101)

    def test_start_launches_every_worker(self) -> None:
        """start() asks for each index once; started() records the pids and logs them."""
        self.start_both()
        self.assertEqual(self.launcher.launched, [0, 1])
        self.assertEqual(self.supervisor.pids, {0: 100, 1: 101})
        self.assertIn("worker 1 started (pid 101)", self.log.messages())

    def test_a_dead_worker_is_started_again_after_a_backoff(self) -> None:
        """An exit nobody asked for is logged at ERROR with its signal, and the worker is
        launched again after the delay, not before."""
        self.start_both()
        self.clock.advance(60)
        self.supervisor.exited(1, -signal.SIGKILL)
        self.assertIn(
            "worker 1 (pid 101) was killed by signal SIGKILL; starting it again in 0.5s",
            self.log.messages(),
        )
        self.assertEqual(self.supervisor.pids, {0: 100})
        self.clock.advance(0.4)
        self.assertEqual(self.launcher.launched, [0, 1])
        self.clock.advance(0.1)
        self.assertEqual(self.launcher.launched, [0, 1, 1])
        self.supervisor.started(1, 102)
        self.assertEqual(self.supervisor.pids, {0: 100, 1: 102})

    def test_a_crash_loop_backs_off(self) -> None:
        """Each quick exit in a row doubles the delay; a run past stable_after resets it."""
        self.start_both()
        delays = []
        for pid in range(200, 204):
            self.supervisor.exited(0, 1)
            delays.append(self.supervisor.slots[0].restart.getTime() - self.clock.seconds())  # type: ignore[union-attr]
            self.clock.advance(delays[-1])
            self.supervisor.started(0, pid)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0])
        self.clock.advance(10)
        self.supervisor.exited(0, 1)
        self.assertIn(
            "worker 0 (pid 203) exited with status 1; starting it again in 0.5s",
            self.log.messages(),
        )

    def test_a_crash_loop_says_which_queue_part_waits(self) -> None:
        """After three quick exits in a row a CRIT line says the worker's part of the
        outbound queue is not being delivered; two are only ERRORs."""
        self.start_both()
        for pid in (200, 201):
            self.supervisor.exited(0, 3)
            self.clock.advance(5)
            self.supervisor.started(0, pid)
        self.assertEqual(self.log.messages(Level.CRIT), [])
        self.supervisor.exited(0, 3)
        self.assertEqual(
            self.log.messages(Level.CRIT),
            [
                "worker 0 keeps failing (3 quick exits in a row): its part 0/2 of the outbound"
                " queue is not being delivered"
            ],
        )

    def test_a_worker_that_could_not_start_is_tried_again(self) -> None:
        """exited(code=None) before started(): 'could not be started', tried again."""
        self.supervisor.start()
        self.supervisor.exited(0, None)
        self.assertIn(
            "worker 0 could not be started; starting it again in 0.5s", self.log.messages()
        )
        self.clock.advance(0.5)
        self.assertEqual(self.launcher.launched, [0, 1, 0])

    def test_control_messages_reach_every_worker(self) -> None:
        """send_all() hands the message to each running worker; a worker down gets it once
        it has started again."""
        self.start_both()
        self.supervisor.exited(1, -9)
        message = {"control": "flush", "args": {"domain": None}}
        self.supervisor.send_all(message)
        self.assertEqual(self.launcher.sent, [(0, message)])
        self.clock.advance(1)
        self.supervisor.started(1, 102)
        self.assertEqual(self.launcher.sent, [(0, message), (1, message)])

    def test_signal_all_reaches_running_workers(self) -> None:
        """signal_all() signals every running worker and says how many."""
        self.start_both()
        self.assertEqual(self.supervisor.signal_all(signal.SIGHUP), 2)
        self.assertEqual(self.launcher.signals, [(100, signal.SIGHUP), (101, signal.SIGHUP)])

    def test_stop_terms_waits_and_fires(self) -> None:
        """stop() sends SIGTERM to each worker and fires once both have exited; no exit is
        restarted while stopping."""
        self.start_both()
        d = self.supervisor.stop()
        self.assertEqual(self.launcher.signals, [(100, signal.SIGTERM), (101, signal.SIGTERM)])
        self.supervisor.exited(0, 0)
        self.assertNoResult(d)
        self.supervisor.exited(1, -signal.SIGTERM)
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(self.launcher.launched, [0, 1])
        self.assertIn(
            "worker 1 (pid 101) stopped: was killed by signal SIGTERM", self.log.messages()
        )

    def test_stop_kills_stragglers(self) -> None:
        """A worker still running stop_timeout after SIGTERM gets SIGKILL; stop() fires when
        it is reported gone, or kill_wait later at most."""
        self.start_both()
        d = self.supervisor.stop()
        self.supervisor.exited(0, 0)
        self.clock.advance(30)
        self.assertEqual(self.launcher.signals[-1], (101, signal.SIGKILL))
        self.assertIn("worker 1 (pid 101) did not stop within 30s; killing it", self.log.messages())
        self.assertNoResult(d)
        self.clock.advance(5)
        self.successResultOf(d)

    def test_stop_cancels_a_pending_restart(self) -> None:
        """A restart waiting out its backoff does not happen once stopping."""
        self.start_both()
        self.supervisor.exited(0, 1)
        d = self.supervisor.stop()
        self.supervisor.exited(1, 0)
        self.successResultOf(d)
        self.clock.advance(60)
        self.assertEqual(self.launcher.launched, [0, 1])

    def test_a_worker_starting_during_stop_is_stopped(self) -> None:
        """A worker asked for before stop() and reported started after it gets SIGTERM."""
        self.supervisor.start()
        self.supervisor.started(0, 100)
        d = self.supervisor.stop()
        self.supervisor.started(1, 101)
        self.assertIn((101, signal.SIGTERM), self.launcher.signals)
        self.supervisor.exited(0, 0)
        self.supervisor.exited(1, 0)
        self.successResultOf(d)

    def test_every_worker_failing_is_said_until_one_stays_up(self) -> None:
        """When every worker is in a crash loop, on_failing(True) (the master then answers
        421) with a CRIT line; once a worker has run stable_after seconds, on_failing(False).
        One worker failing while the other serves is not 'every worker'."""
        told: list[bool] = []
        self.supervisor.on_failing = told.append
        self.start_both()
        for index, pids in ((0, (200, 201, 202)), (1, (300, 301))):
            for pid in pids:  # quick exits, one second apart
                self.supervisor.exited(index, 3)
                self.clock.advance(1)
                self.supervisor.started(index, pid)
            self.assertEqual(told, [])  # (the other worker serves; worker 1 failed twice)
        self.supervisor.exited(1, 3)
        self.assertEqual(told, [True])
        self.assertIn(
            "every worker keeps failing: new connections are answered 421 until one stays up",
            self.log.messages(Level.CRIT),
        )
        self.supervisor.exited(0, 3)  # (worker 0, started 2 s ago, fails again)
        self.clock.advance(8)
        self.supervisor.started(0, 203)
        self.clock.advance(9.9)
        self.assertEqual(told, [True])
        self.clock.advance(0.1)  # stable_after is 10 s
        self.assertEqual(told, [True, False])
        self.assertIn("worker 0 (pid 203) stays up: workers serve again", self.log.messages())

    def test_a_worker_that_failed_then_stayed_up_is_not_failing(self) -> None:
        """A worker with three quick exits behind it that has since run for longer than
        stable_after serves: the other worker crash-looping is not 'every worker'."""
        told: list[bool] = []
        self.supervisor.on_failing = told.append
        self.start_both()
        for pid in (200, 201, 202):
            self.supervisor.exited(0, 3)
            self.clock.advance(1)
            self.supervisor.started(0, pid)
        self.clock.advance(60)  # worker 0 (pid 202) serves from now on
        for pid in (300, 301, 302):
            self.supervisor.exited(1, 3)
            self.clock.advance(1)
            self.supervisor.started(1, pid)
        self.supervisor.exited(1, 3)
        self.assertEqual(told, [])
        self.assertNotIn("every worker", " ".join(self.log.messages(Level.CRIT)))

    def test_describe_exit(self) -> None:
        """Exit statuses in words."""
        self.assertEqual(describe_exit(None), "could not be started")
        self.assertEqual(describe_exit(None, started=True), "ended (its exit status is unknown)")
        self.assertEqual(describe_exit(0), "exited with status 0")
        self.assertEqual(describe_exit(3), "exited with status 3")
        self.assertEqual(describe_exit(-signal.SIGSEGV), "was killed by signal SIGSEGV")
