"""relay over sockets: relaying by address (clients given by a PROXY header from
loopback), recipients taken for listed domains, and outbound mail routed to a next hop (a
real loopback SMTP peer)."""

from __future__ import annotations

import smtplib
import socket
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.codes import DENY
from haraka_tw.interfaces import IConnectHook
from haraka_tw.plugins.relay import parse_acl
from haraka_tw.server import StartupError
from tests.plugins.loading import load
from tests.plugins.test_dns_list import exchange, until
from tests.smtp_peers import Peer, PeerScript
from tests.support import start_server

ACL = "# the office\n10.1.0.0/16 # inline comment\n2001:db8::1\n\nnot-an-address\n"
DOMAINS = """[domains]
Example.COM = { "action": "accept", "nexthop": "127.0.0.1:{peer}" }
cont.example = { "action": "continue" }
no.example = { "action": "deny" }
any = { "nexthop": "127.0.0.1:{peer}" }
"""


@implementer(IConnectHook)
class RefuseAll:
    """Test plugin: refuses every client at connect (reached only if relay lets it)."""

    def hook_connect(self, connection: Any) -> Any:
        return DENY, "go away"


class RelayTests(TestCase):
    def server(self, relay_ini: str = "", plugins: str = "relay\n", peer: int = 0) -> int:
        _, port = start_server(
            self,
            {
                "plugins": plugins,
                "relay.ini": relay_ini,
                "relay_acl_allow": ACL,
                "relay_dest_domains.ini": DOMAINS.replace("{peer}", str(peer or 9)),
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
            },
        )
        return port

    @inlineCallbacks
    def rcpts(self, port: int, ip: str, *recipients: str) -> Deferred[list[bytes]]:
        """The reply codes to RCPT TO each of C{recipients}, from client C{ip}."""
        commands = ["EHLO client.example", "MAIL FROM:<a@client.example>"]
        commands += [f"RCPT TO:<{r}>" for r in recipients]
        got = yield deferToThread(exchange, port, ip, *commands)
        return [reply.split(b"\r\n")[0] for reply in got[3:]]

    @inlineCallbacks
    def test_acl_clients_may_relay(self) -> Deferred[None]:
        """A client in a listed network, or the one listed IPv6 address, may relay; its
        neighbour (Haraka would take the IPv6 entry as a /32) and others may not."""
        port = self.server()
        for ip, code in [
            ("10.1.2.3", b"250"),
            ("10.2.0.1", b"550"),
            ("2001:db8::1", b"250"),
            ("2001:db8::2", b"550"),
            ("1.2.3.4", b"550"),
        ]:
            (reply,) = yield self.rcpts(port, ip, "x@gmail.example")
            self.assertEqual(reply[:3], code, ip)

    @inlineCallbacks
    def test_acl_client_skips_later_connect_plugins(self) -> Deferred[None]:
        """relay answers OK at connect for an ACL client, so a later connect plugin that
        refuses everyone does not run for it."""
        port = self.server(plugins="relay\ntests.plugins.test_relay:RefuseAll\n")
        (banner,) = yield deferToThread(exchange, port, "10.1.2.3")
        self.assertEqual(banner[:4], b"220 ")
        (banner,) = yield deferToThread(exchange, port, "1.2.3.4")
        self.assertEqual(banner, b"554 go away\r\n")

    @inlineCallbacks
    def test_dest_domains(self) -> Deferred[None]:
        """accept and continue take the recipient (domain keys in any case); deny and
        unlisted domains get 550 5.7.1, also after a taken recipient (Haraka then takes
        every later one)."""
        port = self.server("[relay]\ndest_domains=true\n")
        got = yield self.rcpts(
            port, "1.2.3.4", "a@example.com", "b@gmail.example", "c@no.example", "d@cont.example"
        )
        self.assertEqual(
            got,
            [
                b"250 2.1.5 recipient <a@example.com> OK",
                b"550 5.7.1 You are not allowed to relay",
                b"550 5.7.1 You are not allowed to relay",
                b"250 2.1.5 recipient <d@cont.example> OK",
            ],
        )

    @inlineCallbacks
    def test_all_relays_everything(self) -> Deferred[None]:
        """all=true accepts any recipient from anyone."""
        port = self.server("[relay]\nall=true\n")
        got = yield self.rcpts(port, "1.2.3.4", "x@gmail.example")
        self.assertEqual(got[0][:3], b"250")

    @inlineCallbacks
    def test_a_listed_recipient_does_not_open_the_transaction(self) -> Deferred[None]:
        """After a recipient of a relayed domain, one elsewhere is still refused: with
        in_host_list and a forged local sender, and with delay_deny (both accepted it in
        Haraka, whose plugin makes the client a relaying one)."""
        for plugins in (
            "rcpt_to.in_host_list\nrelay\n",
            "relay\nrcpt_to.in_host_list\n",
            "delay_deny\nrelay\nrcpt_to.in_host_list\n",
        ):
            _, port = start_server(
                self,
                {
                    "plugins": plugins,
                    "host_list": "local.example\n",
                    "relay.ini": "[relay]\ndest_domains=true\n",
                    "relay_dest_domains.ini": DOMAINS.replace("{peer}", "9"),
                    "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                },
            )
            commands = ["EHLO client.example", "MAIL FROM:<x@local.example>"]
            commands += ["RCPT TO:<a@cont.example>", "RCPT TO:<v@gmail.example>"]
            commands += ["RCPT TO:<l@local.example>"]
            got = yield deferToThread(exchange, port, "1.2.3.4", *commands)
            self.assertEqual([reply[:3] for reply in got[3:]], [b"250", b"550", b"250"], plugins)

    @inlineCallbacks
    def test_force_routing_sends_outbound_mail_to_the_next_hop(self) -> Deferred[None]:
        """Mail for a listed domain goes to its nexthop, for another to "any"'s (DNS
        answers nothing here): from an ACL client, and from one whose recipient
        dest_domains took (relayed from DATA on)."""
        peers = [Peer(PeerScript()), Peer(PeerScript())]
        ports = [peer.start() for peer in peers]
        for peer in peers:
            self.addCleanup(peer.stop)
        domains = DOMAINS.replace("{peer}", str(ports[0]), 1).replace("{peer}", str(ports[1]))
        _, port = start_server(
            self,
            {
                "plugins": "relay\n",
                "relay.ini": "[relay]\ndest_domains=true\n",
                "relay_acl_allow": ACL,
                "relay_dest_domains.ini": domains,
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "outbound.ini": "[main]\nqueue_dir={base}/queue\n",
            },
        )

        def send(client_ip: str, recipients: list[str]) -> Any:
            with smtplib.SMTP(timeout=10) as client:  # connected by hand: PROXY first
                client.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                header = f"PROXY TCP4 {client_ip} 127.0.0.1 40000 25\r\n"
                client.sock.sendall(header.encode())
                client.getreply()
                return client.sendmail(
                    "a@client.example", recipients, b"Subject: routed\r\n\r\nbody\r\n"
                )

        refused = yield deferToThread(
            send, "10.1.2.3", ["bob@example.com", "carol@elsewhere.example"]
        )
        self.assertEqual(refused, {})
        refused = yield deferToThread(send, "1.2.3.4", ["dan@EXAMPLE.com"])
        self.assertEqual(refused, {})
        yield until(lambda: sum(len(peer.messages) for peer in peers) == 3)
        got = [sorted(r.lower() for m in peer.messages for r in m.rcpt_to) for peer in peers]
        self.assertEqual(got, [["bob@example.com", "dan@example.com"], ["carol@elsewhere.example"]])

    def test_bad_routes_stop_the_start(self) -> None:
        """Bad JSON, an unknown action or a bad nexthop stops start-up, naming the file
        and the domain."""
        for line, words in [
            ("a.example = {nope", "not JSON"),
            ('a.example = { "action": "maybe" }', "action"),
            ('a.example = { "nexthop": "ftp://x" }', "nexthop"),
            ('a.example = { "nexthop": "host:99999" }', "nexthop"),
        ]:
            with self.assertRaises(StartupError) as caught:
                start_server(
                    self,
                    {"plugins": "relay\n", "relay_dest_domains.ini": f"[domains]\n{line}\n"},
                )
            self.assertIn("relay_dest_domains.ini [domains] a.example", str(caught.exception))
            self.assertIn(words, str(caught.exception))


class ACLTests(SynchronousTestCase):
    def test_parse_acl(self) -> None:
        """Networks and single addresses; comments skipped; a bad line, a network with
        host bits set (a typo widens it) and one of every address are named with their
        number, never a match."""
        lines = [*ACL.splitlines(), "192.168.1.10/2", "0.0.0.0/0"]
        networks, problems = parse_acl(lines, "relay_acl_allow")
        self.assertEqual([str(n) for n in networks], ["10.1.0.0/16", "2001:db8::1/128"])
        self.assertEqual(
            problems,
            [
                "relay_acl_allow:5: 'not-an-address' is not an address or network; ignored",
                "relay_acl_allow:6: '192.168.1.10/2' has host bits set (a typo?); ignored,"
                " write 192.0.0.0/2 if that is meant",
                "relay_acl_allow:7: '0.0.0.0/0' is every address; ignored (see all=)",
            ],
        )

    def test_a_bad_route_on_reload_holds_back_nothing_else(self) -> None:
        """A broken relay_dest_domains.ini keeps the previous routes, and a change to
        relay_acl_allow made meanwhile still takes effect."""
        loaded = load(
            self,
            ["relay"],
            {
                "relay_acl_allow": "10.1.0.0/16\n",
                "relay_dest_domains.ini": DOMAINS.replace("{peer}", "9"),
            },
        )
        plugin = loaded.plugin("relay")
        loaded.write("relay_dest_domains.ini", "[domains]\nx.example = {broken\n")
        loaded.write("relay_acl_allow", "10.9.0.0/16\n")
        self.assertEqual([str(n) for n in plugin.acl], ["10.9.0.0/16"])
        self.assertIn("example.com", plugin.domains)
