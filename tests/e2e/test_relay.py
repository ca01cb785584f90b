"""Relayed mail end to end: a relaying client, the outbound queue, MX from a loopback DNS
server, delivery to a loopback peer; 4xx retried, 5xx bounced with a DSN."""

from __future__ import annotations

import email
import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from haraka_tw.codes import CONT
from haraka_tw.interfaces import IConnectHook
from tests.dnsserver import serve
from tests.smtp_peers import Peer, PeerScript
from tests.support import start_server

ZONE = """
$ORIGIN test.
@        300 IN SOA ns.test. admin.test. 1 60 60 60 60
dest     300 IN MX 10 mx.dest
mx.dest  300 IN A 127.0.0.1
client   300 IN MX 10 mx.client
mx.client 300 IN A 127.0.0.1
mx       300 IN A 127.0.0.1
"""


@implementer(IConnectHook)
class RelayForAll:
    """Test plugin: every client may relay (the relay ACL plugin's job in production)."""

    def hook_connect(self, connection: Any) -> Any:
        connection.relaying = True
        return CONT


def Factory() -> RelayForAll:
    return RelayForAll()


class RelayTests(TestCase):
    def relay_server(self, peer: Peer, **outbound: str) -> int:
        dns = serve(self, ZONE, origin="test.")
        port = peer.start()
        self.addCleanup(peer.stop)
        ini = "\n".join(
            [
                "[main]",
                "queue_dir={base}/queue",
                f"mx_port={port}",
                "local_mx_ok=true",
                "temp_fail_intervals=5s*3",
            ]
            + [f"{k}={v}" for k, v in outbound.items()]
        )
        server, smtp_port = start_server(
            self,
            {
                "plugins": "tests.e2e.test_relay:Factory\n",
                "outbound.ini": ini + "\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\n",
            },
        )
        self.server = server
        return smtp_port

    def logged(self) -> list[str]:
        """The server's log lines from now on (kept quiet)."""
        lines: list[str] = []
        self.server.log.hook = lambda connection, record: lines.append(record.message) or True
        return lines

    def send(
        self, port: int, rcpts: list[str], body: bytes = b"Subject: hi\r\n\r\nbody\r\n"
    ) -> Any:
        def run() -> Any:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                return s.sendmail("alice@client.test", rcpts, body)

        return deferToThread(run)

    @inlineCallbacks
    def wait_for(self, condition: Any, timeout: float = 10.0) -> Deferred[None]:
        for _ in range(int(timeout / 0.05)):
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("condition never became true")

    @inlineCallbacks
    def test_relayed_message_delivered_byte_exact(self) -> Deferred[None]:
        """A relayed message reaches the MX byte-exact (dots at line starts intact)."""
        peer = Peer(PeerScript())
        port = self.relay_server(peer)
        body = b"Subject: dots\r\n\r\n.\r\n..two\r\nend.\r\n.x\r\n"
        refused = yield self.send(port, ["bob@dest.test"], body)
        self.assertEqual(refused, {})
        yield self.wait_for(lambda: len(peer.messages) == 1)
        msg = peer.messages[0]
        self.assertEqual(msg.rcpt_to, ["bob@dest.test"])
        head, _, stored_body = msg.data.partition(b"\r\n\r\n")
        self.assertEqual(stored_body, body.partition(b"\r\n\r\n")[2])
        self.assertIn(b"\r\nSubject: dots\r\n", head + b"\r\n")
        self.assertIn(b"Message-Id: ", head)
        self.assertIn(b"Received: from ", head)
        yield self.wait_for(lambda: not list((self.server.base / "queue").glob("1*")))  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_temporary_failure_retried_then_delivered(self) -> Deferred[None]:
        """A 4xx at RCPT is retried on the schedule and delivered on the next attempt."""
        peer = Peer(PeerScript(rcpt={"bob@dest.test": "450 4.2.0 try later"}))
        port = self.relay_server(peer)
        logged = self.logged()
        yield self.send(port, ["bob@dest.test"])
        yield self.wait_for(lambda: any("450 4.2.0" in line for line in peer.transcript))
        # (each recipient a server refuses or defers has a line of its own)
        yield self.wait_for(
            lambda: any(
                line.endswith("] deferred bob@dest.test: 450 4.2.0 try later") for line in logged
            )
        )
        peer.script.rcpt.clear()
        yield self.wait_for(lambda: len(peer.messages) == 1, timeout=15)

    @inlineCallbacks
    def test_recipients_refused_before_a_failed_data_are_logged(self) -> Deferred[None]:
        """The server refuses one recipient at RCPT, then drops the connection in DATA:
        the refused recipient has its own line, as well as the failure itself."""
        peer = Peer(PeerScript(rcpt={"x@dest.test": "550 5.1.1 no such user"}, drop_in_data=5000))
        port = self.relay_server(peer)
        logged = self.logged()
        body = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 200
        yield self.send(port, ["bob@dest.test", "x@dest.test"], body)
        yield self.wait_for(lambda: any(" failed in " in line for line in logged))
        refused = "] refused x@dest.test: 550 5.1.1 no such user"
        self.assertTrue(any(line.endswith(refused) for line in logged), logged)

    @inlineCallbacks
    def test_permanent_failure_bounces_to_sender(self) -> Deferred[None]:
        """A 5xx for one recipient: the other is delivered, a DSN goes to the sender."""
        peer = Peer(PeerScript(rcpt={"nobody@dest.test": "550 5.1.1 no such user"}))
        port = self.relay_server(peer)
        logged = self.logged()
        yield self.send(port, ["bob@dest.test", "nobody@dest.test"])
        yield self.wait_for(lambda: len(peer.messages) == 2, timeout=15)
        refused = "] refused nobody@dest.test: 550 5.1.1 no such user"
        self.assertTrue(any(line.endswith(refused) for line in logged), logged)
        why = "sending a failed report to <alice@client.test>: <nobody@dest.test> 5.1.1"
        self.assertTrue(any(why in line and "no such user" in line for line in logged), logged)
        delivered = [m for m in peer.messages if m.rcpt_to == ["bob@dest.test"]]
        dsns = [m for m in peer.messages if m.rcpt_to == ["alice@client.test"]]
        self.assertEqual(len(delivered), 1)
        self.assertEqual(len(dsns), 1)
        self.assertEqual(dsns[0].mail_from, "")
        report = email.message_from_bytes(dsns[0].data)
        self.assertEqual(report.get_content_type(), "multipart/report")
        status = report.get_payload()[1].as_string()
        self.assertIn("Final-Recipient: rfc822; nobody@dest.test", status)
        self.assertIn("Status: 5.1.1", status)
        self.assertIn("Action: failed", status)

    @inlineCallbacks
    def test_a_recipient_without_a_domain_is_this_hosts(self) -> Deferred[None]:
        """A relayed RCPT TO:<postmaster> (no domain) is queued as postmaster@<me> and
        delivered there, not written as a queue file nothing could be sent for."""
        peer = Peer(PeerScript())
        port = self.relay_server(peer)
        refused = yield self.send(port, ["postmaster"])
        self.assertEqual(refused, {})
        yield self.wait_for(lambda: len(peer.messages) == 1)
        self.assertEqual(peer.messages[0].rcpt_to, ["postmaster@mx.test"])
        queue = self.server.base / "queue"  # type: ignore[attr-defined]
        yield self.wait_for(lambda: not list(queue.glob("1*")))
        self.assertEqual(list(queue.glob("error.*")), [])
