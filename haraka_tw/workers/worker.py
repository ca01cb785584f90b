"""A worker process (smtp.ini nodes): the server, accepting on the master's listeners.

The fork server (L{haraka_tw.workers.forkserver}) forks it and hands it its descriptors:

    0        the control channel from the master: C{haraka-tw queue} requests, one per
             line (L{haraka_tw.workers.channels}); when it closes, the master is gone and
             the worker stops as on SIGTERM
    1, 2     the output channel to the master: every log event, as lines
    3, ...   the listening sockets, then the queue directory's lock (L{WorkerRole})

L{run} installs a reactor, sends the log to the master, builds the server from the
master's config directories with the worker's partition of the outbound queue, adopts the
listeners, runs C{init_child}, and serves until SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import connectionDone
from twisted.logger import ILogObserver, LogEvent, LogLevel, eventAsText, globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.config import ConfigDirectory, ConfigError
from haraka_tw.logging import GatheredWrites, Level, is_udp_port_noise
from haraka_tw.server import HarakaServer, StartupError
from haraka_tw.service import HarakaService
from haraka_tw.workers import GivenFactory, WorkerRole, refuse_connections
from haraka_tw.workers.channels import log_lines, read_control_line

__all__ = ["EXIT_REFUSED", "EXIT_STARTUP", "LineObserver", "MasterChannel", "run"]

#: The exit status of a worker that could not start (config, plugins, listeners).
EXIT_STARTUP = 3
#: The exit status of a worker whose init_child hook refused to start.
EXIT_REFUSED = 4


@implementer(ILogObserver)
class LineObserver:
    """Writes every log event to descriptor C{fd} as output-channel lines. Blocking: a
    master slow to read slows the worker rather than losing its log.

    Lines logged in the reactor thread while it runs are gathered and written together
    about C{delay} seconds later (L{GatheredWrites}): the master wakes once for many
    lines, where a wake-up per line (the disconnect line, once per connection) cost it
    0.085 ms of CPU per message under load. L{run} writes what is left when the reactor
    stops.
    """

    def __init__(self, fd: int, reactor: Any = None, delay: float = 0.02) -> None:
        self.fd = fd
        self._lines = GatheredWrites(self._write, reactor, delay)

    def __call__(self, event: LogEvent) -> None:
        if is_udp_port_noise(event):
            return
        text = event.get("haraka_text")  # a HarakaLog line comes formatted already
        if not isinstance(text, str) or "log_failure" in event:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        self._lines.add(log_lines(event.get("log_level", LogLevel.info), text))

    def flush(self) -> None:
        """Write the lines gathered so far."""
        self._lines.flush()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        with contextlib.suppress(OSError):  # the master is gone: the channels say so
            while view:
                view = view[os.write(self.fd, view) :]


class MasterChannel(LineOnlyReceiver):
    """The worker's end of the control channel: requests to the outbound service; its
    end means the master is gone."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, server: HarakaServer, gone: Callable[[], None]) -> None:
        self.server = server
        self.gone = gone

    def lineReceived(self, line: bytes) -> None:
        try:
            action, args = read_control_line(line)
        except ValueError as e:
            self.server.log.log(Level.WARN, f"from the master: {e}", origin="workers")
            return
        if self.server.outbound.owner:
            self.server.outbound.control(action, args)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone()


def run(role: WorkerRole) -> int:
    """Serve as worker C{role.index} until stopped; the exit status. (The fork server
    has installed this process's reactor.)"""
    from twisted.internet import reactor

    output = LineObserver(1, reactor)
    globalLogBeginner.beginLoggingTo([output], redirectStandardIO=True)
    try:
        config = ConfigDirectory(role.config_dirs)
        server = HarakaServer(config, reactor, partition=role.partition)
        specs = [spec for _, spec in role.listeners]
        service = HarakaService(server, specs, owns_process=True, worker=role)
        service.privilegedStartService()
    except (StartupError, ConfigError, ValueError) as e:
        from twisted.logger import Logger

        Logger(namespace="haraka_tw").critical("worker cannot start: {why}", why=str(e))
        return EXIT_STARTUP  # (the reactor has not run: every line went out at once)

    def stop() -> None:
        with contextlib.suppress(ReactorNotRunning):  # already stopping
            reactor.stop()

    def master_gone() -> None:
        # The master refuses new connections as it stops; killed, it cannot: do it here, or
        # connections would wait in the listeners' queue until the last worker has gone.
        try:
            refuse_connections(service.ports)
            if reactor.running:
                server.log.log(Level.NOTICE, "the master is gone: stopping", origin="workers")
        finally:
            stop()

    def own_signals() -> None:
        # Twisted's handlers stop the reactor on each of SIGINT and SIGTERM, and a second
        # stop is an error. Both can come: systemd signals the whole process group, and
        # the master then sends its own SIGTERM; Ctrl-C under twistd -n reaches every
        # process in the terminal's group. The master takes Ctrl-C and stops the workers.
        threads: Any = reactor  # (IReactorThreads)
        signal.signal(signal.SIGTERM, lambda signum, frame: threads.callFromThread(stop))
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    channel = MasterChannel(server, master_gone)
    reactor.adoptStreamConnection(0, socket.AF_UNIX, GivenFactory(channel))  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(own_signals)
    service.startService()
    reactor.run()
    output.flush()
    return EXIT_REFUSED if service.refused else 0
