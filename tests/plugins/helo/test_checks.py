"""helo.checks over sockets: clients (addresses from a PROXY header) greeting with good and
bad names, their reverse and forward names served by a real DNS server on loopback."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.plugins.helo.checks import CHECKS, is_dynamic, organizational_domain
from haraka_tw.server import StartupError
from tests.dnsserver import serve
from tests.plugins.test_dns_list import exchange
from tests.support import start_server

ZONE = """
.                        300 IN SOA ns.test. admin.test. 1 60 60 60 60
mail.sender.net.         300 IN A 1.2.3.4
other.sender.net.        300 IN A 9.9.9.9
unrelated.other.net.     300 IN A 9.9.9.8
c-1-2-3-5.dyn.isp.net.   300 IN A 1.2.3.5
broken.flaky.net.        300 IN A 1.2.3.4
4.3.2.1.in-addr.arpa.    300 IN PTR mail.sender.net.
5.3.2.1.in-addr.arpa.    300 IN PTR c-1-2-3-5.dyn.isp.net.
"""
REJECT_ALL = "[reject]\n" + "".join(f"{check}=true\n" for check in CHECKS)
BIGCO = "[bigco]\nyahoo.com=yahoo.com,yahoo.net\n"


class HeloChecksTests(TestCase):
    def server(self, ini: str = REJECT_ALL + BIGCO, **files: str) -> int:
        dns = serve(self, ZONE, servfail=["broken.flaky.net"])
        _, port = start_server(
            self,
            {
                "plugins": "helo.checks\n",
                "helo.checks.ini": ini,
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=1\nattempts=1\n",
                **files,
            },
        )
        return port

    @inlineCallbacks
    def greet(self, port: int, ip: str, *commands: str) -> Deferred[list[bytes]]:
        """The replies to C{commands} from client C{ip} (without the banner)."""
        got = yield deferToThread(exchange, port, ip, *commands)
        return got[1:]

    @inlineCallbacks
    def test_each_check_refuses_when_told_to(self) -> Deferred[None]:
        """With every reject on: a good name passes; each bad one gets its 550."""
        port = self.server(**{"helo.checks.regexps": r"bad.*\.net" + "\n"})
        cases = [
            ("1.2.3.4", "mail.sender.net", b"250"),
            ("1.2.3.4", "MAIL.Sender.NET", b"250"),
            ("1.2.3.4", "other.sender.net", b"250"),  # forward DNS elsewhere, same domain
            ("1.2.3.4", "[1.2.3.4]", b"250"),
            ("1.2.3.4", "[1.2.3.99]", b"250"),  # same /24
            ("1.2.3.4", "bad.sender.net", b"550 5.7.1 That HELO not allowed here"),
            ("1.2.3.4", "1.2.3.4", b"550 5.7.1 Invalid address format in HELO"),
            ("1.2.3.5", "c-1-2-3-5.dyn.isp.net", b"550 5.7.1 HELO is dynamic"),
            ("1.2.3.4", "yahoo.com", b"550 5.7.1 You are not who you say you are"),
            ("1.2.3.6", "yahoo.com", b"550 5.7.1 Big company w/o rDNS? Unlikely."),
            ("1.2.3.4", "nodot", b"550 5.7.1 HELO host must be a FQDN or address literal"),
            ("1.2.3.4", "mail.localdomain", b"550 5.7.1 HELO host name invalid"),
            ("1.2.3.4", "under_score.sender.net", b"550 5.7.1 HELO host name invalid"),
            ("1.2.3.6", "unrelated.other.net", b"550 5.7.1 HELO host does not match rDNS"),
            ("1.2.3.4", "[5.6.7.8]", b"550 5.7.1 HELO IP literal not in the same network"),
        ]
        for ip, helo, reply in cases:
            (got,) = yield self.greet(port, ip, f"EHLO {helo}")
            self.assertEqual(got[: len(reply)], reply, (ip, helo, got))

    @inlineCallbacks
    def test_forward_dns(self) -> Deferred[None]:
        """Without rdns_match: a name whose A records miss the client gets 550; a
        nameserver failure gets 450 4.4.3, never 550."""
        port = self.server(REJECT_ALL + "[check]\nrdns_match=false\n")
        (missing,) = yield self.greet(port, "1.2.3.4", "EHLO other.sender.net")
        self.assertEqual(missing, b"550 5.7.1 HELO host has no forward DNS match\r\n")
        (broken,) = yield self.greet(port, "1.2.3.4", "EHLO broken.flaky.net")
        self.assertEqual(broken, b"450 4.4.3 Temporary DNS error resolving your HELO hostname\r\n")

    @inlineCallbacks
    def test_a_refused_greeting_stays_refused(self) -> Deferred[None]:
        """A refused EHLO sent again is refused again (Haraka's plugin lets it by); a
        second greeting naming another host, or switching to HELO, is refused."""
        port = self.server()
        got = yield self.greet(
            port,
            "1.2.3.4",
            "EHLO nodot",
            "EHLO nodot",
            "EHLO mail.sender.net",
            "EHLO mail.sender.net",
            "EHLO other.sender.net",
            "HELO mail.sender.net",
        )
        self.assertEqual(
            [reply.split(b"\r\n")[0] for reply in got],
            [
                b"550 5.7.1 HELO host must be a FQDN or address literal (RFC 5321 2.3.5)",
                b"550 5.7.1 HELO host must be a FQDN or address literal (RFC 5321 2.3.5)",
                b"250-mx.test Hello mail.sender.net [1.2.3.4], Haraka_tw is at your service.",
                b"250-mx.test Hello mail.sender.net [1.2.3.4], Haraka_tw is at your service.",
                b"550 5.7.1 HELO host host_mismatch(mail.sender.net / other.sender.net)",
                b"550 HELO protocol mismatch",
            ],
        )

    @inlineCallbacks
    def test_defaults_only_record(self) -> Deferred[None]:
        """With the shipped defaults (no reject), bad names are greeted; private clients
        are not checked at all."""
        port = self.server("")
        for ip, helo in [("1.2.3.4", "nodot"), ("1.2.3.5", "c-1-2-3-5.dyn.isp.net")]:
            (got,) = yield self.greet(port, ip, f"EHLO {helo}")
            self.assertEqual(got[:4], b"250-")
        port = self.server()
        (got,) = yield self.greet(port, "192.168.1.9", "EHLO nodot")
        self.assertEqual(got[:4], b"250-")

    def test_bad_settings_stop_the_start(self) -> None:
        """A bad literal_mismatch mode or regular expression stops start-up, naming the file."""
        for files, words in [
            ({"helo.checks.ini": "[check]\nliteral_mismatch=9\n"}, "helo.checks.ini"),
            ({"helo.checks.regexps": "bad(\n"}, "helo.checks.regexps"),
        ]:
            with self.assertRaises(StartupError) as caught:
                start_server(self, {"plugins": "helo.checks\n", **files})
            self.assertIn(words, str(caught.exception))


class NameTests(SynchronousTestCase):
    def test_organizational_domain(self) -> None:
        """The registered domain by rule of thumb, country second levels included."""
        cases: list[tuple[Any, Any]] = [
            ("mail.example.com", "example.com"),
            ("a.b.example.co.uk", "example.co.uk"),
            ("example.com.", "example.com"),
            ("mx.example.de", "example.de"),
            ("localhost", None),
            (None, None),
        ]
        for name, domain in cases:
            self.assertEqual(organizational_domain(name), domain, name)

    def test_is_dynamic(self) -> None:
        """Two adjacent octets as numbers, or the hex form, in the host part."""
        self.assertTrue(is_dynamic("c-71-58-45-12.hsd1.pa.comcast.net", "71.58.45.12"))
        self.assertTrue(is_dynamic("12.45.58.71.dsl.example.net", "71.58.45.12"))
        self.assertTrue(is_dynamic("host-473a2d0c.example.net", "71.58.45.12"))
        self.assertFalse(is_dynamic("mx15.example.com", "203.0.1.5"))  # Haraka flags this
        self.assertFalse(is_dynamic("mail.example.com", "71.58.45.12"))
        self.assertFalse(is_dynamic("c-1-2-3-4.example.net", "2001:db8::1"))
