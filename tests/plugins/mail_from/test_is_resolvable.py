"""mail_from.is_resolvable over sockets: a real server, smtplib, and a real DNS server on
loopback holding a domain for each case (MX, implicit MX, null MX, bogus and missing MX
hosts, nameserver failures)."""

from __future__ import annotations

import smtplib
import time
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from haraka_tw.codes import CONT
from haraka_tw.interfaces import IMailHook
from haraka_tw.server import StartupError
from tests.dnsserver import serve
from tests.support import start_server

ZONE = """
$ORIGIN test.
@            300 IN SOA ns.test. admin.test. 1 60 60 60 60
good         300 IN MX 10 mx.good
mx.good      300 IN A 192.0.2.25
good6        300 IN MX 10 mx.good6
mx.good6     300 IN AAAA 2a00:1450:4001::1a
implicit     300 IN A 198.51.100.7
implicit6    300 IN AAAA 2a00:1450:4001::1b
nullmx       300 IN MX 0 .
bogus        300 IN MX 10 mx.bogus
bogus        300 IN MX 20 mx2.bogus
mx.bogus     300 IN A 127.0.0.1
mx2.bogus    300 IN AAAA ::1
noaddr       300 IN TXT "exists, with neither MX nor address"
dangling     300 IN MX 10 mx.nowhere
ipmx         300 IN MX 10 192.0.2.9.
second       300 IN MX 10 mx.second
second       300 IN MX 20 mx2.second
mx.second    300 IN A 127.0.0.2
mx2.second   300 IN A 192.0.2.30
flaky        300 IN MX 10 mx.flaky
mx.flaky     300 IN A 192.0.2.40
partly       300 IN MX 10 mx.partly
partly       300 IN MX 20 mx2.partly
mx.partly    300 IN A 192.0.2.41
mx2.partly   300 IN A 192.0.2.42
"""

# Names the nameserver answers badly: SERVFAIL, REFUSED, or never.
SERVFAIL = ["broken.test/MX", "mx.flaky.test/A", "mx.flaky.test/AAAA"]
REFUSED = ["refusing.test"]
HANG = ["slow.test/MX", "mx2.partly.test"]


def mail_from(port: int, sender: str) -> tuple[int, str]:
    """EHLO and MAIL FROM:<sender>: the reply to MAIL, as (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        return code, text.decode()


RESULTS: list[dict[str, Any]] = []


@implementer(IMailHook)
class Recorder:
    """Test plugin: keeps what mail_from.is_resolvable recorded for each MAIL it let by."""

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Any:
        RESULTS.append(dict(connection.transaction.results.get("mail_from.is_resolvable")))
        return CONT


class IsResolvableTests(TestCase):
    def server(self, ini: str = "", dns_timeout: float = 1.0) -> int:
        dns = serve(self, ZONE, origin="test.", servfail=SERVFAIL, refused=REFUSED, timeout=HANG)
        RESULTS.clear()
        _, port = start_server(
            self,
            {
                "plugins": "mail_from.is_resolvable\n"
                "tests.plugins.mail_from.test_is_resolvable:Recorder\n",
                "mail_from.is_resolvable.ini": ini,
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\n"
                f"timeout={dns_timeout}\nattempts=1\n",
            },
        )
        return port

    @inlineCallbacks
    def replies(self, port: int, *senders: str) -> Deferred[list[tuple[int, str]]]:
        got = []
        for sender in senders:
            got.append((yield deferToThread(mail_from, port, sender)))
        return got

    @inlineCallbacks
    def test_senders_with_a_usable_address_pass(self) -> Deferred[None]:
        """MX with an A or AAAA, the implicit MX (A or AAAA of the domain), a second MX
        when the first is bogus, and the null sender (not checked): 250."""
        port = self.server()
        senders = [
            "a@good.test",
            "a@GOOD.test",
            "a@good6.test",
            "a@implicit.test",
            "a@implicit6.test",
            "a@second.test",
            "",
        ]
        got = yield self.replies(port, *senders)
        self.assertEqual([code for code, _ in got], [250] * len(senders), got)
        self.assertEqual(
            RESULTS,
            [
                {**_empty(), "pass": ["has_fwd_dns"]},
                {**_empty(), "pass": ["has_fwd_dns"]},
                {**_empty(), "pass": ["has_fwd_dns"]},
                {**_empty(), "pass": ["implicit_mx"]},
                {**_empty(), "pass": ["implicit_mx"]},
                {**_empty(), "pass": ["has_fwd_dns"]},
                {**_empty(), "skip": ["null host"]},
            ],
        )

    @inlineCallbacks
    def test_senders_nobody_could_answer_are_refused(self) -> Deferred[None]:
        """No such domain, a domain with neither MX nor address, MX hosts that are bogus
        or do not exist, an MX that names an IP, an address literal: 550 5.1.8; a null MX:
        550 5.7.27."""
        port = self.server()
        got = yield self.replies(
            port,
            "a@missing.test",
            "a@noaddr.test",
            "a@bogus.test",
            "a@dangling.test",
            "a@ipmx.test",
            "a@[192.0.2.9]",
            "a@nullmx.test",
        )
        self.assertEqual(
            got,
            [
                (550, "5.1.8 No MX for your FROM address"),
                (550, "5.1.8 No MX for your FROM address"),
                (550, "5.1.8 No valid MX for your FROM address"),
                (550, "5.1.8 No valid MX for your FROM address"),
                (550, "5.1.8 No valid MX for your FROM address"),
                (550, "5.1.8 No valid MX for your FROM address"),
                (550, "5.7.27 Null MX: nullmx.test does not send mail"),
            ],
        )

    @inlineCallbacks
    def test_nameserver_failures_defer_and_never_refuse(self) -> Deferred[None]:
        """SERVFAIL or REFUSED on the MX, SERVFAIL on every MX host's address, a timeout:
        450 4.4.3 Temp. resolver error; one good MX host is enough even if another hangs."""
        port = self.server()
        got = yield self.replies(
            port, "a@broken.test", "a@refusing.test", "a@flaky.test", "a@slow.test"
        )
        self.assertEqual(
            got,
            [
                (450, "4.4.3 Temp. resolver error (SERVFAIL)"),
                (450, "4.4.3 Temp. resolver error (REFUSED)"),
                (450, "4.4.3 Temp. resolver error (SERVFAIL)"),
                (450, "4.4.3 Temp. resolver error (timeout)"),
            ],
        )
        ((code, _),) = yield self.replies(port, "a@partly.test")
        self.assertEqual(code, 250)

    @inlineCallbacks
    def test_timeout_caps_the_whole_check(self) -> Deferred[None]:
        """With timeout below the nameserver's, a hanging lookup gets 450 at the cap."""
        port = self.server("[main]\ntimeout_ms=300\n", dns_timeout=5)
        start = time.monotonic()
        got = yield self.replies(port, "a@slow.test")
        self.assertEqual(got, [(450, "4.4.3 Temp. resolver error (timeout)")])
        self.assertLess(time.monotonic() - start, 3)

    @inlineCallbacks
    def test_no_mx_modes(self) -> Deferred[None]:
        """[reject] no_mx: defer answers 450 4.1.8; no lets the sender by, recording the
        failure; Haraka's old top-level reject_no_mx=false means defer too."""
        port = self.server("[reject]\nno_mx=defer\n")
        got = yield self.replies(port, "a@missing.test", "a@nullmx.test")
        self.assertEqual(
            got,
            [
                (450, "4.1.8 No MX for your FROM address"),
                (550, "5.7.27 Null MX: nullmx.test does not send mail"),
            ],
        )
        port = self.server("[reject]\nno_mx=no\n")
        got = yield self.replies(port, "a@missing.test", "a@nullmx.test")
        self.assertEqual([code for code, _ in got], [250, 250])
        self.assertEqual(
            RESULTS, [{**_empty(), "fail": ["has_fwd_dns"]}, {**_empty(), "fail": ["null_mx"]}]
        )
        port = self.server("reject_no_mx=false\n")
        got = yield self.replies(port, "a@missing.test")
        self.assertEqual(got, [(450, "4.1.8 No MX for your FROM address")])

    @inlineCallbacks
    def test_allow_mx_ip(self) -> Deferred[None]:
        """allow_mx_ip accepts an MX naming an IP and an address literal, not a bogus one."""
        port = self.server("[main]\nallow_mx_ip=true\n")
        got = yield self.replies(port, "a@ipmx.test", "a@[192.0.2.9]", "a@[127.0.0.1]")
        self.assertEqual([code for code, _ in got], [250, 250, 550])

    @inlineCallbacks
    def test_re_bogus_ip(self) -> Deferred[None]:
        """re_bogus_ip replaces the default: 192.0.2.x no longer counts, 127.0.0.1 does."""
        port = self.server("[main]\nre_bogus_ip=^192\\.0\\.2\\.\n")
        got = yield self.replies(port, "a@good.test", "a@bogus.test")
        self.assertEqual([code for code, _ in got], [550, 250])

    def test_bad_settings_stop_the_start(self) -> None:
        """A bad timeout, regular expression or no_mx word stops start-up, naming the file."""
        for ini, words in [
            ("[main]\ntimeout=soon\n", "timeout"),
            ("[main]\nre_bogus_ip=(\n", "re_bogus_ip"),
            ("[reject]\nno_mx=maybe\n", "no_mx"),
        ]:
            with self.assertRaises(StartupError) as caught:
                start_server(
                    self,
                    {"plugins": "mail_from.is_resolvable\n", "mail_from.is_resolvable.ini": ini},
                )
            self.assertIn("mail_from.is_resolvable.ini", str(caught.exception))
            self.assertIn(words, str(caught.exception))


def _empty() -> dict[str, list[str]]:
    return {"pass": [], "fail": [], "skip": [], "err": [], "msg": []}
