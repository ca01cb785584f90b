"""xclient: trusted front ends hand on the real client; everyone else is refused."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.codes import OK
from haraka_tw.config import ConfigDirectory
from haraka_tw.hooks.loader import load_plugins
from haraka_tw.plugins.xclient import parse_attributes
from tests.support import CLIENT_IP, ListLog, Session, plugin_with, reply_codes, temp_dir


def test_parse_attributes() -> None:
    """Attributes are upper-cased and xtext-decoded; unknown ones are errors."""
    assert parse_attributes("addr=192.0.2.1 NAME=a+2Bb.example") == {
        "ADDR": "192.0.2.1",
        "NAME": "a+b.example",
    }
    for bad in ("FOO=1", "ADDR", "ADDR=a+zz"):
        with pytest.raises(ValueError):
            parse_attributes(bad)
    # control characters (CR LF would reach the Received field and the log)
    for bad in ("NAME=a+0D+0AX-Body:+20yes", "NAME=a+00b", "HELO=x+7F", "LOGIN=a+09b"):
        with pytest.raises(ValueError, match="control characters"):
            parse_attributes(bad)


class XclientTests(SynchronousTestCase):
    def session(self, hosts: str) -> tuple[Session, list[Any]]:
        d = temp_dir(self)
        (d / "xclient.hosts").write_text(hosts)
        config = ConfigDirectory([d])
        (xc,) = load_plugins(["xclient"], config=config, log=ListLog(), server_notes={})
        seen: list[Any] = []
        recorder = plugin_with(
            {
                "lookup_rdns": lambda c: OK,  # no real PTR lookups in tests
                "connect": lambda c: seen.append((c.uuid, c.remote.ip, c.remote.host)),
            }
        )
        return Session([(xc.name, xc.plugin), ("rec", recorder)]), seen

    def test_trusted_host_restarts_session(self) -> None:
        """From xclient.hosts: advertised; XCLIENT gives a new 220, uuid and client."""
        s, seen = self.session(f"{CLIENT_IP}\n")
        self.assertIn("250 XCLIENT NAME ADDR", s.send(b"EHLO front.example\r\n"))
        s.connection.relaying = True
        out = s.send(b"XCLIENT ADDR=203.0.113.9 NAME=real.example PORT=5555\r\n")
        self.assertTrue(out.startswith("220 "), out)
        conn = s.connection
        self.assertEqual(
            (conn.remote.ip, conn.remote.port, conn.remote.host),
            ("203.0.113.9", 5555, "real.example"),
        )
        self.assertFalse(conn.relaying)
        self.assertNotEqual(seen[0][0], seen[1][0])
        self.assertEqual(seen[1][1:], ("203.0.113.9", "real.example"))
        self.assertEqual(reply_codes(s.send(b"MAIL FROM:<a@b.c>\r\n")), [503])  # greet again

    def test_ipv6_and_cidr(self) -> None:
        """CIDRs in xclient.hosts; IPV6: addresses; NAME=[UNAVAILABLE] means no name."""
        s, _seen = self.session("192.0.2.0/24\n")
        out = s.send(b"XCLIENT ADDR=IPV6:2001:db8::5 NAME=[UNAVAILABLE]\r\n")
        self.assertTrue(out.startswith("220 "))
        self.assertEqual(s.connection.remote.ip, "2001:db8::5")

    def test_refusals(self) -> None:
        """550 from other hosts; 503 inside a transaction; 501 without ADDR."""
        s, _ = self.session("198.51.100.1\n")
        self.assertNotIn("XCLIENT", s.send(b"EHLO x\r\n"))
        self.assertIn("550 5.7.1", s.send(b"XCLIENT ADDR=203.0.113.9\r\n"))
        s, _ = self.session(f"{CLIENT_IP}\n")
        s.send(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        self.assertIn("503 5.5.1", s.send(b"XCLIENT ADDR=203.0.113.9\r\n"))
        s.send(b"RSET\r\n")
        self.assertIn("501 5.5.4", s.send(b"XCLIENT NAME=x.example\r\n"))
        self.assertIn("501 5.5.4", s.send(b"XCLIENT ADDR=not-an-ip\r\n"))
