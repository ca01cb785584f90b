"""docs/config.md agrees with the shipped etc/ and the code: every file and key, and their
defaults; the outbound.ini table is every key the outbound side reads."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.config.ini import parse_ini
from haraka_tw.hooks.runner import HookRunner
from haraka_tw.logging import HarakaLog, Level
from haraka_tw.outbound.queue import queue_dir_of
from haraka_tw.outbound.service import OutboundService
from haraka_tw.paths import default_config_dir
from haraka_tw.server import HarakaServer
from haraka_tw.smtp.settings import CONNECTION_INI_BOOLEANS, SMTP_INI_BOOLEANS, SessionSettings
from tests.support import ListLog, temp_dir, write_config

CONFIG_MD = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def _shipped_ini() -> dict[str, dict[str, dict[str, object]]]:
    """Each shipped .ini file, parsed."""
    return {
        p.name: parse_ini(p.read_text(encoding="utf-8"), str(p))
        for p in sorted(default_config_dir().glob("*.ini"))
    }


def _default_cell(text: str, section: str, key: str) -> str | None:
    """The Default cell of the row for C{[section] key}, or None if there is no row."""
    m = re.search(rf"^\| `\[{re.escape(section)}\] {re.escape(key)}` \| ([^|]+) \|", text, re.M)
    return m[1].strip() if m else None


def _section_text(text: str, heading: str) -> str:
    """The text under the C{### heading} of config.md, up to the next heading."""
    start = text.index(f"\n### {heading}\n") + len(heading) + 5
    m = re.compile(r"^#{1,3} ", re.M).search(text, start)
    return text[start : m.start() if m else len(text)]


def _rows(text: str) -> dict[tuple[str, str], str]:
    """(section, key) -> Default cell of every C{| `[section] key` | ... |} row in C{text}."""
    rows = re.findall(r"^\| `\[([^\]]+)\] (\w+)` \| ([^|]+) \|", text, re.M)
    return {(section, key): cell.strip() for section, key, cell in rows}


class ShippedConfigTests(SynchronousTestCase):
    """Each shipped file and key is documented, with the shipped value as its default."""

    def test_every_shipped_file_has_a_section(self) -> None:
        """config.md has a heading for each file in etc/."""
        text = CONFIG_MD.read_text(encoding="utf-8")
        for path in default_config_dir().iterdir():
            if path.is_file() and not path.name.startswith((".", "__")):
                self.assertTrue(
                    re.search(rf"^### .*{re.escape(path.name)}", text, re.M),
                    f"config.md has no heading for {path.name}",
                )

    def test_every_shipped_file_in_a_subdirectory_has_a_section(self) -> None:
        """config.md has a heading naming each file in a subdirectory of etc/ (auth/...)."""
        text = CONFIG_MD.read_text(encoding="utf-8")
        root = default_config_dir()
        for path in root.rglob("*"):
            name = path.relative_to(root).as_posix()
            if path.is_file() and "/" in name and "__pycache__" not in name:
                self.assertTrue(
                    re.search(rf"^### .*{re.escape(name)}", text, re.M),
                    f"config.md has no heading for {name}",
                )

    def test_every_shipped_key_has_a_row_with_its_default(self) -> None:
        """Each [section] key of a shipped .ini has a row whose default is the shipped value."""
        text = CONFIG_MD.read_text(encoding="utf-8")
        for name, sections in _shipped_ini().items():
            for section, keys in sections.items():
                for key, value in keys.items():
                    cell = _default_cell(text, section, key)
                    where = f"{name} [{section}] {key}"
                    self.assertIsNotNone(cell, f"config.md has no row for {where}")
                    assert cell is not None
                    if cell.startswith("`"):
                        self.assertEqual(cell, f"`{value}`", where)

    def test_declared_booleans_are_documented(self) -> None:
        """Every boolean the session settings declare has a row with its declared default."""
        text = CONFIG_MD.read_text(encoding="utf-8")
        for declaration in (*CONNECTION_INI_BOOLEANS, *SMTP_INI_BOOLEANS):
            section, key = declaration.lstrip("+-").split(".", 1)
            cell = _default_cell(text, section, key)
            self.assertEqual(cell, "`true`" if declaration.startswith("+") else "`false`", key)


class BehaviourTests(SynchronousTestCase):
    """What config.md says about defaults and reloading holds."""

    def test_session_settings_defaults_are_the_shipped_values(self) -> None:
        """SessionSettings() has the shipped files' values (me aside), as config.md and
        embedding.md say."""
        built = SessionSettings()
        shipped = SessionSettings.from_config(ConfigDirectory([default_config_dir()]))
        for field in dataclasses.fields(SessionSettings):
            if field.name != "me":
                self.assertEqual(
                    getattr(built, field.name), getattr(shipped, field.name), field.name
                )
        self.assertEqual(built.spool_after, 1048576)

    def test_inactivity_timeout_from_smtp_ini_only(self) -> None:
        """connection.ini inactivity_timeout is not read."""
        config = write_config(
            temp_dir(self) / "config", {"connection.ini": "[main]\ninactivity_timeout=7\n"}
        )
        settings = SessionSettings.from_config(ConfigDirectory([default_config_dir(), config]))
        self.assertEqual(settings.inactivity_timeout, 300)

    def test_loglevel_wins_on_every_reload(self) -> None:
        """The loglevel file wins over log.ini at start-up and after a change to either."""
        config = write_config(temp_dir(self) / "config", {"loglevel": "warn\n"})
        server = HarakaServer.from_directory(config, reactor)  # type: ignore[arg-type]
        self.assertEqual(server.log.level, Level.WARN)
        (config / "log.ini").write_text("[main]\nlevel=debug\n", encoding="utf-8")
        self.assertEqual(server.config.reload(), ["log.ini"])
        self.assertEqual(server.log.level, Level.WARN)
        (config / "loglevel").write_text("error\n", encoding="utf-8")
        self.assertEqual(server.config.reload(), ["loglevel"])
        self.assertEqual(server.log.level, Level.ERROR)
        (config / "loglevel").unlink()
        server.config.reload()
        self.assertEqual(server.log.level, Level.DEBUG)

    def test_plugins_change_asks_for_a_restart(self) -> None:
        """A changed plugins file is not applied to a running server, and the log says a
        restart is needed (config.md)."""
        config = write_config(temp_dir(self) / "config", {"plugins": "queue/discard\n"})
        log = ListLog()
        server = HarakaServer(ConfigDirectory([default_config_dir(), config]), reactor, log)
        (config / "plugins").write_text("queue/discard\nrcpt_to.in_host_list\n")
        self.assertEqual(server.config.reload(), ["plugins"])
        warning = "changed: the plugins loaded at start stay in use until a restart"
        self.assertEqual(log.messages(Level.WARN), [f"{config / 'plugins'} {warning}"])
        self.assertEqual([p.name for p in server.runner.plugins], ["queue/discard"])


class _Recorded(dict[str, Any]):
    """An ini section that notes every key asked of it."""

    def __init__(self, keys: dict[str, Any], seen: set[tuple[str, str]], section: str) -> None:
        super().__init__(keys)
        self._seen = seen
        self._section = section

    def get(self, key: str, default: Any = None) -> Any:
        self._seen.add((self._section, key))
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self._seen.add((self._section, key))
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._seen.add((self._section, str(key)))
        return super().__contains__(key)


class _RecordingConfig:
    """A config directory whose outbound.ini remembers which keys were read."""

    def __init__(self, real: ConfigDirectory) -> None:
        self._real = real
        self.seen: set[tuple[str, str]] = set()

    def get_ini(self, name: str, booleans: Any = ()) -> Any:
        ini = self._real.get_ini(name, booleans=booleans)
        if name != "outbound.ini":
            return ini
        return {
            s: _Recorded(keys, self.seen, "domain.<name>" if s.startswith("domain.") else s)
            for s, keys in ini.items()
        }

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class OutboundIniTests(SynchronousTestCase):
    """The outbound.ini table of config.md is what OutboundService (with its Courier,
    MXResolver, RetryPolicy and limits) and queue_dir_of read, with their defaults."""

    def _service(self, files: dict[str, str]) -> tuple[OutboundService, _RecordingConfig]:
        directory = write_config(temp_dir(self) / "config", files)
        config = _RecordingConfig(ConfigDirectory([default_config_dir(), directory]))
        clock = Clock()
        log = HarakaLog()
        service = OutboundService(
            config,  # type: ignore[arg-type]
            clock,
            HookRunner([], clock, log),
            log,
            "mx.test",
            queue_dir=temp_dir(self) / "queue",
            resolver=object(),  # type: ignore[arg-type]
        )
        return service, config

    def _table(self) -> dict[tuple[str, str], str]:
        text = CONFIG_MD.read_text(encoding="utf-8")
        return _rows(_section_text(text, "outbound.ini"))

    def test_the_table_is_every_key_read(self) -> None:
        """Each key the outbound side reads has a row, and each row is a key it reads."""
        _, config = self._service(
            {"outbound.ini": "[main]\n[domain.example.net]\nconcurrency=1\nrate=10\n"}
        )
        queue_dir_of(config)  # type: ignore[arg-type]
        self.assertEqual(sorted(self._table()), sorted(config.seen))

    def test_defaults(self) -> None:
        """Each row's default is the value in force when outbound.ini sets nothing."""
        service, config = self._service({})
        main = {
            "queue_dir": queue_dir_of(config, cwd=Path("/x")).relative_to("/x").as_posix(),  # type: ignore[arg-type]
            "disabled": service.disabled,
            "concurrency_max": service.limits.concurrency_max,
            "domain_concurrency": service.limits.default.concurrency,
            "domain_rate": int(service.limits.default.rate_per_minute),
            "maxTempFailures": service.retry.max_attempts,
            "always_split": service.always_split,
            "mx_port": service.mx.port,
            "inet_prefer": service.mx.inet_prefer,
            "local_mx_ok": service.mx.local_mx_ok,
            "enable_tls": service.settings.enable_tls,
            "connect_timeout": int(service.settings.timeouts.connect),
            "pool_concurrency_max": service.pool.max_connections,
            "pool_timeout": int(service.pool.idle_timeout),
        }
        self.assertEqual(service.retry.intervals[:2], (64.0, 128.0))
        table = self._table()
        for key, value in main.items():
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            self.assertEqual(table[("main", key)], f"`{shown}`", key)
        for (section, key), cell in table.items():
            if section == "main" and cell.startswith("`"):
                self.assertIn(key, main, f"{key}: a default the test does not check")
