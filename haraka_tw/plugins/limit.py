"""limit: the parts of Haraka's limit plugin that need no Redis.

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

C{[main] tarpit_delay} (seconds, default 0) holds each of these refusals that long first.
The file is re-read when it changes. The rate limits and history of Haraka's plugin need
Redis and are not here.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
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
    IRegistration,
    IUnrecognizedCommandHook,
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
)
#: The server notes key of the per-IP connection counts.
COUNTS_NOTE = "limit.concurrency"
#: the sections this plugin reads
_SECTIONS = frozenset({"main", "concurrency", "recipients", "unrecognized_commands", "errors"})


DEFAULT_MAX = {"concurrency": 3, "recipients": 0, "unrecognized_commands": 10, "errors": 10}

TOO_MANY_CONNECTIONS = "Too many concurrent connections"
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3", "Too many recipient attempts")
TOO_MANY_UNRECOGNIZED = "Too many unrecognized commands"
TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Too many errors")

_Answer = Code | tuple[Code, Any]


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
    IDataHook,
    IUnrecognizedCommandHook,
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

    def register(self, context: IPluginContext) -> None:
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
        self.limits = Limits.from_ini(ini)
        for section, values in ini.items():
            if section not in _SECTIONS and is_truthy(values.get("enabled", False)):
                self.log.warn(
                    f"limit.ini [{section}] enabled is not enforced: this limit plugin has"
                    f" only {', '.join(sorted(_SECTIONS - {'main'}))} (Haraka's rate limits"
                    " and history need its Redis)"
                )

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
        if not limit or ip is None:
            return CONT
        count = self.counts.get(ip, 0)
        connection.results.add(self.name, concurrent=f"{count}/{limit}")
        if count <= limit:
            return CONT
        connection.results.add(self.name, fail="concurrency.max")
        return self.penalize(connection, DENYSOFTDISCONNECT, TOO_MANY_CONNECTIONS)

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
        if not limit:
            return CONT
        counts = connection.rcpt_count
        if counts.accept + counts.tempfail + counts.reject + 1 <= limit:
            return CONT
        connection.results.add(self.name, fail="recipients.max")
        return self.penalize(connection, DENYSOFT, TOO_MANY_RECIPIENTS)

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
