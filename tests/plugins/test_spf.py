"""spf over sockets: clients (their addresses given by a PROXY header from loopback) checked
against SPF records held by a real DNS server on loopback, and what reaches the message."""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw import spf
from haraka_tw.codes import OK
from haraka_tw.interfaces import IQueueHook, IQueueOutboundHook, IRcptHook
from haraka_tw.logging import Level
from haraka_tw.plugins.spf import received_spf
from haraka_tw.server import StartupError
from tests.dnsserver import serve
from tests.plugins.test_dns_list import exchange
from tests.support import WireClient, start_server, temp_dir

ZONE = """
example.com.          300 IN TXT "v=spf1 ip4:1.2.3.0/24 -all"
mail.example.com.     300 IN TXT "v=spf1 a -all"
mail.example.com.     300 IN A   1.2.3.4
soft.example.         300 IN TXT "v=spf1 ~all"
fail.example.         300 IN TXT "v=spf1 -all exp=why.fail.example"
why.fail.example.     300 IN TXT "%{i} is not one of %{d}'s senders"
broken.example.       300 IN TXT "v=spf1 ip4:1.2.3.4/33"
servfail.example.     300 IN TXT "v=spf1 -all"
slow.example.         300 IN TXT "v=spf1 -all"
slowhelo.example.     300 IN TXT "v=spf1 -all"
relayed.example.      300 IN TXT "v=spf1 ptr ip4:1.2.3.77 -all"
3.2.1.10.in-addr.arpa. 300 IN PTR laptop.slowname.example.
77.3.2.1.in-addr.arpa. 300 IN PTR mx.slowname.example.
"""
KEPT: list[tuple[bytes, Any, Any, Any]] = []
MESSAGE = "Subject: spf\r\n\r\nbody\r\n."


class UnixClient(WireClient):
    """A L{WireClient} on a unix socket: a client without an IP address."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.timeout = timeout
        self._buf = bytearray()
        self.banner = self.reply()


def unix_exchange(path: str, *commands: str) -> list[bytes]:
    """Connect to the unix socket C{path} and send C{commands}: the banner and the reply
    to each."""
    with UnixClient(path) as client:
        return [client.banner] + [client.command(c) for c in commands]


@implementer(IRcptHook, IQueueHook, IQueueOutboundHook)
class Keep:
    """Test plugin: takes every recipient and keeps each message's header, its spf notes
    and results."""

    def hook_rcpt(self, connection: Any, recipient: Any, params: Any) -> Any:
        return OK

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        KEPT.append(
            (
                txn.header.to_bytes(),
                txn.notes.get("spf"),
                txn.results.get("spf"),
                connection.results.get("spf"),
            )
        )
        return OK

    hook_queue_outbound = hook_queue


class SPFTests(TestCase):
    def server(
        self,
        ini: str = "",
        files: dict[str, str] | None = None,
        plugins: str = "",
        dns_timeout: float = 5,
    ) -> int:
        dns = serve(
            self,
            ZONE,
            servfail=["servfail.example"],
            timeout=[
                "slow.example",
                "slowhelo.example",
                "laptop.slowname.example",
                "mx.slowname.example",
            ],
        )
        KEPT.clear()
        config = {
            "plugins": f"relay\nspf\n{plugins}tests.plugins.test_spf:Keep\n",
            "spf.ini": ini,
            "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
            "dns.ini": (
                f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout={dns_timeout:g}\nattempts=1\n"
            ),
        }
        config.update(files or {})
        self.haraka, port = start_server(self, config)
        return port

    def send(self, port: int, ip: str, helo: str, sender: str) -> Deferred[list[bytes]]:
        commands = [f"EHLO {helo}", f"MAIL FROM:<{sender}>", "RCPT TO:<you@mx.test>", "DATA"]
        return deferToThread(exchange, port, ip, *commands, MESSAGE)

    @inlineCallbacks
    def test_pass_is_recorded_in_the_message(self) -> Deferred[None]:
        """A client the sender's domain (and its HELO name) designates is accepted; the
        message carries a Received-SPF field for each identity above the Received field,
        an Authentication-Results entry for the sender's domain, and the results and
        notes record the pass."""
        port = self.server()
        replies = yield self.send(port, "1.2.3.4", "mail.example.com", "joe@example.com")
        self.assertEqual([r[:3] for r in replies], [b"220", b"250", b"250", b"250", b"354", b"250"])
        header, outcome, results, conn_results = KEPT[0]
        lines = header.decode().split("\r\n")
        names = [line.split(":")[0] for line in lines if line and line[0] not in " \t"]
        self.assertEqual(
            names[:4], ["Authentication-Results", "Received-SPF", "Received-SPF", "Received"]
        )
        fields = header.decode().replace("\r\n\t", " ").split("\r\n")
        self.assertEqual(
            fields[0], "Authentication-Results: mx.test; spf=pass smtp.mailfrom=example.com"
        )
        self.assertEqual(
            fields[1],
            "Received-SPF: pass (mx.test: domain of joe@example.com designates 1.2.3.4 as "
            'permitted sender) client-ip=1.2.3.4; envelope-from="joe@example.com"; '
            "helo=mail.example.com; receiver=mx.test; identity=mailfrom; "
            'mechanism="ip4:1.2.3.0/24";',
        )
        self.assertTrue(
            fields[2].startswith(
                "Received-SPF: pass (mx.test: domain of postmaster@mail.example.com designates"
            ),
            fields[2],
        )
        self.assertIn("identity=helo; mechanism=a;", fields[2])
        self.assertEqual((outcome.result, outcome.domain), ("pass", "example.com"))
        self.assertEqual((results["result"], results["pass"]), ("Pass", ["example.com"]))
        self.assertEqual(
            (conn_results["scope"], conn_results["result"], conn_results["pass"]),
            ("helo", "Pass", ["mail.example.com"]),
        )

    @inlineCallbacks
    def test_results_refused_only_when_configured(self) -> Deferred[None]:
        """By default a fail is only recorded (250); with [deny] mfrom_fail it is 550
        5.7.23 with the domain's explanation, mfrom_softfail refuses a softfail, and
        mfrom_permerror a broken record (5.7.24)."""
        port = self.server()
        replies = yield self.send(port, "5.6.7.8", "client.example", "joe@fail.example")
        self.assertEqual(replies[2][:3], b"250")
        self.assertEqual(KEPT[0][2]["result"], "Fail")
        self.assertIn(b"spf=fail smtp.mailfrom=fail.example", KEPT[0][0])

        port = self.server("[deny]\nmfrom_fail=true\nmfrom_softfail=true\nmfrom_permerror=true\n")
        got = []
        for sender in ("joe@fail.example", "joe@soft.example", "joe@broken.example"):
            replies = yield deferToThread(
                exchange, port, "5.6.7.8", "EHLO client.example", f"MAIL FROM:<{sender}>"
            )
            got.append(replies[2].decode())
        self.assertEqual(
            got,
            [
                "550-5.7.23 sender <joe@fail.example> SPF Fail\r\n"
                "550 5.7.23 5.6.7.8 is not one of fail.example's senders\r\n",
                "550 5.7.23 sender <joe@soft.example> SPF SoftFail\r\n",
                "550 5.7.24 sender <joe@broken.example> SPF Permanent Error\r\n",
            ],
        )

    @inlineCallbacks
    def test_lookup_failures_defer_when_configured(self) -> Deferred[None]:
        """A SERVFAIL, and a nameserver silent past lookup_timeout, are temperror: 451
        4.7.24 with [defer] mfrom_temperror, else accepted and recorded as TempError."""
        port = self.server("[main]\nlookup_timeout=1\n[defer]\nmfrom_temperror=true\n")
        for sender in ("joe@servfail.example", "joe@slow.example"):
            started = time.monotonic()
            replies = yield deferToThread(
                exchange, port, "5.6.7.8", "EHLO client.example", f"MAIL FROM:<{sender}>"
            )
            self.assertEqual(
                replies[2], f"451 4.7.24 sender <{sender}> SPF Temporary Error\r\n".encode()
            )
            self.assertLess(time.monotonic() - started, 4)  # (the resolver would wait 5 s)
        port = self.server("[main]\nlookup_timeout=1\n")
        replies = yield self.send(port, "5.6.7.8", "client.example", "joe@slow.example")
        self.assertEqual(replies[-1][:3], b"250")
        self.assertEqual(KEPT[0][2]["result"], "TempError")
        self.assertIn(b"Received-SPF: temperror", KEPT[0][0])
        self.assertIn(b'problem="lookups took over 1 s"', KEPT[0][0])

    @inlineCallbacks
    def test_null_sender_judged_by_its_helo_name(self) -> Deferred[None]:
        """For MAIL FROM:<> the HELO name's result stands for the sender (RFC 7208 2.4):
        [deny] helo_fail refuses a bounce from a host its HELO domain does not designate,
        and lets one from a designated host through, with smtp.helo in
        Authentication-Results."""
        port = self.server("[deny]\nhelo_fail=true\n")
        refused = yield deferToThread(
            exchange, port, "5.6.7.8", "EHLO mail.example.com", "MAIL FROM:<>"
        )
        self.assertEqual(refused[2], b"550 5.7.23 sender <> via mail.example.com SPF Fail\r\n")
        replies = yield self.send(port, "1.2.3.4", "mail.example.com", "")
        self.assertEqual(replies[-1][:3], b"250")
        header = KEPT[0][0].decode()
        self.assertIn("spf=pass smtp.helo=mail.example.com", header)
        self.assertEqual(header.count("Received-SPF:"), 1)
        self.assertIn('envelope-from=""; helo=mail.example.com', header.replace("\r\n\t", " "))

    @inlineCallbacks
    def test_the_greeting_does_not_wait_for_the_helo_check(self) -> Deferred[None]:
        """The HELO name is checked in the background: EHLO is answered at once though
        its nameserver is silent, and MAIL FROM:<> waits for the check to end."""
        port = self.server("[main]\nlookup_timeout=2\n[defer]\nhelo_temperror=true\n")
        started = time.monotonic()
        replies = yield deferToThread(exchange, port, "5.6.7.8", "EHLO slowhelo.example")
        self.assertEqual(replies[1][:3], b"250")
        self.assertLess(time.monotonic() - started, 1.5)
        replies = yield deferToThread(
            exchange, port, "5.6.7.8", "EHLO slowhelo.example", "MAIL FROM:<>"
        )
        self.assertEqual(
            replies[2], b"451 4.7.24 sender <> via slowhelo.example SPF Temporary Error\r\n"
        )

    @inlineCallbacks
    def test_a_new_greeting_replaces_the_check(self) -> Deferred[None]:
        """A second EHLO with another name stops the first name's check (still waiting on
        a silent nameserver) and checks the new one; a greeting that is not checked (an
        address literal) leaves no result of the name before it in the message."""
        port = self.server("[main]\nlookup_timeout=6\n[deny]\nhelo_fail=true\n")
        started = time.monotonic()
        commands = ["EHLO slowhelo.example", "EHLO mail.example.com", "MAIL FROM:<>"]
        replies = yield deferToThread(exchange, port, "1.2.3.4", *commands)
        self.assertEqual(replies[3][:3], b"250")
        self.assertLess(time.monotonic() - started, 4)  # (not the 5 s the first check takes)
        commands = ["EHLO mail.example.com", "EHLO [1.2.3.4]", "MAIL FROM:<joe@example.com>"]
        commands += ["RCPT TO:<you@mx.test>", "DATA", MESSAGE]
        replies = yield deferToThread(exchange, port, "1.2.3.4", *commands)
        self.assertEqual(replies[-1][:3], b"250")
        header, _, _, conn_results = KEPT[0]
        self.assertEqual(header.count(b"Received-SPF:"), 1)
        self.assertIn(b"identity=mailfrom", header)
        self.assertEqual(conn_results["skip"], ["helo(ip_literal)"])

    @inlineCallbacks
    def test_clients_not_checked(self) -> Deferred[None]:
        """A client on a private address, and with [skip] relaying a relaying one, is
        not checked: no Received-SPF, the skip recorded; an address-literal greeting is
        not looked up."""
        port = self.server(
            "[skip]\nrelaying=true\n[deny]\nmfrom_fail=true\n",
            {"relay_acl_allow": "10.1.0.0/16\n"},
        )
        for ip, reason in (("192.168.1.9", "private_ip"), ("10.1.2.3", "relay")):
            replies = yield self.send(port, ip, "[192.0.2.1]", "joe@fail.example")
            self.assertEqual(replies[-1][:3], b"250")
            header, _, results, conn_results = KEPT[-1]
            self.assertNotIn(b"Received-SPF", header)
            self.assertEqual(results["skip"], [f"host({reason})"])
            self.assertEqual(conn_results["skip"], [f"helo({reason})"])
        replies = yield self.send(port, "1.2.3.9", "[1.2.3.9]", "joe@example.com")
        self.assertEqual(replies[-1][:3], b"250")
        header, _, results, conn_results = KEPT[-1]
        self.assertEqual(header.count(b"Received-SPF:"), 1)
        self.assertEqual(results["result"], "Pass")
        self.assertEqual(conn_results["skip"], ["helo(ip_literal)"])

    @inlineCallbacks
    def test_a_client_without_an_ip_is_not_checked(self) -> Deferred[None]:
        """A client of a unix socket listener has no address to check: neither its
        greeting nor its sender is looked up (no_ip), nothing fails, and its mail is
        accepted."""
        self.server("[deny]\nmfrom_fail=true\nhelo_fail=true\n")
        path = str(temp_dir(self) / "smtp.sock")
        listener = reactor.listenUNIX(path, self.haraka.factory)  # type: ignore[attr-defined]
        self.addCleanup(listener.stopListening)
        errors: list[str] = []

        def keep_errors(connection: Any, record: Any) -> bool:
            if record.level <= Level.ERROR:
                errors.append(record.message)
            return True

        self.haraka.log.hook = keep_errors
        commands = ["EHLO mail.example.com", "MAIL FROM:<joe@fail.example>"]
        commands += ["RCPT TO:<you@mx.test>", "DATA", MESSAGE]
        replies = yield deferToThread(unix_exchange, path, *commands)
        self.assertEqual([r[:3] for r in replies], [b"220", b"250", b"250", b"250", b"354", b"250"])
        header, outcome, results, conn_results = KEPT[0]
        self.assertNotIn(b"Received-SPF", header)
        self.assertIsNone(outcome)
        self.assertEqual(errors, [])
        self.assertEqual(results["skip"], ["host(no_ip)"])
        self.assertEqual(conn_results["skip"], ["helo(no_ip)"])

    @inlineCallbacks
    def test_relayed_mail_checked_as_sent_from_here(self) -> Deferred[None]:
        """With [relay] context=myself, a relaying client on a private address whose own
        address does not pass is checked as smtp.ini public_ip, which the field names."""
        port = self.server(
            "[relay]\ncontext=myself\n",
            {"relay_acl_allow": "10.1.0.0/16\n", "smtp.ini": "[main]\npublic_ip=1.2.3.77\n"},
        )
        replies = yield self.send(port, "10.1.2.3", "laptop.example", "joe@example.com")
        self.assertEqual(replies[-1][:3], b"250")
        header, outcome, _, _ = KEPT[0]
        self.assertEqual(outcome.result, "pass")
        self.assertIn(b"client-ip=1.2.3.77;", header)

    @inlineCallbacks
    def test_relayed_mail_checked_within_one_lookup_timeout(self) -> Deferred[None]:
        """With [relay] context=myself, the client's check and the second one as
        public_ip share one lookup_timeout: each takes 0.5 s (a ptr name whose address
        never comes) and would pass on its own within 0.8 s, but both together are
        temperror at 0.8 s, for the client's address."""
        port = self.server(
            "[main]\nlookup_timeout=0.8\n[relay]\ncontext=myself\n",
            {"relay_acl_allow": "10.1.0.0/16\n", "smtp.ini": "[main]\npublic_ip=1.2.3.77\n"},
            dns_timeout=0.5,
        )
        replies = yield self.send(port, "10.1.2.3", "laptop.example", "joe@relayed.example")
        self.assertEqual(replies[-1][:3], b"250")
        header, outcome, _, _ = KEPT[0]
        self.assertEqual(
            (outcome.result, outcome.problem), ("temperror", "lookups took over 0.8 s")
        )
        self.assertIn(b"client-ip=10.1.2.3;", header)

    @inlineCallbacks
    def test_headers_from_phish_spares_the_brands_own_hosts(self) -> None:
        """headers' from_phish refuses a From naming a brand from another address, unless
        the envelope sender is of the brand's domain and passed SPF."""
        port = self.server(
            files={
                "headers.ini": "[reject]\nfrom_phish=true\n[phish_targets]\nexample=example.com\n"
            },
            plugins="headers\n",
        )
        phish = "From: Example Support <help@other.test>\r\n" + MESSAGE
        commands = ["EHLO client.example", "MAIL FROM:<joe@example.com>", "RCPT TO:<you@mx.test>"]
        for ip, code in (("1.2.3.4", b"250"), ("5.6.7.8", b"550")):
            replies = yield deferToThread(exchange, port, ip, *commands, "DATA", phish)
            self.assertEqual(replies[-1][:3], code, replies[-1])
        # a bounce (<>) from a host its HELO name designates is no mail of the brand's
        commands = ["EHLO mail.example.com", "MAIL FROM:<>", "RCPT TO:<you@mx.test>"]
        replies = yield deferToThread(exchange, port, "1.2.3.4", *commands, "DATA", phish)
        self.assertEqual(replies[-1][:3], b"550", replies[-1])

    def test_bad_settings_stop_start_up(self) -> None:
        """A [relay] context other than sender or myself, or a public_ip that is not an
        address, stops start-up naming the file and key."""
        for files, words in (
            ({"spf.ini": "[relay]\ncontext=yours\n"}, "spf.ini [relay] context"),
            ({"smtp.ini": "[main]\npublic_ip=my.host\n"}, "smtp.ini [main] public_ip"),
            ({"spf.ini": "[main]\nlookup_timeout=soon\n"}, "lookup_timeout"),
        ):
            with self.assertRaises(StartupError) as raised:
                start_server(self, {"plugins": "spf\n", **files})
            self.assertIn(words, str(raised.exception))


class ReceivedSPFTests(SynchronousTestCase):
    def test_client_chosen_values_cannot_break_the_field(self) -> None:
        """A sender with quotes, parentheses and backslashes, a HELO name with a
        semicolon, and a problem text from a record stay inside their quoted strings and
        comment: the field still has exactly its six key=value pairs."""
        outcome = spf.Outcome(spf.PERMERROR, "example.com", problem='bad "term" (x);\\')
        value = received_spf(
            outcome,
            scope="mailfrom",
            ip="192.0.2.1",
            sender='a"b(c)\\d;e=f@example.com',
            helo="evil;identity=helo",
            receiver="mx.test",
        )
        comment_end = value.index(")")
        self.assertNotIn("(", value[1 : value.index("(")])
        self.assertEqual(value[:comment_end].count("("), 1)
        pairs = value[comment_end + 1 :].replace("\n\t", " ")
        self.assertEqual(
            pairs.strip(),
            'client-ip=192.0.2.1; envelope-from="a\\"b(c)\\\\d;e=f@example.com"; '
            'helo="evil;identity=helo"; receiver=mx.test; identity=mailfrom; '
            'problem="bad \\"term\\" (x);\\\\";',
        )
