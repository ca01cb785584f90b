"""Loading built-in plugins for tests: through the real loader, on a real config directory
(the shipped defaults under a temporary directory of the test's files)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haraka_tw.codes import OK
from haraka_tw.config import ConfigDirectory
from haraka_tw.hooks.loader import load_plugins
from haraka_tw.hooks.runner import LoadedPlugin
from haraka_tw.paths import default_config_dir
from tests.support import ListLog, Session, plugin_with, temp_dir, write_config


@dataclass
class Loaded:
    """Plugins loaded from a config directory, with what a test needs to drive them."""

    plugins: list[LoadedPlugin]
    config: ConfigDirectory
    directory: Path
    log: ListLog
    server_notes: dict[str, Any] = field(default_factory=dict)

    def plugin(self, name: str) -> Any:
        """The plugin object loaded under C{name}."""
        return next(p.plugin for p in self.plugins if p.name == name)

    def pairs(self) -> list[tuple[str, object]]:
        return [(p.name, p.plugin) for p in self.plugins]

    def write(self, name: str, text: str) -> list[str]:
        """Change one config file and reload; the names whose value changed."""
        (self.directory / name).write_text(text, encoding="utf-8")
        return self.config.reload()


def load(case: Any, names: Iterable[str], files: Mapping[str, str] | None = None) -> Loaded:
    """Load C{names} with the shipped config overlaid by C{files}."""
    directory = write_config(temp_dir(case) / "config", files or {})
    config = ConfigDirectory([default_config_dir(), directory])
    log = ListLog()
    notes: dict[str, Any] = {}
    plugins = load_plugins(list(names), config=config, log=log, server_notes=notes)
    return Loaded(plugins, config, directory, log, notes)


def session(*plugins: tuple[str, object], greet: bool = True, settings: Any = None) -> Session:
    """A transcript session with these plugins, in this order."""
    return Session(plugins, greet=greet, settings=settings)


def accepting(stored: list[bytes] | None = None) -> tuple[str, object]:
    """A plugin that accepts every recipient and queues every message, relayed or not
    (keeping its bytes in C{stored} when given)."""

    def queue(connection: Any) -> Any:
        if stored is not None:
            stored.append(connection.transaction.message_stream.get_bytes())
        return OK

    return (
        "accept",
        plugin_with({"rcpt": lambda c, r, p: OK, "queue": queue, "queue_outbound": queue}),
    )


ENVELOPE = "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.com>\r\n"
