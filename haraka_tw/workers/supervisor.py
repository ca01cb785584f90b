"""L{WorkerSupervisor}: keeps N workers running, and stops them.

It decides, and an L{IWorkerLauncher} does: the supervisor asks for worker I{i}, hears that
it runs (its pid) or that it ended (its status), and asks again after a backoff when the
end was not asked for. Stopping sends each worker SIGTERM (each stops gracefully: its
listeners closed, its sessions given smtp.ini C{force_shutdown_timeout}, its deliveries
finished), waits, and kills what is left after C{stop_timeout}. Time comes from the
injected clock, so all of it is tested on a C{task.Clock}.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Interface, implementer

from haraka_tw.logging import HarakaLog, Level

__all__ = ["IWorkerEvents", "IWorkerLauncher", "WorkerSupervisor", "describe_exit"]

CRASH_LOOP = 3  # quick exits in a row after which a worker's undelivered queue part is CRIT


class IWorkerEvents(Interface):
    """What a launcher reports about the workers it started."""

    def started(index: int, pid: int) -> None:
        """Worker C{index} runs, as process C{pid}."""

    def exited(index: int, code: int | None) -> None:
        """Worker C{index} ended: its exit status, -N if signal N killed it, or None if it
        could not be started at all."""


class IWorkerLauncher(Interface):
    """Starts worker processes and reaches them."""

    def launch(index: int, events: IWorkerEvents) -> None:
        """Start worker C{index}; report to C{events} (L{IWorkerEvents.started} once it
        runs, L{IWorkerEvents.exited} when it ends or could not start)."""

    def signal(pid: int, signum: int) -> None:
        """Send signal C{signum} to a worker process the launcher started."""

    def send(index: int, message: dict[str, Any]) -> bool:
        """Hand running worker C{index} a control message (C{{"control": ..., "args":
        ...}}); False if it has no channel now."""


def describe_exit(code: int | None, started: bool = False) -> str:
    """An exit status in words, for the log (None: unknown for a worker that had
    C{started}, whose fork server is gone; else it could not be started)."""
    if code is None:
        return "ended (its exit status is unknown)" if started else "could not be started"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by signal {name}"
    return f"exited with status {code}"


def _jitter() -> float:
    return random.random() * 0.25


@dataclass
class _Slot:
    """One worker index: the process filling it, if any, and its restart history."""

    index: int
    pid: int | None = None
    launching: bool = False
    started_at: float = 0.0
    quick_exits: int = 0
    restart: IDelayedCall | None = None
    outbox: list[dict[str, Any]] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return self.pid is not None or self.launching


@implementer(IWorkerEvents)
class WorkerSupervisor:
    """N worker processes, started, restarted and stopped.

    @param restart_delay: seconds to wait before starting again a worker that ended after
        C{n} quick exits in a row (a run shorter than C{stable_after}); by default 0.5 s
        doubling up to 30 s, so a crash loop does not spin.
    @param stop_timeout: seconds between SIGTERM and SIGKILL when stopping.
    @param kill_wait: seconds to wait for the killed ones to be reported gone.
    """

    def __init__(
        self,
        launcher: IWorkerLauncher,
        clock: IReactorTime,
        log: HarakaLog,
        count: int,
        *,
        stop_timeout: float,
        restart_delay: Callable[[int], float] | None = None,
        stable_after: float = 10.0,
        kill_wait: float = 5.0,
        on_failing: Callable[[bool], None] | None = None,
    ) -> None:
        self.launcher = launcher
        self.on_failing = on_failing
        self.failing = False  # every worker in a crash loop
        self.clock = clock
        self.log = log
        self.slots = [_Slot(i) for i in range(count)]
        self.stop_timeout = stop_timeout
        self.restart_delay = restart_delay or backoffPolicy(0.5, 30.0, 2.0, _jitter)
        self.stable_after = stable_after
        self.kill_wait = kill_wait
        self.stopping = False
        self._stopped: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None

    def _say(self, level: Level, message: str) -> None:
        self.log.log(level, message, origin="workers")

    @property
    def pids(self) -> dict[int, int]:
        """Worker index -> pid, for the workers running now."""
        return {s.index: s.pid for s in self.slots if s.pid is not None}

    def start(self) -> None:
        """Start every worker."""
        for slot in self.slots:
            self._launch(slot)

    def _launch(self, slot: _Slot) -> None:
        slot.restart = None
        slot.launching = True
        self.launcher.launch(slot.index, self)

    # -- what the launcher reports ---------------------------------------------------------

    def started(self, index: int, pid: int) -> None:
        slot = self.slots[index]
        slot.launching, slot.pid, slot.started_at = False, pid, self.clock.seconds()
        self._say(Level.NOTICE, f"worker {index} started (pid {pid})")
        if self.stopping:  # asked for before the stop: stop it too
            self.launcher.signal(pid, signal.SIGTERM)
            return
        waiting, slot.outbox = slot.outbox, []
        for message in waiting:
            self._send(slot, message)
        if self.failing:
            self.clock.callLater(self.stable_after, self._stayed_up, slot, pid)

    def _crash_looping(self, slot: _Slot) -> bool:
        """Whether C{slot}'s worker keeps failing: quick exits in a row, and not running
        now for longer than C{stable_after} (a count is only reset at the next exit)."""
        if slot.quick_exits < CRASH_LOOP:
            return False
        return slot.pid is None or self.clock.seconds() - slot.started_at < self.stable_after

    def _stayed_up(self, slot: _Slot, pid: int) -> None:
        """While every worker was failing: C{pid} has run C{stable_after} seconds."""
        if slot.pid != pid or not self.failing or self.stopping:
            return
        slot.quick_exits = 0
        self._set_failing(False)
        self._say(Level.NOTICE, f"worker {slot.index} (pid {pid}) stays up: workers serve again")

    def _set_failing(self, failing: bool) -> None:
        self.failing = failing
        if self.on_failing is not None:
            self.on_failing(failing)

    def exited(self, index: int, code: int | None) -> None:
        slot = self.slots[index]
        pid, slot.pid, slot.launching = slot.pid, None, False
        who = f"worker {index}" + (f" (pid {pid})" if pid is not None else "")
        if self.stopping:
            self._say(Level.NOTICE, f"{who} stopped: {describe_exit(code, pid is not None)}")
            if not any(s.busy for s in self.slots):
                self._finish()
            return
        ran = self.clock.seconds() - slot.started_at if pid is not None else 0.0
        slot.quick_exits = 0 if ran >= self.stable_after else slot.quick_exits + 1
        delay = self.restart_delay(max(0, slot.quick_exits - 1))
        ended = describe_exit(code, pid is not None)
        self._say(Level.ERROR, f"{who} {ended}; starting it again in {delay:.1f}s")
        if slot.quick_exits >= CRASH_LOOP:
            # Mail is still accepted by the other workers, but this worker's part of the
            # outbound queue waits: say so loudly, not only "starting it again".
            self._say(
                Level.CRIT,
                f"worker {index} keeps failing ({slot.quick_exits} quick exits in a row): its"
                f" part {index}/{len(self.slots)} of the outbound queue is not being delivered",
            )
        slot.restart = self.clock.callLater(delay, self._launch, slot)
        if not self.failing and all(self._crash_looping(s) for s in self.slots):
            self._say(
                Level.CRIT,
                "every worker keeps failing: new connections are answered 421 until one stays up",
            )
            self._set_failing(True)
            now = self.clock.seconds()
            for other in self.slots:  # (one restarted just now may be staying up)
                if other.pid is not None:
                    wait = max(0.0, self.stable_after - (now - other.started_at))
                    self.clock.callLater(wait, self._stayed_up, other, other.pid)

    # -- reaching the workers --------------------------------------------------------------

    def signal_all(self, signum: int) -> int:
        """Send C{signum} to every running worker; how many."""
        running = [s for s in self.slots if s.pid is not None]
        for slot in running:
            assert slot.pid is not None
            self.launcher.signal(slot.pid, signum)
        return len(running)

    def send_all(self, message: dict[str, Any]) -> None:
        """Hand every worker a control message; one not running now gets it when it next
        starts (a request must reach every partition of the queue)."""
        for slot in self.slots:
            self._send(slot, message)

    def _send(self, slot: _Slot, message: dict[str, Any]) -> None:
        if slot.pid is None or not self.launcher.send(slot.index, message):
            slot.outbox.append(message)

    # -- stopping ----------------------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """SIGTERM every worker; fires once all have ended (killed after stop_timeout)."""
        if self._stopped is not None:
            return self._stopped if not self._stopped.called else succeed(None)
        self.stopping = True
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        self._stopped = Deferred()
        if not any(s.busy for s in self.slots):
            self._stopped.callback(None)
            return self._stopped
        self.signal_all(signal.SIGTERM)
        self._timer = self.clock.callLater(self.stop_timeout, self._kill)
        return self._stopped

    def _kill(self) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                self._say(
                    Level.WARN,
                    f"worker {slot.index} (pid {slot.pid}) did not stop within"
                    f" {self.stop_timeout:g}s; killing it",
                )
                self.launcher.signal(slot.pid, signal.SIGKILL)
        self._timer = self.clock.callLater(self.kill_wait, self._finish)

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)
