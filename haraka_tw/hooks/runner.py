"""The hook runner: calls each plugin of a hook's chain by Haraka's rules.

- Plugins run in plugins-file order, sorted (stably) by the priority they set (-100..100).
- The chain stops at the first result other than CONT, except for the hooks in
  L{RUN_ALL_HOOKS}, where every plugin runs and results are ignored.
- A denial (DENY, DENYSOFT and their DISCONNECT variants) first runs the C{deny} hook; a deny
  plugin answering OK overrides the denial and the rest of the chain resumes.
- A plugin that answers asynchronously gets C{<name>.timeout}, else C{plugin_timeout}, else
  30 seconds (0 disables); a timeout is the answer DENYSOFT "plugin timeout".
- An exception (or an unusable return value) is logged at CRIT with the plugin's name and
  treated as CONT.
- Plugins named in C{transaction.notes["skip_plugins"]} are skipped.
- After the client has gone, only the hooks in L{AFTER_DISCONNECT_HOOKS} run.

Plugins that answer synchronously cost a method call each: L{HookRunner.call} then returns
the result itself, with no Deferred anywhere; L{HookRunner.run} wraps it in a fired one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from haraka_tw.codes import CONT_RESULT, Code, HookResult, normalise
from haraka_tw.interfaces import HOOKS
from haraka_tw.logging import HarakaLog, Level

__all__ = [
    "AFTER_DISCONNECT_HOOKS",
    "RUN_ALL_HOOKS",
    "HookRunner",
    "LoadedPlugin",
    "then",
    "under_hook_limit",
]

# Every plugin runs and results are ignored. capabilities is here too (Haraka stops its chain
# at the first OK, which hides later plugins' keywords).
RUN_ALL_HOOKS = frozenset({"connect_init", "capabilities", "disconnect", "reset_transaction"})
AFTER_DISCONNECT_HOOKS = frozenset({"reset_transaction", "disconnect", "log"})
DEFAULT_TIMEOUT = 30.0

_CONT = CONT_RESULT
# What synchronous plugins (and the session's own steps, such as a cached host name) return:
# known at once not to be awaitable (an isawaitable() or isinstance(Deferred) check is an
# ABC instance check, costly on the hot path).
_PLAIN_ANSWERS = frozenset({type(None), Code, HookResult, tuple, int, str})
_T = TypeVar("_T")
_R = TypeVar("_R")


def under_hook_limit(config: Any, plugin: str, wanted: float) -> float:
    """C{wanted} seconds, cut to one second under the limit the runner puts on C{plugin}'s
    hooks (C{<plugin>.timeout}, else C{plugin_timeout}; half a limit of a second or
    less), so that the plugin's own timer
    fires first and it answers as it means to (a DNS timeout as temperror), not with the
    runner's DENYSOFT "plugin timeout"."""
    budget = config.get_value(f"{plugin}.timeout", None)
    if budget is None:
        budget = config.get_value("plugin_timeout", DEFAULT_TIMEOUT)
    try:
        limit = float(budget)
    except (TypeError, ValueError):
        return wanted  # (the server has said what is wrong with it)
    if limit > 1:
        return min(wanted, limit - 1)
    return min(wanted, limit / 2) if limit > 0 else wanted  # (0: no limit)


@dataclass
class LoadedPlugin:
    """A plugin object with its name, priorities and timeout."""

    name: str
    plugin: object
    priorities: dict[str, int] = field(default_factory=dict)
    timeout: float | None = None  # None: the server's plugin_timeout

    def hooks(self) -> list[str]:
        """The hooks this plugin answers, by the interfaces it provides."""
        return [name for name, iface in HOOKS.items() if iface.providedBy(self.plugin)]


_Link = tuple[LoadedPlugin, Callable[..., Any]]


def _is_gone(connection: Any) -> bool:
    remote = getattr(connection, "remote", None)
    return bool(getattr(remote, "closed", False))


def _skipped(connection: Any, name: str) -> bool:
    txn = getattr(connection, "transaction", None)
    if txn is None:
        return False
    skip = txn.notes.get("skip_plugins")
    return bool(skip) and name in skip


class HookRunner:
    """Runs hook chains. Built once per server from the loaded plugins."""

    def __init__(
        self,
        plugins: Sequence[LoadedPlugin],
        reactor: IReactorTime,
        log: HarakaLog,
        plugin_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.plugins = list(plugins)
        self.plugin_timeout = plugin_timeout
        self._reactor = reactor
        self._log = log
        self._chains: dict[str, tuple[_Link, ...]] = {}
        self._named: dict[tuple[Code, str], HookResult] = {}
        for hook, iface in HOOKS.items():
            ranked = [
                (p.priorities.get(hook, 0), i, p)
                for i, p in enumerate(self.plugins)
                if iface.providedBy(p.plugin)
            ]
            ranked.sort(key=lambda t: (t[0], t[1]))
            self._chains[hook] = tuple((p, getattr(p.plugin, f"hook_{hook}")) for _, _, p in ranked)

    def has(self, hook: str) -> bool:
        """Whether any plugin answers C{hook}."""
        return bool(self._chains.get(hook))

    def chain(self, hook: str) -> list[str]:
        """The names of the plugins that answer C{hook}, in the order they run."""
        return [p.name for p, _ in self._chains.get(hook, ())]

    def call(self, hook: str, connection: Any, *args: Any) -> HookResult | Deferred[HookResult]:
        """Run C{hook}'s chain: the deciding L{HookResult} itself when every plugin answered
        synchronously, else a L{Deferred} that fires with it. The session's hot path uses
        this (with L{then}) so that a chain of synchronous plugins costs no Deferred.

        For the hooks in L{RUN_ALL_HOOKS} every plugin runs and the result is CONT.
        """
        chain = self._chains.get(hook)
        if not chain:
            return _CONT
        return self._advance(hook, chain, 0, connection, args)

    def run(self, hook: str, connection: Any, *args: Any) -> Deferred[HookResult]:
        """L{call}, always as a L{Deferred} (already fired for synchronous plugins)."""
        result = self.call(hook, connection, *args)
        return result if isinstance(result, Deferred) else defer.succeed(result)

    def run_log(self, connection: Any, record: Any) -> bool:
        """Offer a log record to the log hook, synchronously; True if a plugin suppressed it."""
        for _loaded, method in self._chains.get("log", ()):
            try:
                result = method(connection, record)
                if result is not None and normalise(result).code is not Code.CONT:
                    return True
            except Exception:  # a broken log plugin must not break logging
                continue
        return False

    # -- the chain -------------------------------------------------------------------

    def _advance(
        self,
        hook: str,
        chain: tuple[_Link, ...],
        index: int,
        connection: Any,
        args: tuple[Any, ...],
    ) -> HookResult | Deferred[HookResult]:
        run_all = hook in RUN_ALL_HOOKS
        while index < len(chain):
            loaded, method = chain[index]
            index += 1
            if _is_gone(connection) and hook not in AFTER_DISCONNECT_HOOKS:
                break
            if _skipped(connection, loaded.name):
                continue
            try:
                value = method(connection, *args)
            except Exception:
                self._crash(hook, loaded, Failure(), connection)
                continue
            if type(value) not in _PLAIN_ANSWERS and (
                isinstance(value, Deferred) or inspect.isawaitable(value)
            ):
                return self._wait(hook, chain, index, connection, args, loaded, value)
            result = self._result(hook, loaded, value, connection)
            if run_all or result.code is Code.CONT:
                continue
            return self._decided(hook, chain, index, connection, args, result)
        return _CONT

    def _wait(
        self,
        hook: str,
        chain: tuple[_Link, ...],
        index: int,
        connection: Any,
        args: tuple[Any, ...],
        loaded: LoadedPlugin,
        value: Any,
    ) -> Deferred[HookResult]:
        """A plugin answered with a Deferred or a coroutine: time it, then go on."""
        pending: Deferred[Any] = (
            value if isinstance(value, Deferred) else defer.ensureDeferred(value)
        )
        timeout = loaded.timeout if loaded.timeout is not None else self.plugin_timeout
        if timeout and timeout > 0:
            pending.addTimeout(timeout, self._reactor)

        def answered(value: Any) -> HookResult | Deferred[HookResult]:
            result = self._result(hook, loaded, value, connection)
            if hook in RUN_ALL_HOOKS or result.code is Code.CONT:
                return self._advance(hook, chain, index, connection, args)
            return self._decided(hook, chain, index, connection, args, result)

        def failed(failure: Failure) -> HookResult | Deferred[HookResult]:
            if failure.check(defer.TimeoutError, defer.CancelledError):
                self._log.log(
                    Level.ERROR,
                    f"plugin timeout in hook_{hook} after {timeout}s",
                    uuid=getattr(connection, "uuid", None),
                    origin=loaded.name,
                )
                if hook in RUN_ALL_HOOKS:
                    return self._advance(hook, chain, index, connection, args)
                result = HookResult(Code.DENYSOFT, "plugin timeout", loaded.name)
                return self._decided(hook, chain, index, connection, args, result)
            self._crash(hook, loaded, failure, connection)
            return self._advance(hook, chain, index, connection, args)

        done: Deferred[HookResult] = pending.addCallbacks(answered, failed)
        return done.addErrback(self._internal_error)

    def _decided(
        self,
        hook: str,
        chain: tuple[_Link, ...],
        index: int,
        connection: Any,
        args: tuple[Any, ...],
        result: HookResult,
    ) -> HookResult | Deferred[HookResult]:
        """A plugin answered non-CONT: let the deny hook override a denial, else finish."""
        if not result.code.is_denial or hook == "deny" or not self._chains.get("deny"):
            return result
        verdict = self.call(
            "deny",
            connection,
            result.code,
            result.message,
            result.plugin,
            f"hook_{hook}",
            args,
            hook,
        )

        def judged(verdict: HookResult) -> HookResult | Deferred[HookResult]:
            if verdict.code is Code.OK:
                return self._advance(hook, chain, index, connection, args)
            return result

        return then(verdict, judged)

    def _result(self, hook: str, loaded: LoadedPlugin, value: Any, connection: Any) -> HookResult:
        try:
            result = normalise(value)
        except (TypeError, ValueError) as e:
            self._log.log(
                Level.CRIT,
                f"hook_{hook} returned an unusable value: {e}",
                uuid=getattr(connection, "uuid", None),
                origin=loaded.name,
            )
            return _CONT
        if result.plugin is None:
            if result.message is not None:
                return HookResult(result.code, result.message, loaded.name)
            # A bare code (the usual answer): one shared result per plugin and code.
            key = (result.code, loaded.name)
            named = self._named.get(key)
            if named is None:
                named = self._named[key] = HookResult(result.code, None, loaded.name)
            return named
        return result

    def _crash(self, hook: str, loaded: LoadedPlugin, failure: Failure, connection: Any) -> None:
        self._log.log(
            Level.CRIT,
            f"hook_{hook} raised {failure.type and failure.type.__name__}: "
            f"{failure.getErrorMessage()}",
            uuid=getattr(connection, "uuid", None),
            origin=loaded.name,
            traceback=failure.getTraceback().strip().splitlines()[-3:],
        )

    def _internal_error(self, failure: Failure) -> HookResult:
        """A bug in the runner itself: answer DENYSOFT rather than hang the session."""
        self._log.log(Level.EMERG, f"hook runner error: {failure.getTraceback()}")
        return HookResult(Code.DENYSOFT, "internal error")


def then(value: _T | Deferred[_T], fn: Callable[[_T], _R]) -> _R | Deferred[Any]:
    """C{fn(value)} now when C{value} is already there, else once its Deferred fires.

    The glue of the synchronous fast path: C{then(runner.call(...), answered)} calls
    C{answered} at once when every plugin answered synchronously, and costs no Deferred.
    An exception from C{fn} becomes a failed Deferred, as it would in a callback.
    """
    if type(value) not in _PLAIN_ANSWERS and isinstance(value, Deferred):
        return value.addCallback(fn)  # (Deferred is an ABC: isinstance on it costs a call)
    try:
        return fn(value)  # type: ignore[arg-type]
    except Exception:
        # As a Deferred callback would: the failure travels on to whoever waits (the
        # session answers 451), instead of escaping into Twisted's dataReceived.
        return defer.fail()
