"""tarpit: slow down the replies to a client that another plugin has judged suspicious.

A plugin listed *before* tarpit sets C{connection.notes.tarpit} (or
C{connection.transaction.notes.tarpit}) to a number of seconds; tarpit then holds each of
its hooks that long before passing the turn on (CONT), so the reply to the command comes
late. It never changes a reply. List it before any plugin that accepts (answers OK), or
those answers come first.

tarpit.ini::

    [main]
    ; the hooks to delay, separated by commas, spaces or semicolons
    hooks_to_delay=connect,helo,ehlo,mail,rcpt,rcpt_ok,data,data_post,queue,unrecognized_command,vrfy,noop,rset,quit
    ; seconds to delay every client that no plugin has set a delay for (0: none)
    delay=0

The hook list is read at start-up; C{delay} is re-read when the file changes. The delay is
a Deferred on the reactor (C{callLater}), never a sleep: other sessions carry on. The
shipped C{tarpit.timeout} is 0 (no plugin timeout), as in Haraka, so a long delay is not cut
short into C{450 plugin timeout}.

Each delayed reply is logged at INFO as C{tarpitting response for <n>s}.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import alsoProvides, implementer
from zope.interface.interface import InterfaceClass

from haraka_tw.codes import CONT, Code
from haraka_tw.interfaces import HOOKS, IPluginContext, IRegistration
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection

__all__ = ["DEFAULT_HOOKS", "DELAYABLE_HOOKS", "Plugin", "parse_hooks"]

#: Haraka's default list.
DEFAULT_HOOKS = (
    "connect",
    "helo",
    "ehlo",
    "mail",
    "rcpt",
    "rcpt_ok",
    "data",
    "data_post",
    "queue",
    "unrecognized_command",
    "vrfy",
    "noop",
    "rset",
    "quit",
)
#: Every hook tarpit can delay: the session hooks whose reply waits for the chain.
DELAYABLE_HOOKS = frozenset({*DEFAULT_HOOKS, "queue_outbound", "max_data_exceeded"})

_SEPARATORS = re.compile(r"[\s,;]+")


def parse_hooks(value: Any) -> tuple[str, ...]:
    """The hook names of a C{hooks_to_delay} value (a string, or a C{key[]=} list).

    @raise ValueError: for a name tarpit cannot delay.
    """
    items = value if isinstance(value, list) else [value]
    names: list[str] = []
    for item in items:
        for name in _SEPARATORS.split(str(item)):
            if name and name not in names:
                names.append(name)
    wrong = [n for n in names if n not in DELAYABLE_HOOKS]
    if wrong:
        raise ValueError(
            f"hooks_to_delay: cannot delay {', '.join(wrong)} "
            f"(can: {', '.join(sorted(DELAYABLE_HOOKS))})"
        )
    return tuple(names)


def _seconds(value: Any) -> float | None:
    """A delay in seconds from a note or config value; None when unset, unusable or 0."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


@implementer(IRegistration)
class Plugin:
    """Provides the hook interfaces of C{hooks_to_delay} only (added at registration)."""

    name = "tarpit"

    def __init__(self, clock: IReactorTime | None = None) -> None:
        # The plugin loader calls the factory with no arguments; a test passes a Clock.
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock = clock
        self.hooks: tuple[str, ...] = ()
        self.delay: float | None = None

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        main = self.config.get_ini("tarpit.ini")["main"]
        hooks = main.get("hooks_to_delay")
        self.hooks = DEFAULT_HOOKS if hooks in (None, "", True) else parse_hooks(hooks)
        interfaces: list[InterfaceClass] = [HOOKS[name] for name in self.hooks]
        alsoProvides(self, *interfaces)
        self.load()
        context.config.on_change("tarpit.ini", self.load)

    def load(self) -> None:
        """(Re)read the default delay."""
        main = self.config.get_ini("tarpit.ini")["main"]
        value = main.get("delay", 0)
        if value not in (None, 0) and _seconds(value) is None:
            raise ValueError(f"tarpit.ini delay must be a number of seconds, not {value!r}")
        self.delay = _seconds(value)

    def delay_for(self, connection: Connection) -> float | None:
        """The seconds to hold this connection's replies: its note, its transaction's note,
        else the configured delay."""
        for notes in (connection.notes, getattr(connection.transaction, "notes", None)):
            if notes is not None and notes.get("tarpit") is not None:
                return _seconds(notes.get("tarpit"))
        return self.delay

    def tarpit(self, connection: Connection) -> Code | Deferred[Code]:
        """CONT, after the connection's delay."""
        delay = self.delay_for(connection)
        if delay is None:
            return CONT
        connection.loginfo(f"tarpitting response for {delay:g}s", self.name)
        return deferLater(self.clock, delay, lambda: CONT)

    # One method per hook tarpit can delay; only the configured ones are ever called.

    def hook_connect(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_helo(self, connection: Connection, host: str) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_ehlo(self, connection: Connection, host: str) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_rcpt(
        self, connection: Connection, recipient: Address, params: dict[str, str | None]
    ) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_rcpt_ok(self, connection: Connection, recipient: Address) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_data(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_data_post(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_max_data_exceeded(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_queue(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_queue_outbound(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_unrecognized_command(
        self, connection: Connection, verb: str, argument: str
    ) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_vrfy(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_noop(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_rset(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)

    def hook_quit(self, connection: Connection) -> Code | Deferred[Code]:
        return self.tarpit(connection)
