"""A small Redis client over Twisted (RESP2), for plugins that keep state shared by every
worker process and every server of a cluster (greylist).

L{RedisClient.execute} sends one command and returns a Deferred of its reply: C{bytes} for
a bulk string, C{str} for a status (C{"OK"}), C{int}, C{None} for a nil, a list for an
array; a Redis error reply fails it with L{RedisError}. Commands are pipelined over one
connection and answered in order.

The client never makes a caller wait on a Redis that is away: while it is not connected,
a command fails at once with L{RedisUnavailable} (and a new connection is tried, at most
once per C{retry} seconds), and a command unanswered after C{timeout} seconds fails with
it too and closes the connection, whose stream can no longer be trusted. Each plugin
decides what Redis being away means for mail (greylist lets it through).

L{shared_client} gives the plugins of one server one client, made from redis.ini::

    [server]
    host=127.0.0.1
    port=6379
    db=0               ; (database= too, as Haraka names it)
    ; timeout=2        seconds a command may take
    [opts]
    ; password=...     AUTH after connecting (username=... for Redis 6 ACLs)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from haraka_tw.config.formats import ini_number

__all__ = [
    "RedisClient",
    "RedisError",
    "RedisProtocolError",
    "RedisUnavailable",
    "encode_command",
    "parse_reply",
    "shared_client",
]

MAX_DEPTH = 8  # nested arrays in one reply
MAX_BULK = 64 * 1024 * 1024


class RedisError(Exception):
    """Redis answered with an error reply (C{-ERR ...})."""


class RedisUnavailable(Exception):
    """No answer from Redis: not connected, connection lost, or too slow."""


class RedisProtocolError(Exception):
    """Bytes from the server that are not RESP."""


def encode_command(args: Sequence[str | bytes | int | float]) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        else:
            data = str(arg).encode("ascii")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse_reply(buf: bytes | bytearray, at: int = 0, depth: int = 0) -> tuple[Any, int] | None:
    """One reply from C{buf} at C{at}: (value, where the next one starts), or None when
    the reply is not all there yet. An error reply is a L{RedisError} value (not
    raised); bytes that are not RESP raise L{RedisProtocolError}."""
    end = buf.find(b"\r\n", at)
    if end < 0:
        if len(buf) - at > 64 * 1024:
            raise RedisProtocolError("a reply line longer than 64 KB")
        return None
    kind, line = buf[at : at + 1], bytes(buf[at + 1 : end])
    after = end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return _integer(line), after
    if kind == b"$":
        size = _integer(line)
        if size == -1:
            return None, after
        if not 0 <= size <= MAX_BULK:
            raise RedisProtocolError(f"bulk string of {size} bytes")
        if len(buf) < after + size + 2:
            return None
        if buf[after + size : after + size + 2] != b"\r\n":
            raise RedisProtocolError("bulk string not ended by CRLF")
        return bytes(buf[after : after + size]), after + size + 2
    if kind == b"*":
        count = _integer(line)
        if count == -1:
            return None, after
        if count < 0 or depth >= MAX_DEPTH:
            raise RedisProtocolError(f"array of {count} at depth {depth}")
        items = []
        for _ in range(count):
            parsed = parse_reply(buf, after, depth + 1)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise RedisProtocolError(f"unknown reply type {bytes(kind)!r}")


def _integer(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise RedisProtocolError(f"not a number: {line[:20]!r}") from None


class _RedisProtocol(Protocol):
    """One connection: commands out, replies matched to them in order."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.pending: deque[tuple[Deferred[Any], IDelayedCall | None]] = deque()
        self.buffer = bytearray()
        self.gone = False

    def send(self, args: Sequence[str | bytes | int | float], timeout: float) -> Deferred[Any]:
        reply: Deferred[Any] = Deferred()
        timer = None
        if timeout > 0:
            timer = self.client.clock.callLater(timeout, self._too_slow)
        self.pending.append((reply, timer))
        assert self.transport is not None
        self.transport.write(encode_command(args))
        return reply

    def _too_slow(self) -> None:
        self._drop(RedisUnavailable(f"no reply from Redis in {self.client.timeout:g} s"))

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        at = 0
        try:
            while self.pending:
                parsed = parse_reply(self.buffer, at)
                if parsed is None:
                    break
                value, at = parsed
                reply, timer = self.pending.popleft()
                if timer is not None and timer.active():
                    timer.cancel()
                if isinstance(value, RedisError):
                    reply.errback(Failure(value))
                else:
                    reply.callback(value)
        except RedisProtocolError as e:
            self._drop(RedisUnavailable(f"Redis sent what is not RESP: {e}"))
            return
        del self.buffer[:at]
        if self.buffer and not self.pending:
            self._drop(RedisUnavailable("Redis sent a reply nobody asked for"))

    def _drop(self, error: Exception) -> None:
        """Fail every command waiting and close: the reply stream is out of step."""
        self._fail_all(error)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _fail_all(self, error: Exception) -> None:
        self.gone = True
        while self.pending:
            reply, timer = self.pending.popleft()
            if timer is not None and timer.active():
                timer.cancel()
            reply.errback(Failure(error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._fail_all(RedisUnavailable(f"connection to Redis lost: {reason.getErrorMessage()}"))
        self.client._lost(self)


class RedisClient:
    """One connection to Redis at C{host}:C{port}, database C{db}, made on first use and
    again after it is lost (at most one try per C{retry} seconds)."""

    def __init__(
        self,
        reactor: Any,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        db: int = 0,
        password: str | None = None,
        username: str | None = None,
        timeout: float = 2.0,
        retry: float = 1.0,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.host, self.port, self.db = host, port, db
        self.password, self.username = password, username
        self.timeout, self.retry = timeout, retry
        self._protocol: _RedisProtocol | None = None
        self._connecting: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._last_try = float("-inf")
        self._closed = False
        self.last_error = ""

    @property
    def connected(self) -> bool:
        return self._protocol is not None and not self._protocol.gone

    def execute(self, *args: str | bytes | int | float) -> Deferred[Any]:
        """Send one command; its reply (see the module's docstring), or RedisError, or
        RedisUnavailable at once when not connected."""
        protocol = self._protocol
        if protocol is None or protocol.gone:
            self.connect().addErrback(lambda _: None)  # (for the commands to come)
            return defer.fail(RedisUnavailable(self.last_error or "not connected to Redis"))
        return protocol.send(args, self.timeout)

    def connect(self) -> Deferred[None]:
        """Connect (log in, select the database) unless connected, connecting, closed or
        tried less than C{retry} seconds ago; fires when connected, or with the error."""
        if self.connected:
            return defer.succeed(None)
        if self._connecting is None:
            now = self.clock.seconds()
            if self._closed or now - self._last_try < self.retry:
                return defer.fail(RedisUnavailable(self.last_error or "not connected to Redis"))
            self._last_try = now
            endpoint = HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
            self._connecting = Deferred.fromCoroutine(self._start(endpoint, _RedisProtocol(self)))
            self._connecting.addBoth(self._attempt_over)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _attempt_over(self, result: object) -> None:
        """Tell everyone waiting for the connection how it went."""
        self._connecting = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            self.last_error = f"cannot reach Redis at {self.host}:{self.port}: " + (
                result.getErrorMessage()
            )
            for waiter in waiters:
                waiter.errback(result)
        else:
            for waiter in waiters:
                waiter.callback(None)

    async def _start(self, endpoint: HostnameEndpoint, protocol: _RedisProtocol) -> None:
        await connectProtocol(endpoint, protocol)
        try:
            if self.password:
                login = [self.username] if self.username else []
                await protocol.send(["AUTH", *login, self.password], self.timeout)
            if self.db:
                await protocol.send(["SELECT", self.db], self.timeout)
        except Exception:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            raise
        if self._closed:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            raise RedisUnavailable("closed")
        self._protocol = protocol
        self.last_error = ""

    def _lost(self, protocol: _RedisProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
            self.last_error = f"connection to Redis at {self.host}:{self.port} lost"

    def close(self) -> None:
        """Close the connection; commands fail from now on."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()


def client_from_config(
    config: Any, reactor: Any, overrides: dict[str, Any] | None = None, where: str = ""
) -> RedisClient:
    """A client as redis.ini says ([opts] under [server]), with C{overrides} (a plugin's
    own [redis] section) over both; ValueError naming the file and key for a bad value."""
    ini = config.get_ini("redis.ini")
    settings = {**ini.get("opts", {}), **ini.get("server", {}), **(overrides or {})}
    where = where or "redis.ini [server]"
    port = ini_number(settings, "port", 6379, zero_ok=False, where=where)
    if "database" in settings and "db" not in settings:  # (Haraka's name for it)
        settings["db"] = settings["database"]
    db = ini_number(settings, "db", 0, zero_ok=True, where=where)
    timeout = ini_number(settings, "timeout", 2, zero_ok=False, where=where)
    if port != int(port) or not 0 < port < 65536 or db != int(db) or db < 0:
        raise ValueError(f"{where}: port must be 1-65535 and db a whole number")
    return RedisClient(
        reactor,
        str(settings.get("host") or "127.0.0.1").strip(),
        int(port),
        db=int(db),
        password=str(settings.get("password") or "") or None,
        username=str(settings.get("username") or "") or None,
        timeout=float(timeout),
    )


def shared_client(context: Any) -> RedisClient:
    """The server's one Redis client (redis.ini), made by the first plugin that asks,
    kept in the server's notes (Haraka's C{server.notes.redis})."""
    notes = context.server_notes
    client = notes.get("redis")
    if not isinstance(client, RedisClient):
        client = client_from_config(context.config, context.reactor)
        notes["redis"] = client
        client.connect().addErrback(lambda _: None)  # (the first command says if it failed)
    return client
