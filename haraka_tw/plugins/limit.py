"""limit: Haraka's limit plugin: limits per connection, and rates kept in Redis.

Each part is off until its section in limit.ini says C{enabled=true}:

- C{[concurrency]}: at most C{max} (default 3) simultaneous connections per client IP,
  counted in the server notes (C{server_notes["limit.concurrency"]}, IP -> count). One
  more gets DENYSOFTDISCONNECT "Too many concurrent connections" in C{connect}: C{421} and
  close, before the banner.
- C{[recipients]}: at most C{max} recipient attempts per connection, every RCPT counted
  whatever its answer (C{max_relaying}, when set, for relaying clients). One more gets
  C{452 4.5.3 Too many recipient attempts}. (The core's connection.ini C{max.recipients}
  caps the recipients of one message.)
- C{[unrecognized_commands]}: at most C{max} (default 10) unrecognized commands per
  connection; one more gets DENYSOFTDISCONNECT "Too many unrecognized commands": C{421} and
  close. List limit after the plugins that answer commands of their own (tls, auth), or
  their commands count too.
- C{[errors]}: once C{connection.errors} is above C{max} (default 10), the next HELO,
  EHLO, MAIL, RCPT or DATA gets DENYSOFTDISCONNECT with C{421 4.7.0 Too many errors}, and
  the connection closes.

Rates, counted in Redis (redis.ini's, or limit.ini C{[redis]}) so that every worker and
every server sharing it counts together (see L{haraka_tw.ratelimit} for the values and
lookups):

- C{[rate_conn]}: connections per client, over the last period (a sliding window);
  one more gets C{421 connection rate limit exceeded} and close.
- C{[rate_rcpt_host]}: recipients per client, counted at RCPT and checked when it next
  connects: C{421 recipient rate limit exceeded} and close.
- C{[rate_rcpt_sender]}: recipients per sender; C{[rate_rcpt_null]}: recipients per
  recipient of the null sender (bounces); C{[rate_rcpt]}: messages per recipient. One more
  gets C{450 4.7.0}, and the session goes on.

With Redis away the rates are not enforced (an C{err} in the results), never deferred.

C{[main] tarpit_delay} (seconds, default 0) holds each of these refusals that long first.
The file is re-read when it changes.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from haraka_tw.codes import CONT, DENYSOFT, DENYSOFTDISCONNECT, Code
from haraka_tw.config.ini import is_truthy
from haraka_tw.interfaces import (
    IConnectHook,
    IConnectInitHook,
    IDataHook,
    IDisconnectHook,
    IEhloHook,
    IHeloHook,
    IMailHook,
    IPluginContext,
    IRcptHook,
    IRcptOkHook,
    IRegistration,
    IShutdown,
    IUnrecognizedCommandHook,
)
from haraka_tw.ratelimit import Rate, RateTable, fixed_window, sliding_window
from haraka_tw.redis import (
    RedisClient,
    RedisError,
    RedisUnavailable,
    plugin_client,
)
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection
from haraka_tw.smtp.replies import Reply

__all__ = [
    "BOOLEANS",
    "COUNTS_NOTE",
    "DEFAULT_MAX",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_ERRORS",
    "TOO_MANY_RECIPIENTS",
    "TOO_MANY_UNRECOGNIZED",
    "Limits",
    "Plugin",
    "count_unrecognized",
    "parse_limit",
]

BOOLEANS = (
    "-concurrency.enabled",
    "-recipients.enabled",
    "-unrecognized_commands.enabled",
    "-errors.enabled",
    "-rate_conn.enabled",
    "-rate_conn_history.enabled",
    "-rate_rcpt_host.enabled",
    "-rate_rcpt_host_history.enabled",
    "-rate_rcpt_sender.enabled",
    "-rate_rcpt_null.enabled",
    "-rate_rcpt.enabled",
)
#: The server notes key of the per-IP connection counts.
COUNTS_NOTE = "limit.concurrency"
#: the sections this plugin reads
#: the rate sections, each counted in Redis
RATE_SECTIONS = ("rate_conn", "rate_rcpt_host", "rate_rcpt_sender", "rate_rcpt_null", "rate_rcpt")
_SECTIONS = frozenset(
    {"main", "concurrency", "recipients", "unrecognized_commands", "errors", "redis"}
    | set(RATE_SECTIONS)
    | {f"{name}_history" for name in ("rate_conn", "rate_rcpt_host")}
)


DEFAULT_MAX = {"concurrency": 3, "recipients": 0, "unrecognized_commands": 10, "errors": 10}

TOO_MANY_CONNECTIONS = "Too many concurrent connections"
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3", "Too many recipient attempts")
TOO_MANY_UNRECOGNIZED = "Too many unrecognized commands"
TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Too many errors")
CONNECTION_RATE = "connection rate limit exceeded"
RECIPIENT_RATE = "recipient rate limit exceeded"
#: the refusal of a recipient over each RCPT rate
RCPT_RATES = {
    "rate_rcpt_sender": Reply.of(450, "4.7.0", "rcpt rate limit exceeded"),
    "rate_rcpt_null": Reply.of(450, "4.7.0", "null recip rate limit"),
    "rate_rcpt": Reply.of(450, "4.7.0", "rate limit exceeded"),
}

_Answer = Code | tuple[Code, Any]
_Refusal = tuple[Code, Any]


def parse_limit(value: Any, where: str) -> int:
    """A limit: a whole number, 0 or more (0: no limit). C{where} names the file and key
    (C{limit.ini [concurrency] max}) for the error.

    @raise ValueError: naming C{where}, for anything else (a word, inf, nan, a fraction).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{where} must be a number, not {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where} must be a number, not {value!r}") from None
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise ValueError(f"{where} must be a whole number, 0 or more, not {value!r}")
    return int(number)


@dataclass(frozen=True)
class Limits:
    """The limits in force; 0 means that part is off."""

    concurrency: int = 0
    recipients: int = 0
    recipients_relaying: int = 0
    unrecognized_commands: int = 0
    errors: int = 0
    tarpit_delay: float = 0.0
    rates: Mapping[str, RateTable] = field(default_factory=dict)

    @classmethod
    def from_ini(cls, ini: dict[str, dict[str, Any]]) -> Limits:
        """Read limit.ini (with L{BOOLEANS} declared).

        @raise ValueError: for a value that is not a limit.
        """

        def limit(section: str, key: str = "max") -> int:
            values = ini.get(section, {})
            if not values.get("enabled"):
                return 0
            default = DEFAULT_MAX[section] if key == "max" else 0
            return parse_limit(values.get(key, default), f"limit.ini [{section}] {key}")

        delay = ini.get("main", {}).get("tarpit_delay", 0)
        try:
            tarpit_delay = float(delay)
        except (TypeError, ValueError):
            raise ValueError(f"limit.ini tarpit_delay must be seconds, not {delay!r}") from None
        return cls(
            concurrency=limit("concurrency"),
            recipients=limit("recipients"),
            recipients_relaying=limit("recipients", "max_relaying"),
            unrecognized_commands=limit("unrecognized_commands"),
            errors=limit("errors"),
            tarpit_delay=max(0.0, tarpit_delay),
            rates={
                name: RateTable.from_ini(ini, name)
                for name in RATE_SECTIONS
                if ini.get(name, {}).get("enabled")
            },
        )


def count_unrecognized(connection: Connection, plugin: str, verb: str) -> int:
    """Record one more unrecognized command (results C{unrec_cmds}); the count so far."""
    connection.results.push(plugin, unrec_cmds=verb)
    entry = connection.results.get(plugin) or {}
    return len(entry.get("unrec_cmds", ()))


@implementer(
    IRegistration,
    IConnectInitHook,
    IConnectHook,
    IDisconnectHook,
    IHeloHook,
    IEhloHook,
    IMailHook,
    IRcptHook,
    IRcptOkHook,
    IDataHook,
    IUnrecognizedCommandHook,
    IShutdown,
)
class Plugin:
    name = "limit"

    def __init__(self, clock: IReactorTime | None = None) -> None:
        # The plugin loader calls the factory with no arguments; a test passes a Clock.
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock = clock
        self.limits = Limits()
        self.counts: dict[str, int] = {}
        self._counted: weakref.WeakKeyDictionary[Connection, str] = weakref.WeakKeyDictionary()
        self.redis: RedisClient | None = None
        self._own_redis = False
        self._redis_section: dict[str, Any] = {}

    def register(self, context: IPluginContext) -> None:
        self.context = context
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.counts = context.server_notes.setdefault(COUNTS_NOTE, {})
        self.load()
        context.config.on_change("limit.ini", self.load)

    def load(self) -> None:
        """(Re)read limit.ini; a bad value raises and changes nothing. A section of
        Haraka's plugin this one lacks, turned on, is a WARN: the operator meant a limit
        that is not enforced."""
        ini = self.config.get_ini("limit.ini", booleans=BOOLEANS)
        limits = Limits.from_ini(ini)
        if limits.rates:
            self._connect_redis(ini.get("redis") or {})  # (may raise: nothing changed yet)
        self.limits = limits
        for section, values in ini.items():
            if section not in _SECTIONS and is_truthy(values.get("enabled", False)):
                self.log.warn(
                    f"limit.ini [{section}] enabled is not enforced: this limit plugin has"
                    f" only {', '.join(sorted(_SECTIONS - {'main', 'redis'}))}"
                )

    def _connect_redis(self, own: dict[str, Any]) -> None:
        """Make the Redis the rates are counted in, and connect it now (not at the first
        count, which would be lost): limit.ini [redis] when it names one (made again when
        it changes), else the server's shared connection.

        @raise ValueError: naming limit.ini [redis] and the key, for a bad value.
        """
        if self.redis is not None and own == self._redis_section:
            return
        client, made = plugin_client(self.context, own, "limit.ini [redis]")
        if self.redis is not None and self._own_redis:
            self.redis.close()
        self.redis, self._own_redis, self._redis_section = client, made, dict(own)

    def _redis(self) -> RedisClient:
        assert self.redis is not None  # (made by load whenever a rate is on)
        return self.redis

    def shutdown(self) -> None:
        """Close limit's own Redis connection (the shared one is the redis plugin's)."""
        if self.redis is not None and self._own_redis:
            self.redis.close()

    def penalize(
        self, connection: Connection, code: Code, message: Any
    ) -> _Answer | Deferred[_Answer]:
        """The refusal, after C{tarpit_delay} seconds when one is set."""
        delay = self.limits.tarpit_delay
        if not delay:
            return code, message
        connection.loginfo(f"tarpitting for {delay:g}s", self.name)
        return deferLater(self.clock, delay, lambda: (code, message))

    # -- concurrency -----------------------------------------------------------------

    def _release(self, connection: Connection) -> None:
        ip = self._counted.pop(connection, None)
        if ip is None:
            return
        left = self.counts.get(ip, 0) - 1
        if left > 0:
            self.counts[ip] = left
        else:
            self.counts.pop(ip, None)

    def hook_connect_init(self, connection: Connection) -> Code:
        self._release(connection)  # connect_init runs again after XCLIENT or PROXY
        if self.limits.concurrency:
            ip = connection.remote.ip
            self.counts[ip] = self.counts.get(ip, 0) + 1
            self._counted[connection] = ip
        return CONT

    def hook_connect(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        limit = self.limits.concurrency
        ip = self._counted.get(connection)
        if limit and ip is not None:
            count = self.counts.get(ip, 0)
            connection.results.add(self.name, concurrent=f"{count}/{limit}")
            if count > limit:
                connection.results.add(self.name, fail="concurrency.max")
                return self.penalize(connection, DENYSOFTDISCONNECT, TOO_MANY_CONNECTIONS)
        rates = self.limits.rates
        if "rate_conn" in rates or "rate_rcpt_host" in rates:
            return self._rate_checked(connection, self._connect_rates(connection))
        return CONT

    def hook_disconnect(self, connection: Connection) -> Code:
        self._release(connection)
        return CONT

    # -- errors -----------------------------------------------------------------------

    def _errors(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        limit = self.limits.errors
        if not limit or connection.errors <= limit:
            return CONT
        connection.results.add(self.name, fail="errors.max")
        return self.penalize(connection, DENYSOFTDISCONNECT, TOO_MANY_ERRORS)

    def hook_helo(self, connection: Connection, host: str) -> _Answer | Deferred[_Answer]:
        return self._errors(connection)

    def hook_ehlo(self, connection: Connection, host: str) -> _Answer | Deferred[_Answer]:
        return self._errors(connection)

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> _Answer | Deferred[_Answer]:
        return self._errors(connection)

    def hook_data(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        return self._errors(connection)

    # -- recipients -----------------------------------------------------------------

    def hook_rcpt(
        self, connection: Connection, recipient: Address, params: dict[str, str | None]
    ) -> _Answer | Deferred[_Answer]:
        answer = self._errors(connection)
        if answer is not CONT:
            return answer
        limits = self.limits
        limit = limits.recipients
        if connection.relaying and limits.recipients_relaying:
            limit = limits.recipients_relaying
        counts = connection.rcpt_count
        if limit and counts.accept + counts.tempfail + counts.reject + 1 > limit:
            connection.results.add(self.name, fail="recipients.max")
            return self.penalize(connection, DENYSOFT, TOO_MANY_RECIPIENTS)
        table = limits.rates.get("rate_rcpt_host")
        remote = connection.remote
        found = table.for_client(remote.ip, remote.host, connection.results) if table else None
        if found is not None:  # (counted, not waited for: it is checked at the next connect)
            counted = Deferred.fromCoroutine(fixed_window(self._redis(), found[0], found[1].period))
            counted.addErrback(lambda f: self._redis_failed(connection, "rate_rcpt_host", f.value))
        return CONT

    def hook_rcpt_ok(self, connection: Connection, recipient: Address) -> Any:
        """The rates of an accepted recipient: its sender, the null sender's recipient and
        the recipient (so a recipient refused anyway makes no count)."""
        if RCPT_RATES.keys() & self.limits.rates.keys():
            return self._rate_checked(connection, self._rcpt_rates(connection, recipient))
        return CONT

    # -- rates (Redis) ------------------------------------------------------------------

    def _redis_failed(self, connection: Connection, section: str, error: object) -> None:
        connection.results.add(self.name, err=f"{section}: {error}")

    def _rate_checked(
        self, connection: Connection, check: Coroutine[Any, Any, _Refusal | None]
    ) -> Deferred[_Answer]:
        """Run a rate C{check} within one Redis C{timeout} in all (its commands wait for
        one another), and answer its refusal after the tarpit; a check that takes longer
        enforces nothing, as with Redis away."""

        def too_slow(result: Any, timeout: float) -> None:
            self._redis_failed(connection, "rates", f"no answer from Redis in {timeout:g} s")

        def answer(refusal: _Refusal | None) -> _Answer | Deferred[_Answer]:
            return CONT if refusal is None else self.penalize(connection, *refusal)

        checked: Deferred[_Refusal | None] = Deferred.fromCoroutine(check)
        checked.addTimeout(self._redis().timeout, self.clock, onTimeoutCancel=too_slow)
        return checked.addCallback(answer)

    def _over(self, connection: Connection, section: str, count: int, rate: Rate) -> bool:
        """Record C{section}'s count against its rate, and a fail when over; True if over."""
        connection.results.add(self.name, **{section: f"{count}/{rate.limit}"})
        if count <= rate.limit:
            return False
        connection.results.add(self.name, fail=section)
        return True

    async def _connect_rates(self, connection: Connection) -> _Refusal | None:
        """[rate_conn]: count this connection and refuse one over the rate;
        [rate_rcpt_host]: refuse a client whose recipients are over the rate."""
        rates, remote = self.limits.rates, connection.remote
        table = rates.get("rate_conn")
        found = table.for_client(remote.ip, remote.host, connection.results) if table else None
        if found is not None:
            key, rate = found
            now_ms = int(self.clock.seconds() * 1000)
            try:
                count = await sliding_window(
                    self._redis(), key, rate.period, now_ms, connection.uuid
                )
            except (RedisError, RedisUnavailable) as e:
                self._redis_failed(connection, "rate_conn", e)
            else:
                if self._over(connection, "rate_conn", count, rate):
                    return DENYSOFTDISCONNECT, CONNECTION_RATE
        table = rates.get("rate_rcpt_host")
        found = table.for_client(remote.ip, remote.host, connection.results) if table else None
        if found is not None:
            key, rate = found
            try:
                reply = await self._redis().execute("GET", key)
                count = int(reply or 0)
            except (RedisError, RedisUnavailable, ValueError) as e:
                self._redis_failed(connection, "rate_rcpt_host", e)
            else:
                if self._over(connection, "rate_rcpt_host", count, rate):
                    return DENYSOFTDISCONNECT, RECIPIENT_RATE
        return None

    async def _rcpt_rates(self, connection: Connection, recipient: Address) -> _Refusal | None:
        """Count an accepted recipient for its sender (or, from the null sender, for
        itself in [rate_rcpt_null]) and for itself; refuse it (450) over a rate."""
        rates = self.limits.rates
        txn = connection.transaction
        sender = txn.mail_from if txn is not None else None
        checks = [("rate_rcpt", recipient.address)]
        if sender is not None:
            if sender.is_null:
                checks.insert(0, ("rate_rcpt_null", recipient.address))
            else:
                checks.insert(0, ("rate_rcpt_sender", sender.address))
        for section, address in checks:
            table = rates.get(section)
            found = table.for_address(address) if table else None
            if found is None:
                continue
            key, rate = found
            try:
                count = await fixed_window(self._redis(), key, rate.period)
            except (RedisError, RedisUnavailable) as e:
                self._redis_failed(connection, section, e)
                continue
            if self._over(connection, section, count, rate):
                return DENYSOFT, RCPT_RATES[section]
        return None

    # -- unrecognized commands ----------------------------------------------------------

    def hook_unrecognized_command(
        self, connection: Connection, verb: str, argument: str
    ) -> _Answer | Deferred[_Answer]:
        limit = self.limits.unrecognized_commands
        if not limit:
            return CONT
        if count_unrecognized(connection, self.name, verb) <= limit:
            return CONT
        connection.results.add(self.name, fail="unrec_cmds.max")
        return self.penalize(connection, DENYSOFTDISCONNECT, TOO_MANY_UNRECOGNIZED)
