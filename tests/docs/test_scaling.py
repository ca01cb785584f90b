"""docs/scaling.md: the HAProxy config and the plugin it shows are the files in
docs/examples (which tests/e2e/test_scaling.py runs), and its connection.ini does what the
guide says."""

from __future__ import annotations

import re
import sys
from ipaddress import ip_network
from pathlib import Path
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.codes import CONT
from haraka_tw.config import ConfigDirectory
from haraka_tw.logging import Level, LogRecord
from haraka_tw.paths import default_config_dir
from haraka_tw.smtp.settings import SessionSettings
from tests.support import temp_dir, write_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
SCALING = REPO / "docs" / "scaling.md"

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import quiet_checks  # noqa: E402


def doc_block(marker: str) -> str:
    """The fenced block of scaling.md right after C{<!-- marker -->}, with its last newline."""
    text = SCALING.read_text(encoding="utf-8")
    found = re.findall(rf"<!-- {re.escape(marker)} -->\n```[a-z]*\n(.*?\n)```", text, re.DOTALL)
    assert len(found) == 1, f"scaling.md has {len(found)} blocks after <!-- {marker} -->"
    return str(found[0])


def seconds(value: str) -> float:
    """An HAProxy time (C{500ms}, C{5s}, C{6m}, C{1h}; a bare number is milliseconds)."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {None: 0.001, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


class ExampleFileTests(SynchronousTestCase):
    """The blocks the guide shows as files are those files, byte for byte."""

    def test_haproxy_config_is_the_example_file(self) -> None:
        """The HAProxy config shown is docs/examples/haproxy-scaling.cfg."""
        shown = doc_block("file: haproxy-scaling.cfg")
        self.assertEqual(shown, (EXAMPLES / "haproxy-scaling.cfg").read_text(encoding="utf-8"))

    def test_plugin_is_the_example_file(self) -> None:
        """The quiet_checks plugin shown is docs/examples/quiet_checks.py."""
        shown = doc_block("file: quiet_checks.py")
        self.assertEqual(shown, (EXAMPLES / "quiet_checks.py").read_text(encoding="utf-8"))


class HAProxyConfigTests(SynchronousTestCase):
    """What the guide says of its HAProxy config holds for the file."""

    def setUp(self) -> None:
        self.config = (EXAMPLES / "haproxy-scaling.cfg").read_text(encoding="utf-8")

    def test_timeouts_outlast_the_session_timeouts(self) -> None:
        """timeout client and server are longer than the shipped inactivity and data timeouts."""
        shipped = SessionSettings.from_config(ConfigDirectory([default_config_dir()]))
        for side in ("client", "server"):
            (value,) = re.findall(rf"^\s*timeout {side} (\S+)$", self.config, re.M)
            self.assertGreater(seconds(value), shipped.inactivity_timeout, side)
            self.assertGreater(seconds(value), shipped.data_timeout, side)

    def test_every_server_gets_proxy_v2_and_checks(self) -> None:
        """TCP mode, round robin, SMTP checks, and send-proxy-v2 for every server."""
        self.assertRegex(self.config, r"(?m)^\s*mode tcp$")
        self.assertRegex(self.config, r"(?m)^\s*balance roundrobin$")
        self.assertRegex(self.config, r"(?m)^\s*option smtpchk EHLO \S+$")
        self.assertRegex(self.config, r"(?m)^\s*default-server send-proxy-v2 check\b")
        servers = re.findall(r"(?m)^\s*server (\S+) (.*)$", self.config)
        self.assertEqual([name for name, _ in servers], ["mx1", "mx2"])


class ConnectionIniTests(SynchronousTestCase):
    """The guide's connection.ini trusts the balancer, and only it."""

    def test_hosts_lists_the_balancer(self) -> None:
        """[haproxy] hosts[] as shown reads as the balancer's address, with timeout 30."""
        directory = write_config(
            temp_dir(self) / "config", {"connection.ini": doc_block("connection.ini")}
        )
        settings = SessionSettings.from_config(ConfigDirectory([default_config_dir(), directory]))
        self.assertEqual(settings.proxy_hosts, (ip_network("192.0.2.10/32"),))
        self.assertEqual(settings.proxy_timeout, 30.0)


def connection(proxy: dict[str, object] | None) -> SimpleNamespace:
    """A stand-in connection whose notes hold C{proxy} as the core's PROXY note."""
    return SimpleNamespace(notes={} if proxy is None else {"proxy": proxy})


CHECK = {"type": "haproxy", "proto": None, "src_ip": None, "proxy_ip": "192.0.2.10"}
CLIENT = {"type": "haproxy", "proto": "TCP4", "src_ip": "203.0.113.5", "proxy_ip": "192.0.2.10"}


class QuietChecksTests(SynchronousTestCase):
    """quiet_checks drops a health check's lines below WARN, and nothing else."""

    def answer(self, proxy: dict[str, object] | None, level: Level) -> object:
        plugin = quiet_checks.QuietHealthChecks()
        return plugin.hook_log(connection(proxy), LogRecord(level, "disconnect"))

    def test_check_summary_is_dropped(self) -> None:
        """A session whose PROXY header named no client: NOTICE and INFO lines are dropped."""
        self.assertNotEqual(self.answer(CHECK, Level.NOTICE), CONT)
        self.assertNotEqual(self.answer(CHECK, Level.INFO), CONT)

    def test_check_warnings_are_kept(self) -> None:
        """A health check's WARN and ERROR lines are still written."""
        self.assertEqual(self.answer(CHECK, Level.WARN), CONT)
        self.assertEqual(self.answer(CHECK, Level.ERROR), CONT)

    def test_clients_and_server_lines_are_kept(self) -> None:
        """A proxied client, a direct client and a server line (no connection) are kept."""
        self.assertEqual(self.answer(CLIENT, Level.NOTICE), CONT)
        self.assertEqual(self.answer(None, Level.NOTICE), CONT)
        record = LogRecord(Level.NOTICE, "listening")
        self.assertEqual(quiet_checks.QuietHealthChecks().hook_log(None, record), CONT)
