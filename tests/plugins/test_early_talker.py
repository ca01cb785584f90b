"""early_talker: clients that talk before the banner (or before the 354) are refused."""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.hooks.loader import PluginLoadError
from haraka_tw.plugins.early_talker import parse_networks
from tests.plugins.loading import ENVELOPE, Loaded, accepting, load, session
from tests.support import WireClient, plugin_with, start_server

CHECKED = "[main]\ncheck_private=true\n"  # the test client, 192.0.2.10, counts as private


class EarlyTalkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def loaded(self, ini: str = CHECKED) -> Loaded:
        loaded = load(self, ["early_talker"], {"early_talker.ini": ini})
        loaded.plugin("early_talker").clock = self.clock
        return loaded

    def results(self, s: Any) -> dict[str, Any]:
        return dict(s.connection.results.get("early_talker") or {})

    def test_talking_during_the_pause_is_refused(self) -> None:
        """A client that speaks during the pause gets 554 You talk too soon and is closed."""
        s = session(*self.loaded(CHECKED + "pause=2\n").pairs(), greet=False)
        self.assertEqual(s.send("EHLO client.test\r\n"), "")
        self.clock.advance(2)
        self.assertEqual(s.read(), "554 You talk too soon\r\n")
        self.assertTrue(s.closed)
        self.assertEqual(self.results(s)["fail"], ["early"])

    def test_patient_client_is_greeted_after_the_pause(self) -> None:
        """A client that waits gets the banner once the pause is over, and passes."""
        s = session(*self.loaded(CHECKED + "pause=2\n").pairs(), greet=False)
        self.clock.advance(1.9)
        self.assertEqual(s.read(), "")
        self.clock.advance(0.1)
        self.assertTrue(s.read().startswith("220 "))
        self.assertEqual(self.results(s)["pass"], ["early"])

    def test_reject_false_only_records(self) -> None:
        """With reject=false an early talker is greeted; the result says it failed."""
        s = session(*self.loaded(CHECKED + "pause=1\nreject=false\n").pairs(), greet=False)
        s.send("EHLO client.test\r\n")
        self.clock.advance(1)
        self.assertEqual([line[:3] for line in s.read().splitlines()][:2], ["220", "250"])
        self.assertEqual(self.results(s)["fail"], ["early"])

    def test_flag_refused_at_helo_ehlo_mail(self) -> None:
        """A client marked early_talker gets 550 and close at HELO, EHLO or MAIL."""
        loaded = self.loaded()
        for command in ("HELO client.test", "EHLO client.test", "MAIL FROM:<a@client.test>"):
            s = session(*loaded.pairs(), accepting())
            if command.startswith("MAIL"):
                s.send("EHLO client.test\r\n")
            s.connection.early_talker = True
            self.assertIn("550", s.send(command + "\r\n"))
            self.assertTrue(s.closed, command)

    def test_talking_before_the_banner_without_pause(self) -> None:
        """Without a pause, talking while connect runs is refused at connect or HELO."""
        for early_talker_first in (False, True):
            slow: Deferred[None] = Deferred()
            plugins = [("slow", plugin_with({"connect": lambda c, d=slow: d}))]
            at = 0 if early_talker_first else 1
            plugins[at:at] = self.loaded().pairs()
            s = session(*plugins, greet=False)
            s.send("EHLO client.test\r\n")
            slow.callback(None)
            if early_talker_first:
                self.assertEqual(s.read().splitlines()[-1], "550 5.7.1 You talk too soon")
            else:
                self.assertEqual(s.read(), "554 You talk too soon\r\n")
            self.assertTrue(s.closed)

    def test_data_pause_catches_early_body(self) -> None:
        """With a pause, a body sent before the 354 gets 554 and the connection closes."""
        s = session(*self.loaded(CHECKED + "pause=1\n").pairs(), accepting(), greet=False)
        self.clock.advance(1)
        s.read()
        s.send(ENVELOPE)
        self.assertEqual(s.send("DATA\r\n"), "")
        s.send("Subject: spam\r\n")
        self.clock.advance(1)
        self.assertEqual(s.read(), "554 5.7.1 You talk too soon\r\n")
        self.assertTrue(s.closed)

    def test_data_and_the_message_in_one_write(self) -> None:
        """DATA with the whole message after it in the same write (the clearest case of not
        waiting for the 354): 554 at once, the connection closed, nothing taken."""
        s = session(*self.loaded(CHECKED + "pause=1\n").pairs(), accepting(), greet=False)
        self.clock.advance(1)
        s.read()
        s.send(ENVELOPE)
        self.assertEqual(
            s.send("DATA\r\nSubject: spam\r\n\r\nhi\r\n.\r\n"),
            "554 5.7.1 You talk too soon\r\n",
        )
        self.assertTrue(s.closed)

    def test_data_pause_patient_client(self) -> None:
        """A client that waits for the 354 gets it after the pause, and its message is taken."""
        s = session(*self.loaded(CHECKED + "pause=1\n").pairs(), accepting(), greet=False)
        self.clock.advance(1)
        s.send(ENVELOPE)
        s.send("DATA\r\n")
        self.clock.advance(1)
        self.assertEqual(s.codes(""), [354])
        self.assertEqual(s.codes("Subject: x\r\n\r\nhi\r\n.\r\n"), [250])

    def test_skipped_clients(self) -> None:
        """Private addresses, the ip_whitelist and relaying clients are not checked."""
        cases = {
            "": "private_ip",
            CHECKED + "[ip_whitelist]\n192.0.2.0/24\n": "whitelist",
        }
        for ini, reason in cases.items():
            s = session(*self.loaded(ini + "\n[main]\npause=5\n").pairs())
            self.assertEqual(self.results(s)["skip"], [reason])
        relay = ("relay", plugin_with({"connect": lambda c: setattr(c, "relaying", True)}))
        s = session(relay, *self.loaded(CHECKED + "pause=5\n").pairs())
        self.assertEqual(self.results(s)["skip"], ["relay"])

    def test_bad_config(self) -> None:
        """A pause that is not a number fails loading; bad whitelist lines are left out."""
        with self.assertRaises(PluginLoadError):
            self.loaded("[main]\npause=soon\n")
        networks, bad = parse_networks(["10.0.0.0/8", "::1", "nonsense"])
        self.assertEqual([str(n) for n in networks], ["10.0.0.0/8", "::1/128"])
        self.assertEqual(bad, ["nonsense"])


def _early_exchange(port: int) -> tuple[bytes, float]:
    """Connect and send EHLO at once; what the server wrote before closing, and how long."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        got = b""
        while piece := sock.recv(4096):
            got += piece
    return got, time.monotonic() - start


class EarlyTalkerServerTests(TestCase):
    @inlineCallbacks
    def test_early_and_patient_clients(self) -> Deferred[None]:
        """Over sockets: an early EHLO gets 554 after the pause; a patient client a 220."""
        _, port = start_server(
            self,
            {
                "plugins": "early_talker\n",
                "early_talker.ini": "[main]\npause=0.4\ncheck_private=true\n",
            },
        )
        got, elapsed = yield deferToThread(_early_exchange, port)
        self.assertEqual(got, b"554 You talk too soon\r\n")
        self.assertGreaterEqual(elapsed, 0.4)

        def patient() -> tuple[bytes, float]:
            start = time.monotonic()
            with WireClient(port) as client:
                return client.banner, time.monotonic() - start

        banner, elapsed = yield deferToThread(patient)
        self.assertTrue(banner.startswith(b"220 "))
        self.assertGreaterEqual(elapsed, 0.4)
