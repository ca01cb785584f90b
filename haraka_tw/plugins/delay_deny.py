"""delay_deny: hold pre-DATA refusals until the recipient is known, so that relaying
clients (authenticated users, trusted hosts) get past them.

It answers the C{deny} hook. When another plugin refuses (DENY, DENYSOFT or their
DISCONNECT variants) in C{lookup_rdns}, C{connect}, C{helo}, C{ehlo}, C{mail} or C{rcpt},
delay_deny overrides the refusal (the session goes on as if that plugin had said CONT) and
keeps it: connection-wide for the greeting hooks, for the transaction for C{mail}, for that
one recipient for C{rcpt}. Then, in C{rcpt_ok}:

- a relaying client gets past every kept refusal;
- anyone else gets the first one kept (connection first, then transaction, then this
  recipient's), with the refusing plugin's own code and message, in the reply to RCPT.
  (With DENYDISCONNECT, that reply closes the connection.)

A refusal in C{rcpt_ok} itself is overridden for a relaying client only. Refusals in
C{data} and later hooks are never delayed. At data_post, when refusals were held, the
message gets an C{X-Haraka-Fail-Pre} header naming the plugins that refused.

delay_deny.ini, C{[main]}, selects which refusals are delayed. Entries are
C{plugin}, C{plugin:hook} or C{plugin:hook:method} (the method is C{hook_<hook>}),
separated by commas, semicolons or spaces:

- C{included_plugins}: delay only these;
- C{excluded_plugins}: delay all but these (ignored when included_plugins is set).

With neither, every pre-DATA refusal is delayed. The file is re-read when it changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, OK, Code
from haraka_tw.interfaces import (
    IDataPostHook,
    IDenyHook,
    IPluginContext,
    IRcptOkHook,
    IRegistration,
)
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection

__all__ = ["CONNECTION_HOOKS", "NOTE", "TRANSACTION_HOOKS", "DelayedDenial", "Plugin"]

#: Refusals in these hooks are kept for the whole connection.
CONNECTION_HOOKS = frozenset({"lookup_rdns", "connect", "helo", "ehlo"})
#: Refusals in these hooks are kept for the transaction (rcpt: for its recipient only).
TRANSACTION_HOOKS = frozenset({"mail", "rcpt"})
#: The notes key (on the connection and the transaction) holding the kept refusals.
NOTE = "delay_deny_pre"
FAIL_NOTE = "delay_deny_pre_fail"

_SEPARATORS = re.compile(r"[;,\s]+")


@dataclass(frozen=True)
class DelayedDenial:
    """A refusal held back: what the plugin answered, and where."""

    code: Code
    message: Any
    plugin: str
    hook: str
    method: str
    recipient: Address | None = None  # for a rcpt refusal: the recipient it was about


def _entries(value: Any) -> frozenset[str]:
    items = value if isinstance(value, list) else [value]
    return frozenset(
        name for item in items if item not in (None, True) for name in _SEPARATORS.split(str(item))
    ) - {""}


@implementer(IRegistration, IDenyHook, IRcptOkHook, IDataPostHook)
class Plugin:
    name = "delay_deny"

    def __init__(self) -> None:
        self.included: frozenset[str] = frozenset()
        self.excluded: frozenset[str] = frozenset()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.load()
        context.config.on_change("delay_deny.ini", self.load)

    def load(self) -> None:
        """(Re)read delay_deny.ini."""
        main = self.config.get_ini("delay_deny.ini")["main"]
        self.included = _entries(main.get("included_plugins"))
        self.excluded = _entries(main.get("excluded_plugins"))

    def delays(self, plugin: str, hook: str, method: str) -> bool:
        """Whether a refusal by C{plugin} in C{hook} (C{method}) is to be delayed."""
        keys = {plugin, f"{plugin}:{hook}", f"{plugin}:{hook}:{method}"}
        if self.included:
            return bool(keys & self.included)
        return not keys & self.excluded

    def hook_deny(
        self,
        connection: Connection,
        code: Code,
        message: Any,
        plugin: str,
        method: str,
        params: tuple[Any, ...],
        hook: str,
    ) -> Code:
        if plugin == self.name:  # our own refusal, at rcpt_ok: it stands
            return CONT
        if hook == "rcpt_ok":
            if connection.relaying and self.delays(plugin, hook, method):
                txn = connection.transaction
                self._record_fail(txn.notes if txn is not None else None, plugin)
                connection.loginfo(
                    f"relaying: past {code.name} from {plugin} in rcpt_ok", self.name
                )
                return OK
            return CONT
        if hook not in CONNECTION_HOOKS and hook not in TRANSACTION_HOOKS:
            return CONT
        if not self.delays(plugin, hook, method):
            connection.logdebug(f"not delaying {code.name} from excluded {plugin}", self.name)
            return CONT
        if hook in CONNECTION_HOOKS:
            notes: dict[str, Any] = connection.notes
        elif connection.transaction is not None:
            notes = connection.transaction.notes
        else:
            return CONT
        recipient = params[0] if hook == "rcpt" and params else None
        notes.setdefault(NOTE, []).append(
            DelayedDenial(code, message, plugin, hook, method, recipient)
        )
        self._record_fail(notes, plugin)
        connection.loginfo(f"delaying {code.name} from {plugin} in {hook}", self.name)
        return OK

    @staticmethod
    def _record_fail(notes: dict[str, Any] | None, plugin: str) -> None:
        if notes is not None:
            notes.setdefault(FAIL_NOTE, {})[plugin] = 1

    def hook_rcpt_ok(self, connection: Connection, recipient: Address) -> Code | tuple[Code, Any]:
        txn = connection.transaction
        if txn is None:
            return CONT
        held: list[DelayedDenial] = txn.notes.get(NOTE) or []
        # A rcpt refusal is about its own recipient: used now or never.
        mine = [d for d in held if d.hook == "rcpt" and d.recipient is recipient]
        txn.notes[NOTE] = [d for d in held if d.hook != "rcpt"]
        pending = [*(connection.notes.get(NOTE) or []), *txn.notes[NOTE], *mine]
        if not pending:
            return CONT
        if connection.relaying:
            connection.loginfo("relaying: past every pre-DATA refusal", self.name)
            return CONT
        first = pending[0]
        connection.loginfo(f"applying {first.code.name} from {first.plugin}", self.name)
        return first.code, first.message

    def hook_data_post(self, connection: Connection) -> Code:
        txn = connection.transaction
        if txn is None:
            return CONT
        failed = {**(connection.notes.get(FAIL_NOTE) or {}), **(txn.notes.get(FAIL_NOTE) or {})}
        if failed:
            txn.add_header("X-Haraka-Fail-Pre", " ".join(failed))
        return CONT
