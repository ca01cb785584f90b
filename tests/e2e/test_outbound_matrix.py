"""Outbound delivery end to end, in process: relaying clients, the durable queue, MX from a
real DNS server on loopback, and real SMTP/LMTP peers on loopback ports.

The peers, one per destination domain, share C{mx_port} on 127.0.0.2, 127.0.0.3, ...:
one accepts, one answers 4xx then accepts, one refuses some recipients with 5xx, one drops
the connection in the middle of DATA (once), one is slow; an LMTP server and an implicit
TLS server are reached through a get_mx plugin. DSNs go to the senders' domain, whose MX
is one more peer.
"""

from __future__ import annotations

import smtplib
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from haraka_tw.logging import Level
from haraka_tw.outbound.mx import MXHost
from haraka_tw.server import HarakaServer
from tests.dnsserver import serve
from tests.e2e import outbound_world
from tests.e2e.outbound_world import (
    WorldPeer,
    dsn_parts,
    message_id,
    queue_listing,
    start_peers,
    wait_until,
)
from tests.smtp_peers import PeerScript
from tests.support import WireClient, reply_code, start_server

SENDER = "alice@client.test"

ZONE = """
$ORIGIN test.
@          300 IN SOA ns.test. admin.test. 1 60 60 60 60
client     300 IN MX 10 mx.client
mx.client  300 IN A 127.0.0.2
accept     300 IN MX 10 mx.accept
mx.accept  300 IN A 127.0.0.3
flaky      300 IN MX 10 mx.flaky
mx.flaky   300 IN A 127.0.0.4
reject     300 IN MX 10 mx.reject
mx.reject  300 IN A 127.0.0.5
drop       300 IN MX 10 mx.drop
mx.drop    300 IN A 127.0.0.6
slow       300 IN MX 10 mx.slow
mx.slow    300 IN A 127.0.0.7
conc       300 IN MX 10 mx.conc
mx.conc    300 IN A 127.0.0.8
free       300 IN MX 10 mx.free
mx.free    300 IN A 127.0.0.9
"""


def message(mid: str, body: bytes = b"Hello.\r\n", subject: str = "test") -> bytes:
    return (
        f"From: <{SENDER}>\r\nSubject: {subject}\r\nMessage-Id: {mid}\r\n"
        "Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n".encode()
        + body
    )


class OutboundWorldCase(TestCase):
    """A relaying server whose outbound queue delivers into a loopback world."""

    def world(
        self, peers: dict[str, WorldPeer], *, intervals: str = "5s*2", extra: str = ""
    ) -> int:
        """Start the DNS server, the peers (address -> peer) and the server; its port."""
        outbound_world.ROUTES.clear()
        self.addCleanup(outbound_world.ROUTES.clear)
        dns = serve(self, ZONE, origin="test.")
        mx_port = start_peers(self, peers)
        self.outbound_ini = (
            "[main]\nqueue_dir={base}/queue\n"
            f"mx_port={mx_port}\nlocal_mx_ok=true\ntemp_fail_intervals={intervals}\n" + extra
        )
        server, port = start_server(
            self,
            {
                "plugins": "tests.e2e.outbound_world:Factory\n",
                "outbound.ini": self.outbound_ini,
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\n",
            },
        )
        self.server = server
        self.base: Path = server.base  # type: ignore[attr-defined]
        self.queue_dir = self.base / "queue"
        self.outbound = server.outbound
        self.outbound.start()
        self.addCleanup(lambda: self.outbound.stop())
        self.port = port
        return port

    def restart_outbound(self) -> Deferred[None]:
        """Stop the outbound side and start a new server's on the same config and queue."""
        d = self.outbound.stop()

        def again(_: Any) -> Deferred[None]:
            server = HarakaServer.from_directory(self.base / "config", reactor)
            server.log.hook = lambda c, r: r.level > Level.WARN  # as start_server's
            self.outbound = server.outbound
            return server.outbound.start()

        return d.addCallback(again)

    def send(
        self,
        rcpts: list[str],
        data: bytes,
        *,
        sender: str = SENDER,
        rcpt_options: tuple[str, ...] = (),
    ) -> Deferred[dict[str, Any]]:
        """smtplib in a thread: relay one message; its refused recipients (none: all 250)."""

        def run() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as s:
                return s.sendmail(sender, rcpts, data, rcpt_options=list(rcpt_options))

        return deferToThread(run)

    def queue_empty(self) -> bool:
        return not queue_listing(self.queue_dir)

    def settle(self, seconds: float = 1.0) -> Deferred[None]:
        """Let the reactor run a little more (for anything that should NOT happen)."""
        return deferLater(reactor, seconds, lambda: None)


def deliveries(peers: list[WorldPeer]) -> dict[tuple[str, str], int]:
    """(Message-Id, recipient) -> how many times a peer took the message for it."""
    counts: dict[tuple[str, str], int] = {}
    for peer in peers:
        bounced = {r for r, reply in peer.script.lmtp_replies.items() if reply[:1] != "2"}
        for m in peer.messages:
            for rcpt in m.rcpt_to:
                if peer.script.lmtp and rcpt in bounced:
                    continue
                key = (message_id(m.data), rcpt)
                counts[key] = counts.get(key, 0) + 1
    return counts


class DeliveryMatrixTests(OutboundWorldCase):
    @inlineCallbacks
    def test_every_accepted_message_delivered_once_or_bounced_across_a_restart(
        self,
    ) -> Deferred[None]:
        """Accept, 4xx-then-OK, 5xx, mid-DATA drop, slow, LMTP peers: once, or a correct DSN."""
        client = WorldPeer(PeerScript(name="mx.client"))
        accept = WorldPeer(PeerScript(name="mx.accept"))
        flaky = WorldPeer(
            PeerScript(name="mx.flaky", replies={"RCPT": ["451 4.2.1 busy", "250 2.1.5 ok"]})
        )
        reject = WorldPeer(
            PeerScript(name="mx.reject", rcpt={"nobody@reject.test": "550 5.1.1 no such user"})
        )
        drop = WorldPeer(PeerScript(name="mx.drop", drop_in_data=200), drop_once=True)
        slow = WorldPeer(PeerScript(name="mx.slow", delay=0.3))
        lmtp = WorldPeer(
            PeerScript(
                name="lmtp.local",
                lmtp=True,
                lmtp_replies={"y@lmtp.test": "550 5.2.1 mailbox disabled"},
            )
        )
        self.world(
            {
                "127.0.0.2": client,
                "127.0.0.3": accept,
                "127.0.0.4": flaky,
                "127.0.0.5": reject,
                "127.0.0.6": drop,
                "127.0.0.7": slow,
            }
        )
        lmtp_port = lmtp.start("127.0.0.1")
        self.addCleanup(lmtp.stop)
        outbound_world.ROUTES["lmtp.test"] = MXHost(
            "127.0.0.1", 0, port=lmtp_port, using_lmtp=True, from_dns=False
        )
        body = b"".join(b"line %d of a message long enough to be cut\r\n" % i for i in range(20))
        sent = {
            "<accept@t>": ["bob@accept.test"],
            "<flaky@t>": ["a@flaky.test", "b@flaky.test"],
            "<reject@t>": ["bob@reject.test", "nobody@reject.test"],
            "<drop@t>": ["bob@drop.test"],
            "<slow@t>": ["bob@slow.test"],
            "<lmtp@t>": ["x@lmtp.test", "y@lmtp.test"],
        }
        originals = {mid: message(mid, body) for mid in sent}
        for mid, rcpts in sent.items():
            refused = yield self.send(rcpts, originals[mid])
            self.assertEqual(refused, {}, mid)

        # First round: the 4xx recipient and the dropped message wait in the queue.
        def first_round_done() -> bool:
            entries = queue_listing(self.queue_dir)
            waiting = sorted(r.address for e in entries for r in e.todo.rcpt_to)
            return waiting == ["a@flaky.test", "bob@drop.test"] and all(
                e.attempts == 1 for e in entries
            )

        yield wait_until(first_round_done, 10, "the first attempts to settle")
        self.assertTrue(
            any("mid-message" in line for line in drop.transcript), "the peer never dropped"
        )
        yield self.restart_outbound()
        yield wait_until(self.queue_empty, 20, "the queue to drain after the restart")
        yield self.settle(1.0)

        peers = [accept, flaky, reject, drop, slow, lmtp]
        expected = {
            ("<accept@t>", "bob@accept.test"),
            ("<flaky@t>", "a@flaky.test"),
            ("<flaky@t>", "b@flaky.test"),
            ("<reject@t>", "bob@reject.test"),
            ("<drop@t>", "bob@drop.test"),
            ("<slow@t>", "bob@slow.test"),
            ("<lmtp@t>", "x@lmtp.test"),
        }
        counts = deliveries(peers)
        self.assertEqual(set(counts), expected)
        self.assertEqual({k: v for k, v in counts.items() if v != 1}, {}, "delivered twice")
        for peer in peers:
            for m in peer.messages:
                self.assertTrue(m.data.endswith(originals[message_id(m.data)]), message_id(m.data))

        # Exactly two DSNs, one per refused recipient, to the sender, from <>.
        self.assertEqual(len(client.messages), 2, [m.data[:300] for m in client.messages])
        by_original: dict[str, Any] = {}
        for m in client.messages:
            self.assertEqual((m.mail_from, m.rcpt_to), ("", [SENDER]))
            dsn = dsn_parts(m.data)
            original = dsn.original.get_payload()[0] if dsn.original.is_multipart() else None
            mid = str(original["Message-Id"]) if original is not None else ""
            by_original[mid] = dsn
        self.assertEqual(sorted(by_original), ["<lmtp@t>", "<reject@t>"])
        for mid, address, status, diagnostic, remote in [
            (
                "<reject@t>",
                "nobody@reject.test",
                "5.1.1",
                "550 5.1.1 no such user",
                "mx.reject.test",
            ),
            ("<lmtp@t>", "y@lmtp.test", "5.2.1", "550 5.2.1 mailbox disabled", "127.0.0.1"),
        ]:
            dsn = by_original[mid]
            self.assertEqual(dsn.report["From"], "MAILER-DAEMON@mx.test")
            self.assertEqual(dsn.report["To"], SENDER)
            self.assertEqual(dsn.per_message["Reporting-MTA"], "dns; mx.test")
            self.assertIsNotNone(dsn.per_message["Arrival-Date"])
            self.assertEqual(len(dsn.recipients), 1, mid)
            fields = dsn.recipient(address)
            self.assertEqual(fields["Action"], "failed")
            self.assertEqual(fields["Status"], status)
            self.assertEqual(fields["Diagnostic-Code"], f"smtp; {diagnostic}")
            self.assertEqual(fields["Remote-MTA"], f"dns; {remote}")
            self.assertIsNotNone(fields["Last-Attempt-Date"])

    @inlineCallbacks
    def test_implicit_tls_mx_from_get_mx(self) -> Deferred[None]:
        """A get_mx MX that only speaks TLS (implicit, SMTPS) gets the message over TLS."""
        tls = WorldPeer(PeerScript(name="mx.test", implicit_tls=True))
        self.world({"127.0.0.2": WorldPeer()})
        tls_port = tls.start("127.0.0.1")
        self.addCleanup(tls.stop)
        try:
            route = MXHost("127.0.0.1", 0, port=tls_port, from_dns=False, implicit_tls=True)  # type: ignore[call-arg]
        except TypeError as e:
            self.fail(f"a get_mx plugin cannot ask for implicit TLS to an MX: {e}")
        outbound_world.ROUTES["tls.test"] = route
        yield self.send(["bob@tls.test"], message("<tls@t>"))
        yield wait_until(lambda: tls.messages, 10, "delivery over implicit TLS")
        self.assertTrue(tls.messages[0].tls)
        self.assertEqual(tls.ids(), ["<tls@t>"])
        yield wait_until(self.queue_empty, 5, "the queue to drain")


class DotTests(OutboundWorldCase):
    @inlineCallbacks
    def test_dots_at_every_position_and_chunking_arrive_byte_exact(self) -> Deferred[None]:
        """Dot lines in every chunking and straddling the 64 KiB reads arrive byte-exact."""
        peer = WorldPeer(PeerScript(name="mx.accept"))
        self.world({"127.0.0.2": WorldPeer(), "127.0.0.3": peer})
        small = [
            b".\r\n",
            b"..\r\n",
            b".x\r\n",
            b"x.\r\n",
            b"...\r\n.\r\n..\r\n",
            b"a\r\n.\r\nb\r\n",
            b"\r\n.\r\n\r\n",
            b". \r\n .\r\n",
            b".\r\n" * 5,
            b"",
            b"end.\r\n.",
        ]
        bodies = [b if b.endswith(b"\r\n") or not b else b + b"\r\n" for b in small]
        # A 11-byte cycle of dot lines across the 64 KiB (and 128 KiB) read boundaries,
        # shifted one byte per message so that every phase meets the boundary.
        cycle = b".\r\n..\r\n.x\r\n"
        for shift in range(len(cycle)):
            filler = b"x" * 60 + b"\r\n"
            head = b"p" * shift + b"\r\n" + filler * ((65536 - 400) // len(filler))
            bodies.append(head + cycle * 60 + filler * 1050 + cycle * 60)
        expected: dict[str, bytes] = {}
        chunkings = [1, 2, 3, 5, 7, 11, 64, 4096, 65535, 65536, 65537]
        for i, body in enumerate(bodies):
            mid = f"<dots{i}@t>"
            data = message(mid, body)
            size = chunkings[i % len(chunkings)] if len(data) < 4096 else chunkings[7 + i % 4]
            expected[mid] = data
            yield deferToThread(self.send_chunked, data, size)
        yield wait_until(lambda: len(peer.messages) >= len(expected), 20, "every message")
        got = {message_id(m.data): m.data for m in peer.messages}
        self.assertEqual(sorted(got), sorted(expected))
        for mid, data in expected.items():
            self.assertTrue(got[mid].endswith(data), f"{mid} changed on the way")
            head = got[mid][: -len(data)]
            self.assertTrue(head.startswith(b"Received: "), head[:100])

    def send_chunked(self, data: bytes, size: int) -> None:
        """Relay C{data} over a raw socket, the dot-stuffed DATA written C{size} bytes at a time."""
        stuffed = b"\r\n".join(
            b"." + line if line.startswith(b".") else line for line in data.split(b"\r\n")
        )
        wire = stuffed + (b"" if stuffed.endswith(b"\r\n") or not stuffed else b"\r\n") + b".\r\n"
        with WireClient(self.port) as c:
            assert reply_code(c.command("EHLO client.test")) == 250
            assert reply_code(c.command(f"MAIL FROM:<{SENDER}>")) == 250
            assert reply_code(c.command("RCPT TO:<bob@accept.test>")) == 250
            assert reply_code(c.command("DATA")) == 354
            for start in range(0, len(wire), size):
                c.send(wire[start : start + size])
            reply = c.reply()
            assert reply_code(reply) == 250, reply
            c.command("QUIT")


class NotifyTests(OutboundWorldCase):
    @inlineCallbacks
    def test_notify_delay_never_and_bounce_of_a_bounce(self) -> Deferred[None]:
        """NOTIFY=DELAY: one delayed DSN over two deferrals; NEVER and a null sender: no DSN."""
        client = WorldPeer(PeerScript(name="mx.client"))
        full = WorldPeer(
            PeerScript(
                name="mx.flaky", rcpt={"full@flaky.test": "452 4.2.2 mailbox full"}, dsn=True
            )
        )
        reject = WorldPeer(
            PeerScript(name="mx.reject", rcpt={"nobody@reject.test": "550 5.1.1 no such user"})
        )
        self.world({"127.0.0.2": client, "127.0.0.4": full, "127.0.0.5": reject})
        yield self.send(["full@flaky.test"], message("<delay@t>"), rcpt_options=("NOTIFY=DELAY",))
        yield self.send(["full@flaky.test"], message("<giveup@t>"))
        yield self.send(
            ["nobody@reject.test"], message("<never@t>"), rcpt_options=("NOTIFY=NEVER",)
        )
        yield self.send(["nobody@reject.test"], message("<bounce@t>"), sender="")

        def deferred_twice() -> bool:
            entries = queue_listing(self.queue_dir)
            return len(entries) == 2 and all(e.attempts == 2 for e in entries)

        yield wait_until(deferred_twice, 10, "two deferrals of both 4xx messages")
        yield self.settle(0.5)
        self.assertEqual(len(client.messages), 1, [m.data[:400] for m in client.messages])
        # 5s*2: the third failure gives up; only the message without NOTIFY gets a failure DSN.
        yield wait_until(self.queue_empty, 10, "the 4xx messages to give up")
        yield self.settle(1.0)
        refused = [line for line in reject.transcript if line.startswith("S: 550")]
        self.assertEqual(len(refused), 2, reject.transcript)
        self.assertEqual(len(full.messages), 0)
        self.assertEqual(len(client.messages), 2, [m.data[:400] for m in client.messages])
        for m in client.messages:
            self.assertEqual((m.mail_from, m.rcpt_to), ("", [SENDER]))
        delayed, failed = (dsn_parts(m.data) for m in client.messages)

        fields = delayed.recipient("full@flaky.test")
        self.assertEqual(fields["Action"], "delayed")
        self.assertEqual(fields["Status"], "4.2.2")
        self.assertEqual(fields["Diagnostic-Code"], "smtp; 452 4.2.2 mailbox full")
        self.assertEqual(delayed.per_message["Reporting-MTA"], "dns; mx.test")
        self.assertEqual(delayed.original.get_content_type(), "text/rfc822-headers")
        self.assertIn("Message-Id: <delay@t>", delayed.original.get_payload())

        fields = failed.recipient("full@flaky.test")
        self.assertEqual(fields["Action"], "failed")
        self.assertEqual(fields["Status"], "5.2.2")
        self.assertEqual(fields["Diagnostic-Code"], "smtp; 452 4.2.2 mailbox full")
        self.assertEqual(failed.per_message["Reporting-MTA"], "dns; mx.test")
        self.assertEqual(failed.original.get_content_type(), "message/rfc822")
        self.assertEqual(failed.original.get_payload()[0]["Message-Id"], "<giveup@t>")

        # The NOTIFY parameter went on to a server that offers DSN.
        rcpt_lines = [line for line in full.transcript if line.startswith("C: RCPT")]
        self.assertEqual(sum("NOTIFY=DELAY" in line for line in rcpt_lines), 3)
        # RFC 3464 2.3.9: a "delayed" DSN says until when the MTA will keep trying.
        fields = delayed.recipient("full@flaky.test")
        self.assertIsNotNone(fields["Will-Retry-Until"], "no Will-Retry-Until in a delayed DSN")
        retry_until = parsedate_to_datetime(fields["Will-Retry-Until"])
        self.assertGreater(retry_until, parsedate_to_datetime(fields["Last-Attempt-Date"]))


class ConcurrencyTests(OutboundWorldCase):
    @inlineCallbacks
    def test_domain_concurrency_one_never_overlaps(self) -> Deferred[None]:
        """[domain.conc.test] concurrency=1: never two connections at once (unlimited: overlap)."""
        slow = PeerScript(name="mx.conc", delays={"DOT": 0.4})
        limited = WorldPeer(slow)
        free = WorldPeer(PeerScript(name="mx.free", delays={"DOT": 0.4}))
        self.world(
            {"127.0.0.2": WorldPeer(), "127.0.0.8": limited, "127.0.0.9": free},
            extra="[domain.conc.test]\nconcurrency=1\n",
        )
        for i in range(5):
            yield self.send([f"u{i}@conc.test"], message(f"<conc{i}@t>"))
            yield self.send([f"u{i}@free.test"], message(f"<free{i}@t>"))
        yield wait_until(
            lambda: len(limited.messages) == 5 and len(free.messages) == 5, 15, "all ten"
        )
        yield wait_until(self.queue_empty, 5, "the queue to drain")
        self.assertEqual(limited.most_open, 1)
        self.assertGreater(free.most_open, 1, "the unlimited domain never overlapped")
        self.assertEqual(sorted(limited.ids()), [f"<conc{i}@t>" for i in range(5)])
