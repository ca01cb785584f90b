"""limit: concurrency, recipient, unrecognized-command and error limits (no Redis)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.codes import DENY
from haraka_tw.hooks.loader import PluginLoadError
from haraka_tw.logging import Level
from haraka_tw.plugins.limit import COUNTS_NOTE, Limits
from haraka_tw.smtp.connection import Connection, Local, Remote
from tests.plugins.loading import Loaded, accepting, load, session
from tests.support import WireClient, plugin_with, start_server


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def loaded(self, ini: str = "", name: str = "limit") -> Loaded:
        loaded = load(self, [name], {"limit.ini": ini} if ini else {})
        if name == "limit":
            loaded.plugin("limit").clock = self.clock
        return loaded

    def test_all_off_by_default(self) -> None:
        """With the shipped limit.ini every part is off."""
        self.assertEqual(self.loaded().plugin("limit").limits, Limits())

    def test_concurrency(self) -> None:
        """The connection over [concurrency] max gets 421; counts fall as clients leave."""
        loaded = self.loaded("[concurrency]\nenabled=true\nmax=2\n")
        first, second = (session(*loaded.pairs()) for _ in range(2))
        third = session(*loaded.pairs(), greet=False)
        self.assertEqual(third.banner, "421 Too many concurrent connections\r\n")
        self.assertTrue(third.closed)
        third.lose()
        first.lose()
        self.assertTrue(session(*loaded.pairs(), greet=False).banner.startswith("220 "))
        self.assertEqual(first.connection.results.get("limit")["concurrent"], "1/2")
        counts = loaded.server_notes[COUNTS_NOTE]
        self.assertEqual(counts, {"192.0.2.10": 2})
        second.lose()
        self.assertEqual(counts, {"192.0.2.10": 1})

    def test_concurrency_follows_a_new_address(self) -> None:
        """When connect_init runs again for a new address, the count moves with it."""
        plugin = self.loaded("[concurrency]\nenabled=true\n").plugin("limit")
        connection = Connection(Remote("192.0.2.1"), Local())
        plugin.hook_connect_init(connection)
        connection.remote = Remote("198.51.100.7")
        plugin.hook_connect_init(connection)
        self.assertEqual(plugin.counts, {"198.51.100.7": 1})
        plugin.hook_disconnect(connection)
        self.assertEqual(plugin.counts, {})

    def test_recipients_per_connection(self) -> None:
        """RCPT attempts count over the connection; the one over max gets 452 4.5.3."""
        loaded = self.loaded("[recipients]\nenabled=true\nmax=3\n")
        refuse_bad = (
            "refuse",
            plugin_with({"rcpt": lambda c, r, p: DENY if r.local == "bad" else None}),
        )
        s = session(*loaded.pairs(), refuse_bad, accepting())
        s.send("EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        self.assertEqual(s.codes("RCPT TO:<bad@x.test>\r\nRCPT TO:<b@x.test>\r\n"), [550, 250])
        s.send("RSET\r\nMAIL FROM:<a@client.test>\r\n")
        self.assertEqual(s.codes("RCPT TO:<c@x.test>\r\n"), [250])
        self.assertEqual(
            s.send("RCPT TO:<d@x.test>\r\n"), "452 4.5.3 Too many recipient attempts\r\n"
        )
        self.assertFalse(s.closed)

    def test_recipients_max_relaying(self) -> None:
        """A relaying client is held to max_relaying instead."""
        loaded = self.loaded("[recipients]\nenabled=true\nmax=1\nmax_relaying=2\n")
        relay = ("relay", plugin_with({"connect": lambda c: setattr(c, "relaying", True)}))
        s = session(relay, *loaded.pairs(), accepting())
        s.send("EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        self.assertEqual(
            s.codes("RCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nRCPT TO:<d@x.test>\r\n"),
            [250, 250, 452],
        )

    def test_unrecognized_commands(self) -> None:
        """Unrecognized commands up to max get 500; the next one 421 and the connection closes."""
        s = session(*self.loaded("[unrecognized_commands]\nenabled=true\nmax=2\n").pairs())
        self.assertEqual(s.codes("FOO\r\nBAR\r\n"), [500, 500])
        self.assertEqual(s.send("BAZ\r\n"), "421 Too many unrecognized commands\r\n")
        self.assertTrue(s.closed)
        self.assertEqual(s.connection.results.get("limit")["unrec_cmds"], ["FOO", "BAR", "BAZ"])

    def test_errors(self) -> None:
        """Once connection.errors is above max, the next MAIL gets 421 and close."""
        s = session(*self.loaded("[errors]\nenabled=true\nmax=1\n").pairs(), accepting())
        self.assertEqual(s.codes("EHLO client.test\r\nFOO\r\n"), [250, 500])
        self.assertEqual(s.codes("MAIL FROM:<a@client.test>\r\nRSET\r\nBAR\r\n"), [250, 250, 500])
        self.assertEqual(s.send("MAIL FROM:<a@client.test>\r\n"), "421 4.7.0 Too many errors\r\n")
        self.assertTrue(s.closed)

    def test_tarpit_delay(self) -> None:
        """[main] tarpit_delay holds a refusal that many seconds first."""
        loaded = self.loaded("tarpit_delay=3\n[unrecognized_commands]\nenabled=true\nmax=1\n")
        s = session(*loaded.pairs())
        self.assertEqual(s.codes("FOO\r\n"), [500])
        self.assertEqual(s.send("BAR\r\n"), "")
        self.clock.advance(3)
        self.assertEqual(s.read(), "421 Too many unrecognized commands\r\n")

    def test_bad_value_and_reload(self) -> None:
        """A bad limit fails loading; a reload applies a good edit and ignores a bad one."""
        with self.assertRaises(PluginLoadError):
            self.loaded("[errors]\nenabled=true\nmax=lots\n")
        for value in ("inf", "nan", "1e999", "2.5"):  # (each named with its file and key)
            with self.assertRaisesRegex(PluginLoadError, r"limit\.ini \[errors\] max must be"):
                self.loaded(f"[errors]\nenabled=true\nmax={value}\n")
        loaded = self.loaded("[errors]\nenabled=true\nmax=5\n")
        plugin = loaded.plugin("limit")
        loaded.write("limit.ini", "[errors]\nenabled=true\nmax=7\n")
        self.assertEqual(plugin.limits.errors, 7)
        loaded.write("limit.ini", "[errors]\nenabled=true\nmax=-1\n")
        self.assertEqual(plugin.limits.errors, 7)

    def test_a_haraka_section_this_plugin_lacks_is_a_warning(self) -> None:
        """Haraka's outbound concurrency, turned on in limit.ini: a WARN says it is not
        enforced; sections left off say nothing."""
        loaded = self.loaded(
            "[outbound]\nenabled=true\nexample.com=5\n[concurrency_history]\nenabled=false\n"
            "[concurrency]\nenabled=true\n"
        )
        warned = loaded.log.messages(Level.WARN)
        self.assertEqual(len(warned), 1, warned)
        self.assertTrue(
            warned[0].startswith(
                "limit.ini [outbound] enabled is not enforced: this limit plugin has only"
                " concurrency, errors, rate_conn, rate_conn_history, rate_rcpt,"
            ),
            warned,
        )

    def test_max_unrecognized_commands(self) -> None:
        """Haraka's older plugin name: always on, its own value file (else limit.ini, else 10)."""
        loaded = load(self, ["max_unrecognized_commands"], {"max_unrecognized_commands": "1\n"})
        s = session(*loaded.pairs())
        self.assertEqual(s.codes("FOO\r\nBAR\r\n"), [500, 421])
        self.assertTrue(s.closed)
        self.assertEqual(
            load(self, ["max_unrecognized_commands"]).plugin("max_unrecognized_commands").limit, 10
        )
        with self.assertRaisesRegex(
            PluginLoadError, "the max_unrecognized_commands file must be a number, not 'x'"
        ):
            load(self, ["max_unrecognized_commands"], {"max_unrecognized_commands": "x\n"})


class LimitServerTests(TestCase):
    @inlineCallbacks
    def test_concurrency_over_sockets(self) -> Deferred[None]:
        """Over sockets with max=1: a second client gets 421; a later one is greeted."""
        _, port = start_server(
            self, {"plugins": "limit\n", "limit.ini": "[concurrency]\nenabled=true\nmax=1\n"}
        )

        def exchange() -> tuple[bytes, bytes, bool, bytes]:
            with WireClient(port) as first:
                with WireClient(port) as second:
                    refused, closed = second.banner, second.at_eof()
                first.command("QUIT")
                first.at_eof()
            with WireClient(port) as third:
                return first.banner, refused, closed, third.banner

        first, refused, closed, third = yield deferToThread(exchange)
        self.assertTrue(first.startswith(b"220 "))
        self.assertEqual(refused, b"421 Too many concurrent connections\r\n")
        self.assertTrue(closed)
        self.assertTrue(third.startswith(b"220 "))
