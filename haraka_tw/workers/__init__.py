"""Worker processes (smtp.ini C{nodes=N|cpus}): a master and N workers sharing the listeners.

With nodes above 1, the C{twistd haraka} process is the I{master}. It binds the listeners as
a single process does (before twistd's C{-u/-g} drop) but never accepts on them; it starts
the I{fork server}, and after the drop it has it fork the workers, supervises them
(a worker that dies is forked again after a backoff), forwards SIGHUP, stops them on
SIGTERM, holds the outbound queue directory and hands each worker the requests of
C{haraka-tw queue}. Each I{worker} builds the same server from the same config directories,
accepts on the master's listening sockets (the kernel hands each connection to one of
them) and delivers its partition of the outbound queue.

The rooms:

- C{forkserver.py}: the fork server process (no reactor): imports the worker's code as the
  privileged user, drops to the master's, and forks a worker when asked;
- C{launcher.py}: the master's end of it: starting it, a worker's channels, its log lines;
- C{supervisor.py}: L{WorkerSupervisor<haraka_tw.workers.supervisor.WorkerSupervisor>}:
  start, restart with backoff, stop, over an injected launcher and clock;
- C{master.py}: what L{HarakaService<haraka_tw.service.HarakaService>} runs as the master;
- C{worker.py}: the worker process's main.

This module holds what the service and those rooms share: L{parse_nodes},
L{WorkerRole} (what a worker is told) and L{AdoptedEndpoint}.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.outbound.partition import Partition
from haraka_tw.writethrough import WriteThroughPort

__all__ = ["AdoptedEndpoint", "GivenFactory", "WorkerRole", "available_cpus", "parse_nodes"]


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_nodes(value: Any, cpus: int | None = None) -> int:
    """smtp.ini C{nodes} as a number of processes: a count, or C{cpus} (the CPUs this
    process may use, else C{cpus}). Absent, empty, 0 and 1 all mean a single process (1).

    @raise ValueError: for anything else, naming smtp.ini.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1
    text = str(value).strip().lower()
    if text == "cpus":
        return cpus if cpus is not None else available_cpus()
    if isinstance(value, bool) or not text.isdigit():
        raise ValueError(f"smtp.ini nodes: {value!r} is not a number of worker processes or 'cpus'")
    return max(1, int(text))


@dataclass(frozen=True)
class WorkerRole:
    """What the master tells worker C{index} of C{count}.

    @ivar config_dirs: the config directories, lowest precedence first (the master's).
    @ivar listeners: (descriptor in the worker, the listener as smtp.ini or --listen gave
        it) for each socket the master bound, in the master's order.
    @ivar queue_lock: the worker's descriptor of the master's lock on the outbound queue
        directory, or None when the master could not take it (then nobody delivers).
    """

    index: int
    count: int
    config_dirs: tuple[str, ...]
    listeners: tuple[tuple[int, str], ...]
    queue_lock: int | None = None

    @property
    def partition(self) -> Partition | None:
        """The part of the outbound queue this worker delivers, if the queue is held."""
        return Partition(self.index, self.count) if self.queue_lock is not None else None

    def to_json(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "count": self.count,
                "config_dirs": list(self.config_dirs),
                "listeners": [list(pair) for pair in self.listeners],
                "queue_lock": self.queue_lock,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerRole:
        data = json.loads(text)
        return cls(
            index=int(data["index"]),
            count=int(data["count"]),
            config_dirs=tuple(str(d) for d in data["config_dirs"]),
            listeners=tuple((int(fd), str(spec)) for fd, spec in data["listeners"]),
            queue_lock=None if data.get("queue_lock") is None else int(data["queue_lock"]),
        )


class GivenFactory(Factory):
    """Builds the one protocol it was given: for adopting a connected socket (a channel
    between the master and a worker) with a protocol made beforehand."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.protocol_instance


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """A socket that is already listening (a worker's, bound by the master): listening on
    it adopts it (C{IReactorSocket.adoptStreamPort}); the descriptor given stays open."""

    def __init__(self, reactor: Any, descriptor: int) -> None:
        self.reactor = reactor
        self.descriptor = descriptor

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def adopt() -> IListeningPort:
            probe = socket.socket(fileno=os.dup(self.descriptor))  # learns the family
            family = probe.family
            probe.close()
            if family == socket.AF_UNIX:  # as adoptStreamPort does, with our Port
                shared: Any = _SharedUNIXPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
                    self.reactor, self.descriptor, protocolFactory
                )
                shared._preexistingSocket = _ListenerSocket.taking(shared._preexistingSocket)
                shared.startListening()
                port: IListeningPort = shared
                return port
            tcp_port: Any = _SharedTCPPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
                self.reactor, self.descriptor, family, protocolFactory
            )
            tcp_port._preexistingSocket = _ListenerSocket.taking(tcp_port._preexistingSocket)
            tcp_port.startListening()
            adopted: IListeningPort = tcp_port
            return adopted

        return execute(adopt)


class _ListenerSocket(socket.socket):
    """A listening socket shared with the master and the other workers. Once it is shut
    down (the master does so as it stops, L{refuse_connections} when the master is gone)
    C{accept} fails with EINVAL; here that is "nothing to accept", and remembered, so that
    the port stops reading instead of logging an error."""

    shut_down = False

    @classmethod
    def taking(cls, plain: socket.socket) -> _ListenerSocket:
        """The same socket (the descriptor taken over from C{plain}) as this class."""
        return cls(plain.family, plain.type, plain.proto, fileno=plain.detach())

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return super().accept()
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.shut_down = True
            raise BlockingIOError(errno.EAGAIN, "the listening socket was shut down") from None


class _SharedListener:
    """What a worker's copy of a shared listener does beyond Twisted's port: it stops
    reading once the socket has been shut down."""

    socket: Any

    def doRead(self) -> None:
        super().doRead()  # type: ignore[misc]
        # (no socket: the port has been closed meanwhile)
        if getattr(getattr(self, "socket", None), "shut_down", False):
            self.stopReading()  # type: ignore[attr-defined]

    def refuse_connections(self) -> None:
        """Shut the listening socket down, for every process that shares it: connections
        waiting to be accepted and new ones are refused (what the master does as it stops).
        A port already closed has nothing to shut."""
        listening = getattr(self, "socket", None)
        if listening is not None:
            with contextlib.suppress(OSError):
                listening.shutdown(socket.SHUT_RDWR)


def refuse_connections(ports: Iterable[object]) -> None:
    """L{_SharedListener.refuse_connections} for each of C{ports} that is one."""
    for port in ports:
        if isinstance(port, _SharedListener):
            port.refuse_connections()


class _SharedTCPPort(_SharedListener, WriteThroughPort):
    """A worker's copy of a listening TCP socket that every worker accepts on. Each wake-up
    accepts one connection: Twisted's port takes up to a hundred at once, so the worker that
    woke first took most of a burst while its siblings idled (measured: 70/30 between two
    workers, and less than 1.3 times one process's rate)."""

    def doRead(self) -> None:
        self.numberAccepts = 1
        super().doRead()


class _SharedUNIXPort(_SharedListener, unix.Port):
    """A worker's copy of the master's unix socket. Closing it must leave the socket's
    path alone: the master made it, the other workers still accept on it, and the master
    removes it when it stops."""

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)
