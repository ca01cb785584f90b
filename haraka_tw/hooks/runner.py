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

Plugins that answer synchronously cost a method call each: no Deferred is created per plugin,
and the L{Deferred} returned for the whole chain has already fired.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from haraka_tw.codes import Code, HookResult, normalise
from haraka_tw.interfaces import HOOKS
from haraka_tw.logging import HarakaLog, Level

__all__ = ["AFTER_DISCONNECT_HOOKS", "RUN_ALL_HOOKS", "HookRunner", "LoadedPlugin"]

# Every plugin runs and results are ignored. capabilities is here too (Haraka stops its chain
# at the first OK, which hides later plugins' keywords).
RUN_ALL_HOOKS = frozenset({"connect_init", "capabilities", "disconnect", "reset_transaction"})
AFTER_DISCONNECT_HOOKS = frozenset({"reset_transaction", "disconnect", "log"})
DEFAULT_TIMEOUT = 30.0

_CONT = HookResult(Code.CONT)


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

    def run(self, hook: str, connection: Any, *args: Any) -> Deferred[HookResult]:
        """Run C{hook}'s chain; the Deferred fires with the deciding L{HookResult}.

        For the hooks in L{RUN_ALL_HOOKS} every plugin runs and the result is CONT.
        """
        done: Deferred[HookResult] = Deferred()
        chain = self._chains.get(hook, ())
        if not chain:
            done.callback(_CONT)
            return done
        self._advance(hook, chain, 0, connection, args, done)
        return done

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
        done: Deferred[HookResult],
    ) -> None:
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
            if isinstance(value, Deferred) or inspect.isawaitable(value):
                self._wait(hook, chain, index, connection, args, done, loaded, value)
                return
            result = self._result(hook, loaded, value, connection)
            if run_all or result.code is Code.CONT:
                continue
            self._decided(hook, chain, index, connection, args, done, result)
            return
        done.callback(_CONT)

    def _wait(
        self,
        hook: str,
        chain: tuple[_Link, ...],
        index: int,
        connection: Any,
        args: tuple[Any, ...],
        done: Deferred[HookResult],
        loaded: LoadedPlugin,
        value: Any,
    ) -> None:
        pending: Deferred[Any] = (
            value if isinstance(value, Deferred) else defer.ensureDeferred(value)
        )
        timeout = loaded.timeout if loaded.timeout is not None else self.plugin_timeout
        if timeout and timeout > 0:
            pending.addTimeout(timeout, self._reactor)

        def answered(value: Any) -> None:
            result = self._result(hook, loaded, value, connection)
            if hook in RUN_ALL_HOOKS or result.code is Code.CONT:
                self._advance(hook, chain, index, connection, args, done)
            else:
                self._decided(hook, chain, index, connection, args, done, result)

        def failed(failure: Failure) -> None:
            if failure.check(defer.TimeoutError, defer.CancelledError):
                self._log.log(
                    Level.ERROR,
                    f"plugin timeout in hook_{hook} after {timeout}s",
                    uuid=getattr(connection, "uuid", None),
                    origin=loaded.name,
                )
                result = HookResult(Code.DENYSOFT, "plugin timeout", loaded.name)
                if hook in RUN_ALL_HOOKS:
                    self._advance(hook, chain, index, connection, args, done)
                else:
                    self._decided(hook, chain, index, connection, args, done, result)
                return
            self._crash(hook, loaded, failure, connection)
            self._advance(hook, chain, index, connection, args, done)

        pending.addCallbacks(answered, failed)
        pending.addErrback(self._internal_error, done)

    def _decided(
        self,
        hook: str,
        chain: tuple[_Link, ...],
        index: int,
        connection: Any,
        args: tuple[Any, ...],
        done: Deferred[HookResult],
        result: HookResult,
    ) -> None:
        """A plugin answered non-CONT: let the deny hook override a denial, else finish."""
        if not result.code.is_denial or hook == "deny" or not self._chains.get("deny"):
            done.callback(result)
            return
        deny = self.run(
            "deny",
            connection,
            result.code,
            result.message,
            result.plugin,
            f"hook_{hook}",
            args,
            hook,
        )

        def judged(verdict: HookResult) -> None:
            if verdict.code is Code.OK:
                self._advance(hook, chain, index, connection, args, done)
            else:
                done.callback(result)

        deny.addCallback(judged)
        deny.addErrback(self._internal_error, done)

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
            result = HookResult(result.code, result.message, loaded.name)
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

    def _internal_error(self, failure: Failure, done: Deferred[HookResult]) -> None:
        """A bug in the runner itself: answer DENYSOFT rather than hang the session."""
        self._log.log(Level.EMERG, f"hook runner error: {failure.getTraceback()}")
        if not done.called:
            done.callback(HookResult(Code.DENYSOFT, "internal error"))
