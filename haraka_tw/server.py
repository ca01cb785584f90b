"""The inbound server assembled from a config directory: log, plugins, runner, factory.

L{HarakaServer} reads the config, loads the plugins named in C{plugins}, and builds the
L{HarakaSMTPFactory}. When connection.ini, smtp.ini, me or log.ini change it rebuilds the
session settings (new sessions use them; a bad file keeps the last good settings). The
plugin list itself is read at start-up only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime

from haraka_tw.config import ConfigDirectory, ConfigError
from haraka_tw.config.formats import ini_number
from haraka_tw.dns import Resolver
from haraka_tw.hooks.loader import PluginLoadError, load_plugins
from haraka_tw.hooks.runner import DEFAULT_TIMEOUT, HookRunner
from haraka_tw.logging import HarakaLog, Level
from haraka_tw.outbound.partition import Partition
from haraka_tw.outbound.service import OutboundService
from haraka_tw.paths import default_config_dir
from haraka_tw.smtp.factory import HarakaSMTPFactory
from haraka_tw.smtp.rdns import ReverseLookup
from haraka_tw.smtp.settings import SMTP_INI_BOOLEANS, SessionSettings

__all__ = ["HarakaServer", "StartupError"]

_SETTINGS_FILES = ("connection.ini", "smtp.ini", "me")


def _plugin_timeout(config: Any) -> float:
    """The plugin_timeout file: seconds a plugin may take to answer a hook (0: no limit).

    @raise ValueError: naming the file, for anything but a number of 0 or more.
    """
    value = config.get_value("plugin_timeout", DEFAULT_TIMEOUT)
    return ini_number({"plugin_timeout": value}, "plugin_timeout", DEFAULT_TIMEOUT, True, "")


def _check_spool_dir(path: str | None) -> None:
    """connection.ini spool_dir: a directory, or a path one can be made at (the first
    spooled message makes it, as the user the server then runs as: twistd -u drops
    privileges after this check). A path that can never be one stops start-up here,
    rather than each large message getting 451 later.

    @raise ValueError: naming the key and what is in the way.
    """
    if not path:
        return
    probe = Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"connection.ini [main] spool_dir: {path}: {probe} is not a directory")


def where_in(config: ConfigDirectory, name: str, match: Callable[[str], bool]) -> str:
    """C{path:line: } of the first line of the top config file C{name} that C{match}es;
    C{path: } when none does, "" when there is no such file. For messages."""
    path = config.path(name)
    if path is None:
        return ""
    try:
        lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        return f"{path}: "
    for number, line in enumerate(lines, 1):
        if match(line):
            return f"{path}:{number}: "
    return f"{path}: "


def _where_listed(config: ConfigDirectory, name: str) -> str:
    """C{path:line: } of the plugins file line that names C{name}, or "" if not found."""
    return where_in(config, "plugins", lambda line: line.strip() == name)


class StartupError(Exception):
    """The server cannot start; the message names the file, line or plugin at fault."""


class HarakaServer:
    """Everything the SMTP listeners share.

    @param partition: a worker's part of the outbound queue (smtp.ini nodes); None: all.
    """

    def __init__(
        self,
        config: ConfigDirectory,
        reactor: IReactorTime,
        log: HarakaLog | None = None,
        *,
        partition: Partition | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.log = log if log is not None else HarakaLog()
        self.notes: dict[str, Any] = {}
        try:
            self._configure_log()
            self.settings = SessionSettings.from_config(config)
            _check_spool_dir(self.settings.spool_dir)
            smtp_ini = config.get_ini("smtp.ini", booleans=SMTP_INI_BOOLEANS)["main"]
            names = config.get_list("plugins")
            plugin_timeout = _plugin_timeout(config)
        except (ConfigError, ValueError) as e:
            raise StartupError(str(e)) from e
        self.smtp_ini = smtp_ini
        #: the plugins left out under smtp.ini ignore_bad_plugins, and why
        self.skipped_plugins: list[PluginLoadError] = []
        try:
            self.resolver = Resolver.from_config(config, reactor)
            rdns = ReverseLookup.from_config(config, reactor, resolver=self.resolver)
        except (ConfigError, ValueError) as e:
            raise StartupError(str(e)) from e
        try:
            plugins = load_plugins(
                names,
                config=config,
                log=self.log,
                server_notes=self.notes,
                ignore_bad_plugins=bool(smtp_ini.get("ignore_bad_plugins")),
                reactor=reactor,
                where=lambda name: _where_listed(config, name),
                skipped=self.skipped_plugins,
                resolver=self.resolver,
            )
        except PluginLoadError as e:
            raise StartupError(str(e)) from e
        self.runner = HookRunner(plugins, reactor, self.log, plugin_timeout)
        if self.runner.has("log"):
            self.log.hook = self.runner.run_log
        try:
            self.outbound = OutboundService(
                config,
                reactor,
                self.runner,
                self.log,
                self.settings.me,
                resolver=self.resolver,
                partition=partition,
            )
        except (ConfigError, ValueError) as e:
            raise StartupError(f"outbound: {e}") from e
        self.notes["outbound"] = self.outbound  # plugins: server_notes["outbound"].send_email(...)
        self.factory = HarakaSMTPFactory(
            self.runner,
            self.settings,
            self.log,
            reactor=reactor,
            server_notes=self.notes,
            outbound=self.outbound,
            rdns=rdns,
        )
        for name in _SETTINGS_FILES:
            config.on_change(name, self._settings_changed)
        config.on_change("log.ini", self._log_changed)
        config.on_change("loglevel", self._log_changed)
        config.on_change("plugin_timeout", self._timeout_changed)
        config.on_change("plugins", self._plugins_changed)

    @classmethod
    def from_directory(
        cls,
        directory: str | Path | None,
        reactor: IReactorTime,
        *,
        extra: Sequence[str | Path] = (),
    ) -> HarakaServer:
        """A server on the shipped defaults overlaid with C{directory} (if given)."""
        dirs: list[str | Path] = [default_config_dir()]
        if directory is not None:
            path = Path(directory)
            if not path.is_dir():
                problem = "is not a directory" if path.exists() else "does not exist"
                raise StartupError(f"config directory {path} {problem}")
            dirs.append(path)
        dirs.extend(extra)
        try:
            config = ConfigDirectory(dirs)
        except ConfigError as e:
            raise StartupError(str(e)) from e
        return cls(config, reactor)

    def _settings_changed(self) -> None:
        try:
            self.settings = SessionSettings.from_config(self.config)
        except (ConfigError, ValueError) as e:
            self.log.log(Level.ERROR, f"config reload: {e}; keeping the last good settings")
            return
        self.factory.settings = self.settings
        self.log.log(Level.NOTICE, "session settings reloaded")

    def _plugins_changed(self) -> None:
        """The plugins file is read once, at start (as Haraka does): say so when it changes."""
        self.log.log(
            Level.WARN,
            f"{self.config.path('plugins')} changed: the plugins loaded at start stay in"
            " use until a restart",
        )

    def _configure_log(self) -> None:
        """log.ini, then the loglevel file (Haraka's older way), which wins when present.

        Both are read and checked before either is applied, so a bad value changes nothing.
        """
        trial = HarakaLog()
        trial.configure(self.config.get_ini("log.ini", booleans=["-main.timestamps"]))
        loglevel = self.config.get_value("loglevel", None)
        if loglevel is not None:
            try:
                trial.level = Level.parse(loglevel)
            except ValueError as e:
                raise ValueError(f"{self.config.path('loglevel') or 'loglevel'}: {e}") from None
        self.log.level, self.log.format, self.log.timestamps = (
            trial.level,
            trial.format,
            trial.timestamps,
        )

    def _log_changed(self) -> None:
        try:
            self._configure_log()
        except (ConfigError, ValueError) as e:
            self.log.log(Level.ERROR, f"log config: {e}; keeping the last good settings")

    def _timeout_changed(self) -> None:
        try:
            self.runner.plugin_timeout = _plugin_timeout(self.config)
        except (ConfigError, ValueError) as e:
            self.log.log(Level.ERROR, f"plugin_timeout: {e}")
