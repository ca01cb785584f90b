"""Turns the names in the plugins file into plugin objects.

A name is one of:
- a built-in plugin as Haraka names it: C{queue/discard} is C{haraka_tw.plugins.queue.discard},
  C{rcpt_to.in_host_list} is C{haraka_tw.plugins.rcpt_to.in_host_list} (a C{-} becomes C{_});
  the module's C{Plugin} is the factory;
- a plugin published under the entry-point group C{haraka_tw.plugins}, by its entry-point name;
- C{package.module:Factory}, a factory anywhere on the Python path.

A factory is called with no arguments. A plugin providing L{IRegistration} then has its
C{register(context)} called with its name, the config, a logger and the server notes.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from zope.interface import implementer

from haraka_tw.config.formats import ini_number
from haraka_tw.hooks.runner import LoadedPlugin
from haraka_tw.interfaces import HOOKS, IPluginContext, IRegistration
from haraka_tw.logging import HarakaLog, Level, PluginLogger

__all__ = ["ENTRY_POINT_GROUP", "PluginContext", "PluginLoadError", "load_plugins", "resolve"]

ENTRY_POINT_GROUP = "haraka_tw.plugins"
_BUILTIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*([./][A-Za-z_][A-Za-z0-9_\-]*)*$")


class PluginLoadError(Exception):
    """A plugin could not be found, created or registered.

    @ivar where: C{path:line: } of the plugins-file line naming it, when known.
    @ivar others: more plugins that could not be found, reported with this one (each a
        L{PluginLoadError}), so that one start shows every unknown name in the file.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"plugin {name!r} failed to load: {reason}")
        self.name = name
        self.reason = reason
        self.where = ""
        self.others: list[PluginLoadError] = []

    def __str__(self) -> str:
        first = f"{self.where}{self.args[0]}"
        if not self.others:
            return first
        rest = "".join(f"\n  {e.where}{e.args[0]}" for e in self.others)
        return f"{len(self.others) + 1} plugins failed to load:\n  {first}{rest}"


@implementer(IPluginContext)
@dataclass
class PluginContext:
    """What a plugin gets at registration (see L{IPluginContext})."""

    name: str
    config: Any
    log: PluginLogger
    server_notes: dict[str, Any]
    reactor: Any = None
    priorities: dict[str, int] = field(default_factory=dict)
    shared_resolver: Any = None

    @property
    def resolver(self) -> Any:
        """The server's resolver; without one (a plugin loaded on its own), one made from
        dns.ini on first use."""
        if self.shared_resolver is None:
            from haraka_tw.dns import Resolver

            self.shared_resolver = Resolver.from_config(self.config, self.reactor)
        return self.shared_resolver

    def set_priority(self, hook: str, priority: int) -> None:
        if hook not in HOOKS:
            raise ValueError(f"unknown hook {hook!r}")
        if not -100 <= priority <= 100:
            raise ValueError(f"priority {priority} is outside -100..100")
        self.priorities[hook] = priority


def resolve(name: str) -> Callable[[], object]:
    """Find the factory for a plugins-file name.

    @raise PluginLoadError: if there is none.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        module = _import(name, module_name)
        factory = module
        for part in attr.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise PluginLoadError(name, f"module {module_name!r} has no {attr!r}")
        return _callable(name, factory)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return _callable(name, ep.load())
            except PluginLoadError:
                raise
            except Exception as e:
                raise PluginLoadError(name, f"entry point {ep.value!r}: {e}") from e
    if not _BUILTIN_NAME.match(name):
        raise PluginLoadError(name, "not a plugin name, a module:Factory, or an entry point")
    module_name = "haraka_tw.plugins." + name.replace("/", ".").replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise PluginLoadError(name, "no such built-in plugin or entry point") from e
        raise PluginLoadError(name, f"{type(e).__name__}: {e}") from e
    except Exception as e:
        raise PluginLoadError(name, f"{type(e).__name__}: {e}") from e
    factory = getattr(module, "Plugin", None)
    if factory is None:
        raise PluginLoadError(name, f"built-in module {module_name} has no Plugin")
    return _callable(name, factory)


def _import(name: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        raise PluginLoadError(
            name, f"cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from e


def _callable(name: str, factory: object) -> Callable[[], object]:
    if not callable(factory):
        raise PluginLoadError(name, f"{factory!r} is not callable")
    return factory


def load_plugins(
    names: Iterable[str],
    *,
    config: Any,
    log: HarakaLog,
    server_notes: dict[str, Any],
    ignore_bad_plugins: bool = False,
    reactor: Any = None,
    where: Callable[[str], str] = lambda name: "",
    skipped: list[PluginLoadError] | None = None,
    resolver: Any = None,
) -> list[LoadedPlugin]:
    """Create and register every plugin named, in order; a plugin named twice (by the
    same name, or as C{queue/discard} and C{queue.discard}: the same factory) loads once.

    Every name is looked up before any plugin is created, so a file with several unknown
    names is reported whole, and nothing is registered when one is missing.

    @param where: C{where(name)} is C{path:line: } of the line naming it, for messages.
    @param skipped: with C{ignore_bad_plugins}, receives each plugin left out.
    @param resolver: the server's L{haraka_tw.dns.Resolver}, handed to every plugin.
    @raise PluginLoadError: unless C{ignore_bad_plugins} (then each is logged and left
        out): for the names that cannot be found (the first, the rest in C{others}), else
        for the first plugin that cannot be created or registered.
    """
    found: list[tuple[str, Callable[[], object]]] = []
    missing: list[PluginLoadError] = []
    seen: dict[object, str] = {}  # a factory -> the name it was listed under first
    for name in names:
        try:
            factory = resolve(name)
        except PluginLoadError as e:
            missing.append(e)
            continue
        if factory in seen:
            also = "" if seen[factory] == name else f" (as {seen[factory]!r})"
            log.log(
                Level.WARN, f"plugin {name!r} is listed twice{also}; loaded once", origin="plugins"
            )
            continue
        seen[factory] = name
        found.append((name, factory))

    def failed(e: PluginLoadError) -> None:
        e.where = where(e.name)
        if not ignore_bad_plugins:
            return
        log.log(Level.ERROR, f"{e} (ignored: ignore_bad_plugins)", origin="plugins")
        if skipped is not None:
            skipped.append(e)

    for error in missing:
        failed(error)
    if missing and not ignore_bad_plugins:
        missing[0].others = missing[1:]
        raise missing[0]
    loaded: list[LoadedPlugin] = []
    for name, factory in found:
        try:
            loaded.append(_load_one(name, factory, config, log, server_notes, reactor, resolver))
        except PluginLoadError as e:
            failed(e)
            if not ignore_bad_plugins:
                raise
    return loaded


def _load_one(
    name: str,
    factory: Callable[[], object],
    config: Any,
    log: HarakaLog,
    server_notes: dict[str, Any],
    reactor: Any,
    resolver: Any,
) -> LoadedPlugin:
    try:
        plugin = factory()
    except Exception as e:
        raise PluginLoadError(name, f"factory raised {type(e).__name__}: {e}") from e
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    context = PluginContext(
        name, config, log.for_origin(name), server_notes, reactor, shared_resolver=resolver
    )
    if IRegistration.providedBy(plugin):
        try:
            plugin.register(context)
        except Exception as e:
            raise PluginLoadError(name, f"register() raised {type(e).__name__}: {e}") from e
    result = LoadedPlugin(name, plugin, dict(context.priorities))
    if not result.hooks() and not IRegistration.providedBy(plugin):
        raise PluginLoadError(name, "provides no hook interface (see haraka_tw.interfaces)")
    timeout = config.get_value(f"{name}.timeout", None) if config is not None else None
    if timeout is not None:
        key = f"{name}.timeout"
        try:
            result.timeout = ini_number({key: timeout}, key, 0, zero_ok=True, where="")
        except ValueError as e:
            raise PluginLoadError(name, str(e)) from e
    return result
