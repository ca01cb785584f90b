"""Write-through TCP connections (haraka_tw.writethrough), over real loopback sockets."""

from __future__ import annotations

import select
import socket
import ssl
from typing import Any
from unittest import mock

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IOpenSSLContextFactory, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from haraka_tw import writethrough
from haraka_tw.service import HarakaService
from haraka_tw.writethrough import (
    WriteThroughPort,
    WriteThroughServer,
    dispatch_without_log_context,
    write_through_reactor,
)
from tests.smtp_peers import certs
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
    """Writes outside a poll's batch of events (see HeldWriteTests for those inside)."""

    def setUp(self) -> None:
        # Twisted's own dispatch for these, whatever an earlier test made of the reactor
        # (start_server gives it haraka_tw's, as twistd haraka does).
        own = vars(reactor)
        patched = {name: own.pop(name) for name in ("doPoll", "doIteration") if name in own}
        self.addCleanup(own.update, patched)

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
        self.addCleanup(server.stopReading)  # (before the socket closes)
        for name in (
            "connected",
            "disconnecting",
            "_aborting",
            "_writeDisconnecting",
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


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return sock.recv(1024)


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


class CountingSocket:
    """A connection's socket that keeps what each send() was given."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Answering(Protocol):
    """Answers each chunk it reads with the factory's C{answer(protocol, data)}; its
    transport's socket counts sends."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.counting = transport.socket = CountingSocket(transport.socket)
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.sent_while_answering: list[int] = []
        self.read: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.read.append(data)
        self.factory.answer(self, data)  # type: ignore[attr-defined]
        self.sent_while_answering.append(len(self.sends))

    @property
    def sends(self) -> list[bytes]:
        return self.counting.sends


class OwnLoop:
    """A private epoll reactor with haraka_tw's dispatch (as under twistd haraka), turned
    by hand, listening on loopback with a write-through port."""

    def __init__(self, case: TestCase, answer: Any) -> None:
        self.reactor: Any = EPollReactor()
        case.addCleanup(self._close)
        self.case = case
        assert dispatch_without_log_context(self.reactor)
        self.factory = Factory.forProtocol(Answering)
        self.factory.answer = answer  # type: ignore[attr-defined]
        self.factory.connections = []  # type: ignore[attr-defined]
        self.port = WriteThroughPort(0, self.factory, 50, "127.0.0.1", self.reactor)
        self.port.startListening()
        self.clients: list[socket.socket] = []

    def _close(self) -> None:
        for client in self.clients:
            client.close()
        for conn in self.factory.connections:  # type: ignore[attr-defined]
            conn.transport.abortConnection()
        self.port.stopListening()
        self.turn(0)
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def turn(self, timeout: float = 0.2) -> None:
        self.reactor.runUntilCurrent()
        self.reactor.doIteration(timeout)

    def settle(self, turns: int = 5) -> None:
        """Turn the loop C{turns} times, up to 0.05 s each, for what is under way."""
        for _ in range(turns):
            self.turn(0.05)

    def connect(self, count: int) -> list[Answering]:
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
            client.settimeout(10)
            self.clients.append(client)
        for _ in range(100):
            if len(self.factory.connections) == count:  # type: ignore[attr-defined]
                break
            self.turn()
        connections: list[Answering] = self.factory.connections  # type: ignore[attr-defined]
        self.case.assertEqual(len(connections), count)
        return connections

    def send_all(self, data: bytes) -> None:
        """Each client sends C{data}; the loop turns until every connection has read it."""
        for client in self.clients:
            client.sendall(data)
        connections: list[Answering] = self.factory.connections  # type: ignore[attr-defined]
        for _ in range(100):
            if all(c.sent_while_answering for c in connections):
                return
            self.turn()
        raise AssertionError("the server never read the clients' data")


def receive_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it ends the stream."""
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


class HeldWriteTests(TestCase):
    """Under haraka_tw's own loop, writes wait for the end of a poll's events when it
    returned more than one. (The clients send before the loop turns, so their commands
    are all in its next poll.)"""

    def test_writes_made_during_a_poll_leave_together_when_its_events_are_handed_out(
        self,
    ) -> None:
        """Three clients' commands in one poll, three writes answering each: nothing is
        sent until the poll's events are all handed out, then one send a connection."""

        def answer(protocol: Answering, data: bytes) -> None:
            for word in (b"one", b"two", b"three"):
                protocol.transport.write(word + b" " + data)  # type: ignore[union-attr]

        loop = OwnLoop(self, answer)
        connections = loop.connect(3)
        loop.send_all(b"x\r\n")
        for conn, client in zip(connections, loop.clients, strict=True):
            self.assertEqual(conn.sent_while_answering, [0])
            self.assertEqual(conn.sends, [b"one x\r\ntwo x\r\nthree x\r\n"])
            self.assertEqual(client.recv(100), b"one x\r\ntwo x\r\nthree x\r\n")

    def test_a_poll_with_one_event_sends_at_once(self) -> None:
        """One client at a time: its reply leaves in write(), while the session still has
        its bookkeeping to do, so the client works meanwhile."""

        def answer(protocol: Answering, data: bytes) -> None:
            protocol.transport.write(b"250 ok\r\n")  # type: ignore[union-attr]
            protocol.transport.write(b"250 again\r\n")  # type: ignore[union-attr]

        loop = OwnLoop(self, answer)
        (conn,) = loop.connect(1)
        loop.send_all(b"x\r\n")
        self.assertEqual(conn.sent_while_answering, [2])
        self.assertEqual(loop.clients[0].recv(100), b"250 ok\r\n250 again\r\n")

    def test_a_write_outside_a_poll_goes_out_at_once(self) -> None:
        """A write from a timer (outside the poll's events) is sent in write()."""
        loop = OwnLoop(self, lambda protocol, data: None)
        (conn,) = loop.connect(1)
        sent: list[list[bytes]] = []

        def later() -> None:
            conn.transport.write(b"250 later\r\n")  # type: ignore[union-attr]
            sent.append(list(conn.sends))

        loop.reactor.callLater(0, later)
        loop.turn(0)
        self.assertEqual(sent, [[b"250 later\r\n"]])
        self.assertEqual(loop.clients[0].recv(100), b"250 later\r\n")

    def test_held_writes_leave_before_the_connection_closes(self) -> None:
        """A reply and a close in the same poll (QUIT's 221): the reply, then the end."""

        def answer(protocol: Answering, data: bytes) -> None:
            protocol.transport.write(b"221 bye\r\n")  # type: ignore[union-attr]
            protocol.transport.loseConnection()  # type: ignore[union-attr]

        loop = OwnLoop(self, answer)
        connections = loop.connect(2)
        loop.send_all(b"QUIT\r\n")
        loop.settle(20)
        for conn, client in zip(connections, loop.clients, strict=True):
            self.assertEqual(conn.sent_while_answering, [0])
            self.assertEqual(conn.sends[0], b"221 bye\r\n")  # (Twisted's close sends b"")
            self.assertEqual(b"".join(conn.sends), b"221 bye\r\n")
            self.assertEqual(receive_until_closed(client), b"221 bye\r\n")

    def test_held_writes_leave_before_a_half_close(self) -> None:
        """A reply and a half-close in the same poll: the reply, then the end of the
        stream, while the client can still write."""

        def answer(protocol: Answering, data: bytes) -> None:
            if data == b"last\r\n":
                protocol.transport.write(b"250 that was the last\r\n")  # type: ignore[union-attr]
                protocol.transport.loseWriteConnection()  # type: ignore[union-attr]

        loop = OwnLoop(self, answer)
        connections = loop.connect(2)
        loop.send_all(b"last\r\n")
        loop.settle()
        for conn, client in zip(connections, loop.clients, strict=True):
            self.assertEqual(conn.sent_while_answering, [0])
            self.assertEqual(receive_until_closed(client), b"250 that was the last\r\n")
            client.sendall(b"more\r\n")
        loop.settle()
        for conn in connections:
            self.assertEqual(conn.read, [b"last\r\n", b"more\r\n"])  # (the read side is open)

    def test_an_abort_drops_what_is_held(self) -> None:
        """abortConnection drops held writes, as it drops Twisted's buffer."""

        def answer(protocol: Answering, data: bytes) -> None:
            protocol.transport.write(b"250 never\r\n")  # type: ignore[union-attr]
            protocol.transport.abortConnection()  # type: ignore[union-attr]

        loop = OwnLoop(self, answer)
        connections = loop.connect(2)
        loop.send_all(b"x\r\n")
        loop.settle()
        for conn, client in zip(connections, loop.clients, strict=True):
            self.assertEqual(conn.sent_while_answering, [0])
            self.assertEqual(conn.sends, [])
            with self.assertRaises(ConnectionResetError):
                client.recv(100)

    def test_held_writes_leave_in_the_clear_before_starttls(self) -> None:
        """STARTTLS's 220 and the switch in one poll: the 220 leaves in the clear, then
        the handshake completes. (What TLS writes goes through Twisted's buffer.)"""
        issued = certs()

        @implementer(IOpenSSLContextFactory)
        class ServerTLS:
            def getContext(self) -> SSL.Context:
                context = SSL.Context(SSL.TLS_SERVER_METHOD)
                context.use_certificate_chain_file(str(issued.server_cert))
                context.use_privatekey_file(str(issued.server_key))
                return context

        server_tls = ServerTLS()
        sent_before_tls: list[int] = []

        def answer(protocol: Answering, data: bytes) -> None:
            protocol.transport.write(b"220 go ahead\r\n")  # type: ignore[union-attr]
            sent_before_tls.append(len(protocol.sends))
            protocol.transport.startTLS(server_tls)  # type: ignore[union-attr]

        loop = OwnLoop(self, answer)
        conn, _ = loop.connect(2)  # (two clients: their commands come in one poll)
        loop.send_all(b"STARTTLS\r\n")
        self.assertEqual(sent_before_tls, [0, 0])  # (held)
        self.assertEqual(conn.sent_while_answering, [1])  # (sent when TLS started)
        client = loop.clients[0]
        self.assertEqual(client.recv(100), b"220 go ahead\r\n")
        self.assertEqual(conn.sends[0], b"220 go ahead\r\n")
        context = ssl.create_default_context(cafile=str(issued.ca))
        context.check_hostname = False
        client.setblocking(False)
        tls = context.wrap_socket(client, do_handshake_on_connect=False)
        loop.clients[0] = tls
        for _ in range(200):
            try:
                tls.do_handshake()
                break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                loop.turn(0.02)
        self.assertEqual(tls.version(), "TLSv1.3")
        self.assertEqual(conn.sends[1][:1], b"\x16")  # (the server's handshake: TLS records)

    def test_a_write_after_a_half_close_is_sent_before_the_end(self) -> None:
        """A write after loseWriteConnection, in a poll where the socket is also writable
        (Twisted then ends the stream): it leaves before the end, as in plain Twisted."""

        def answer(protocol: Answering, data: bytes) -> None:
            if data == b"last\r\n":
                protocol.transport.loseWriteConnection()  # type: ignore[union-attr]
            else:
                protocol.transport.write(b"250 after\r\n")  # type: ignore[union-attr]

        loop = OwnLoop(self, answer)
        loop.connect(2)
        loop.send_all(b"last\r\n")  # (each now waits to be writable, to end the stream)
        for client in loop.clients:
            client.sendall(b"more\r\n")  # (the next poll: readable and writable at once)
        loop.settle()
        for client in loop.clients:
            self.assertEqual(receive_until_closed(client), b"250 after\r\n")

    def test_a_streaming_producer_is_paused_while_its_writes_are_held(self) -> None:
        """A push producer writing until it is paused: held writes past bufferSize leave
        at once, so the socket fills and Twisted pauses the producer, as with one client."""

        @implementer(IPushProducer)
        class Pusher:
            paused = False

            def pauseProducing(self) -> None:
                self.paused = True

            def resumeProducing(self) -> None:
                self.paused = False

            def stopProducing(self) -> None:
                pass

        written: list[int] = []

        def answer(protocol: Answering, data: bytes) -> None:
            pusher = Pusher()
            transport: Any = protocol.transport
            transport.registerProducer(pusher, True)
            count = 0
            while not pusher.paused and count < 2000:
                transport.write(b"x" * 65536)
                count += 1
            written.append(count)
            transport.unregisterProducer()

        loop = OwnLoop(self, answer)
        loop.connect(2)
        loop.send_all(b"go\r\n")
        self.assertEqual(len(written), 2)
        for count in written:
            self.assertLess(count, 200)  # (8 MiB: about 60 fill the socket and the buffer)

    def test_a_handler_that_turns_the_reactor_keeps_the_order(self) -> None:
        """A handler that turns the reactor (a poll of one event inside a poll of two):
        the reply held in the outer poll still leaves before the later one."""
        turned: list[bool] = []

        def answer(protocol: Answering, data: bytes) -> None:
            first = loop.factory.connections[0]  # type: ignore[attr-defined]
            if protocol is first:
                protocol.transport.write(b"A:" + data)  # type: ignore[union-attr]
            elif not turned:
                turned.append(True)
                loop.clients[0].sendall(b"second\n")
                loop.reactor.doIteration(0.5)  # (inside: one event, the first client's)

        loop = OwnLoop(self, answer)
        loop.connect(2)
        loop.clients[0].sendall(b"first\n")
        loop.clients[1].sendall(b"x\n")
        for _ in range(10):
            loop.turn(0.05)
        self.assertEqual(turned, [True])
        self.assertEqual(loop.clients[0].recv(100), b"A:first\nA:second\n")

    def test_a_release_that_fails_leaves_the_others_for_the_next_poll(self) -> None:
        """One connection's send raising at the end of a poll: the exception goes to the
        reactor (which logs it), and the other connections' held replies leave at the end
        of the next poll, ahead of their later ones."""

        def answer(protocol: Answering, data: bytes) -> None:
            protocol.transport.write(b"R:" + data)  # type: ignore[union-attr]

        loop = OwnLoop(self, answer)
        connections = loop.connect(3)
        failing: Any = connections[1].transport

        def broken(data: bytes) -> None:
            raise RuntimeError("send failed")

        failing._send = broken
        for client in loop.clients:
            client.sendall(b"1\n")
        failures = []
        for _ in range(5):
            try:
                loop.turn(0.05)
            except RuntimeError as e:
                failures.append(e)
        self.assertEqual(len(failures), 1)
        for client in loop.clients[0], loop.clients[2]:
            client.sendall(b"2\n")
        loop.settle()
        for client in loop.clients[0], loop.clients[2]:
            self.assertEqual(client.recv(100), b"R:1\nR:2\n")
        self.assertEqual(writethrough._batch.held, [])
