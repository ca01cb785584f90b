"""haraka_tw.redis: against a real redis-server on loopback (replies, pipelining, errors, a
server that goes away and comes back), and the reply parser byte by byte."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.redis import (
    RedisClient,
    RedisError,
    RedisProtocolError,
    RedisUnavailable,
    encode_command,
    parse_reply,
)
from tests.redis_server import start_redis


class ClientTests(TestCase):
    def client(self, port: int, **options: Any) -> RedisClient:
        client = RedisClient(reactor, "127.0.0.1", port, **options)
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def test_replies_of_each_type(self) -> Deferred[None]:
        """A status, a bulk string, a nil, an integer and an array come back as str,
        bytes, None, int and list; an error reply fails with RedisError."""
        redis = start_redis(self)
        client = self.client(redis.port, db=3)
        yield client.connect()
        self.assertEqual((yield client.execute("SET", "k", "v\r\nx")), "OK")
        self.assertEqual((yield client.execute("GET", "k")), b"v\r\nx")
        self.assertIsNone((yield client.execute("GET", "missing")))
        self.assertEqual((yield client.execute("INCRBY", "n", 5)), 5)
        yield client.execute("HSET", "h", "a", "1", "b", "2")
        self.assertEqual(sorted((yield client.execute("HGETALL", "h"))), [b"1", b"2", b"a", b"b"])
        with self.assertRaises(RedisError):
            yield client.execute("INCR", "k")
        other = self.client(redis.port)
        yield other.connect()
        self.assertIsNone((yield other.execute("GET", "k")))  # (db 0, not 3)

    @inlineCallbacks
    def test_pipelined_commands_answered_in_order(self) -> Deferred[None]:
        """Many commands sent at once each get their own reply."""
        redis = start_redis(self)
        client = self.client(redis.port)
        yield client.connect()
        replies = yield gatherResults([client.execute("INCR", "c") for _ in range(500)])
        self.assertEqual(replies, list(range(1, 501)))

    @inlineCallbacks
    def test_a_server_away_fails_at_once_and_is_reconnected(self) -> Deferred[None]:
        """With Redis stopped, a command fails at once with RedisUnavailable (no wait);
        when it is back, the client connects again by itself."""
        redis = start_redis(self)
        client = self.client(redis.port, retry=0.1)
        yield client.connect()
        redis.stop()
        yield deferLater(reactor, 0.2, lambda: None)
        with self.assertRaises(RedisUnavailable):
            yield client.execute("PING")
        redis.start()
        for _ in range(50):
            yield deferLater(reactor, 0.1, lambda: None)
            if client.connected:
                break
            client.connect().addErrback(lambda _: None)
        self.assertEqual((yield client.execute("PING")), "PONG")

    @inlineCallbacks
    def test_a_silent_server_times_out(self) -> Deferred[None]:
        """A server that accepts but never answers: the command fails after the timeout
        and the connection is dropped."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = self.client(port.getHost().port, timeout=0.3)
        yield client.connect()
        with self.assertRaises(RedisUnavailable) as raised:
            yield client.execute("PING")
        self.assertIn("no reply from Redis in 0.3 s", str(raised.exception))
        self.assertFalse(client.connected)

    @inlineCallbacks
    def test_wrong_password_fails_the_connection(self) -> Deferred[None]:
        """A password the server does not take fails connect() with Redis's error."""
        redis = start_redis(self)
        client = self.client(redis.port, password="nope")
        with self.assertRaises(RedisError):
            yield client.connect()
        self.assertFalse(client.connected)


class ParseTests(SynchronousTestCase):
    def test_partial_replies_wait(self) -> None:
        """Every prefix of a reply is 'not yet'; the whole reply parses to its end."""
        wire = b"*3\r\n$3\r\nabc\r\n:42\r\n*2\r\n+OK\r\n$-1\r\n"
        for cut in range(len(wire)):
            self.assertIsNone(parse_reply(wire[:cut]), cut)
        self.assertEqual(parse_reply(wire), ([b"abc", 42, ["OK", None]], len(wire)))

    def test_bad_bytes(self) -> None:
        """What is not RESP raises RedisProtocolError (and an error reply is a value)."""
        for wire in (b"?x\r\n", b":12a\r\n", b"$3\r\nabcd\r\n", b"$-5\r\n", b"*9\r\n" * 9):
            with self.assertRaises(RedisProtocolError, msg=wire):
                parse_reply(wire)
        value, _ = parse_reply(b"-ERR no\r\n")  # type: ignore[misc]
        self.assertIsInstance(value, RedisError)

    def test_encode(self) -> None:
        """Arguments go as bulk strings: text as UTF-8, numbers as digits."""
        self.assertEqual(
            encode_command(["SET", "ké", 5]), b"*3\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$1\r\n5\r\n"
        )
