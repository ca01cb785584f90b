"""aliases: rewrite or drop recipients by a table (Haraka's C{aliases}, aliases.json).

aliases.json maps keys to rules::

    {
      "postmaster@example.com": {"action": "alias", "to": "ops@example.com"},
      "team":                   {"action": "alias", "to": ["ann@example.com", "bob"]},
      "noreply@example.com":    {"action": "drop"},
      "@old.example":           {"action": "alias", "to": "desk@example.com"}
    }

For each recipient the first key that exists wins, tried in Haraka's order (no chaining: a
target is not looked up again):

  1. C{user@domain}, the whole address;
  2. C{user}, the whole local part, at any domain;
  3. C{prefix@domain}: the local part up to its first C{+} or C{-}
     (C{john+news@example.com} and C{john-smith@example.com} try C{john@example.com});
  4. C{prefix}, at any domain;
  5. C{@domain}, every address at the domain;
  6. C{*}, anything else.

C{alias} replaces the recipient with its targets (a string or a list; a target without
C{@} takes the recipient's domain) and sets C{transaction.notes["forward"]}; C{drop}
takes the recipient out. The client is not told: the recipient is answered as the other
rcpt plugins decide (list C{aliases} above them; it answers CONT), with the address it
gave. The envelope is changed when the client sends DATA, for the recipients accepted.

Done otherwise than Haraka's plugin, where it loses or misroutes mail:

  - C{drop} drops that recipient, not the whole message for every recipient (Haraka sets
    the transaction's discard note); a message whose every recipient is dropped is
    accepted and thrown away at the queue hook;
  - a recipient refused by a later plugin leaves no alias target behind (Haraka's pop
    removes only the last target);
  - targets are checked when the file is read: a rule with another action, without
    C{to}, or with a target that is not an address stops start-up (Haraka logs it at
    each RCPT, and a bad target loses the recipient); a list target without C{@} takes
    the domain as a string one does;
  - domains are matched in any case, and local parts too (Haraka matches the local part
    as typed, and the domain sometimes as typed);
  - the keys without a domain (C{user}, C{prefix}, C{*}) apply only to mail received,
    not to mail a relaying client sends out (Haraka's C{*} rewrites every outgoing
    recipient too);
  - a target already among the recipients is not added twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, OK, Code
from haraka_tw.interfaces import (
    IDataHook,
    IPluginContext,
    IQueueHook,
    IQueueOutboundHook,
    IRcptHook,
    IRegistration,
)
from haraka_tw.logging import Level
from haraka_tw.plugins.rcpt_to.host_list_base import HostList, ascii_form
from haraka_tw.smtp.address import Address, AddressError, parse_path
from haraka_tw.smtp.connection import Connection, Transaction

__all__ = ["Plugin", "Rule", "load_rules"]

_ACTIONS = ("alias", "drop")
_PENDING = "aliases"  # transaction note: [(recipient, rule)], applied at DATA
_DROPPED = "aliases_dropped"


@dataclass(frozen=True)
class Rule:
    key: str  # as the file writes it
    action: str  # alias or drop
    targets: tuple[str, ...] = ()  # for alias: addresses, or local parts taking the domain


def _target(item: Any, where: str) -> str:
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"{where}: a target must be an address, not {item!r}")
    text = item.strip()
    if "@" in text:
        try:
            parse_path(f"<{text}>", allow_utf8=True)
        except AddressError as e:
            raise ValueError(f"{where}: {text!r} is not an address: {e}") from None
    else:
        try:
            parse_path(f"<{text}@example.com>", allow_utf8=True)
        except AddressError as e:
            raise ValueError(f"{where}: {text!r} is not a local part: {e}") from None
    return text


def _lookup_key(key: str) -> str:
    """A key as looked up: lower case, its domain (after @) as A-labels."""
    local, at, domain = key.strip().lower().rpartition("@")
    return f"{local}@{ascii_form(domain)}" if at else domain


def load_rules(table: Any, name: str = "aliases.json") -> dict[str, Rule]:
    """The rules of an aliases table, keyed as looked up (lower case, domains as
    A-labels); ValueError naming the file and key for anything that is not a rule. A key
    whose value is null or false is no rule (as in Haraka: it can undo a key of a lower
    config directory)."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ValueError(f"{name}: must be an object of key: rule, not {type(table).__name__}")
    rules: dict[str, Rule] = {}
    for key, value in table.items():
        where = f"{name} {key!r}"
        if value is None or value is False:
            continue
        if not isinstance(key, str):
            raise ValueError(f"{where}: a key is an address, a local part, @domain or *")
        if not isinstance(value, dict):
            raise ValueError(f"{where}: a rule is an object with an action, not {value!r}")
        action = value.get("action")
        if not isinstance(action, str) or action.lower() not in _ACTIONS:
            raise ValueError(f"{where}: action must be alias or drop, not {action!r}")
        action = action.lower()
        targets: tuple[str, ...] = ()
        if action == "alias":
            to = value.get("to")
            items = [to] if isinstance(to, str) else to
            if not isinstance(items, list) or not items:
                raise ValueError(f'{where}: an alias needs "to": an address or a list of them')
            targets = tuple(_target(item, where) for item in items)
        lookup = _lookup_key(key)
        if lookup in rules:
            raise ValueError(f"{where}: the same key as {rules[lookup].key!r}")
        rules[lookup] = Rule(key, action, targets)
    return rules


def _prefix(local: str) -> str:
    for at, char in enumerate(local):
        if char in "+-":
            return local[:at]
    return local


@implementer(IRegistration, IRcptHook, IDataHook, IQueueHook, IQueueOutboundHook)
class Plugin:
    name = "aliases"

    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}
        self.local_domains: Any = ()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.local_domains = HostList(context.config, context.log)
        self.load()
        context.config.on_change("aliases.json", self.load)
        context.config.on_change("aliases", self.load)

    def load(self) -> None:
        """(Re)read aliases.json (else Haraka's older C{aliases}, JSON too); a bad rule
        raises, naming the file and key, and changes nothing."""
        table = self.config.get_json("aliases.json")
        name = "aliases.json"
        if table is None:
            table, name = self.config.get_json("aliases"), "aliases"
        self.rules = load_rules(table, name)

    def find(self, recipient: Address, *, relaying: bool = False) -> Rule | None:
        """The rule for C{recipient}: the first key of the six that exists. For a
        relaying client, the keys without a domain are tried only for recipients in the
        local domains (host_list, host_list_regex): mail it sends elsewhere keeps its
        recipients."""
        local, domain = recipient.local.lower(), ascii_form(recipient.domain)
        prefix = _prefix(local)
        keys = [f"{local}@{domain}", f"{prefix}@{domain}", f"@{domain}"]
        if not relaying or domain in self.local_domains:
            keys = [keys[0], local, keys[1], prefix, keys[2], "*"]
        for key in keys:
            rule = self.rules.get(key)
            if rule is not None:
                return rule
        return None

    def hook_rcpt(
        self, connection: Connection, recipient: Address, params: dict[str, str | None]
    ) -> Code:
        txn = connection.transaction
        if txn is None or not self.rules or not recipient.domain:  # (not a bare <postmaster>)
            return CONT
        rule = self.find(recipient, relaying=connection.relaying)
        if rule is not None:
            txn.notes.setdefault(_PENDING, []).append((recipient, rule))
        return CONT

    def hook_data(self, connection: Connection) -> Code:
        if connection.transaction is not None:
            self._apply(connection, connection.transaction)
        return CONT

    def hook_queue(self, connection: Connection) -> Code:
        return self._queue(connection)

    def hook_queue_outbound(self, connection: Connection) -> Code:
        return self._queue(connection)

    def _queue(self, connection: Connection) -> Code:
        """The envelope as rewritten (if a data plugin above answered for it); a message
        whose every recipient was dropped is accepted here and goes nowhere."""
        txn = connection.transaction
        if txn is None:
            return CONT
        self._apply(connection, txn)
        if not txn.rcpt_to and txn.notes.get(_DROPPED):  # (a note: a bool, kept in queue files)
            connection.log(Level.INFO, "every recipient dropped: message discarded", self.name)
            return OK
        return CONT

    def _apply(self, connection: Connection, txn: Transaction) -> None:
        """Rewrite the accepted recipients by their rules, once."""
        pending = txn.notes.pop(_PENDING, None)
        if not pending:
            return
        rules = {id(recipient): rule for recipient, rule in pending}
        # targets already among the recipients kept as they are, or added, are not added
        present = {_identity(r) for r in txn.rcpt_to if id(r) not in rules}
        recipients: list[Address] = []
        all_params: list[dict[str, str | None]] = []
        # (a plugin may have added recipients without parameters, as Haraka's do)
        params_of = txn.rcpt_params + [{}] * (len(txn.rcpt_to) - len(txn.rcpt_params))
        for recipient, params in zip(txn.rcpt_to, params_of, strict=False):
            rule = rules.get(id(recipient))
            if rule is None:
                recipients.append(recipient)
                all_params.append(params)
                continue
            shown = recipient.address
            if rule.action == "drop":
                txn.results.push(self.name, drop=shown)
                txn.notes[_DROPPED] = True
                connection.log(Level.INFO, f"dropping <{shown}> ({rule.key})", self.name)
                continue
            targets = [_address(t, recipient.domain) for t in rule.targets]
            added = [t for t in targets if _identity(t) not in present]
            present.update(_identity(t) for t in added)
            recipients += added
            all_params += [dict(params) for _ in added]
            names = ", ".join(t.address for t in targets)
            txn.results.push(self.name, alias=f"{shown} -> {names}")
            txn.notes["forward"] = True
            connection.log(Level.INFO, f"aliasing <{shown}> to {names} ({rule.key})", self.name)
        txn.rcpt_to[:] = recipients
        txn.rcpt_params[:] = all_params


def _address(target: str, domain: str) -> Address:
    """A target as an Address; a bare local part takes the recipient's domain. (Each was
    parsed when the file was read.)"""
    text = target if "@" in target else f"{target}@{domain}"
    return parse_path(f"<{text}>", allow_utf8=True)


def _identity(address: Address) -> tuple[str, str]:
    return address.local.lower(), ascii_form(address.domain)
