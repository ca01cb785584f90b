"""karma: Haraka's scoring plugin. Each connection earns a score from what it does and what
other plugins found; a score at or below C{[thresholds] negative} is refused at the hooks
C{[deny] hooks} names, and a negative score slows every reply (C{[tarpit]}).

What scores:

- C{[result_awards]}: C{ID = plugin | property | operator | value | award | reason}, a
  rule over another plugin's results (C{dns-list | fail | match | zen | -5}). Operators:
  C{equals} (C{eq}, C{equal}; the value C{true} is any true value), C{match} (a regular
  expression, any case), C{lt}, C{gt} (numbers), C{length} (C{length gt 2}: of the list),
  C{exists}. Read from the connection's and the open transaction's results each time a
  karma hook runs; each rule scores at most once per connection.
- C{[awards]}: C{location[@wants] = N [if condition value]}, a connection attribute
  (C{relaying = 6}), a note (C{notes.a.b}) or a result (C{results.plugin.property}),
  conditions C{equals}, C{gt}, C{lt}, C{match}, C{length gt|lt|equals N}, C{in}; each
  scores once, when its condition first holds.
- C{[spammy_tlds]}: C{suffix = penalty}, the sender's domain (longest suffix wins).
- C{[tls]} C{set}/C{unset}: added at the first MAIL with TLS on or off (once a connection).
- Each unrecognized command: -1 (not STARTTLS or AUTH, which other plugins answer).
- Each denial of another plugin that karma takes over: -2. Karma answers the C{deny} hook
  with OK, so the session goes on and karma decides, unless the plugin is in
  C{[deny_excludes] plugins} or the hook in C{[deny_excludes] hooks}.

History: with Redis (redis.ini, or karma.ini C{[redis]}), the hash C{karma|<ip>} counts the
client's C{connections}, C{good} (ended above C{[thresholds] positive}) and C{bad} (ended
below 0) connections, kept C{[redis] expire_days}; the counts read at connect are in the
results (C{good}, C{bad}, C{connections}, C{history} = good - bad; C{pass: all_good} or
C{fail: all_bad} past 5 one-sided connections) for C{[result_awards]} to score. Redis
being away only means no history.

Private and loopback clients, and a connection with the note C{disable_karma}, are not
scored. At data_post the message gets C{X-Haraka-Karma} with the score and what made it.
List karma before the queue plugins (it refuses at queue) and after tls and auth.
"""

from __future__ import annotations

import fnmatch
import math
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYSOFT, OK, Code
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import (
    IConnectHook,
    IConnectInitHook,
    IDataHook,
    IDataPostHook,
    IDenyHook,
    IDisconnectHook,
    IEhloHook,
    IHeloHook,
    IMailHook,
    INoopHook,
    IPluginContext,
    IQueueHook,
    IQueueOutboundHook,
    IRcptHook,
    IRcptOkHook,
    IRegistration,
    IResetTransactionHook,
    IShutdown,
    IUnrecognizedCommandHook,
    IVrfyHook,
)
from haraka_tw.redis import RedisClient, plugin_client
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection, canonical_address
from haraka_tw.smtp.state import Results

__all__ = [
    "HEADER",
    "Award",
    "Plugin",
    "Rule",
    "Settings",
    "read_settings",
]

HEADER = "X-Haraka-Karma"
#: what each denial karma takes over costs
DENIAL_PENALTY = -2
#: one-sided connections past this many earn all_good / all_bad
ONE_SIDED = 5
#: at most this many unrecognized commands are named in the results (all of them score)
NAMED_COMMANDS = 10

_DEFAULT_DENY_HOOKS = (
    "unrecognized_command",
    "helo",
    "data",
    "data_post",
    "queue",
    "queue_outbound",
)
_DEFAULT_EXCLUDED_PLUGINS = (
    "access",
    "helo.checks",
    "headers",
    "spamassassin",
    "mail_from.is_resolvable",
    "clamd",
    "tls",
    "limit",
    "max_unrecognized_commands",
    "toobusy",
    "prevent_credential_leaks",
    "data.signatures",
    "block_me",
    "xclient",
    "auth/*",
)
_DEFAULT_EXCLUDED_HOOKS = ("rcpt", "rcpt_ok", "queue", "queue_outbound", "max_data_exceeded")
#: the hooks karma can refuse at
_DECIDING_HOOKS = frozenset(
    {
        "connect",
        "helo",
        "ehlo",
        "vrfy",
        "noop",
        "mail",
        "rcpt",
        "data",
        "data_post",
        "queue",
        "queue_outbound",
        "unrecognized_command",
    }
)
_NO_TARPIT = frozenset({"queue", "reset_transaction"})
_MSA_PORTS = frozenset({465, 587})
_EQUALS = frozenset({"eq", "equal", "equals"})
_OPERATORS = _EQUALS | {"match", "lt", "gt", "length", "exists"}
_CONDITIONS = _EQUALS | {"match", "lt", "gt", "length", "in"}
_LIST_SPLIT = re.compile(r"[\s,;]+")
_PHASES = ("rcpt_to.", "mail_from.", "connect.", "data.")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def _number(value: Any, where: str) -> float:
    """A finite number from an ini value; ValueError naming C{where}."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {value!r} is not a number")
    return number


def _as_number(value: Any) -> float | None:
    """C{value} as a number when it is one (a bool is not), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # (an int too large for a float)
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str:
    """How a result value reads when compared with a word from the ini."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    try:
        return str(value)
    except ValueError:  # (an int of more digits than Python will write)
        return ""


def _same(value: Any, wanted: str) -> bool:
    """Haraka's loose equality, for result values against an ini word: the same text, or
    the same number (C{5} and C{"5.0"})."""
    if _text(value) == wanted:
        return True
    number, target = _as_number(value), _as_number(wanted)
    return number is not None and number == target


def _compare(op: str, left: float, right: float) -> bool:
    return left > right if op == "gt" else left < right if op == "lt" else left == right


def _length_test(spec: str, where: str) -> tuple[str, float]:
    """C{"gt 2"} -> (C{"gt"}, 2.0)."""
    words = spec.split()
    if len(words) != 2 or words[0] not in (_EQUALS | {"gt", "lt"}):
        raise ValueError(f"{where}: length wants 'gt N', 'lt N' or 'equals N', not {spec!r}")
    op = "equals" if words[0] in _EQUALS else words[0]
    return op, _number(words[1], where)


def _regex(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{where}: {pattern!r} is not a regular expression: {e}") from None


def _values(value: Any) -> list[Any]:
    """A result property as a list of values (Haraka's reading): a list as it is, a
    mapping's values, anything else alone; nothing for an empty or missing value."""
    if value is None or value == "" or value == [] or value == {}:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, Mapping):
        return list(value.values())
    return [value]


@dataclass(frozen=True)
class Rule:
    """A C{[result_awards]} line: C{ID = plugin | property | operator | value | award}."""

    id: str
    plugin: str
    property: str
    operator: str
    value: str
    award: float
    reason: str = ""
    pattern: re.Pattern[str] | None = None
    length: tuple[str, float] | None = None

    @classmethod
    def parse(cls, rule_id: str, line: Any) -> Rule:
        where = f"karma.ini [result_awards] {rule_id}"
        parts = [part.strip() for part in str(line).split("|")]
        if len(parts) < 5 or not all(parts[:3]) or parts[4] == "":
            raise ValueError(
                f"{where}: wants 'plugin | property | operator | value | award [| reason]',"
                f" not {line!r}"
            )
        plugin, prop, operator, value, award = parts[:5]
        operator = operator.lower()
        if operator not in _OPERATORS:
            raise ValueError(
                f"{where}: unknown operator {operator!r} (equals, match, lt, gt, length, exists)"
            )
        if operator in ("lt", "gt"):
            _number(value, where)
        return cls(
            id=rule_id,
            plugin=plugin,
            property=prop,
            operator="equals" if operator in _EQUALS else operator,
            value=value,
            award=_number(award, where),
            reason=parts[5] if len(parts) > 5 else "",
            pattern=_regex(value, where) if operator == "match" else None,
            length=_length_test(value, where) if operator == "length" else None,
        )

    def matches(self, values: list[Any]) -> bool:
        """Whether the property's values (L{_values}) meet the rule."""
        op = self.operator
        if op == "exists":
            return bool(values)
        if op == "length":
            assert self.length is not None
            return _compare(self.length[0], len(values), self.length[1])
        for value in values:
            if op == "equals":
                if bool(value) if self.value == "true" else _same(value, self.value):
                    return True
            elif op == "match":
                assert self.pattern is not None
                if self.pattern.search(_text(value)):
                    return True
            else:
                number = _as_number(value)
                if number is not None and _compare(op, number, float(self.value)):
                    return True
        return False


@dataclass(frozen=True)
class Award:
    """An C{[awards]} line: C{location[@wants] = N [if condition value]}."""

    key: str
    location: str
    award: float
    condition: str | None = None  # None: the value must be true (or equal @wants)
    wanted: str | None = None
    pattern: re.Pattern[str] | None = None
    length: tuple[str, float] | None = None

    @classmethod
    def parse(cls, key: str, line: Any) -> Award:
        where = f"karma.ini [awards] {key}"
        location, _, wants = key.partition("@")
        words = str(line).split()
        if not location or not words:
            raise ValueError(f"{where}: wants 'N [if condition value]', not {line!r}")
        award = _number(words[0], where)
        if len(words) == 1:
            return cls(key, location, award, wanted=wants or None)
        if words[1].lower() != "if" or len(words) < 3:
            raise ValueError(f"{where}: wants 'N if condition value', not {line!r}")
        condition = words[2].lower()
        if condition not in _CONDITIONS:
            raise ValueError(
                f"{where}: unknown condition {condition!r} (equals, gt, lt, match, length, in)"
            )
        rest = words[3:]
        if condition == "length":
            spec = " ".join(rest) if len(rest) == 2 else f"{rest[0] if rest else ''} {wants}"
            return cls(key, location, award, "length", length=_length_test(spec, where))
        wanted = " ".join(rest) if rest else wants
        if not wanted:
            raise ValueError(f"{where}: {condition} needs a value (after it, or after @)")
        if condition in ("gt", "lt"):
            _number(wanted, where)
        return cls(
            key,
            location,
            award,
            "equals" if condition in _EQUALS else condition,
            wanted,
            pattern=_regex(wanted, where) if condition == "match" else None,
        )

    @property
    def name(self) -> str:
        """How the award is named in karma's pass and fail lists: the location without
        its C{notes.}/C{results.} prefix and phase (C{results.rcpt_to.qmd.pass} ->
        C{qmd.pass})."""
        name = self.location
        for prefix in ("transaction.results.", "results.", "notes."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        for phase in _PHASES:
            if name.startswith(phase):
                return name[len(phase) :]
        return name

    def holds(self, value: Any) -> bool:
        """Whether the value found at the location earns the award."""
        condition = self.condition
        if condition is None:
            return bool(value) if self.wanted is None else _same(value, self.wanted)
        if condition == "length":
            assert self.length is not None
            return hasattr(value, "__len__") and _compare(
                self.length[0], len(value), self.length[1]
            )
        wanted = self.wanted or ""
        if condition == "in":
            return isinstance(value, list | tuple | set | frozenset) and any(
                _same(item, wanted) for item in value
            )
        if condition == "match":
            assert self.pattern is not None
            text = ",".join(map(_text, value)) if isinstance(value, list) else _text(value)
            return self.pattern.search(text) is not None
        if condition == "equals":
            return _same(value, wanted)
        number = _as_number(value)
        return number is not None and _compare(condition, number, float(wanted))


@dataclass(frozen=True)
class Tarpit:
    """C{[tarpit]}: C{delay} seconds for every reply when set, else the score's size in
    seconds up to C{max} (C{max_msa} at connect and EHLO on the submission ports)."""

    delay: float = 0.0
    max: float = 5.0
    max_msa: float = 2.0


@dataclass(frozen=True)
class Settings:
    """karma.ini, read. A missing C{[thresholds]} section records no history."""

    negative: float = -5.0
    positive: float = 3.0
    record_history: bool = False
    deny_hooks: frozenset[str] = frozenset(_DEFAULT_DENY_HOOKS)
    deny_message: str = "very bad karma score: {score}"
    excluded_plugins: frozenset[str] = frozenset(_DEFAULT_EXCLUDED_PLUGINS)
    excluded_hooks: frozenset[str] = frozenset(_DEFAULT_EXCLUDED_HOOKS)
    tarpit: Tarpit | None = None
    spammy_tlds: Mapping[str, float] = field(default_factory=dict)
    tls_set: float = 0.0
    tls_unset: float = 0.0
    awards: tuple[Award, ...] = ()
    rules: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    expire_seconds: int = 60 * 86400


def _names(value: Any, where: str) -> frozenset[str]:
    if isinstance(value, list):
        value = ",".join(map(str, value))
    if not isinstance(value, str):
        raise ValueError(f"{where}: wants a list of names, not {value!r}")
    return frozenset(word for word in _LIST_SPLIT.split(value) if word)


def read_settings(ini: Mapping[str, Mapping[str, Any]]) -> Settings:
    """karma.ini as L{Settings}; ValueError naming the section and key of a bad value."""
    defaults = Settings()
    thresholds = ini.get("thresholds", {})
    negative = _number(thresholds.get("negative", -5), "karma.ini [thresholds] negative")
    positive = _number(thresholds.get("positive", 3), "karma.ini [thresholds] positive")
    deny = ini.get("deny", {})
    deny_hooks = defaults.deny_hooks
    if "hooks" in deny:
        deny_hooks = _names(deny["hooks"], "karma.ini [deny] hooks")
        unknown = deny_hooks - _DECIDING_HOOKS
        if unknown:
            raise ValueError(
                f"karma.ini [deny] hooks: karma cannot refuse at {', '.join(sorted(unknown))}"
                f" (it can at {', '.join(sorted(_DECIDING_HOOKS))})"
            )
    message = str(deny.get("message") or defaults.deny_message)
    excludes = ini.get("deny_excludes", {})
    excluded_plugins = defaults.excluded_plugins
    if "plugins" in excludes:
        excluded_plugins = _names(excludes["plugins"], "karma.ini [deny_excludes] plugins")
    excluded_hooks = defaults.excluded_hooks
    if "hooks" in excludes:
        excluded_hooks = _names(excludes["hooks"], "karma.ini [deny_excludes] hooks")
    tarpit = None
    if "tarpit" in ini:
        section = ini["tarpit"]

        def seconds(key: str, default: float) -> float:
            where = f"karma.ini [tarpit] {key}"
            value = _number(section.get(key, default), where)
            if value < 0:
                raise ValueError(f"{where}: {value:g} is not 0 or more seconds")
            return value

        tarpit = Tarpit(seconds("delay", 0), seconds("max", 5), seconds("max_msa", 2))
    spammy = {
        str(suffix).lower().strip("."): _number(value, f"karma.ini [spammy_tlds] {suffix}")
        for suffix, value in ini.get("spammy_tlds", {}).items()
    }
    tls = ini.get("tls", {})
    rules: dict[str, list[Rule]] = {}
    for rule_id, line in ini.get("result_awards", {}).items():
        rule = Rule.parse(str(rule_id), line)
        rules.setdefault(rule.plugin, []).append(rule)
    redis = ini.get("redis", {})
    days = _number(redis.get("expire_days", 60), "karma.ini [redis] expire_days")
    if days <= 0:
        raise ValueError(f"karma.ini [redis] expire_days: {days:g} is not a positive number")
    return Settings(
        negative=negative,
        positive=positive,
        record_history="thresholds" in ini,
        deny_hooks=deny_hooks,
        deny_message=message,
        excluded_plugins=excluded_plugins,
        excluded_hooks=excluded_hooks,
        tarpit=tarpit,
        spammy_tlds=spammy,
        tls_set=_number(tls.get("set", 0), "karma.ini [tls] set"),
        tls_unset=_number(tls.get("unset", 0), "karma.ini [tls] unset"),
        awards=tuple(Award.parse(str(k), v) for k, v in ini.get("awards", {}).items()),
        rules={plugin: tuple(found) for plugin, found in rules.items()},
        expire_seconds=max(1, round(days * 86400)),
    )


def _excluded(plugin: str, patterns: frozenset[str]) -> bool:
    """Whether C{plugin} is one of C{patterns} (names, or C{auth/*} and the like)."""
    names = {plugin, plugin.replace("/", "."), plugin.replace(".", "/")}  # (both load)
    if names & patterns:
        return True
    wild = [p for p in patterns if "*" in p or "?" in p]
    return any(fnmatch.fnmatchcase(name, p) for name in names for p in wild)


def _score_text(score: float) -> str:
    return f"{score:g}"


@dataclass
class _State:
    """One connection's karma: its score, the rules and awards already given, and the
    awards still to look for."""

    ip: str
    score: float = 0.0
    awarded: set[str] = field(default_factory=set)
    todo: list[Award] = field(default_factory=list)
    history: int | None = None
    deny_code: Code | None = None
    commands: int = 0
    tls_scored: bool = False
    #: (plugin, property, rule id) -> how many items of a connection result list were read
    read_connection: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: the same for the open transaction's results (cleared when it ends)
    read_transaction: dict[tuple[str, str, str], int] = field(default_factory=dict)


@implementer(
    IRegistration,
    IShutdown,
    IConnectInitHook,
    IConnectHook,
    IHeloHook,
    IEhloHook,
    IVrfyHook,
    INoopHook,
    IMailHook,
    IRcptHook,
    IRcptOkHook,
    IDataHook,
    IDataPostHook,
    IQueueHook,
    IQueueOutboundHook,
    IResetTransactionHook,
    IUnrecognizedCommandHook,
    IDenyHook,
    IDisconnectHook,
)
class Plugin:
    name = "karma"

    def __init__(self) -> None:
        self.settings = Settings()
        self.config: Any = None
        self.redis: RedisClient | None = None
        self._own_redis = False
        self._states: weakref.WeakKeyDictionary[Connection, _State] = weakref.WeakKeyDictionary()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.clock = context.reactor
        self.load()
        own = {
            key: value
            for key, value in self.config.get_ini("karma.ini").get("redis", {}).items()
            if key != "expire_days"
        }
        self.redis, self._own_redis = plugin_client(context, own, "karma.ini [redis]")
        context.config.on_change("karma.ini", self.load)

    def load(self) -> None:
        """(Re)read karma.ini; a bad value raises, naming it, and changes nothing."""
        self.settings = read_settings(self.config.get_ini("karma.ini"))

    def shutdown(self) -> None:
        """Close karma's own Redis connection (the shared one is the redis plugin's)."""
        if self.redis is not None and self._own_redis:
            self.redis.close()

    # -- the score ---------------------------------------------------------------------

    def _state(self, connection: Any) -> _State | None:
        if not isinstance(connection, Connection):
            return None  # (the deny hook also runs for outbound's hooks)
        return self._states.get(connection)

    def _add(self, connection: Connection, state: _State, award: float) -> None:
        state.score += award
        connection.results.add(self.name, score=state.score)

    def _label(self, connection: Connection, **labels: str) -> None:
        """Record C{fail=...} (or another list) once: a label a client can repeat at will
        (a command, a recipient) must not grow the list the rules read at every hook."""
        entry = connection.results.get(self.name) or {}
        for key, value in labels.items():
            if value not in entry.get(key, ()):
                connection.results.add(self.name, **{key: value})

    def _check_awards(self, connection: Connection, state: _State) -> None:
        """Score what the results and the connection now show that has not scored yet."""
        rules = self.settings.rules
        if rules:
            self._check_rules(connection, state, connection.results, state.read_connection)
            txn = connection.transaction
            if txn is not None:
                self._check_rules(connection, state, txn.results, state.read_transaction)
        if state.todo:
            for award in list(state.todo):
                value = self._locate(connection, award.location)
                if value is None or not award.holds(value):
                    continue
                state.todo.remove(award)
                if award.award:
                    self._add(connection, state, award.award)
                    listed = "pass" if award.award > 0 else "fail"
                    connection.results.add(self.name, **{listed: award.name})

    def _check_rules(
        self,
        connection: Connection,
        state: _State,
        results: Results,
        read: dict[tuple[str, str, str], int],
    ) -> None:
        """Score the rules not yet given against C{results}. Of a list (they only grow),
        only the items added since a rule last read it are read again, so a client that
        makes a plugin repeat a result costs each rule one look per item, not per hook."""
        for plugin, plugin_rules in self.settings.rules.items():
            entry = results.get(plugin)
            if not entry:
                continue
            for rule in plugin_rules:
                if rule.id in state.awarded or rule.property not in entry:
                    continue
                value = entry[rule.property]
                values = _values(value)
                if isinstance(value, list) and rule.operator not in ("length", "exists"):
                    mark = (plugin, rule.property, rule.id)
                    start = read.get(mark, 0)
                    read[mark] = len(value)
                    if start <= len(value):  # (else the list was reset: read it all)
                        values = values[start:]
                try:
                    matched = rule.matches(values)
                except (ValueError, OverflowError, TypeError):
                    matched = False  # (a value no rule can read is no match)
                if matched:
                    state.awarded.add(rule.id)
                    connection.results.push(self.name, awards=rule.id)
                    self._add(connection, state, rule.award)

    @staticmethod
    def _locate(connection: Connection, location: str) -> Any:
        """The value an C{[awards]} location names, or None while there is none."""
        txn = connection.transaction
        head, _, path = location.partition(".")
        if head == "notes" and path:
            for notes in (txn.notes if txn is not None else None, connection.notes):
                if notes is not None:
                    found = notes.get_path(path)
                    if found is not None:
                        return found
            return None
        if head in ("results", "transaction") and path:
            if head == "transaction":
                if not path.startswith("results."):
                    return None
                path = path[len("results.") :]
                sources = [txn.results] if txn is not None else []
            else:
                sources = [txn.results] if txn is not None else []
                sources.append(connection.results)
            parts = path.split(".")
            for results in sources:
                for cut in range(len(parts), 0, -1):  # the longest plugin name first
                    entry = results.get(".".join(parts[:cut]))
                    if entry is None:
                        continue
                    rest = ".".join(parts[cut:])
                    found = entry if not rest else entry.get(rest)
                    if found is not None:
                        return found
            return None
        if "." in location or location.startswith("_"):
            return None
        value = getattr(connection, location, None)
        return None if callable(value) else value

    # -- deciding ----------------------------------------------------------------------

    def _decide(self, connection: Connection, hook: str, tarpit: bool = True) -> Any:
        """Refuse at a deny hook when the score is at or below the negative threshold;
        first, for a negative score, wait as the tarpit says (unless C{tarpit} is false:
        the hook's reply has waited already)."""
        state = self._state(connection)
        if state is None:
            return CONT
        self._check_awards(connection, state)
        settings = self.settings
        answer: Any = CONT
        if state.score <= settings.negative and hook in settings.deny_hooks:
            message = settings.deny_message.replace("{score}", _score_text(state.score))
            message = message.replace("{uuid}", connection.uuid)
            self._label(connection, fail=f"deny:{hook}")
            answer = (state.deny_code or DENY, message)
        delay = self._delay(connection, state, hook) if tarpit else 0.0
        if delay <= 0:
            return answer
        return deferLater(self.clock, delay, lambda: answer)

    def _delay(self, connection: Connection, state: _State, hook: str) -> float:
        """The tarpit's wait, kept a second under the hook's time limit (the runner would
        answer "plugin timeout" first)."""
        tarpit = self.settings.tarpit
        if tarpit is None or state.score >= 0 or hook in _NO_TARPIT:
            return 0.0
        if tarpit.delay:
            delay = tarpit.delay
        elif not tarpit.max:
            return 0.0  # (max=0: the tarpit is off)
        elif connection.local.port in _MSA_PORTS and hook in ("connect", "ehlo"):
            delay = -state.score
            if state.history is not None and state.history > 0:
                delay -= 2  # a submission client with a good name waits less
            delay = min(delay, tarpit.max_msa, tarpit.max)
        else:
            delay = min(-state.score, tarpit.max)
        if self.config is not None:
            delay = under_hook_limit(self.config, self.name, delay)
        return max(delay, 0.0)

    # -- history -----------------------------------------------------------------------

    def _key(self, state: _State) -> str:
        return f"karma|{state.ip}"  # (Haraka's key: the address as IPv4 when it is one)

    def _redis_failed(self, connection: Connection, what: str) -> Any:
        def failed(failure: Any) -> None:
            connection.loginfo(f"Redis {what}: {failure.getErrorMessage()}", self.name)
            self._label(connection, err=f"redis {what}: failed")

        return failed

    async def _read_history(self, connection: Connection, state: _State) -> None:
        """Put the client's history in the results and count this connection."""
        redis = self.redis
        if redis is None:
            return
        key = self._key(state)
        try:
            reply = await redis.execute("HGETALL", key)
        except Exception as e:
            # (the reason goes to the log; the results reach the header: no host and port)
            connection.loginfo(f"no history from Redis: {e}", self.name)
            connection.results.add(self.name, err="redis history: unavailable")
            return
        if self._state(connection) is not state:
            return  # (a new client, after PROXY or XCLIENT, while we waited)
        pairs = reply if isinstance(reply, list) else []
        counts: dict[str, int] = {}
        for name, value in zip(pairs[::2], pairs[1::2], strict=False):
            number = _as_number(value.decode("ascii", "replace"))
            if isinstance(name, bytes) and number is not None:
                counts[name.decode("ascii", "replace")] = int(number)
        failed = self._redis_failed(connection, "history")
        if not counts:
            redis.execute("HSET", key, "good", 0, "bad", 0, "connections", 1).addErrback(failed)
        else:
            redis.execute("HINCRBY", key, "connections", 1).addErrback(failed)
            good, bad = counts.get("good", 0), counts.get("bad", 0)
            state.history = good - bad
            connection.results.add(
                self.name,
                good=good,
                bad=bad,
                connections=counts.get("connections", 0),
                history=state.history,
            )
            if good > ONE_SIDED and bad == 0:
                connection.results.add(self.name, **{"pass": "all_good"})
            elif bad > ONE_SIDED and good == 0:
                connection.results.add(self.name, fail="all_bad")
        redis.execute("EXPIRE", key, self.settings.expire_seconds).addErrback(failed)
        self._check_awards(connection, state)

    def _record_history(self, connection: Connection, state: _State) -> None:
        settings = self.settings
        redis = self.redis
        if redis is None or not settings.record_history:
            return
        if state.score > settings.positive:
            verdict = "good"
        elif state.score < 0:
            verdict = "bad"
        else:
            return
        key = self._key(state)

        def failed(failure: Any) -> None:
            self.log.warn(f"{state.ip}: {verdict} not recorded: {failure.getErrorMessage()}")

        redis.execute("HINCRBY", key, verdict, 1).addErrback(failed)
        redis.execute("EXPIRE", key, settings.expire_seconds).addErrback(failed)

    # -- hooks -------------------------------------------------------------------------

    def hook_connect_init(self, connection: Connection) -> Any:
        earlier = self._states.pop(connection, None)  # (again after XCLIENT: a new client)
        if earlier is not None:
            self._check_awards(connection, earlier)
            self._record_history(connection, earlier)
        connection.results.reset(self.name)
        if connection.remote.is_private or connection.notes.get("disable_karma"):
            return CONT
        address = canonical_address(connection.remote.ip)
        ip = str(address) if address is not None else connection.remote.ip
        state = _State(ip, todo=list(self.settings.awards))
        self._states[connection] = state
        connection.results.add(self.name, score=0)
        return Deferred.fromCoroutine(self._read_history(connection, state))

    def hook_connect(self, connection: Connection) -> Any:
        return self._decide(connection, "connect")

    def hook_helo(self, connection: Connection, host: str) -> Any:
        return self._decide(connection, "helo")

    def hook_ehlo(self, connection: Connection, host: str) -> Any:
        return self._decide(connection, "ehlo")

    def hook_vrfy(self, connection: Connection) -> Any:
        return self._decide(connection, "vrfy")

    def hook_noop(self, connection: Connection) -> Any:
        return self._decide(connection, "noop")

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> Any:
        state = self._state(connection)
        if state is None:
            return CONT
        self._spammy_tld(connection, state, sender)
        command = connection.current_command
        if command is not None and command.raw[:11].upper() != b"MAIL FROM:<":
            self._label(connection, fail="rfc5321.MailFrom")
        if not state.tls_scored:  # (once a connection: a client must not earn it by RSET)
            state.tls_scored = True
            tls = self.settings.tls_set if connection.tls.enabled else self.settings.tls_unset
            if tls:
                self._add(connection, state, tls)
        return self._decide(connection, "mail")

    def _spammy_tld(self, connection: Connection, state: _State, sender: Address) -> None:
        spammy = self.settings.spammy_tlds
        if not spammy or sender.is_null or not sender.domain:
            return
        labels = sender.domain_lower.strip(".").split(".")
        for start in range(len(labels)):  # the longest suffix first
            suffix = ".".join(labels[start:])
            penalty = spammy.get(suffix)
            if penalty:
                self._add(connection, state, penalty)
                self._label(connection, fail=f"spammy.{suffix}")
                return

    def _recipient(self, connection: Connection, recipient: Address) -> Any:
        txn = connection.transaction
        sender = txn.mail_from if txn is not None else None
        if sender is not None and recipient.local.lower() == sender.local.lower() != "":
            self._label(connection, fail="env_user_match")
        command = connection.current_command
        if command is not None and command.raw[:9].upper() != b"RCPT TO:<":
            self._label(connection, fail="rfc5321.RcptTo")
        return self._decide(connection, "rcpt")

    def hook_rcpt(
        self, connection: Connection, recipient: Address, params: dict[str, str | None]
    ) -> Any:
        if self._state(connection) is None:
            return CONT
        return self._recipient(connection, recipient)

    def hook_rcpt_ok(self, connection: Connection, recipient: Address) -> Any:
        # (hook_rcpt has checked this recipient and waited: only decide)
        return self._decide(connection, "rcpt", tarpit=False)

    def hook_data(self, connection: Connection) -> Any:
        return self._decide(connection, "data")

    def hook_data_post(self, connection: Connection) -> Any:
        state = self._state(connection)
        txn = connection.transaction
        if state is None or txn is None:
            return CONT
        self._check_awards(connection, state)
        txn.remove_header(HEADER)
        txn.add_header(HEADER, self._summary(connection))
        return self._decide(connection, "data_post")

    def hook_queue(self, connection: Connection) -> Any:
        return self._decide(connection, "queue")

    def hook_queue_outbound(self, connection: Connection) -> Any:
        return self._decide(connection, "queue_outbound")

    def hook_reset_transaction(self, connection: Connection) -> Any:
        state = self._state(connection)
        if state is not None:
            self._check_awards(connection, state)  # (the transaction's results go next)
            state.read_transaction.clear()
        return CONT

    def hook_unrecognized_command(self, connection: Connection, verb: str, argument: str) -> Any:
        state = self._state(connection)
        if state is None or verb in ("STARTTLS", "AUTH"):
            return CONT
        self._add(connection, state, -1)
        state.commands += 1
        if state.commands <= NAMED_COMMANDS:
            connection.results.add(self.name, fail=f"cmd:{_UNPRINTABLE.sub('?', verb)[:20]}")
        return self._decide(connection, "unrecognized_command")

    def hook_deny(
        self,
        connection: Any,
        code: Code,
        message: Any,
        plugin: str | None,
        method: str,
        params: tuple[Any, ...],
        hook: str,
    ) -> Any:
        """Take over another plugin's denial: it costs 2 points, and karma decides."""
        state = self._state(connection)
        settings = self.settings
        if (
            state is None
            or plugin is None
            or plugin == self.name
            or _excluded(plugin, settings.excluded_plugins)
            or hook in settings.excluded_hooks
        ):
            return CONT
        if code in (Code.DENY, Code.DENYDISCONNECT):
            state.deny_code = DENY
        elif state.deny_code is None:
            state.deny_code = DENYSOFT
        self._label(connection, msg=f"deny:{plugin}")
        self._add(connection, state, DENIAL_PENALTY)
        connection.loginfo(f"took over {plugin}'s denial at {hook}", self.name)
        return OK

    def hook_disconnect(self, connection: Connection) -> Any:
        state = self._states.pop(connection, None)
        if state is None:
            return CONT
        self._check_awards(connection, state)
        self._record_history(connection, state)
        connection.loginfo(self._summary(connection).replace("\n\t", " "), self.name)
        return CONT

    # -- reporting ---------------------------------------------------------------------

    def _summary(self, connection: Connection) -> str:
        """Karma's results as one line of printable ASCII (the header's value), folded."""
        entry = connection.results.get(self.name) or {}
        items: list[str] = []
        for key, value in entry.items():
            if key in Results.LISTS or value in (None, "", []):
                continue
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            if isinstance(shown, float):
                shown = _score_text(shown)
            items.append(f"{key}: {shown}")
        for key in Results.LISTS:
            values: Iterable[Any] = entry.get(key) or ()
            items.extend(f"{key}:{value}" for value in values)
        text = ", ".join(_UNPRINTABLE.sub("?", item) for item in items)
        return _fold(text[:900])


def _fold(text: str, width: int = 76) -> str:
    """C{text} with a line break (which the header makes a fold) after the comma nearest
    before each C{width} characters."""
    lines: list[str] = []
    while len(text) > width:
        cut = text.rfind(", ", 0, width)
        if cut <= 0:
            break
        lines.append(text[: cut + 1])
        text = text[cut + 2 :]
    lines.append(text)
    return "\n\t".join(lines)
