"""A stand-in for a content scanner (spamd, clamd) on loopback: it reads a request until
C{complete(request)} says it has all of it, keeps it, answers with C{answer} (or never,
for None) and closes: for the answers a real scanner does not give at will."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol


class _StandIn(Protocol):
    factory: StandIn

    def connectionMade(self) -> None:
        self.buffer = b""
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.factory.complete(self.buffer):
            return
        self.factory.requests.append(self.buffer)
        if self.factory.answer is None:
            return  # never answers
        assert self.transport is not None
        self.transport.write(self.factory.answer)
        self.transport.loseConnection()


class StandIn(Factory):
    protocol = _StandIn

    def __init__(self, answer: bytes | None, complete: Callable[[bytes], bool]) -> None:
        self.answer = answer
        self.complete = complete
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0


def stand_in(
    case: Any, answer: bytes | None, complete: Callable[[bytes], bool], unix: str = ""
) -> StandIn:
    """A stand-in listening on 127.0.0.1 (its C{port}), or on the Unix socket C{unix},
    until the test C{case} ends."""
    factory = StandIn(answer, complete)
    if unix:
        port = reactor.listenUNIX(unix, factory)  # type: ignore[attr-defined]
    else:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        factory.port = port.getHost().port
    case.addCleanup(port.stopListening)
    return factory
