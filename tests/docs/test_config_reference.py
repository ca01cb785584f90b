"""docs/config.md agrees with the shipped etc/: every file and key, and their defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.config.ini import parse_ini
from haraka_tw.logging import Level
from haraka_tw.paths import default_config_dir
from haraka_tw.server import HarakaServer
from haraka_tw.smtp.settings import CONNECTION_INI_BOOLEANS, SMTP_INI_BOOLEANS, SessionSettings
from tests.support import temp_dir, write_config

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
