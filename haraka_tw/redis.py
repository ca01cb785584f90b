"""A small Redis client over Twisted (RESP2), for plugins that keep state shared by every
worker process and every server of a cluster (greylist).

L{RedisClient.execute} sends one command and returns a Deferred of its reply: C{bytes} for
a bulk string, C{str} for a status (C{"OK"}), C{int}, C{None} for a nil, a list for an
array; a Redis error reply fails it with L{RedisError}. Commands are pipelined over one
connection and answered in order.

The client never makes a caller wait on a Redis that is away: while it is not connected,
a command fails at once with L{RedisUnavailable} (a new connection is tried every C{retry}
seconds meanwhile), and a command unanswered after C{timeout} seconds fails with it too
and closes the connection, whose stream can no longer be trusted. Each plugin decides what
Redis being away means for mail (greylist defers, unless told to accept).

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
    "INCOMPLETE",
    "RedisClient",
    "RedisError",
    "RedisProtocolError",
    "RedisUnavailable",
    "ReplyReader",
    "client_from_config",
    "encode_command",
    "parse_reply",
    "plugin_client",
    "shared_client",
]

MAX_DEPTH = 8  # nested arrays in one reply
MAX_BULK = 64 * 1024 * 1024
MAX_ITEMS = 10_000_000
MAX_LINE = 64 * 1024
INCOMPLETE = object()  # the reply is not all there yet
_OPENED = object()


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


class ReplyReader:
    """Replies parsed from a byte stream as it arrives, each byte read once (an array
    split over many reads is not parsed again from its start). L{feed} returns the
    replies completed: an error reply is a L{RedisError} value; bytes that are not RESP
    raise L{RedisProtocolError}."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._at = 0
        self._open: list[tuple[int, list[Any]]] = []  # arrays begun: (items wanted, items)

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        replies = []
        while True:
            value = self._element()
            if value is INCOMPLETE:
                break
            if value is _OPENED:
                continue
            while self._open:  # put the value in the innermost array; close full ones
                wanted, items = self._open[-1]
                items.append(value)
                if len(items) < wanted:
                    break
                self._open.pop()
                value = items
            else:
                replies.append(value)
        if self._at:
            del self._buffer[: self._at]
            self._at = 0
        return replies

    @property
    def pending(self) -> bool:
        """Whether part of a reply has been read."""
        return bool(self._buffer) or bool(self._open)

    def _element(self) -> Any:
        """One element at the read position: a value, _OPENED (an array began), or
        INCOMPLETE (wait for more bytes)."""
        buf, at = self._buffer, self._at
        end = buf.find(b"\r\n", at)
        if end < 0:
            if len(buf) - at > MAX_LINE:
                raise RedisProtocolError(f"a reply line longer than {MAX_LINE} bytes")
            return INCOMPLETE
        kind, line = buf[at : at + 1], bytes(buf[at + 1 : end])
        after = end + 2
        if kind == b"$":
            size = _integer(line)
            if size == -1:
                self._at = after
                return None
            if not 0 <= size <= MAX_BULK:
                raise RedisProtocolError(f"bulk string of {size} bytes")
            if len(buf) < after + size + 2:
                return INCOMPLETE
            if buf[after + size : after + size + 2] != b"\r\n":
                raise RedisProtocolError("bulk string not ended by CRLF")
            self._at = after + size + 2
            return bytes(buf[after : after + size])
        self._at = after
        if kind == b"+":
            return line.decode("utf-8", "replace")
        if kind == b"-":
            return RedisError(line.decode("utf-8", "replace"))
        if kind == b":":
            return _integer(line)
        if kind == b"*":
            count = _integer(line)
            if count == -1:
                return None
            if not 0 <= count <= MAX_ITEMS or len(self._open) >= MAX_DEPTH:
                raise RedisProtocolError(f"array of {count} at depth {len(self._open)}")
            if count == 0:
                return []
            self._open.append((count, []))
            return _OPENED
        raise RedisProtocolError(f"unknown reply type {bytes(kind)!r}")


def parse_reply(data: bytes) -> Any:
    """The first reply in C{data}, or L{INCOMPLETE} when it is not all there."""
    replies = ReplyReader().feed(data)
    return replies[0] if replies else INCOMPLETE


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
        self.reader = ReplyReader()
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
        try:
            replies = self.reader.feed(data)
        except RedisProtocolError as e:
            self._drop(RedisUnavailable(f"Redis sent what is not RESP: {e}"))
            return
        for value in replies:
            if not self.pending:
                self._drop(RedisUnavailable("Redis sent a reply nobody asked for"))
                return
            reply, timer = self.pending.popleft()
            if timer is not None and timer.active():
                timer.cancel()
            if isinstance(value, RedisError):
                reply.errback(Failure(value))
            else:
                reply.callback(value)

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
        self._next_try: IDelayedCall | None = None
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

    async def atomically(self, *commands: Sequence[str | bytes | int | float]) -> list[Any]:
        """C{commands} in one MULTI/EXEC, sent together (so that, say, a key is never
        written without its expiry); their replies, or the first error among them."""
        sent = [self.execute("MULTI")]
        try:
            sent += [self.execute(*command) for command in commands]
        except BaseException:  # (a command that cannot be sent: leave no MULTI open)
            self.execute("DISCARD").addErrback(lambda _: None)
            for queued in sent:
                queued.addErrback(lambda _: None)
            raise
        sent.append(self.execute("EXEC"))
        outcomes = await defer.DeferredList(sent, consumeErrors=True)
        for ok, value in outcomes:
            if not ok:
                value.raiseException()
        replies = list(outcomes[-1][1] or [])
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply
        return replies

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
            self._try_again()
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
            self._try_again()

    def _try_again(self) -> None:
        """Connect again in C{retry} seconds (so Redis back is used before the next
        command needs it), unless closed or already planned."""
        if self._closed or (self._next_try is not None and self._next_try.active()):
            return

        def attempt() -> None:
            self._next_try = None
            self.connect().addErrback(lambda _: None)

        self._next_try = self.clock.callLater(self.retry, attempt)

    def close(self) -> None:
        """Close the connection; commands fail from now on."""
        self._closed = True
        if self._next_try is not None and self._next_try.active():
            self._next_try.cancel()
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
    for key in ("path", "tls", "socket"):
        if settings.get(key):
            raise ValueError(f"{where}: {key} is not supported (TCP to host:port only)")
    if settings.get("ip") and not settings.get("host"):  # (Haraka's older name)
        settings["host"] = settings["ip"]
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


def plugin_client(context: Any, own: Any, where: str) -> tuple[RedisClient, bool]:
    """A plugin's Redis: a connection of its own, connecting now, when C{own} (the
    plugin's [redis] section) names one, else the server's shared one; and whether it
    is the plugin's own (to close at shutdown).

    @raise ValueError: naming C{where} and the key, for a bad value.
    """
    if own:
        client = client_from_config(context.config, context.reactor, own, where)
        client.connect().addErrback(lambda _: None)  # (the first command says)
        return client, True
    return shared_client(context), False


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
