"""Connection reuse: several messages to one server over one connection, on loopback."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from haraka_tw.outbound.client import Recipient, Timeouts, TLSPolicy
from haraka_tw.outbound.pool import ConnectionPool
from tests.outbound.test_client import PeerCase, eventually


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
        """Concurrent messages use separate connections; one is kept idle, the other quits."""
        peer, port = self.peer(delay=0.02)
        pool = self.pool()
        await DeferredList([self.send(port, pool=pool) for _ in range(2)], fireOnOneErrback=True)
        self.assertEqual(len(peer.connections), 2)
        self.assertEqual(len(pool), 1)

    async def test_closed_pool_keeps_nothing(self) -> None:
        """After close() a finished session is quit, not kept."""
        peer, port = self.peer()
        pool = self.pool()
        await pool.close()
        await self.send(port, pool=pool)
        self.assertEqual(len(pool), 0)
        self.assertEqual(self.commands(peer)[-1], "QUIT")
