"""Loading plugins by built-in name, module:Factory and entry point."""

from __future__ import annotations

import sys
import textwrap
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.hooks.loader import PluginLoadError, load_plugins, resolve
from haraka_tw.plugins.queue.discard import Plugin as Discard
from tests.support import ListLog, temp_dir

PLUGIN_SOURCE = textwrap.dedent(
    """
    from zope.interface import implementer
    from haraka_tw.codes import OK
    from haraka_tw.interfaces import IMailHook, IRegistration

    @implementer(IMailHook, IRegistration)
    class Factory:
        def register(self, context):
            self.context = context
            context.set_priority("mail", -5)
            context.server_notes["registered"] = context.name
        def hook_mail(self, connection, sender, params):
            return OK

    class NoHooks:
        pass

    class Explodes:
        def __init__(self):
            raise RuntimeError("cannot start")
    """
)


class LoaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)
        (self.dir / "tw_sample_plugins.py").write_text(PLUGIN_SOURCE)
        dist = self.dir / "tw_sample_plugins-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: tw-sample-plugins\nVersion: 1.0\n"
        )
        (dist / "entry_points.txt").write_text(
            "[haraka_tw.plugins]\nsample = tw_sample_plugins:Factory\n"
        )
        sys.path.insert(0, str(self.dir))
        self.addCleanup(sys.path.remove, str(self.dir))
        self.addCleanup(sys.modules.pop, "tw_sample_plugins", None)
        conf = self.dir / "conf"
        conf.mkdir()
        (conf / "tw_sample_plugins:Factory.timeout").write_text("7\n")
        self.config = ConfigDirectory([conf])
        self.log = ListLog()

    def load(self, names: list[str], ignore: bool = False) -> tuple[list[Any], dict[str, Any]]:
        notes: dict[str, Any] = {}
        loaded = load_plugins(
            names, config=self.config, log=self.log, server_notes=notes, ignore_bad_plugins=ignore
        )
        return loaded, notes

    def test_builtin_names(self) -> None:
        """Haraka names map to built-in modules: queue/discard, rcpt_to.in_host_list."""
        self.assertIs(resolve("queue/discard"), Discard)
        from haraka_tw.plugins.rcpt_to import in_host_list

        self.assertIs(resolve("rcpt_to.in_host_list"), in_host_list.Plugin)

    def test_module_factory_registration(self) -> None:
        """module:Factory loads; register() gets name, config, logger, notes; priority is kept."""
        loaded, notes = self.load(["tw_sample_plugins:Factory"])
        (p,) = loaded
        self.assertEqual(p.name, "tw_sample_plugins:Factory")
        self.assertEqual(notes["registered"], "tw_sample_plugins:Factory")
        self.assertIs(p.plugin.context.config, self.config)
        self.assertEqual(p.plugin.context.log.origin, "tw_sample_plugins:Factory")
        self.assertEqual(p.priorities, {"mail": -5})
        self.assertEqual(p.timeout, 7.0)
        self.assertEqual(p.hooks(), ["mail"])

    def test_entry_point(self) -> None:
        """A plugin published under the haraka_tw.plugins entry-point group loads by name."""
        loaded, notes = self.load(["sample"])
        self.assertEqual(notes["registered"], "sample")
        self.assertEqual(type(loaded[0].plugin).__name__, "Factory")

    def test_failures_name_the_plugin(self) -> None:
        """Unknown, hookless and crashing plugins stop loading with a message naming them."""
        for name, words in [
            ("no_such_plugin", "no such built-in plugin"),
            ("queue/nothing_here", "no such built-in plugin"),
            ("tw_sample_plugins:Missing", "has no 'Missing'"),
            ("no_such_module:Factory", "cannot import"),
            ("tw_sample_plugins:NoHooks", "provides no hook interface"),
            ("tw_sample_plugins:Explodes", "cannot start"),
        ]:
            with self.assertRaises(PluginLoadError) as ctx:
                self.load([name])
            self.assertIn(repr(name), str(ctx.exception))
            self.assertIn(words, str(ctx.exception))

    def test_every_unknown_name_is_reported_at_once_and_nothing_registers(self) -> None:
        """A plugins file brought from Haraka with several plugins this server lacks: one
        error names them all, each where it is listed, and no plugin was registered (the
        one listed before them included)."""
        lines = {"sample": "plugins:1: ", "watch": "plugins:2: ", "known-senders": "plugins:4: "}
        notes: dict[str, Any] = {}
        with self.assertRaises(PluginLoadError) as ctx:
            load_plugins(
                ["sample", "watch", "queue/discard", "known-senders"],
                config=self.config,
                log=self.log,
                server_notes=notes,
                where=lines.__getitem__,
            )
        self.assertEqual(
            str(ctx.exception).splitlines(),
            [
                "2 plugins failed to load:",
                "  plugins:2: plugin 'watch' failed to load: no such built-in plugin or"
                " entry point",
                "  plugins:4: plugin 'known-senders' failed to load: no such built-in plugin or"
                " entry point",
            ],
        )
        self.assertEqual(notes, {})  # 'sample' registers itself in the notes

    def test_ignore_bad_plugins_names_the_line_and_keeps_what_was_left_out(self) -> None:
        """Each plugin left out is an ERROR naming its line, and is handed back."""
        skipped: list[PluginLoadError] = []
        loaded = load_plugins(
            ["watch", "queue/discard", "tw_sample_plugins:Explodes"],
            config=self.config,
            log=self.log,
            server_notes={},
            ignore_bad_plugins=True,
            where=lambda name: f"plugins:{name}: ",
            skipped=skipped,
        )
        self.assertEqual([p.name for p in loaded], ["queue/discard"])
        self.assertEqual([e.name for e in skipped], ["watch", "tw_sample_plugins:Explodes"])
        self.assertIn(
            "plugins:watch: plugin 'watch' failed to load: no such built-in plugin or entry"
            " point (ignored: ignore_bad_plugins)",
            self.log.messages(),
        )

    def test_ignore_bad_plugins(self) -> None:
        """With ignore_bad_plugins a bad plugin is logged and left out; the rest load."""
        loaded, _ = self.load(["no_such_plugin", "queue/discard"], ignore=True)
        self.assertEqual([p.name for p in loaded], ["queue/discard"])
        self.assertTrue(any("no_such_plugin" in m for m in self.log.messages()))

    def test_listed_twice_loads_once(self) -> None:
        """A plugin listed twice is loaded once, also when spelt both ways (queue/discard
        and queue.discard name the same module), with a WARN that says so."""
        loaded, _ = self.load(["queue/discard", "queue/discard"])
        self.assertEqual(len(loaded), 1)
        loaded, _ = self.load(["queue/discard", "rcpt_to.in_host_list", "queue.discard"])
        self.assertEqual([p.name for p in loaded], ["queue/discard", "rcpt_to.in_host_list"])
        self.assertIn(
            "plugin 'queue.discard' is listed twice (as 'queue/discard'); loaded once",
            self.log.messages(),
        )
