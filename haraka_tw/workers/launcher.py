"""The master's end of the fork server: starting it, starting workers through it, and the
two channels of each worker.

L{ForkServerLauncher} is the L{IWorkerLauncher} of the master. C{start()} runs the fork
server (L{haraka_tw.workers.forkserver}) while the master is still privileged;
C{send_credentials()}, after twistd's C{-u/-g} drop, tells it whom to become. For each
worker it makes two socket pairs: the control channel (the master writes
C{haraka-tw queue} requests; its end tells the worker that the master is gone) and the
output channel (the worker's log lines, which L{WorkerOutput} writes to the master's log
under C{haraka_tw.worker.<index>}). It passes the worker's ends, the listening sockets and
the queue lock to the fork server, which forks the worker and reports its pid and, later,
its exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import main
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.logging import HarakaLog, Level, emit_text
from haraka_tw.workers import GivenFactory, WorkerRole
from haraka_tw.workers.channels import control_line, read_log_line
from haraka_tw.workers.supervisor import IWorkerEvents, IWorkerLauncher

__all__ = ["ForkServerLauncher", "WorkerOutput"]

FORK_SERVER = ("-P", "-m", "haraka_tw.workers.forkserver")
#: The worker's descriptor of its first listener; the channels are 0, 1 and 2.
FIRST_LISTENER = 3


class WorkerOutput(Protocol):
    """A worker's output channel: each line to the master's log, under the worker's name
    (C{namespace}, C{haraka_tw.worker.<index>}) and at the level the worker gave it.

    @param closed: called once the channel has closed (the worker has ended).
    """

    MAX_LINE = 1 << 16

    def __init__(self, namespace: str, closed: Callable[[], None] = lambda: None) -> None:
        self.logger = Logger(namespace=namespace)
        self.closed = closed
        self._partial = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._emit(line)
        if len(self._partial) > self.MAX_LINE:
            self._emit(self._partial)
            self._partial = b""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        self.closed()

    def _emit(self, line: bytes) -> None:
        level, text = read_log_line(line)
        # As a HarakaLog line: TwistdLogObserver writes it without formatting it again
        # (Logger.emit's level check was some 60% of the master's work per relayed line).
        emit_text(self.logger, level, text, time.time())


class _ControlChannel(Protocol):
    """The master's end of a worker's control channel: written to, never read."""


class _ForkServerProcess(ProcessProtocol):
    """The fork server as a child process: what it prints goes to the log."""

    def __init__(self, launcher: ForkServerLauncher) -> None:
        self.launcher = launcher
        self.output = WorkerOutput("haraka_tw.forkserver")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output.dataReceived(data)

    def processEnded(self, reason: Failure) -> None:
        self.output.connectionLost(reason)
        self.launcher.fork_server_ended(reason)


@implementer(IWorkerLauncher, IReadDescriptor)
class ForkServerLauncher:
    """Starts workers through the fork server (see the module docstring).

    @param listeners: (spec, descriptor) of each listening socket, in order.
    @param on_lost: called with a reason if the fork server ends while not asked to.
    """

    def __init__(
        self,
        reactor: Any,
        log: HarakaLog,
        config_dirs: Sequence[str | Path],
        listeners: Sequence[tuple[str, int]],
        count: int,
        on_lost: Callable[[str], None],
    ) -> None:
        self.reactor = reactor
        self.log = log
        self.config_dirs = tuple(str(d) for d in config_dirs)
        self.listeners = list(listeners)
        self.count = count
        self.on_lost = on_lost
        #: The master's descriptor holding the queue directory's lock, once it has it.
        self.queue_lock: int | None = None
        self._channel: socket.socket | None = None
        self._events: dict[int, IWorkerEvents] = {}
        self._pids: dict[int, int] = {}  # pid -> index
        self._controls: dict[int, _ControlChannel] = {}
        self._ended: Deferred[None] = Deferred()
        self._running = False
        self._stopping = False

    def say(self, level: Level, message: str) -> None:
        self.log.log(level, message, origin="workers")

    # -- the fork server ---------------------------------------------------------------

    def start(self) -> None:
        """Run the fork server (while privileged: it imports what the workers need)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.reactor.spawnProcess(
                _ForkServerProcess(self),
                sys.executable,
                [sys.executable, *FORK_SERVER],
                env=dict(os.environ),
                childFDs={0: theirs.fileno(), 1: "r", 2: "r"},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._channel = ours
        self._running = True
        self.reactor.addReader(self)

    def send_credentials(self) -> None:
        """Tell the fork server to become this process's user, group and groups (after
        twistd's drop), once it has imported the standard library modules loaded here."""
        modules = sorted(
            name
            for name in sys.modules
            if name.partition(".")[0] in sys.stdlib_module_names and "__" not in name
        )
        self._send(
            {
                "op": "credentials",
                # Effective ids: under twistd --euid the real uid stays 0, and a worker must
                # not be more privileged than the master serves as.
                "uid": os.geteuid(),
                "gid": os.getegid(),
                "groups": os.getgroups(),
                "modules": modules,
            }
        )

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self._channel is None:
            raise OSError("the fork server is not running")
        socket.send_fds(self._channel, [json.dumps(message).encode()], list(fds))

    def stop(self) -> Deferred[None]:
        """Close the fork server's channel (it exits) and fire once it has ended."""
        self._stopping = True
        for channel in self._controls.values():
            if channel.transport is not None:
                channel.transport.loseConnection()
        self._controls.clear()
        self._close_channel()
        if not self._running:
            return succeed(None)
        return self._ended

    def _close_channel(self) -> None:
        if self._channel is not None:
            self.reactor.removeReader(self)
            self._channel.close()
            self._channel = None

    def fork_server_ended(self, reason: Failure) -> None:
        """No exit will be reported from now on: a worker not yet started never will be;
        one running is taken as ended when its output channel closes."""
        self._running = False
        self._close_channel()
        started = set(self._pids.values())
        for index in [i for i in self._events if i not in started]:
            self._forget(index).exited(index, None)
        if not self._stopping:
            self.on_lost(f"the fork server ended: {reason.getErrorMessage()}")
        if not self._ended.called:
            self._ended.callback(None)

    def _output_closed(self, index: int) -> None:
        if self._running or index not in self._events:
            return  # the fork server reports the exit, with its status
        self._pids = {pid: i for pid, i in self._pids.items() if i != index}
        self._forget(index).exited(index, None)

    # -- IReadDescriptor: the fork server's reports ---------------------------------------

    def fileno(self) -> int:
        return self._channel.fileno() if self._channel is not None else -1

    def logPrefix(self) -> str:
        return "fork server"

    def doRead(self) -> Any:
        while self._channel is not None:
            try:
                data = self._channel.recv(1 << 16)
            except BlockingIOError:
                return None
            except OSError:
                return main.CONNECTION_LOST
            if not data:
                return main.CONNECTION_DONE
            try:
                self._report(json.loads(data))
            except (ValueError, KeyError, TypeError) as e:
                self.say(Level.ERROR, f"fork server: unreadable report {data[:200]!r}: {e}")
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._close_channel()  # the process's end (processEnded) says what happened

    def _report(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "spawned":
            index, pid = int(message["index"]), int(message["pid"])
            self._pids[pid] = index
            self._events[index].started(index, pid)
        elif op == "exited":
            found = self._pids.pop(int(message["pid"]), None)
            if found is not None:
                self._forget(found).exited(found, int(message["code"]))
        elif op == "error":
            self.say(Level.ERROR, f"fork server: {message.get('message')}")
            if message.get("index") is not None:
                index = int(message["index"])
                self._forget(index).exited(index, None)

    def _forget(self, index: int) -> IWorkerEvents:
        channel = self._controls.pop(index, None)
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()
        return self._events.pop(index)

    # -- IWorkerLauncher ----------------------------------------------------------------

    def launch(self, index: int, events: IWorkerEvents) -> None:
        control, control_theirs = socket.socketpair()
        output, output_theirs = socket.socketpair()
        listeners = tuple((FIRST_LISTENER + i, spec) for i, (spec, _) in enumerate(self.listeners))
        fds = [control_theirs.fileno(), output_theirs.fileno(), *(fd for _, fd in self.listeners)]
        lock = None
        if self.queue_lock is not None:
            lock = FIRST_LISTENER + len(self.listeners)
            fds.append(self.queue_lock)
        role = WorkerRole(index, self.count, self.config_dirs, listeners, lock)
        try:
            self._send({"op": "spawn", "index": index, "role": role.to_json()}, fds)
        except OSError as e:
            control.close()
            output.close()
            self.say(Level.ERROR, f"worker {index}: cannot ask the fork server: {e}")
            self.reactor.callLater(0, events.exited, index, None)
            return
        finally:
            control_theirs.close()
            output_theirs.close()
        self._events[index] = events
        channel = _ControlChannel()
        self.reactor.adoptStreamConnection(control.fileno(), socket.AF_UNIX, GivenFactory(channel))
        control.close()
        self._controls[index] = channel
        lines = WorkerOutput(f"haraka_tw.worker.{index}", lambda: self._output_closed(index))
        self.reactor.adoptStreamConnection(output.fileno(), socket.AF_UNIX, GivenFactory(lines))
        output.close()

    def signal(self, pid: int, signum: int) -> None:
        try:
            self._send({"op": "signal", "pid": pid, "signal": int(signum)})
        except OSError:  # no fork server (it died): signal directly
            with contextlib.suppress(OSError):
                os.kill(pid, signum)

    def send(self, index: int, message: dict[str, Any]) -> bool:
        channel = self._controls.get(index)
        if channel is None or channel.transport is None or not channel.connected:
            return False
        channel.transport.write(control_line(message["control"], message.get("args") or {}))
        return True
