"""L{WorkerMaster}: what the C{twistd haraka} process does when smtp.ini nodes is above 1.

L{HarakaService<haraka_tw.service.HarakaService>} binds the listeners as always, then hands
them to a L{WorkerMaster}:

1. C{prepare()}, while privileged: the master stops accepting on its listeners (it only
   holds them, for the workers and their replacements) and starts the fork server.
2. C{start()}, after twistd's C{-u/-g} drop and the C{init_master} hook: it takes the
   outbound queue directory's lock (C{.lock}, as a single process does; each worker gets a
   copy, so the lock stays held while any of them runs), tells the fork server whom to
   become, starts the workers, and from then on hands each one the requests
   C{haraka-tw queue} leaves in the queue directory.
3. C{reload()} (SIGHUP) sends SIGHUP to every worker: each re-reads its config and retries
   its deferred mail.
4. C{stop()}: SIGTERM to every worker, each stopping gracefully; SIGKILL for what is left
   after smtp.ini C{force_shutdown_timeout} plus L{STOP_MARGIN}; then the fork server
   ends and the queue lock is released.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall

from haraka_tw.logging import Level
from haraka_tw.smtp.catalogue import S421_UNAVAILABLE
from haraka_tw.smtp.factory import HarakaSMTPFactory
from haraka_tw.workers.launcher import ForkServerLauncher
from haraka_tw.workers.supervisor import WorkerSupervisor

__all__ = ["STOP_MARGIN", "WorkerMaster"]

#: Seconds a worker gets beyond force_shutdown_timeout to finish its deliveries and exit.
STOP_MARGIN = 15.0


class WorkerMaster:
    """The master of C{count} workers serving C{listeners} (spec and bound port each).

    @param server: the master's L{HarakaServer<haraka_tw.server.HarakaServer>}: its config
        directories, log and outbound queue directory are the workers'.
    @param on_fatal: called when workers can no longer be started (the reason is logged).
    """

    def __init__(
        self,
        server: Any,
        listeners: Sequence[tuple[str, IListeningPort]],
        count: int,
        *,
        force_shutdown_timeout: float,
        on_fatal: Callable[[], None],
    ) -> None:
        self.server = server
        self.log = server.log
        self.ports = [port for _, port in listeners]
        self.queue = server.outbound.queue
        self.launcher = ForkServerLauncher(
            server.reactor,
            self.log,
            server.config.directories,
            [(spec, port.fileno()) for spec, port in listeners],  # type: ignore[attr-defined]
            count,
            on_lost=self._lost,
        )
        self.supervisor = WorkerSupervisor(
            self.launcher,
            server.reactor,
            self.log,
            count,
            stop_timeout=force_shutdown_timeout + STOP_MARGIN,
            on_failing=self._set_refusing,
        )
        self.on_fatal = on_fatal
        self._serving: dict[IListeningPort, Any] = {}  # port -> its factory, while refusing
        self.owns_queue = False
        self._controls = LoopingCall(self._take_controls)
        self._controls.clock = server.reactor

    def prepare(self) -> None:
        """While privileged: stop accepting here (the workers do) and start the fork server."""
        for port in self.ports:
            port.stopReading()  # type: ignore[attr-defined]
        self.launcher.start()

    def start(self) -> None:
        """After the privilege drop: take the queue directory, start the workers."""
        self.owns_queue = self._lock_queue()
        if self.owns_queue:
            self.launcher.queue_lock = self.queue.store.lock_fd
        self.launcher.send_credentials()
        self.supervisor.start()
        if self.owns_queue:
            self._controls.start(1.0, now=False)

    def _lock_queue(self) -> bool:
        try:
            locked: bool = self.queue.lock()
        except OSError as e:
            self.log.log(Level.CRIT, f"outbound queue unusable: {e}; not delivering")
            return False
        if not locked:
            self.log.log(
                Level.ERROR,
                f"queue directory {self.queue.queue_dir} is held by another process:"
                " not delivering",
            )
        return locked

    def reload(self) -> int:
        """SIGHUP to every worker; how many."""
        return self.supervisor.signal_all(signal.SIGHUP)

    def stop(self) -> Deferred[None]:
        """Stop the workers, then the fork server; release the queue directory."""
        if self._controls.running:
            self._controls.stop()
        d = self.supervisor.stop()
        d.addCallback(lambda _: self.launcher.stop())

        def release(result: Any) -> Any:
            if self.owns_queue:
                self.queue.unlock()
                self.owns_queue = False
            return result

        return d.addBoth(release)

    def _set_refusing(self, refusing: bool) -> None:
        """While every worker keeps failing, the master accepts on the listeners itself and
        answers 421, so that clients go elsewhere or come back later instead of waiting,
        with no banner, for a worker that does not come; once one stays up, it stops.
        (Plain listeners only: on an implicit TLS one, a reply in the clear would only
        fail the client's handshake. Closed ones, when stopping, are left alone.)"""
        for port in self.ports:
            listening: Any = port
            if refusing and port not in self._serving:
                if not listening.connected or not isinstance(listening.factory, HarakaSMTPFactory):
                    continue
                self._serving[port] = listening.factory
                listening.factory = _Unavailable()
                listening.startReading()
            elif not refusing and port in self._serving:
                if listening.connected:
                    listening.stopReading()
                listening.factory = self._serving.pop(port)

    def _lost(self, reason: str) -> None:
        if not self.supervisor.stopping:
            self.log.log(Level.CRIT, f"workers: {reason}; no worker can be started again")
            self.on_fatal()

    def _take_controls(self) -> Deferred[None]:
        d: Deferred[Any] = self.queue.take_controls()

        def hand_out(controls: list[Any]) -> None:
            for control in controls:
                self.log.log(
                    Level.NOTICE,
                    f"queue control: {control.action} {control.args}: to every worker",
                    origin="outbound",
                )
                self.supervisor.send_all({"control": control.action, "args": control.args})

        def failed(failure: Any) -> None:  # the next check tries again
            self.log.log(Level.ERROR, f"queue controls: {failure.getErrorMessage()}")

        d.addCallbacks(hand_out, failed)
        return d


class _Unavailable(Factory):
    """Answers every connection C{421 4.3.2} and closes it (RFC 5321 4.3.2: service not
    available)."""

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Refusal()


class _Refusal(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(S421_UNAVAILABLE.to_bytes())
        self.transport.loseConnection()
