"""Connection reuse: several messages to one server over one connection, on loopback."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.outbound.client import Destination, Recipient, Timeouts, TLSPolicy
from haraka_tw.outbound.pool import ConnectionPool, PoolSettings
from tests.outbound.test_client import NO_TLS, PeerCase, eventually


def _destination(port: int) -> Destination:
    """The pool key of PeerCase.send's deliveries."""
    return Destination("127.0.0.1", port, "client.test", tls=NO_TLS)


class PoolTests(PeerCase):
    def pool(self, **kwargs: Any) -> ConnectionPool:
        pool = ConnectionPool(reactor, **kwargs)
        self.addCleanup(pool.close)
        return pool

    async def test_two_messages_one_connection(self) -> None:
        """Two messages share one TCP connection, with RSET between; close() says QUIT."""
        peer, port = self.peer()
        pool = self.pool()
        first = await self.send(port, pool=pool)
        second = await self.send(port, pool=pool)
        self.assertEqual((first.reused, second.reused), (False, True))
        self.assertEqual(len(peer.connections), 1)
        self.assertEqual(len(peer.messages), 2)
        self.assertEqual(len(pool), 1)
        await pool.close()
        self.assertEqual(len(pool), 0)
        commands = self.commands(peer)
        self.assertEqual(commands.count("EHLO"), 1)
        self.assertEqual(commands[commands.index("RSET") - 1], "<message,")
        self.assertEqual(commands[-1], "QUIT")
        self.assertTrue(peer.connections[0].closed)

    async def test_tls_and_auth_done_once(self) -> None:
        """A reused session keeps its TLS and AUTH: STARTTLS and AUTH are sent once."""
        peer, port = self.peer(starttls=True, auth=("PLAIN",))
        pool = self.pool()
        for _ in range(3):
            report = await self.send(port, pool=pool, tls=TLSPolicy(), auth=("user", "secret"))
            self.assertTrue(report.secured and report.authenticated)
        commands = self.commands(peer)
        self.assertEqual((commands.count("STARTTLS"), commands.count("AUTH")), (1, 1))
        self.assertEqual([m.tls for m in peer.messages], [True] * 3)

    async def test_idle_expiry_quits(self) -> None:
        """An idle session is closed with QUIT after idle_timeout."""
        peer, port = self.peer()
        pool = self.pool(idle_timeout=0.1)
        await self.send(port, pool=pool)
        self.assertEqual(len(pool), 1)
        await eventually(lambda: peer.connections[0].closed)
        self.assertEqual(len(pool), 0)
        self.assertEqual(self.commands(peer)[-1], "QUIT")

    async def test_server_closes_idle_session(self) -> None:
        """A session the server closed while idle is dropped; the next message reconnects."""
        peer, port = self.peer()
        pool = self.pool()
        await self.send(port, pool=pool)
        await peer.connections[0].shut()
        await eventually(lambda: len(pool) == 0)
        report = await self.send(port, pool=pool)
        self.assertFalse(report.reused)
        self.assertEqual(len(peer.connections), 2)

    async def test_rset_refused_reconnects(self) -> None:
        """A pooled session whose RSET fails is dropped and a new connection delivers."""
        peer, port = self.peer(replies={"RSET": ["421 4.4.2 idle too long"]})
        pool = self.pool()
        await self.send(port, pool=pool)
        report = await self.send(port, pool=pool)
        self.assertFalse(report.reused)
        self.assertEqual((len(peer.connections), len(peer.messages)), (2, 2))

    async def test_refused_transaction_keeps_session(self) -> None:
        """After a message no recipient took, the session is reset and reused."""
        peer, port = self.peer(rcpt={"x@b.test": "550 5.1.1 no"})
        pool = self.pool()
        refused = await self.send(port, pool=pool, recipients=[Recipient("x@b.test")])
        self.assertEqual(len(refused.bounced), 1)
        report = await self.send(port, pool=pool)
        self.assertTrue(report.reused)
        self.assertEqual(len(peer.connections), 1)
        self.assertEqual(len(peer.messages), 1)

    async def test_failed_session_not_kept(self) -> None:
        """A session that timed out is closed, not pooled."""
        _, port = self.peer(replies={"DOT": ["HANG", "250 OK"]})
        pool = self.pool()
        await self.failure(self.send(port, pool=pool, timeouts=Timeouts(dot=0.2)))
        self.assertEqual(len(pool), 0)

    async def test_keys_keep_destinations_apart(self) -> None:
        """Another HELO name (or TLS policy, credentials, port...) is another session."""
        peer, port = self.peer()
        pool = self.pool()
        await self.send(port, pool=pool)
        await self.send(port, pool=pool, helo="other.test")
        self.assertEqual(len(peer.connections), 2)
        self.assertEqual(len(pool), 2)

    async def test_max_messages(self) -> None:
        """A session that carried max_messages is closed rather than kept."""
        peer, port = self.peer()
        pool = self.pool(max_messages=2)
        for _ in range(3):
            await self.send(port, pool=pool)
        self.assertEqual(len(peer.connections), 2)

    async def test_concurrent_deliveries(self) -> None:
        """Concurrent messages use separate connections, and both are kept idle."""
        peer, port = self.peer(delay=0.02)
        pool = self.pool()
        await DeferredList([self.send(port, pool=pool) for _ in range(2)], fireOnOneErrback=True)
        self.assertEqual(len(peer.connections), 2)
        self.assertEqual(len(pool), 2)

    async def test_at_most_max_connections(self) -> None:
        """Six messages at once over max_connections=2: two connections carry them all,
        each reused at once by a waiting delivery, with no new EHLO."""
        peer, port = self.peer(delay=0.01)
        pool = self.pool(max_connections=2)
        sends = [self.send(port, pool=pool) for _ in range(6)]
        destination = _destination(port)
        self.assertEqual((pool.open(destination), pool.waiting(destination)), (2, 4))
        reports = await DeferredList(sends, fireOnOneErrback=True)
        self.assertEqual(len(peer.connections), 2)
        self.assertEqual(len(peer.messages), 6)
        self.assertEqual(sum(report.reused for _, report in reports), 4)
        self.assertEqual(self.commands(peer).count("EHLO"), 2)
        self.assertEqual((pool.open(destination), pool.waiting(destination), len(pool)), (2, 0, 2))

    async def test_rset_goes_with_the_envelope(self) -> None:
        """With PIPELINING, a reused session's RSET is in the same write as MAIL."""
        peer, port = self.peer()
        pool = self.pool()
        await self.send(port, pool=pool)
        await self.send(port, pool=pool)
        [batch] = [r for r in peer.connections[0].reads if r.startswith(b"RSET")]
        self.assertTrue(batch.startswith(b"RSET\r\nMAIL FROM:"), batch)
        self.assertTrue(batch.endswith(b"DATA\r\n"))

    async def test_rset_alone_without_pipelining(self) -> None:
        """Without PIPELINING, RSET is a command of its own before MAIL."""
        peer, port = self.peer(pipelining=False)
        pool = self.pool()
        for _ in range(2):
            await self.send(port, pool=pool)
        self.assertIn(b"RSET\r\n", peer.connections[0].reads)
        self.assertEqual(len(peer.messages), 2)

    async def test_server_gone_at_rset_reconnects(self) -> None:
        """A reused session the server drops at RSET (the envelope with it) is replaced by
        a new connection, and the message is delivered once."""
        peer, port = self.peer(replies={"RSET": ["DROP", "250 OK"]})
        pool = self.pool()
        await self.send(port, pool=pool)
        report = await self.send(port, pool=pool)
        self.assertFalse(report.reused)
        self.assertEqual((len(peer.connections), len(peer.messages)), (2, 2))

    async def test_failed_connection_frees_its_place(self) -> None:
        """A delivery that cannot open its session hands its place to the next one."""
        peer, port = self.peer(replies={"BANNER": ["421 4.3.2 busy"]})
        pool = self.pool(max_connections=1)
        sends = [Deferred.fromCoroutine(self.failure(self.send(port, pool=pool))) for _ in range(3)]
        errors = await DeferredList(sends, fireOnOneErrback=True)
        self.assertEqual([e.phase for _, e in errors], ["banner"] * 3)
        self.assertEqual(len(peer.connections), 3)
        self.assertEqual(pool.open(_destination(port)), 0)

    async def test_cancel_a_waiting_delivery(self) -> None:
        """A delivery cancelled while it waits for a session leaves the queue."""
        peer, port = self.peer(delay=0.05)
        pool = self.pool(max_connections=1)
        first = self.send(port, pool=pool)
        second = self.send(port, pool=pool)
        second.cancel()
        with self.assertRaises(CancelledError):
            await second
        self.assertEqual(pool.waiting(_destination(port)), 0)
        await first
        self.assertEqual(len(peer.messages), 1)

    async def test_expired_session_frees_its_place(self) -> None:
        """An idle session that expires, or that the server closes, no longer counts."""
        peer, port = self.peer()
        pool = self.pool(idle_timeout=0.1, max_connections=1)
        await self.send(port, pool=pool)
        self.assertEqual(pool.open(_destination(port)), 1)
        await eventually(lambda: pool.open(_destination(port)) == 0)
        await self.send(port, pool=pool)
        await peer.connections[1].shut()
        await eventually(lambda: pool.open(_destination(port)) == 0)

    async def test_configure_lets_waiting_deliveries_in(self) -> None:
        """Raising max_connections starts deliveries that were waiting."""
        peer, port = self.peer(delay=0.05)
        pool = self.pool(max_connections=1)
        sends = [self.send(port, pool=pool) for _ in range(3)]
        pool.configure(PoolSettings(max_connections=3, idle_timeout=5))
        self.assertEqual(pool.waiting(_destination(port)), 0)
        await DeferredList(sends, fireOnOneErrback=True)
        self.assertEqual(len(peer.connections), 3)

    async def test_closed_pool_keeps_nothing(self) -> None:
        """After close() a finished session is quit, not kept."""
        peer, port = self.peer()
        pool = self.pool()
        await pool.close()
        await self.send(port, pool=pool)
        self.assertEqual(len(pool), 0)
        self.assertEqual(self.commands(peer)[-1], "QUIT")


class PoolSettingsTests(SynchronousTestCase):
    """outbound.ini pool_concurrency_max and pool_timeout, with Haraka's defaults."""

    def test_defaults(self) -> None:
        """10 connections per destination, idle for 50 seconds."""
        self.assertEqual(PoolSettings.from_ini({}), PoolSettings(10, 50.0))
        self.assertTrue(PoolSettings.from_ini({}).enabled)

    def test_zero_turns_reuse_off(self) -> None:
        """Either key at 0 means no pool, as in Haraka."""
        self.assertFalse(PoolSettings.from_ini({"pool_concurrency_max": 0}).enabled)
        self.assertFalse(PoolSettings.from_ini({"pool_timeout": "0"}).enabled)

    def test_values(self) -> None:
        """Numbers as ini values or text."""
        settings = PoolSettings.from_ini({"pool_concurrency_max": "4", "pool_timeout": 2.5})
        self.assertEqual(settings, PoolSettings(4, 2.5))

    def test_bad_values(self) -> None:
        """A negative, fractional or non-numeric value names its key."""
        for main in (
            {"pool_concurrency_max": -1},
            {"pool_concurrency_max": "2.5"},
            {"pool_timeout": "soon"},
            {"pool_timeout": True},
        ):
            with self.assertRaises(ValueError) as caught:
                PoolSettings.from_ini(main)
            self.assertIn(next(iter(main)), str(caught.exception))


class NoDelayTests(PeerCase):
    async def test_connections_do_not_wait_for_acks(self) -> None:
        """Outbound connections set TCP_NODELAY: the ending dot is not held back by Nagle's
        algorithm until the server's delayed ACK."""
        _, port = self.peer()
        pool = ConnectionPool(reactor)
        self.addCleanup(pool.close)
        await self.send(port, pool=pool)
        lease = self.successResultOf(pool.lease(_destination(port)))
        assert lease.session is not None
        sock = lease.session.proto.transport.getHandle()  # type: ignore[union-attr]
        self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        pool.keep(lease, lease.session)
