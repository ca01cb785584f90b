"""docs/plugins.md indexes every built-in plugin under haraka_tw/plugins/, with its hooks."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import haraka_tw.plugins
from haraka_tw.hooks.loader import resolve
from haraka_tw.hooks.runner import LoadedPlugin
from haraka_tw.interfaces import HOOKS

PLUGINS_MD = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
_ROW = re.compile(r"^\| \[`([^`]+)`\]\(#([^)]+)\) \| ([^|]+) \| [^|]+ \|$")


def _builtin_modules() -> dict[str, object]:
    """Each module under haraka_tw/plugins/ that has a Plugin factory, by dotted name
    relative to the package (C{rcpt_to.in_host_list})."""
    found: dict[str, object] = {}
    prefix = haraka_tw.plugins.__name__ + "."
    for info in pkgutil.walk_packages(haraka_tw.plugins.__path__, prefix):
        module = importlib.import_module(info.name)
        if hasattr(module, "Plugin"):
            found[info.name[len(prefix) :]] = module
    return found


def _index() -> list[tuple[str, str, str]]:
    """(name, anchor, hooks cell) of each row of the first table of plugins.md."""
    rows: list[tuple[str, str, str]] = []
    for line in PLUGINS_MD.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line)
        if m is not None:
            rows.append((m[1], m[2], m[3].strip()))
        elif rows:
            break  # the index is the first such table
    return rows


def _module_name(name: str) -> str:
    """The module a plugins-file name loads, relative to haraka_tw.plugins."""
    return name.replace("/", ".").replace("-", "_")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


class IndexTests(SynchronousTestCase):
    def test_every_builtin_plugin_is_indexed(self) -> None:
        """The index names exactly the modules under haraka_tw/plugins/ with a Plugin."""
        listed = sorted(_module_name(name) for name, _, _ in _index())
        self.assertEqual(listed, sorted(_builtin_modules()))

    def test_names_load_the_module(self) -> None:
        """Each name, as written in the index, loads that module's Plugin."""
        modules = _builtin_modules()
        for name, _, _ in _index():
            module = modules[_module_name(name)]
            self.assertIs(resolve(name), module.Plugin, name)  # type: ignore[attr-defined]

    def test_hooks_column(self) -> None:
        """The hooks listed are the hooks the plugin answers ("—" for none)."""
        for name, _, cell in _index():
            plugin = resolve(name)()
            answered = sorted(LoadedPlugin(name, plugin).hooks())
            if cell.startswith("—"):
                self.assertEqual(answered, [], name)
                continue
            words = [w.strip() for w in cell.split(",")]
            if all(w in HOOKS for w in words):
                self.assertEqual(sorted(words), answered, name)
            else:  # decided by config at registration (tarpit)
                self.assertIn("`", cell, name)

    def test_links_have_sections(self) -> None:
        """Each index link points at a heading of plugins.md."""
        anchors = {
            _anchor(line.lstrip("#"))
            for line in PLUGINS_MD.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")
        }
        for name, anchor, _ in _index():
            self.assertIn(anchor, anchors, name)
