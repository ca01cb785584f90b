"""tarpit: the replies of the configured hooks wait connection.notes.tarpit seconds."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.hooks.loader import PluginLoadError
from haraka_tw.interfaces import IConnectHook, IHeloHook, IMailHook
from haraka_tw.logging import Level
from haraka_tw.plugins.tarpit import DEFAULT_HOOKS
from tests.plugins.loading import ENVELOPE, Loaded, accepting, load, session
from tests.support import Session, WireClient, plugin_with, reply_codes, start_server


def noting(where: str, seconds: Any) -> tuple[str, object]:
    """A plugin that sets the tarpit note (on the connection, or on each transaction)."""
    if where == "connection":

        def connect(connection: Any) -> None:
            connection.notes.tarpit = seconds

        return ("karma", plugin_with({"connect": connect}))

    def mail(connection: Any, sender: Any, params: Any) -> None:
        connection.transaction.notes.tarpit = seconds

    return ("karma", plugin_with({"mail": mail}))


class TarpitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def loaded(self, files: dict[str, str] | None = None) -> Loaded:
        loaded = load(self, ["tarpit"], files)
        loaded.plugin("tarpit").clock = self.clock
        return loaded

    def test_connection_note_delays_each_reply(self) -> None:
        """connection.notes.tarpit = 3 holds the banner and each reply exactly 3s."""
        loaded = self.loaded()
        s = session(noting("connection", 3), *loaded.pairs(), accepting(), greet=False)
        self.assertEqual(s.read(), "")
        self.clock.advance(3)
        self.assertTrue(s.read().startswith("220 "))
        s.send("EHLO client.test\r\n")
        self.clock.advance(3)
        s.read()
        self.assertEqual(s.send("MAIL FROM:<a@client.test>\r\n"), "")
        self.clock.advance(2.9)
        self.assertEqual(s.read(), "")
        self.clock.advance(0.1)
        self.assertEqual(s.read(), "250 2.1.0 sender <a@client.test> OK\r\n")
        self.assertIn("tarpitting response for 3s", s.log.messages(Level.INFO))

    def test_transaction_note(self) -> None:
        """transaction.notes.tarpit holds each hook of that transaction, nothing after."""
        loaded = self.loaded()
        s = session(noting("transaction", 2), *loaded.pairs(), accepting())
        s.send("EHLO client.test\r\n")
        self.assertEqual(s.send("MAIL FROM:<a@client.test>\r\n"), "")
        self.clock.advance(2)
        self.assertEqual(reply_codes(s.read()), [250])
        self.assertEqual(s.send("RCPT TO:<b@example.com>\r\n"), "")
        self.clock.advance(2)  # rcpt, then rcpt_ok: two delays
        self.assertEqual(s.read(), "")
        self.clock.advance(2)
        self.assertEqual(reply_codes(s.read()), [250])
        self.assertEqual(s.codes("RSET\r\nNOOP\r\n"), [250, 250])  # no transaction: no delay

    def test_configured_delay_and_note_zero(self) -> None:
        """tarpit.ini delay holds every client; a note of 0 lets one through at once."""
        loaded = self.loaded({"tarpit.ini": "[main]\ndelay=1.5\nhooks_to_delay=helo,ehlo\n"})
        slow = session(*loaded.pairs())
        self.assertEqual(slow.send("HELO client.test\r\n"), "")
        self.clock.advance(1.5)
        self.assertEqual(slow.codes(""), [250])
        fast = session(noting("connection", 0), *loaded.pairs())
        self.assertEqual(fast.codes("HELO client.test\r\n"), [250])

    def test_hooks_to_delay(self) -> None:
        """Only the hooks in hooks_to_delay are delayed: the plugin answers no others."""
        loaded = self.loaded({"tarpit.ini": "[main]\nhooks_to_delay=mail; helo\n"})
        plugin = loaded.plugin("tarpit")
        self.assertEqual(loaded.plugins[0].hooks(), ["helo", "mail"])
        self.assertTrue(IMailHook.providedBy(plugin) and IHeloHook.providedBy(plugin))
        self.assertFalse(IConnectHook.providedBy(plugin))
        s = session(noting("connection", 5), *loaded.pairs(), accepting())
        self.assertEqual(s.codes("EHLO client.test\r\n"), [250])
        self.assertEqual(s.send("MAIL FROM:<a@client.test>\r\n"), "")
        self.clock.advance(5)
        self.assertEqual(reply_codes(s.read()), [250])

    def test_default_hooks_and_no_timeout(self) -> None:
        """The shipped config delays Haraka's list of hooks, with no plugin timeout."""
        loaded = self.loaded()
        self.assertEqual(set(loaded.plugins[0].hooks()), set(DEFAULT_HOOKS))
        self.assertEqual(loaded.plugins[0].timeout, 0)

    def test_unknown_hook_stops_start_up(self) -> None:
        """A hook tarpit cannot delay, in hooks_to_delay, fails the plugin's loading."""
        with self.assertRaises(PluginLoadError) as caught:
            self.loaded({"tarpit.ini": "[main]\nhooks_to_delay=mail,disconnect\n"})
        self.assertIn("cannot delay disconnect", str(caught.exception))

    def test_disconnect_during_delay(self) -> None:
        """A client that leaves during a delay gets nothing more, and no timer is left."""
        loaded = self.loaded()
        s: Session = session(noting("connection", 0), *loaded.pairs(), accepting())
        s.send(ENVELOPE)
        s.connection.notes.tarpit = 4
        s.send("DATA\r\n")
        s.lose()
        self.clock.advance(4)
        self.assertEqual(s.read(), "")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TarpitServerTests(TestCase):
    @inlineCallbacks
    def test_delay_holds_one_client_not_the_server(self) -> Deferred[None]:
        """Over sockets: a tarpitted EHLO waits while another client is greeted."""
        _, port = start_server(
            self,
            {"plugins": "tarpit\n", "tarpit.ini": "[main]\ndelay=0.6\nhooks_to_delay=ehlo\n"},
        )

        def exchange() -> tuple[float, float, bytes]:
            with WireClient(port) as slow:
                start = time.monotonic()
                slow.send("EHLO client.test\r\n")
                with WireClient(port) as other:
                    other_banner = time.monotonic() - start
                    self.assertTrue(other.banner.startswith(b"220 "))
                reply = slow.reply()
                return other_banner, time.monotonic() - start, reply

        other_banner, elapsed, reply = yield deferToThread(exchange)
        self.assertLess(other_banner, 0.5)
        self.assertGreaterEqual(elapsed, 0.6)
        self.assertTrue(reply.startswith(b"250-"))
