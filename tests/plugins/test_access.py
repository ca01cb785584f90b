"""access over sockets: clients (addresses from a PROXY header, reverse names from a real
DNS server on loopback) and their HELO names, senders, recipients and From fields checked
against allow and deny lists."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.dnsserver import serve
from tests.haproxy import SourcedClient
from tests.plugins.loading import load
from tests.plugins.test_dns_list import exchange
from tests.support import start_server

ZONE = """
.                       300 IN SOA ns.test. admin.test. 1 60 60 60 60
4.9.9.9.in-addr.arpa.   300 IN PTR mail.spammer.example.
5.5.9.10.in-addr.arpa.  300 IN PTR mx.friend.example.
6.9.9.9.in-addr.arpa.   300 IN PTR host.evil.example.
"""
LISTS = {
    "connect.rdns_access.blacklist": (
        "# bad hosts\n10.9.0.0/16\nmail.spammer.example  # by name\n9.9.9.9\n"
    ),
    "connect.rdns_access.whitelist": "1.2.3.7\nmx.friend.example\n",
    "connect.rdns_access.blacklist_regex": ".*\\.dyn\\.example\n1\\.2\\.3\\.\\d+\n",
    "mail_from.access.blacklist": "spam@sender.example\n",
    "mail_from.access.blacklist_regex": ".*@bulk\\.example\n",
    "mail_from.access.whitelist_regex": "boss@bulk\\.example\n",
    "rcpt_to.access.blacklist": "nobody@example.com\n",
    "rcpt_to.access.whitelist": "postmaster@example.com\n",
    "helo.checks.regexps": ".*\\.bad\\.example\n",
    "access.domains": "evil.example\n!good.evil.example\n!friend@other.evil.example\n",
}
ENVELOPE = ["EHLO client.example", "MAIL FROM:<a@client.example>"]


def banner_and_eof(port: int, ip: str) -> tuple[bytes, bool]:
    """Connect as C{ip}: the banner, and whether the server then closed the connection."""
    family, server = ("TCP6", "::1") if ":" in ip else ("TCP4", "127.0.0.1")
    preamble = f"PROXY {family} {ip} {server} 40000 25\r\n".encode()
    with SourcedClient(port, preamble=preamble, timeout=20) as client:
        return client.banner, client.at_eof()


class AccessTests(TestCase):
    def server(self, ini: str = "", **files: str) -> int:
        dns = serve(self, ZONE)
        _, port = start_server(
            self,
            {
                "plugins": "access\nrcpt_to.in_host_list\nqueue/discard\n",
                "access.ini": ini,
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=1\nattempts=1\n",
                **LISTS,
                **files,
            },
        )
        return port

    @inlineCallbacks
    def talk(self, port: int, ip: str, *commands: str) -> Deferred[list[bytes]]:
        got = yield deferToThread(exchange, port, ip, *commands)
        return [reply.split(b"\r\n")[0] for reply in got]

    @inlineCallbacks
    def test_clients(self) -> Deferred[None]:
        """By network, address (IPv4-mapped too), reverse name and pattern a client is
        refused and disconnected; the whitelist beats the blacklist pattern that also
        matches an address, but a whitelisted reverse name does not lift a blacklisted
        address (whoever owns the address writes its PTR)."""
        port = self.server()
        refused = b"You are not allowed to connect"
        for ip, banner in [
            ("10.9.1.2", b"554 unknown [10.9.1.2] " + refused),
            ("::ffff:9.9.9.9", b"554 unknown [::ffff:909:909] " + refused),
            ("9.9.9.4", b"554 mail.spammer.example [9.9.9.4] " + refused),
            ("1.2.3.8", b"554 unknown [1.2.3.8] " + refused),
            ("::ffff:1.2.3.8", b"554 unknown [::ffff:102:308] " + refused),  # by the pattern
            ("10.9.5.5", b"554 mx.friend.example [10.9.5.5] " + refused),
        ]:
            closed = yield deferToThread(banner_and_eof, port, ip)
            self.assertEqual(closed, (banner + b"\r\n", True), ip)
        for ip in ("1.2.3.7", "8.8.4.4"):
            (got,) = yield self.talk(port, ip)
            self.assertEqual(got[:4], b"220 ", ip)

    @inlineCallbacks
    def test_senders_recipients_and_helo(self) -> Deferred[None]:
        """A listed sender (exact or by pattern) and recipient get 550; a whitelisted
        sender beats the pattern; HELO patterns are checked only with check.helo."""
        port = self.server()
        (_, ehlo) = yield self.talk(port, "8.8.4.4", "EHLO x.bad.example")
        self.assertEqual(ehlo[:4], b"250-")
        port = self.server("[check]\nhelo=true\n")
        got = yield self.talk(
            port,
            "8.8.4.4",
            "EHLO x.bad.example",
            "EHLO client.example",
            "MAIL FROM:<SPAM@sender.example>",
            "MAIL FROM:<bulk@bulk.example>",
            "MAIL FROM:<boss@bulk.example>",
            "RCPT TO:<nobody@example.com>",
            "RCPT TO:<b@example.com>",
        )
        self.assertEqual(
            got[1:],
            [
                b"550 5.7.1 x.bad.example That HELO is not allowed to connect",
                b"250-mx.test Hello [8.8.4.4], Haraka_tw is at your service.",
                b"550 5.7.1 SPAM@sender.example That sender cannot send mail here",
                b"550 5.7.1 bulk@bulk.example That sender cannot send mail here",
                b"250 2.1.0 sender <boss@bulk.example> OK",
                b"550 5.7.1 nobody@example.com That recipient is not allowed",
                b"250 2.1.5 recipient <b@example.com> OK",
            ],
        )

    @inlineCallbacks
    def test_rcpt_accept(self) -> Deferred[None]:
        """With [rcpt] accept, a whitelisted recipient is accepted though no other plugin
        would (its domain is not in host_list); without it, the core refuses it."""
        port = self.server(
            "[rcpt]\naccept=true\n", **{"rcpt_to.access.whitelist": "ceo@elsewhere.example\n"}
        )
        got = yield self.talk(port, "8.8.4.4", *ENVELOPE, "RCPT TO:<ceo@elsewhere.example>")
        self.assertEqual(got[-1][:3], b"250")
        port = self.server(**{"rcpt_to.access.whitelist": "ceo@elsewhere.example\n"})
        got = yield self.talk(port, "8.8.4.4", *ENVELOPE, "RCPT TO:<ceo@elsewhere.example>")
        self.assertEqual(got[-1][:3], b"550")

    @inlineCallbacks
    def test_access_domains(self) -> Deferred[None]:
        """A listed domain is refused by reverse name, HELO, sender, recipient and From
        field, subdomains included; its exceptions (a host, an address) are let by, at the
        end of DATA too (Haraka refuses friend@ there)."""
        port = self.server()
        (banner, *rest) = yield self.talk(port, "9.9.9.6", "EHLO client.example")
        self.assertEqual(banner, b"554 You are not welcome here.")
        self.assertEqual(rest, [b"554 You are not welcome here."])
        got = yield self.talk(
            port,
            "8.8.4.4",
            "EHLO mx.evil.example",
            "EHLO client.example",
            "MAIL FROM:<x@sub.evil.example>",
            "MAIL FROM:<x@good.evil.example>",
            "RCPT TO:<y@evil.example>",
            "RSET",
            "MAIL FROM:<friend@other.evil.example>",
            "RCPT TO:<b@example.com>",
            "DATA",
        )
        self.assertEqual(
            [reply[:3] for reply in got[1:]],
            [b"550", b"250", b"550", b"250", b"550", b"250", b"250", b"250", b"354"],
        )
        for sender, code in [("friend@other.evil.example", 250), ("x@evil.example", 550)]:
            body = f"From: <{sender}>\r\nSubject: s\r\n\r\nbody\r\n.\r\nQUIT"
            got = yield self.talk(
                port,
                "8.8.4.4",
                "EHLO client.example",
                "MAIL FROM:<a@client.example>",
                "RCPT TO:<b@example.com>",
                "DATA",
                body,
            )
            self.assertEqual(got[-1][:3], str(code).encode(), sender)


class ListTests(SynchronousTestCase):
    def test_bad_lines_and_reload(self) -> None:
        """A pattern that does not compile and a bad network are ERRORs naming the file
        and line; a line removed from access.domains stops matching when it is re-read."""
        loaded = load(
            self,
            ["access"],
            {
                "mail_from.access.blacklist_regex": "ok@x\\.example\n(broken\n",
                "connect.rdns_access.blacklist": "10.0.0.1/8\n",
                "access.domains": "evil.example\n",
            },
        )
        errors = loaded.log.messages()
        for where in (
            "mail_from.access.blacklist_regex:2: '(broken'",
            "connect.rdns_access.blacklist:1: '10.0.0.1/8'",
        ):
            self.assertTrue(any(where in e for e in errors), errors)
        plugin: Any = loaded.plugin("access")
        (good,) = plugin.black["mail"][1].patterns  # the good line is kept
        self.assertEqual(good.pattern, "ok@x\\.example")
        self.assertEqual(plugin.domains_black, {"evil.example"})
        loaded.write("access.domains", "other.example\n")
        self.assertEqual(plugin.domains_black, {"other.example"})
