"""haraka_tw.exchange over real loopback sockets: one request, one answer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.exchange import Address, ServiceError, ServiceTimeout, chained, exchange
from haraka_tw.exchange import parse_address as parse
from tests.standin import stand_in
from tests.support import free_port


def ends_with_dot(request: bytes) -> bool:
    return request.endswith(b".")


class AddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Host, host:port, [v6]:port, v6:port and a bare v6 address (Haraka's reading), a
        port alone, a Unix path (a file mode after it dropped)."""
        self.assertEqual(parse("spam.example", 783), Address("spam.example", 783))
        self.assertEqual(parse("10.0.0.1:7830", 783), Address("10.0.0.1", 7830))
        self.assertEqual(parse("[::1]:7830", 783), Address("::1", 7830))
        self.assertEqual(parse("::1:783", 1), Address("::1", 783))
        self.assertEqual(parse("2001:db8::5", 783), Address("2001:db8::5", 783))
        self.assertEqual(parse("7830", 783), Address("localhost", 7830))
        self.assertEqual(parse("/run/spamd.sock:660", 783), Address(path="/run/spamd.sock"))
        self.assertEqual(str(parse("[::1]:7830", 783)), "[::1]:7830")
        for bad in ("", "host:port", "host:70000", "a b", "1:2:3:zz"):
            self.assertRaises(ValueError, parse, bad, 783)


class ExchangeTests(TestCase):
    def address(self, answer: bytes | None) -> tuple[Address, object]:
        fake = stand_in(self, answer, ends_with_dot)
        return Address("127.0.0.1", fake.port), fake

    @inlineCallbacks
    def test_request_in_pieces_answer_at_close(self) -> Deferred[None]:
        """The pieces go in order (empty ones skipped: they would stall a pull producer);
        the answer is what the peer wrote before closing."""
        address, fake = self.address(b"fine")
        answer = yield exchange(
            reactor,
            address,
            [b"one ", b"", b"two", b"", b"."],
            name="x",
            limit=10,
            timeout=5,
            connect_timeout=5,
        )
        self.assertEqual(answer, b"fine")
        self.assertEqual(fake.requests, [b"one two."])  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_limits(self) -> Deferred[None]:
        """An answer over the limit, no answer in time, nobody listening: each a
        ServiceError saying which."""
        address, _ = self.address(b"x" * 20)
        d = exchange(reactor, address, [b"."], name="x", limit=10, timeout=5, connect_timeout=5)
        error = yield self.assertFailure(d, ServiceError)
        self.assertIn("longer than 10 bytes", str(error))
        address, _ = self.address(None)
        d = exchange(reactor, address, [b"."], name="x", limit=10, timeout=0.3, connect_timeout=5)
        error = yield self.assertFailure(d, ServiceTimeout)
        self.assertFalse(error.connecting)
        dead = Address("127.0.0.1", free_port())
        d = exchange(reactor, dead, [b"."], name="x", limit=10, timeout=5, connect_timeout=5)
        error = yield self.assertFailure(d, ServiceError)
        self.assertIn("cannot reach x at 127.0.0.1:", str(error))

    @inlineCallbacks
    def test_cancel_hangs_up_and_closes_the_request(self) -> Deferred[None]:
        """Cancelled while waiting for the answer (the hook's own timeout): the caller
        gets CancelledError (not a verdict on the service), the connection is closed
        (trial reports one left open) and so is the request's generator."""
        address, fake = self.address(None)
        closed: list[bool] = []

        def pieces() -> Iterator[bytes]:
            try:
                yield b"."
                yield b""
            finally:
                closed.append(True)

        d = exchange(
            reactor,
            address,
            chained(b"", pieces()),
            name="x",
            limit=10,
            timeout=5,
            connect_timeout=5,
        )
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(fake.requests, [b"."])  # type: ignore[attr-defined]
        d.cancel()
        yield self.assertFailure(d, CancelledError)
        self.assertEqual(closed, [True])
        yield deferLater(reactor, 0.05, lambda: None)


class _Hanging(Address):
    """An address whose connection attempt never ends until cancelled (as a SYN that
    gets no answer), and is cancelled as Twisted's endpoints are."""

    def endpoint(self, reactor: object, timeout: float) -> Any:
        class Endpoint:
            def connect(self, factory: object) -> Deferred[None]:
                return Deferred(lambda d: d.errback(ConnectingCancelledError(None)))

        return Endpoint()


class ConnectingTests(TestCase):
    @inlineCallbacks
    def test_cancel_while_connecting(self) -> Deferred[None]:
        """Cancelled while still connecting: CancelledError, not a verdict on the service
        (a caller trying hosts in turn must stop, not take the next one)."""
        d = exchange(reactor, _Hanging(), [b"."], name="x", limit=10, timeout=5, connect_timeout=5)
        yield deferLater(reactor, 0.05, lambda: None)
        d.cancel()
        yield self.assertFailure(d, CancelledError)

    @inlineCallbacks
    def test_no_connection_in_time(self) -> Deferred[None]:
        """No connection within the time limit: ServiceTimeout, while connecting."""
        d = exchange(
            reactor, _Hanging(), [b"."], name="x", limit=10, timeout=0.2, connect_timeout=5
        )
        error = yield self.assertFailure(d, ServiceTimeout)
        self.assertTrue(error.connecting)
