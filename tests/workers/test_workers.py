"""smtp.ini nodes, what a worker is told, and adopting a listening socket."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor

from haraka_tw.outbound.partition import Partition
from haraka_tw.workers import AdoptedEndpoint, WorkerRole, available_cpus, parse_nodes


@pytest.mark.parametrize(
    ("value", "nodes"),
    [(None, 1), ("", 1), ("  ", 1), (0, 1), ("0", 1), (1, 1), (2, 2), ("4", 4), (" 3 ", 3)],
)
def test_nodes_counts(value: object, nodes: int) -> None:
    """Absent, empty, 0 and 1 are one process; a count is that many."""
    assert parse_nodes(value) == nodes


def test_nodes_cpus() -> None:
    """'cpus' (any case) is the CPUs this process may use, or the count given."""
    assert parse_nodes("cpus", cpus=6) == 6
    assert parse_nodes("CPUs") == available_cpus()
    assert available_cpus() >= 1


@pytest.mark.parametrize("value", ["-1", "two", "1.5", "2x", True, "cpu"])
def test_bad_nodes_name_smtp_ini(value: object) -> None:
    """Anything else is an error that names smtp.ini and the value."""
    with pytest.raises(ValueError, match=r"smtp\.ini nodes: .* is not a number"):
        parse_nodes(value)


def test_worker_role_round_trips() -> None:
    """A role survives its JSON; it has a partition only when the queue is held."""
    role = WorkerRole(1, 3, ("/etc/a", "/etc/b"), ((3, "tcp:25"), (4, "tls:tcp:465")), 5)
    assert WorkerRole.from_json(role.to_json()) == role
    assert role.partition == Partition(1, 3)
    assert WorkerRole(0, 2, (), (), None).partition is None


def test_adopted_endpoint_adopts_the_socket_with_its_family() -> None:
    """listen() adopts the descriptor (the family read from the socket) as a port that
    accepts on it; the descriptor given stays open."""
    reactor = MemoryReactor()
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        factory = Factory.forProtocol(Protocol)
        d = AdoptedEndpoint(reactor, sock.fileno()).listen(factory)
        port = d.result
        assert port.getHost().port == sock.getsockname()[1]
        assert port.addressFamily == socket.AF_INET6
        assert port.factory is factory
        os.fstat(sock.fileno())  # still open
        port.socket.close()


def test_a_worker_accepts_one_connection_per_wake_up() -> None:
    """Workers share the accept queue: each wake-up takes one connection, not a burst, so a
    burst is spread over the workers instead of going to whichever woke first."""
    reactor = MemoryReactor()
    built: list[Protocol] = []

    class Counting(Factory):
        def buildProtocol(self, addr: object) -> Protocol:
            built.append(Protocol())
            return built[-1]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = AdoptedEndpoint(reactor, sock.fileno()).listen(Counting()).result
        clients = [socket.create_connection(sock.getsockname()) for _ in range(3)]
        try:
            port.doRead()
            assert len(built) == 1
            port.doRead()
            port.doRead()
            assert len(built) == 3
        finally:
            for client in clients:
                client.close()
            for accepted in built:
                accepted.transport.socket.close()  # type: ignore[union-attr]
            port.socket.close()
