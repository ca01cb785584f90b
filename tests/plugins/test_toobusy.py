"""toobusy: 421 before the banner while the reactor lags more than maxlag."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.hooks.loader import PluginLoadError
from haraka_tw.logging import Level
from haraka_tw.plugins.toobusy import SMOOTHING, LagMonitor
from tests.plugins.loading import Loaded, load, session
from tests.support import WireClient, start_server


class LagMonitorTests(SynchronousTestCase):
    def test_lag_is_lateness_smoothed(self) -> None:
        """A check 0.3s late makes the lag a third of that; a punctual one shrinks it by a third."""
        clock = Clock()
        monitor = LagMonitor(clock, 0.5)
        monitor.start()
        clock.advance(0.5)
        self.assertEqual(monitor.lag, 0.0)
        clock.advance(0.8)  # due at 1.0, runs at 1.3
        self.assertAlmostEqual(monitor.lag, SMOOTHING * 0.3)
        clock.advance(0.5)
        self.assertAlmostEqual(monitor.lag, (1 - SMOOTHING) * SMOOTHING * 0.3)
        monitor.stop()
        self.assertFalse(monitor.running)
        self.assertEqual(clock.getDelayedCalls(), [])


class TooBusyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def loaded(self, files: dict[str, str] | None = None) -> Loaded:
        loaded = load(self, ["toobusy"], files)
        loaded.plugin("toobusy").clock = self.clock
        return loaded

    def connect(self, loaded: Loaded) -> Any:
        return session(*loaded.pairs(), greet=False)

    def test_busy_refuses_then_recovers(self) -> None:
        """Lag over maxlag gets new clients 421 Too busy; back under it, 220 again."""
        loaded = self.loaded()
        first = self.connect(loaded)  # starts the monitor
        self.assertTrue(first.banner.startswith("220 "))
        self.clock.advance(0.5)
        self.clock.advance(0.8)  # one check 300ms late: smoothed lag 100ms > 70ms
        busy = self.connect(loaded)
        self.assertEqual(busy.banner, "421 Too busy; please try again later\r\n")
        self.assertTrue(busy.closed)
        self.clock.advance(0.5)  # a punctual check: 67ms
        self.assertTrue(self.connect(loaded).banner.startswith("220 "))

    def test_crit_once_per_busy_spell(self) -> None:
        """The first refusal of a busy spell is logged at CRIT, the next ones are not."""
        loaded = self.loaded()
        self.connect(loaded)
        self.clock.advance(0.5)
        self.clock.advance(1.0)
        self.connect(loaded)
        self.connect(loaded)
        crit = loaded.log.messages(Level.CRIT)
        self.assertEqual(len(crit), 1)
        self.assertIn("deferring connections: lag=167ms max=70ms", crit[0])

    def test_maxlag_from_ini_and_value_file(self) -> None:
        """maxlag comes from toobusy.ini, toobusy.maxlag wins; both reload."""
        loaded = self.loaded({"toobusy.ini": "[main]\nmaxlag=200\n"})
        plugin = loaded.plugin("toobusy")
        self.assertEqual(plugin.maxlag, 0.2)
        self.assertEqual(loaded.write("toobusy.maxlag", "30\n"), ["toobusy.maxlag"])
        self.assertEqual(plugin.maxlag, 0.03)
        loaded.write("toobusy.ini", "[main]\nmaxlag=200\ncheck_interval=100\n")
        self.assertEqual(plugin.monitor.interval, 0.1)

    def test_defaults(self) -> None:
        """With the shipped config: maxlag 70ms, a check every 500ms, connect at -100."""
        loaded = self.loaded()
        plugin = loaded.plugin("toobusy")
        self.assertEqual((plugin.maxlag, plugin.monitor.interval), (0.07, 0.5))
        self.assertEqual(loaded.plugins[0].priorities, {"connect": -100})

    def test_bad_maxlag_stops_start_up(self) -> None:
        """A maxlag that is not a positive number fails the plugin's loading."""
        with self.assertRaises(PluginLoadError) as caught:
            self.loaded({"toobusy.ini": "[main]\nmaxlag=fast\n"})
        self.assertIn("toobusy.ini maxlag must be a number of milliseconds", str(caught.exception))
        with self.assertRaisesRegex(PluginLoadError, "the toobusy.maxlag file must be a number"):
            self.loaded({"toobusy.maxlag": "abc\n"})
        with self.assertRaisesRegex(PluginLoadError, "toobusy.ini check_interval must be above 0"):
            self.loaded({"toobusy.ini": "[main]\ncheck_interval=inf\n"})

    def test_init_master_starts_the_monitor(self) -> None:
        """The service start (init_master) starts measuring; stop() ends it."""
        plugin = self.loaded().plugin("toobusy")
        plugin.hook_init_master(None)
        self.assertTrue(plugin.monitor.running)
        plugin.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TooBusyServerTests(TestCase):
    @inlineCallbacks
    def test_lagging_reactor_refuses_over_a_socket(self) -> Deferred[None]:
        """Over a socket: 220 when idle, 421 while the reactor is kept busy, then 220."""
        server, port = start_server(
            self,
            {"plugins": "toobusy\n", "toobusy.ini": "[main]\nmaxlag=70\ncheck_interval=20\n"},
        )
        plugin = next(p.plugin for p in server.runner.plugins if p.name == "toobusy")
        self.addCleanup(plugin.stop)

        def banner() -> bytes:
            with WireClient(port) as client:
                return client.banner

        self.assertTrue((yield deferToThread(banner)).startswith(b"220 "))
        hog = LoopingCall(time.sleep, 0.2)  # blocks the reactor most of the time
        hog.start(0.01)
        try:
            yield deferLater(reactor, 0.5, lambda: None)
            self.assertEqual(
                (yield deferToThread(banner)), b"421 Too busy; please try again later\r\n"
            )
        finally:
            hog.stop()
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertTrue((yield deferToThread(banner)).startswith(b"220 "))
