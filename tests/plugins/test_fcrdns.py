"""fcrdns over sockets: clients (their addresses given by a PROXY header from loopback)
looked up both ways in a real DNS server on loopback; what is recorded and refused."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.codes import OK
from haraka_tw.interfaces import IQueueHook
from haraka_tw.plugins.fcrdns import is_generic_rdns
from tests.dnsserver import serve
from tests.plugins.test_dns_list import exchange
from tests.support import start_server

ZONE = """
4.3.2.1.in-addr.arpa.      300 IN PTR mail.example.com.
mail.example.com.          300 IN A   1.2.3.4
5.3.2.1.in-addr.arpa.      300 IN PTR near.example.org.
near.example.org.          300 IN A   1.2.3.99
6.3.2.1.in-addr.arpa.      300 IN PTR elsewhere.example.net.
elsewhere.example.net.     300 IN A   192.0.2.50
7.3.2.1.in-addr.arpa.      300 IN PTR localhost.
8.3.2.1.in-addr.arpa.      300 IN PTR c-1-2-3-8.pool.isp.example.
c-1-2-3-8.pool.isp.example. 300 IN A  1.2.3.8
9.3.2.1.in-addr.arpa.      300 IN PTR broken.example.com.
10.3.2.1.in-addr.arpa.     300 IN PTR silent.example.com.
"""
KEPT: list[tuple[bytes, Any]] = []


@implementer(IQueueHook)
class Keep:
    """Test plugin: keeps each message's header and the connection's fcrdns results."""

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        KEPT.append((txn.header.to_bytes(), connection.results.get("fcrdns")))
        return OK


class FCrDNSTests(TestCase):
    def server(self, ini: str = "", plugins: str = "") -> int:
        dns = serve(self, ZONE, servfail=["broken.example.com"], timeout=["silent.example.com"])
        KEPT.clear()
        _, port = start_server(
            self,
            {
                "plugins": f"{plugins}fcrdns\nrcpt_to.in_host_list\n{__name__}:Keep\n",
                "xclient.hosts": "1.2.3.4\n",
                "fcrdns.ini": ini,
                "host_list": "example.com\n",
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\nattempts=1\n",
            },
        )
        return port

    def send(self, port: int, ip: str, extra: str = "") -> Deferred[list[bytes]]:
        commands = ["EHLO client.example", "MAIL FROM:<a@b.example>", "RCPT TO:<you@example.com>"]
        message = f"{extra}Subject: hi\r\n\r\nbody\r\n."
        return deferToThread(exchange, port, ip, *commands, "DATA", message)

    @inlineCallbacks
    def test_results_and_header(self) -> Deferred[None]:
        """A name that resolves back to the client passes (iprev=pass); one in its /24
        passes as fcrdns(net) (iprev=fail, not exact); one elsewhere fails, its address
        noted. The header fields say so; a copy the client sent is gone."""
        port = self.server()
        forged = "X-Haraka-FCrDNS: forged.example\r\n"
        for ip in ("1.2.3.4", "1.2.3.5", "1.2.3.6"):
            replies = yield self.send(port, ip, forged)
            self.assertEqual(replies[-1][:3], b"250", replies)
        (exact, r1), (net, r2), (other, r3) = KEPT
        self.assertEqual((r1["pass"], r1["fcrdns"]), (["fcrdns"], ["mail.example.com"]))
        self.assertIn(b"iprev=pass policy.iprev=1.2.3.4 (mail.example.com)", exact)
        self.assertIn(b"X-Haraka-FCrDNS: mail.example.com\r\n", exact)
        self.assertNotIn(b"forged.example", exact)
        self.assertEqual(r2["pass"], ["fcrdns(net)"])
        self.assertIn(b"iprev=fail policy.iprev=1.2.3.5", net)
        self.assertEqual((r3["fcrdns"], r3["other_ips"]), ([], ["192.0.2.50"]))
        self.assertIn(b"X-Haraka-rDNS-OtherIPs: 192.0.2.50\r\n", other)
        self.assertEqual(r3["ptr_name_to_ip"], {"elsewhere.example.net": ["192.0.2.50"]})

    @inlineCallbacks
    def test_refusals_when_configured(self) -> Deferred[None]:
        """With every [reject] key on: no name, no confirming name, a name without a
        top-level domain and a generic name are 554; no match with a forward lookup that
        failed is 421 (it may match later); a confirmed client is greeted."""
        port = self.server(
            "[reject]\nno_rdns=true\nno_fcrdns=true\ninvalid_tld=true\ngeneric_rdns=true\n"
        )
        banners = {}
        for ip in ("1.2.3.4", "1.2.3.1", "1.2.3.6", "1.2.3.7", "1.2.3.8", "1.2.3.9"):
            replies = yield deferToThread(exchange, port, ip, "EHLO client.example")
            banners[ip] = replies[0].decode()
        self.assertTrue(banners["1.2.3.4"].startswith("220 "))
        self.assertEqual(banners["1.2.3.1"], "554 client [1.2.3.1] rejected; no rDNS\r\n")
        self.assertEqual(banners["1.2.3.6"], "554 Sorry, no FCrDNS match found\r\n")
        self.assertIn("invalid TLD in rDNS (localhost)", banners["1.2.3.7"])
        self.assertIn(
            "c-1-2-3-8.pool.isp.example [1.2.3.8] rejected; generic rDNS", banners["1.2.3.8"]
        )
        self.assertEqual(banners["1.2.3.9"], "421 no FCrDNS match found (DNS error)\r\n")

    @inlineCallbacks
    def test_a_timeout_stops_the_check(self) -> Deferred[None]:
        """A forward lookup still unanswered at fcrdns.ini's timeout ends the check: the
        client is greeted, the timeout is recorded with one iprev=temperror entry, and
        nothing of the cancelled lookup (no fail, no second iprev entry) follows."""
        port = self.server("[main]\ntimeout=0.5\n[reject]\nno_fcrdns=true\n")
        replies = yield self.send(port, "1.2.3.10")
        self.assertEqual([r[:3] for r in replies], [b"220", b"250", b"250", b"250", b"354", b"250"])
        header, results = KEPT[0]
        self.assertEqual(header.count(b"; iprev="), 1, header)
        self.assertIn(b"; iprev=temperror policy.iprev=1.2.3.10 (timeout)\r\n", header)
        self.assertEqual((results["err"], results["fail"]), (["timeout"], []))
        self.assertEqual(results["fcrdns"], [])

    @inlineCallbacks
    def test_xclient_starts_afresh(self) -> Deferred[None]:
        """After XCLIENT names another client, nothing of the first is in the message:
        one iprev entry, for the new address (IPv6 quoted, as RFC 8601 wants)."""
        port = self.server(plugins="xclient\n")
        commands = [
            "EHLO front.example",
            "XCLIENT ADDR=IPv6:2a00:1450:4001::99",
            "EHLO client.example",
            "MAIL FROM:<a@b.example>",
            "RCPT TO:<you@example.com>",
            "DATA",
            "Subject: hi\r\n\r\nbody\r\n.",
        ]
        replies = yield deferToThread(exchange, port, "1.2.3.4", *commands)
        self.assertEqual(replies[-1][:3], b"250", replies)
        header, results = KEPT[0]
        self.assertEqual(header.count(b"; iprev="), 1, header)
        self.assertIn(b'iprev=permerror policy.iprev="2a00:1450:4001::99"', header)
        self.assertNotIn(b"X-Haraka-FCrDNS", header)
        self.assertEqual((results["pass"], results["fcrdns"]), ([], []))

    @inlineCallbacks
    def test_private_clients_not_looked_up(self) -> Deferred[None]:
        """A client on a private address is not looked up, and not refused."""
        port = self.server("[reject]\nno_rdns=true\nno_fcrdns=true\n")
        replies = yield self.send(port, "192.168.1.9")
        self.assertEqual(replies[-1][:3], b"250")
        self.assertEqual(KEPT[0][1]["skip"], ["private_ip"])


class GenericTests(SynchronousTestCase):
    def test_generic_names(self) -> None:
        """Names holding the address are generic, unless static or business."""
        self.assertTrue(is_generic_rdns("dsl-188-34-255-136.asretelecom.net", "188.34.255.136"))
        self.assertTrue(is_generic_rdns("c-76-121-96-159.hsd1.wa.comcast.net", "76.121.96.159"))
        self.assertFalse(
            is_generic_rdns("c-76-121-96-159.business.wa.comcast.net", "76.121.96.159")
        )
        self.assertFalse(is_generic_rdns("mail.theartfarm.com", "66.128.51.165"))
