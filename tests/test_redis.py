"""haraka_tw.redis: against a real redis-server on loopback (replies, pipelining, errors, a
server that goes away and comes back), and the reply parser byte by byte."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.redis import (
    INCOMPLETE,
    RedisClient,
    RedisError,
    RedisProtocolError,
    RedisUnavailable,
    ReplyReader,
    encode_command,
    parse_reply,
)
from haraka_tw.server import StartupError
from tests.redis_server import start_redis
from tests.support import start_server


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
        when it is back, the client has connected again by itself, before any command."""
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


class ConfigTests(TestCase):
    def test_a_unix_socket_or_tls_stops_start_up(self) -> None:
        """redis.ini (or greylist.ini [redis]) naming a unix socket path or TLS, which the
        client cannot do, stops start-up naming the file and key, rather than quietly
        connecting to 127.0.0.1:6379 in the clear."""
        for files, words in (
            ({"redis.ini": "[server]\npath=/run/redis.sock\n"}, "redis.ini [server]: path"),
            ({"redis.ini": "[server]\ntls=true\n"}, "redis.ini [server]: tls"),
            ({"redis.ini": "[opts]\ntls=true\n"}, "redis.ini [server]: tls"),
            (
                {"plugins": "greylist\n", "greylist.ini": "[redis]\npath=/run/redis.sock\n"},
                "greylist.ini [redis]: path",
            ),
        ):
            with self.assertRaises(StartupError, msg=files) as raised:
                start_server(self, {"plugins": "redis\n", **files})
            self.assertIn(words, str(raised.exception))
            self.assertIn("is not supported", str(raised.exception))


class ParseTests(SynchronousTestCase):
    def test_partial_replies_wait(self) -> None:
        """Every prefix of a reply is incomplete; the whole reply parses; fed a byte at a
        time, the reader gives each reply once, when its last byte arrives."""
        wire = b"*3\r\n$3\r\nabc\r\n:42\r\n*2\r\n+OK\r\n$-1\r\n"
        for cut in range(len(wire)):
            self.assertIs(parse_reply(wire[:cut]), INCOMPLETE, cut)
        self.assertEqual(parse_reply(wire), [b"abc", 42, ["OK", None]])
        reader = ReplyReader()
        got = [reader.feed(bytes([b])) for b in wire + wire]
        self.assertEqual([r for r in got if r], [[[b"abc", 42, ["OK", None]]]] * 2)
        self.assertFalse(reader.pending)

    def test_a_long_array_in_small_pieces_is_read_once(self) -> None:
        """An array of 200,000 items arriving 4 KB at a time is parsed in linear time
        (each read used to parse the array again from its start: a minute and more)."""
        wire = b"*200000\r\n" + b":1\r\n" * 200_000
        reader = ReplyReader()
        started = time.monotonic()
        replies = []
        for at in range(0, len(wire), 4096):
            replies += reader.feed(wire[at : at + 4096])
        self.assertEqual(len(replies[0]), 200_000)
        self.assertLess(time.monotonic() - started, 5)

    def test_bad_bytes(self) -> None:
        """What is not RESP raises RedisProtocolError (and an error reply is a value)."""
        for wire in (b"?x\r\n", b":12a\r\n", b"$3\r\nabcd\r\n", b"$-5\r\n", b"*1\r\n" * 9):
            with self.assertRaises(RedisProtocolError, msg=wire):
                parse_reply(wire)
        self.assertIsInstance(parse_reply(b"-ERR no\r\n"), RedisError)

    def test_encode(self) -> None:
        """Arguments go as bulk strings: text as UTF-8, numbers as digits."""
        self.assertEqual(
            encode_command(["SET", "ké", 5]), b"*3\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$1\r\n5\r\n"
        )
