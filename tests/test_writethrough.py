"""Write-through TCP connections (haraka_tw.writethrough), over real loopback sockets."""

from __future__ import annotations

import select
import socket
from typing import Any
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionClosed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from haraka_tw.service import HarakaService
from haraka_tw.writethrough import (
    WriteThroughPort,
    WriteThroughServer,
    dispatch_without_log_context,
    write_through_reactor,
)
from tests.support import temp_dir, write_config


class Writer(Protocol):
    """Writes the factory's chunks on connect, noting whether the transport had to ask the
    reactor to watch the socket for each."""

    def connectionMade(self) -> None:
        factory: Any = self.factory
        factory.transport = self.transport
        for chunk in factory.chunks:
            self.transport.write(chunk)
            factory.watched.append(self.transport in reactor.getWriters())
        if factory.close:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        factory: Any = self.factory
        if not factory.lost.called:
            factory.lost.callback(reason.value)


def writer_factory(chunks: list[bytes], close: bool = True) -> Factory:
    factory = Factory.forProtocol(Writer)
    factory.chunks = chunks  # type: ignore[attr-defined]
    factory.close = close  # type: ignore[attr-defined]
    factory.watched = []  # type: ignore[attr-defined]
    factory.lost = Deferred()  # type: ignore[attr-defined]
    return factory


def read_all(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        parts = []
        while chunk := sock.recv(1 << 20):
            parts.append(chunk)
        return b"".join(parts)


class WriteThroughTests(TestCase):
    def listen(self, factory: Factory) -> int:
        port = write_through_reactor(reactor).listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, WriteThroughPort)
        return int(port.getHost().port)

    @inlineCallbacks
    def test_a_short_write_goes_out_at_once(self) -> Any:
        """A reply the socket can take is sent in write(): the reactor is not asked to
        watch for writability (which costs two epoll_ctl calls and a turn)."""
        factory = writer_factory([b"220 hello\r\n", b"250 ok\r\n"])
        received = yield deferToThread(read_all, self.listen(factory))
        self.assertEqual(received, b"220 hello\r\n250 ok\r\n")
        self.assertEqual(factory.watched, [False, False])  # type: ignore[attr-defined]
        self.assertIsInstance(factory.transport, WriteThroughServer)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_what_the_socket_cannot_take_waits_and_later_writes_queue_behind_it(self) -> Any:
        """A write larger than the socket buffer is sent in part; Twisted sends the rest,
        and the small writes after it wait their turn: the stream arrives whole, in order."""
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB, far beyond the socket buffers
        chunks = [b"first\r\n", big, b"after-1\r\n", b"after-2\r\n"]
        factory = writer_factory(chunks)
        received = yield deferToThread(read_all, self.listen(factory))
        self.assertEqual(len(received), sum(map(len, chunks)))
        self.assertEqual(received, b"".join(chunks))
        watched = factory.watched  # type: ignore[attr-defined]
        self.assertEqual(watched[0], False)
        self.assertEqual(watched[1:], [True, True, True])

    @inlineCallbacks
    def test_a_write_to_a_reset_peer_ends_the_connection_quietly(self) -> Any:
        """A peer that reset the connection: the write raises nothing, and the connection
        is reported lost (Twisted's own send finds the error)."""
        factory = writer_factory([], close=False)
        port = self.listen(factory)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        while getattr(factory, "transport", None) is None:
            yield deferToThread(lambda: None)
        sock.close()  # linger 0: an RST
        transport = factory.transport  # type: ignore[attr-defined]
        for _ in range(50):
            transport.write(b"250 ok\r\n" * 100)
            if factory.lost.called:  # type: ignore[attr-defined]
                break
            yield deferToThread(lambda: None)
        why = yield factory.lost  # type: ignore[attr-defined]
        self.assertIsInstance(why, ConnectionClosed)

    @inlineCallbacks
    def test_the_service_listens_with_write_through_ports(self) -> Any:
        """HarakaService's tcp: listeners (smtp.ini listen) make write-through connections."""
        base = temp_dir(self)
        config = write_config(
            base / "config",
            {"maildir.ini": f"[main]\npath={base / 'maildir'}\n", "me": "mx.test\n"},
        )
        service = HarakaService.from_directory(config, ["tcp:0:interface=127.0.0.1"])
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(service.ports), 1)
        self.assertIsInstance(service.ports[0], WriteThroughPort)
        port = service.ports[0].getHost().port
        banner = yield deferToThread(_banner, port)
        self.assertTrue(banner.startswith(b"220 mx.test"), banner)


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return sock.recv(1024)

    @inlineCallbacks
    def test_endpoints_other_than_tcp_are_twisteds(self) -> Any:
        """Only listenTCP is replaced: a unix endpoint made with the wrapped reactor
        listens with Twisted's own port."""
        wrapped = write_through_reactor(reactor)
        assert wrapped.callLater == reactor.callLater
        path = temp_dir(self) / "s.sock"
        port = yield serverFromString(wrapped, f"unix:{path}").listen(writer_factory([]))
        self.addCleanup(port.stopListening)
        self.assertNotIsInstance(port, WriteThroughPort)
        self.assertTrue(path.exists())

    def test_the_twisted_attributes_it_reads_are_there(self) -> None:
        """WriteThroughServer.write reads Twisted's buffer and state attributes: a Twisted
        that renamed one must fail here, not misorder a stream."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        server = WriteThroughServer(sock, Protocol(), ("127.0.0.1", 1), None, 1, reactor)
        for name in (
            "connected",
            "disconnecting",
            "_aborting",
            "_writeDisconnected",
            "TLS",
            "_tempDataLen",
            "offset",
            "dataBuffer",
            "producer",
            "streamingProducer",
        ):
            self.assertTrue(hasattr(server, name), name)
        self.assertEqual((server._tempDataLen, server.offset, server.dataBuffer), (0, 0, b""))


def test_other_reactors_are_left_alone() -> None:
    """A reactor that is not a real one (a MemoryReactor in a test) is not wrapped."""
    memory = MemoryReactor()
    assert write_through_reactor(memory) is memory
    serverFromString(write_through_reactor(memory), "tcp:25").listen(Factory())
    assert len(memory.tcpServers) == 1


class _Other:
    """A selectable that is not ours, with the log prefix Twisted dispatches it under."""

    def logPrefix(self) -> str:
        return "other-prefix"


def test_events_of_our_connections_skip_the_log_context() -> None:
    """Events of our connections and ports skip callWithLogger; others keep their prefix."""
    epoll: Any = EPollReactor.__new__(EPollReactor)  # (no epoll fd: a poller stands in)
    seen: list[tuple[str, str]] = []

    def dispatch(selectable: Any, fd: int, event: int) -> None:
        seen.append((type(selectable).__name__, context.get(log.ILogContext)["system"]))

    ready = [(fd, select.EPOLLIN) for fd in (101, 102, 103, 104)]  # (104: already gone)
    epoll._doReadOrWrite = dispatch
    epoll._poller = type("Poller", (), {"poll": staticmethod(lambda *_: ready)})()
    epoll._selectables = {
        101: WriteThroughServer.__new__(WriteThroughServer),
        102: _Other(),
        103: WriteThroughPort.__new__(WriteThroughPort),
    }
    assert dispatch_without_log_context(epoll)
    epoll.doIteration(0)
    assert seen == [
        ("WriteThroughServer", "-"),
        ("_Other", "other-prefix"),
        ("WriteThroughPort", "-"),
    ]


def test_dispatch_left_alone_when_twisted_changes_do_poll() -> None:
    """A Twisted whose doPoll no longer reads what the copy reads keeps its own dispatch."""
    epoll: Any = EPollReactor.__new__(EPollReactor)
    with mock.patch.object(EPollReactor, "doPoll", lambda self, timeout: None):
        assert not dispatch_without_log_context(epoll)
    assert "doPoll" not in vars(epoll)


def test_dispatch_left_alone_on_other_reactors() -> None:
    """A reactor that is not exactly the epoll reactor keeps its own dispatch."""
    memory = MemoryReactor()
    assert not dispatch_without_log_context(memory)
    assert not hasattr(memory, "doPoll")


def test_the_epoll_attributes_it_reads_are_there() -> None:
    """The epoll attributes the lean dispatch reads exist (a rename must fail here)."""
    epoll: Any = EPollReactor()
    try:
        for name in ("_poller", "_selectables", "_doReadOrWrite", "doPoll", "doIteration"):
            assert hasattr(epoll, name), name
        assert EPollReactor.doIteration is EPollReactor.doPoll
    finally:
        epoll.waker.connectionLost(None)
        epoll._poller.close()
