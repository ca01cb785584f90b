"""The outbound client against scriptable peers and a real haraka_tw server, on loopback.

Each test starts a L{Peer} that behaves one way (tests/smtp_peers.py), delivers to it and
checks the report or the error and what the peer saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial import unittest

from haraka_tw.outbound.client import (
    DeliveryError,
    DeliveryReport,
    Recipient,
    Timeouts,
    TLSPolicy,
    deliver,
)
from haraka_tw.outbound.pool import ConnectionPool
from tests.smtp_peers import Peer, PeerScript, certs
from tests.support import maildir_messages, start_server

FAST = Timeouts.every(5)
BODY = b"From: <alice@a.test>\r\nSubject: hello\r\n\r\nHi.\r\n.leading dot\r\n.\r\nend\r\n"
NO_TLS = TLSPolicy(mode="none")
SAYS_8BIT = {"BODY": "8BITMIME"}  # the caller says, so the client does not scan the source


def big_message() -> Iterator[bytes]:
    """32 MB, made as it is read: more than the socket buffers hold."""
    piece = (b"y" * 998 + b"\r\n") * 64
    return (piece for _ in range(500))


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds, polling; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition not met in time")


def chunks(body: bytes, size: int) -> Any:
    """A message source yielding ``body`` in pieces of ``size`` bytes."""
    return lambda: (body[i : i + size] for i in range(0, len(body), size))


class PeerCase(unittest.TestCase):
    """Helpers: start peers, deliver with test defaults, expect failures."""

    def peer(self, **script: Any) -> tuple[Peer, int]:
        peer = Peer(PeerScript(**script))
        port = peer.start()
        self.addCleanup(peer.stop)
        return peer, port

    def send(self, port: int, **kwargs: Any) -> Deferred[DeliveryReport]:
        args: dict[str, Any] = {
            "ip": "127.0.0.1",
            "port": port,
            "helo": "client.test",
            "mail_from": "alice@a.test",
            "recipients": [Recipient("bob@b.test")],
            "message": lambda: [BODY],
            "size": len(BODY),
            "timeouts": FAST,
            "tls": NO_TLS,
        }
        args.update(kwargs)
        return deliver(reactor, **args)

    async def failure(self, d: Deferred[Any]) -> DeliveryError:
        try:
            await d
        except DeliveryError as e:
            return e
        raise self.failureException("delivery did not fail")

    def commands(self, peer: Peer) -> list[str]:
        return [line[3:].split(" ")[0] for line in peer.transcript if line.startswith("C: ")]


class DialogueTests(PeerCase):
    async def test_delivers_byte_exact(self) -> None:
        """A message reaches the peer byte-exact; the report says SMTP, accepted, plaintext."""
        peer, port = self.peer()
        report = await self.send(port, recipients=[Recipient("bob@b.test"), Recipient("c@b.test")])
        [message] = peer.messages
        self.assertEqual(message.data, BODY)
        self.assertEqual(message.rcpt_to, ["bob@b.test", "c@b.test"])
        self.assertEqual(message.mail_from, "alice@a.test")
        self.assertEqual([r.code for r in report.accepted], [250, 250])
        self.assertEqual(
            (report.mode, report.secured, report.greeting), ("SMTP", False, "peer.test ESMTP")
        )
        self.assertEqual(report.response, "queued as X1")
        self.assertEqual((report.deferred, report.bounced), ([], []))
        self.assertEqual(self.commands(peer)[-1], "QUIT")

    async def test_pipelining_in_one_write(self) -> None:
        """With PIPELINING, MAIL, every RCPT and DATA arrive at the peer in one read."""
        peer, port = self.peer()
        rcpts = [Recipient(f"r{i}@b.test") for i in range(5)]
        await self.send(port, recipients=rcpts)
        [batch] = [r for r in peer.connections[0].reads if r.startswith(b"MAIL")]
        self.assertEqual(batch.count(b"RCPT TO:"), 5)
        self.assertTrue(batch.endswith(b"DATA\r\n"))

    async def test_without_pipelining_one_at_a_time(self) -> None:
        """Without PIPELINING each command waits for the previous reply."""
        peer, port = self.peer(pipelining=False)
        await self.send(port, recipients=[Recipient("a@b.test"), Recipient("c@b.test")])
        reads = peer.connections[0].reads
        for verb in (b"MAIL", b"RCPT TO:<a", b"RCPT TO:<c", b"DATA"):
            self.assertEqual(len([r for r in reads if r.startswith(verb)]), 1, verb)
        self.assertEqual(len(peer.messages), 1)

    async def test_message_in_small_chunks(self) -> None:
        """A message given one byte at a time arrives whole."""
        peer, port = self.peer()
        await self.send(port, message=chunks(BODY, 1))
        self.assertEqual(peer.messages[0].data, BODY)

    async def test_banner_4xx_is_temporary(self) -> None:
        """A 421 banner is a temporary failure at the banner; the client says QUIT."""
        peer, port = self.peer(replies={"BANNER": ["421 4.3.2 busy"]})
        error = await self.failure(self.send(port))
        self.assertEqual((error.phase, error.code, error.permanent), ("banner", 421, False))
        self.assertEqual(error.enhanced, "4.3.2")
        self.assertEqual(self.commands(peer), ["QUIT"])

    async def test_banner_5xx_is_permanent(self) -> None:
        """A 554 banner is a permanent failure."""
        _, port = self.peer(replies={"BANNER": ["554 no service"]})
        error = await self.failure(self.send(port))
        self.assertEqual((error.phase, error.code, error.permanent), ("banner", 554, True))
        self.assertEqual(error.enhanced, "5.0.0")

    async def test_helo_fallback(self) -> None:
        """EHLO refused with 5xx: HELO, and no ESMTP parameters on MAIL."""
        peer, port = self.peer(replies={"EHLO": ["502 5.5.1 no EHLO"]}, size=1000)
        await self.send(port)
        self.assertEqual(self.commands(peer)[:3], ["EHLO", "HELO", "MAIL"])
        self.assertEqual(peer.messages[0].mail_params, [])

    async def test_ehlo_4xx_is_temporary(self) -> None:
        """EHLO answered 4xx is a temporary failure at ehlo, without HELO."""
        peer, port = self.peer(replies={"EHLO": ["451 4.3.0 later"]})
        error = await self.failure(self.send(port))
        self.assertEqual((error.phase, error.code, error.permanent), ("ehlo", 451, False))
        self.assertNotIn("HELO", self.commands(peer))

    async def test_connection_refused(self) -> None:
        """Nothing listening: a temporary failure at connect with no reply code."""
        peer, port = self.peer()
        await peer.stop()
        error = await self.failure(self.send(port))
        self.assertEqual((error.phase, error.code, error.permanent), ("connect", None, False))

    async def test_bind_source_address(self) -> None:
        """The connection comes from the source address asked for."""
        peer, port = self.peer()
        await self.send(port, bind="127.0.0.2")
        self.assertEqual(peer.connections[0].remote_host, "127.0.0.2")

    async def test_ipv6(self) -> None:
        """An IPv6 address literal is connected to over IPv6."""
        peer = Peer(PeerScript())
        try:
            port = peer.start("::1")
        except CannotListenError:
            raise unittest.SkipTest("no IPv6 loopback") from None
        self.addCleanup(peer.stop)
        await self.send(port, ip="::1")
        self.assertEqual(peer.messages[0].data, BODY)

    async def test_bad_reply_is_temporary(self) -> None:
        """A line that is not an SMTP reply is a temporary failure in that phase."""
        _, port = self.peer(replies={"MAIL": ["this is not SMTP"]})
        error = await self.failure(self.send(port))
        self.assertEqual((error.phase, error.code, error.permanent), ("mail", None, False))
        self.assertIn("bad reply", error.text)


class ParameterTests(PeerCase):
    async def test_size_when_offered(self) -> None:
        """SIZE=n goes on MAIL when SIZE is offered, not otherwise."""
        peer, port = self.peer(size=100000)
        await self.send(port)
        self.assertIn(f"SIZE={len(BODY)}", peer.messages[0].mail_params)
        peer, port = self.peer()
        await self.send(port)
        self.assertEqual(peer.messages[0].mail_params, [])

    async def test_size_over_the_limit(self) -> None:
        """A message over the declared SIZE fails permanently (5.3.4) before MAIL."""
        peer, port = self.peer(size=10)
        error = await self.failure(self.send(port))
        self.assertEqual((error.phase, error.enhanced, error.permanent), ("mail", "5.3.4", True))
        self.assertNotIn("MAIL", self.commands(peer))
        self.assertEqual(self.commands(peer)[-1], "QUIT")

    async def test_body_8bitmime_detected(self) -> None:
        """An 8-bit message gets BODY=8BITMIME when 8BITMIME is offered; 7-bit gets none."""
        peer, port = self.peer()
        await self.send(port, message=lambda: [b"Subject: caf\xc3\xa9\r\n\r\n\xe9\r\n"])
        await self.send(port)
        self.assertEqual([m.mail_params for m in peer.messages], [["BODY=8BITMIME"], []])

    async def test_body_not_offered(self) -> None:
        """Without 8BITMIME no BODY parameter is sent, even when the caller asks."""
        peer, port = self.peer(eightbitmime=False)
        await self.send(port, mail_params={"BODY": "8BITMIME"}, message=lambda: [b"\xe9\r\n"])
        self.assertEqual(peer.messages[0].mail_params, [])

    async def test_smtputf8_offered(self) -> None:
        """A UTF-8 address gets SMTPUTF8 on MAIL when offered."""
        peer, port = self.peer(smtputf8=True)
        await self.send(port, recipients=[Recipient("jösé@b.test")])
        self.assertIn("SMTPUTF8", peer.messages[0].mail_params)
        self.assertEqual(peer.messages[0].rcpt_to, ["jösé@b.test"])

    async def test_smtputf8_not_offered(self) -> None:
        """SMTPUTF8 needed but not offered: permanent 5.6.7 for the message, no MAIL."""
        peer, port = self.peer()
        for kwargs in ({"mail_from": "jösé@a.test"}, {"mail_params": {"SMTPUTF8": None}}):
            error = await self.failure(self.send(port, **kwargs))
            self.assertEqual(
                (error.phase, error.enhanced, error.permanent), ("mail", "5.6.7", True)
            )
        self.assertNotIn("MAIL", self.commands(peer))

    async def test_dsn_params_when_offered(self) -> None:
        """RET/ENVID and NOTIFY/ORCPT go out when DSN is offered, and are dropped if not."""
        rcpt = Recipient("bob@b.test", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;bob@b.test"})
        params = {"RET": "HDRS", "ENVID": "abc123"}
        for dsn in (True, False):
            peer, port = self.peer(dsn=dsn)
            await self.send(port, recipients=[rcpt], mail_params=params)
            [message] = peer.messages
            if dsn:
                self.assertEqual(message.mail_params, ["RET=HDRS", "ENVID=abc123"])
                self.assertEqual(
                    message.rcpt_params, [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@b.test"]]
                )
            else:
                self.assertEqual((message.mail_params, message.rcpt_params), ([], [[]]))


class RecipientTests(PeerCase):
    async def test_per_recipient_replies(self) -> None:
        """RCPT 250/450/550 split the recipients into accepted, deferred and bounced."""
        rcpt = {"soft@b.test": "450 mailbox busy", "hard@b.test": "550 5.1.1 no such user"}
        peer, port = self.peer(rcpt=rcpt)
        addresses = ["ok@b.test", "soft@b.test", "hard@b.test"]
        report = await self.send(port, recipients=[Recipient(a) for a in addresses])
        self.assertEqual([r.recipient.address for r in report.accepted], ["ok@b.test"])
        [deferred] = report.deferred
        [bounced] = report.bounced
        self.assertEqual(
            (deferred.code, deferred.enhanced, deferred.text), (450, "4.0.0", "mailbox busy")
        )
        self.assertEqual((bounced.code, bounced.enhanced), (550, "5.1.1"))
        self.assertEqual(peer.messages[0].rcpt_to, ["ok@b.test"])

    async def test_3xx_to_rcpt_is_temporary(self) -> None:
        """A 3xx where 2xx was due defers the recipient."""
        _, port = self.peer(rcpt={"odd@b.test": "354 what"})
        report = await self.send(port, recipients=[Recipient("odd@b.test")])
        self.assertEqual([(r.code, r.enhanced) for r in report.deferred], [(354, "4.0.0")])

    async def test_no_recipient_accepted(self) -> None:
        """All refused: no message is sent, the report lists them, the session ends cleanly."""
        for pipelining in (True, False):
            peer, port = self.peer(pipelining=pipelining, rcpt={"x@b.test": "550 5.1.1 no"})
            report = await self.send(port, recipients=[Recipient("x@b.test")])
            self.assertEqual(([r.code for r in report.bounced], report.accepted), ([550], []))
            self.assertEqual(peer.messages, [])
            self.assertEqual(self.commands(peer)[-1], "QUIT")

    async def test_data_opened_without_recipients(self) -> None:
        """A server that answers 354 with no recipient gets an empty message ended at once."""
        replies = {"DATA_EMPTY": ["354 sure"]}
        peer, port = self.peer(rcpt={"x@b.test": "550 no"}, replies=replies)
        report = await self.send(port, recipients=[Recipient("x@b.test")])
        self.assertEqual(len(report.bounced), 1)
        [empty] = peer.messages
        self.assertEqual((empty.rcpt_to, empty.data), ([], b""))
        self.assertEqual(self.commands(peer)[-1], "QUIT")

    async def test_bad_address_never_sent(self) -> None:
        """An address that would break the command line is bounced (5.1.3) locally."""
        peer, port = self.peer()
        rcpts = [Recipient("ok@b.test"), Recipient("evil@b.test>\r\nRSET")]
        report = await self.send(port, recipients=rcpts)
        self.assertEqual([(r.code, r.enhanced) for r in report.bounced], [(553, "5.1.3")])
        self.assertEqual(peer.messages[0].rcpt_to, ["ok@b.test"])
        self.assertNotIn("RSET", self.commands(peer))

    async def test_mail_refused_then_accepted(self) -> None:
        """MAIL 451 once is a temporary failure; the next attempt is delivered."""
        peer, port = self.peer(replies={"MAIL": ["451 4.3.0 try later", "250 OK"]})
        error = await self.failure(self.send(port))
        self.assertEqual((error.phase, error.code, error.permanent), ("mail", 451, False))
        self.assertEqual(error.settled, [])
        await self.send(port)
        self.assertEqual(len(peer.messages), 1)

    async def test_mail_5xx_is_permanent(self) -> None:
        """MAIL 550 fails the message permanently; the RCPT replies to it are not results."""
        for pipelining in (True, False):
            _, port = self.peer(pipelining=pipelining, replies={"MAIL": ["550 5.7.1 go away"]})
            error = await self.failure(self.send(port))
            self.assertEqual(
                (error.phase, error.enhanced, error.permanent), ("mail", "5.7.1", True)
            )
            self.assertEqual(error.settled, [])

    async def test_data_refused(self) -> None:
        """DATA 451 defers every accepted recipient with that reply."""
        peer, port = self.peer(replies={"DATA": ["451 4.3.0 no room"]})
        report = await self.send(port, recipients=[Recipient("a@b.test"), Recipient("c@b.test")])
        self.assertEqual([(r.code, r.enhanced) for r in report.deferred], [(451, "4.3.0")] * 2)
        self.assertEqual(peer.messages, [])

    async def test_final_reply_applies_to_all(self) -> None:
        """The reply after "." decides every accepted recipient: 554 bounces, 452 defers."""
        for reply, kind in (("554 5.6.0 rejected", "bounced"), ("452 4.3.1 full", "deferred")):
            _, port = self.peer(replies={"DOT": [reply]})
            report = await self.send(
                port, recipients=[Recipient("a@b.test"), Recipient("c@b.test")]
            )
            self.assertEqual(len(getattr(report, kind)), 2)
            self.assertEqual(report.response, reply[10:])
            self.assertEqual(report.accepted, [])


class ConnectionLossTests(PeerCase):
    async def test_dropped_in_data(self) -> None:
        """The peer drops mid-message: temporary failure at data; RCPT refusals settled."""
        _, port = self.peer(drop_in_data=5000, rcpt={"x@b.test": "550 5.1.1 no"})
        rcpts = [Recipient("a@b.test"), Recipient("x@b.test")]
        d = self.send(port, recipients=rcpts, message=big_message, mail_params=SAYS_8BIT)
        error = await self.failure(d)
        self.assertEqual((error.phase, error.code, error.permanent), ("data", None, False))
        self.assertEqual([r.recipient.address for r in error.settled], ["x@b.test"])

    async def test_reply_then_drop_in_data(self) -> None:
        """A reply sent before the peer closes mid-message decides the recipients."""
        _, port = self.peer(drop_in_data=5000, drop_in_data_reply="552 5.3.4 too big")
        report = await self.send(port, message=big_message, mail_params=SAYS_8BIT)
        self.assertEqual([(r.code, r.enhanced) for r in report.bounced], [(552, "5.3.4")])

    async def test_a_250_before_the_end_of_the_message_is_not_a_delivery(self) -> None:
        """A 250 sent mid-message, then the connection closed: the server cannot have the
        message, so it is a temporary failure at data, not a delivery."""
        _, port = self.peer(drop_in_data=5000, drop_in_data_reply="250 2.0.0 queued")
        error = await self.failure(self.send(port, message=big_message, mail_params=SAYS_8BIT))
        self.assertEqual((error.phase, error.permanent), ("data", False))
        self.assertIn("replied 250 queued before the end of the message", error.text)

    async def test_an_early_250_does_not_stand_for_the_reply_to_the_dot(self) -> None:
        """A 250 sent mid-message on a connection that stays open (and then a 554 to the
        dot): not a delivery either."""
        _, port = self.peer(early_reply_at=5000, replies={"DOT": ["554 5.6.0 no"]})
        error = await self.failure(self.send(port, message=big_message, mail_params=SAYS_8BIT))
        self.assertEqual((error.phase, error.permanent), ("data", False))
        self.assertIn("replied 250 ok (early) before the end of the message", error.text)

    async def test_dropped_at_rcpt(self) -> None:
        """A connection dropped instead of an RCPT reply is a temporary failure at rcpt."""
        _, port = self.peer(pipelining=False, replies={"RCPT": ["550 5.1.1 no", "DROP"]})
        rcpts = [Recipient("a@b.test"), Recipient("c@b.test")]
        error = await self.failure(self.send(port, recipients=rcpts))
        self.assertEqual((error.phase, error.permanent), ("rcpt", False))
        self.assertEqual([r.code for r in error.settled], [550])

    async def test_banner_timeout(self) -> None:
        """A server slower than the banner timeout: temporary failure, connection dropped."""
        _, port = self.peer(delay=2)
        error = await self.failure(self.send(port, timeouts=Timeouts(banner=0.2)))
        self.assertEqual((error.phase, error.code, error.permanent), ("banner", None, False))
        self.assertIn("timeout", error.text)

    async def test_slow_but_in_time(self) -> None:
        """Replies delayed within the timeouts still deliver."""
        peer, port = self.peer(delay=0.02)
        await self.send(port)
        self.assertEqual(len(peer.messages), 1)

    async def test_dot_timeout(self) -> None:
        """No reply after the message within the dot timeout: temporary failure at dot."""
        _, port = self.peer(replies={"DOT": ["HANG"]})
        error = await self.failure(self.send(port, timeouts=Timeouts(dot=0.2)))
        self.assertEqual((error.phase, error.permanent), ("dot", False))

    async def test_data_block_timeout_and_backpressure(self) -> None:
        """A peer that stops reading: the source is read only as the socket drains, then timeout."""
        pulled = []
        piece = b"x" * 1000 + b"\r\n"

        def source() -> Iterator[bytes]:
            for i in range(100_000):  # 100 MB if read whole
                pulled.append(i)
                yield piece * 64

        _, port = self.peer(stall_data=True)
        timeouts = Timeouts(data_block=0.3)
        d = self.send(port, message=source, size=None, timeouts=timeouts, mail_params=SAYS_8BIT)
        error = await self.failure(d)
        self.assertEqual((error.phase, error.permanent), ("data", False))
        self.assertLess(len(pulled), 1000)  # under 64 MB pulled; typically a few MB

    async def test_message_source_fails(self) -> None:
        """The message source raising mid-stream is a temporary failure at data."""

        def source() -> Iterator[bytes]:
            yield b"Subject: x\r\n\r\n"
            raise OSError("disk gone")

        _, port = self.peer()
        error = await self.failure(self.send(port, message=source, mail_params=SAYS_8BIT))
        self.assertEqual((error.phase, error.permanent), ("data", False))
        self.assertIn("disk gone", error.text)
        error = await self.failure(self.send(port, message=source))  # found by the 8-bit scan
        self.assertEqual((error.phase, error.permanent), ("mail", False))

    async def test_cancel(self) -> None:
        """Cancelling a delivery closes its connection and fails with CancelledError."""
        peer, port = self.peer(replies={"BANNER": ["HANG"]})
        d = self.send(port)
        await deferLater(reactor, 0.1, lambda: None)
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await eventually(lambda: peer.connections[0].closed)


class LMTPTests(PeerCase):
    async def test_per_recipient_data_replies(self) -> None:
        """LMTP: LHLO, and one reply per accepted recipient after the message."""
        replies = {"b@b.test": "452 4.2.2 over quota", "c@b.test": "550 5.2.1 disabled"}
        peer, port = self.peer(lmtp=True, lmtp_replies=replies)
        rcpts = [Recipient(a) for a in ("a@b.test", "b@b.test", "c@b.test")]
        report = await self.send(port, recipients=rcpts, lmtp=True)
        self.assertEqual(report.mode, "LMTP")
        self.assertEqual([r.recipient.address for r in report.accepted], ["a@b.test"])
        self.assertEqual([(r.code, r.enhanced) for r in report.deferred], [(452, "4.2.2")])
        self.assertEqual([(r.code, r.enhanced) for r in report.bounced], [(550, "5.2.1")])
        self.assertEqual(self.commands(peer)[0], "LHLO")
        self.assertEqual(peer.messages[0].data, BODY)

    async def test_lost_between_recipient_replies(self) -> None:
        """LMTP: lost after the first recipient's reply: that one is settled (delivered)."""
        _, port = self.peer(lmtp=True, lmtp_replies={"b@b.test": "DROP"})
        rcpts = [Recipient("a@b.test"), Recipient("b@b.test")]
        error = await self.failure(self.send(port, recipients=rcpts, lmtp=True))
        self.assertEqual((error.phase, error.permanent), ("dot", False))
        self.assertEqual(
            [(r.recipient.address, r.code) for r in error.settled], [("a@b.test", 250)]
        )

    async def test_no_helo_fallback(self) -> None:
        """LHLO refused is a failure: LMTP has no HELO."""
        peer, port = self.peer(lmtp=True, replies={"LHLO": ["500 5.5.1 what"]})
        error = await self.failure(self.send(port, lmtp=True))
        self.assertEqual((error.phase, error.permanent), ("ehlo", True))
        self.assertNotIn("HELO", self.commands(peer))


class TLSTests(PeerCase):
    def ca(self) -> str:
        return str(certs().ca)

    async def test_opportunistic(self) -> None:
        """STARTTLS offered: used, EHLO again, and the report says which TLS."""
        peer, port = self.peer(starttls=True)
        report = await self.send(port, tls=TLSPolicy())
        self.assertTrue(report.secured)
        self.assertFalse(report.tls_verified)
        self.assertIn(report.tls_version, ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(report.tls_cipher)
        self.assertEqual(self.commands(peer)[:3], ["EHLO", "STARTTLS", "EHLO"])
        self.assertTrue(peer.messages[0].tls)

    async def test_large_message_over_tls(self) -> None:
        """A 4 MB message streams through STARTTLS byte-exact."""
        peer, port = self.peer(starttls=True)
        body = b"".join(b"line %d .\r\n.%d\r\n" % (i, i) for i in range(250_000))
        report = await self.send(port, tls=TLSPolicy(), message=chunks(body, 100_000))
        self.assertTrue(report.secured)
        self.assertEqual(peer.messages[0].data, body)

    async def test_opportunistic_not_offered(self) -> None:
        """No STARTTLS offered: plaintext, secured False."""
        peer, port = self.peer()
        report = await self.send(port, tls=TLSPolicy())
        self.assertFalse(report.secured)
        self.assertNotIn("STARTTLS", self.commands(peer))

    async def test_opportunistic_handshake_fails(self) -> None:
        """A failed handshake: a new connection without TLS delivers, secured False."""
        peer, port = self.peer(starttls=True, tls_broken=True)
        report = await self.send(port, tls=TLSPolicy())
        self.assertFalse(report.secured)
        self.assertEqual(len(peer.connections), 2)
        self.assertNotIn("C: STARTTLS", peer.connections[1].transcript)
        self.assertEqual(len(peer.messages), 1)

    async def test_plaintext_after_starttls_reply_discarded(self) -> None:
        """Replies injected in plaintext behind the 220 are never read (RFC 3207 4.2)."""
        inject = b"250-fake.test\r\n250 AUTH PLAIN\r\n250 2.1.0 fake MAIL reply\r\n"
        peer, port = self.peer(starttls=True, starttls_inject=inject)
        report = await self.send(port, tls=TLSPolicy())
        self.assertTrue(report.secured)
        self.assertEqual(
            self.commands(peer),
            ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "<message,", "QUIT"],
        )
        self.assertEqual(len(peer.messages), 1)

    async def test_required_starttls_refused(self) -> None:
        """Required: STARTTLS refused is a temporary failure; the session ends with QUIT."""
        peer, port = self.peer(starttls=True, replies={"STARTTLS": ["454 4.7.0 no TLS now"]})
        error = await self.failure(self.send(port, tls=TLSPolicy(mode="required")))
        self.assertEqual((error.phase, error.code, error.permanent), ("starttls", 454, False))
        self.assertEqual(self.commands(peer), ["EHLO", "STARTTLS", "QUIT"])
        self.assertIn("S: 221 2.0.0 bye", peer.transcript)

    async def test_opportunistic_starttls_refused(self) -> None:
        """STARTTLS refused: the same connection goes on in plaintext."""
        peer, port = self.peer(starttls=True, replies={"STARTTLS": ["454 4.7.0 no TLS now"]})
        report = await self.send(port, tls=TLSPolicy())
        self.assertFalse(report.secured)
        self.assertEqual(len(peer.connections), 1)
        self.assertEqual(len(peer.messages), 1)

    async def test_none_never_starts_tls(self) -> None:
        """Mode none ignores an offered STARTTLS."""
        peer, port = self.peer(starttls=True)
        report = await self.send(port, tls=NO_TLS)
        self.assertFalse(report.secured)
        self.assertNotIn("STARTTLS", self.commands(peer))

    async def test_required_verified(self) -> None:
        """Required: the certificate is checked against the CA and the name; verified."""
        _, port = self.peer(starttls=True)
        tls = TLSPolicy(mode="required", ca_file=self.ca())
        report = await self.send(port, tls=tls, host="mx.test")
        self.assertTrue(report.secured and report.tls_verified)
        self.assertEqual(report.host, "mx.test")

    async def test_required_verifies_an_ip_address(self) -> None:
        """With no host name the certificate must name the IP address."""
        _, port = self.peer(starttls=True)
        report = await self.send(port, tls=TLSPolicy(mode="required", ca_file=self.ca()))
        self.assertTrue(report.tls_verified)

    async def test_required_not_offered(self) -> None:
        """Required and no STARTTLS: temporary "TLS required", nothing sent."""
        peer, port = self.peer()
        error = await self.failure(self.send(port, tls=TLSPolicy(mode="required")))
        self.assertEqual((error.phase, error.permanent), ("starttls", False))
        self.assertIn("TLS required", error.text)
        self.assertNotIn("MAIL", self.commands(peer))

    async def test_required_wrong_name(self) -> None:
        """Required: a certificate for another name fails, with no plaintext retry."""
        peer, port = self.peer(starttls=True)
        tls = TLSPolicy(mode="required", ca_file=self.ca(), servername="wrong.test")
        error = await self.failure(self.send(port, tls=tls))
        self.assertEqual((error.phase, error.permanent), ("starttls", False))
        self.assertIn("TLS required", error.text)
        self.assertEqual((len(peer.connections), peer.messages), (1, []))

    async def test_required_untrusted_certificate(self) -> None:
        """Required: a self-signed certificate fails the handshake."""
        _, port = self.peer(starttls=True, selfsigned=True)
        tls = TLSPolicy(mode="required", ca_file=self.ca())
        error = await self.failure(self.send(port, tls=tls, host="mx.test"))
        self.assertEqual((error.phase, error.permanent), ("starttls", False))

    async def test_required_without_verification(self) -> None:
        """Required with verify=False takes the self-signed certificate (a test setup)."""
        _, port = self.peer(starttls=True, selfsigned=True)
        report = await self.send(port, tls=TLSPolicy(mode="required", verify=False))
        self.assertTrue(report.secured)
        self.assertFalse(report.tls_verified)

    async def test_required_handshake_fails(self) -> None:
        """Required: a failed handshake is temporary and not retried in plaintext."""
        peer, port = self.peer(starttls=True, tls_broken=True)
        error = await self.failure(self.send(port, tls=TLSPolicy(mode="required", verify=False)))
        self.assertIn("TLS required", error.text)
        self.assertEqual(len(peer.connections), 1)

    async def test_client_certificate(self) -> None:
        """A client certificate in the policy is shown to the server."""
        peer, port = self.peer(starttls=True, request_client_cert=True)
        pki = certs()
        tls = TLSPolicy(client_cert=str(pki.client_cert), client_key=str(pki.client_key))
        await self.send(port, tls=tls)
        self.assertEqual(peer.connections[0].client_cert_subject, "client.test")

    async def test_implicit_tls(self) -> None:
        """Implicit TLS (SMTPS) speaks TLS from the first byte, no STARTTLS."""
        peer, port = self.peer(implicit_tls=True)
        tls = TLSPolicy(implicit=True, mode="required", ca_file=self.ca())
        report = await self.send(port, tls=tls, host="mx.test")
        self.assertTrue(report.secured and report.tls_verified)
        self.assertEqual(self.commands(peer)[0], "EHLO")

    async def test_plaintext_to_implicit_tls_port(self) -> None:
        """Plaintext to a TLS-only port gets no banner: a temporary failure."""
        _, port = self.peer(implicit_tls=True)
        error = await self.failure(self.send(port, timeouts=Timeouts(banner=0.3)))
        self.assertEqual((error.phase, error.permanent), ("banner", False))


class AuthTests(PeerCase):
    async def test_each_mechanism(self) -> None:
        """CRAM-MD5, PLAIN and LOGIN each authenticate when they are all that is offered."""
        for mechanism in ("CRAM-MD5", "PLAIN", "LOGIN"):
            peer, port = self.peer(starttls=True, auth=(mechanism,))
            report = await self.send(port, tls=TLSPolicy(), auth=("user", "secret"))
            self.assertTrue(report.authenticated)
            self.assertEqual(peer.connections[0].auth_mechanism, mechanism)
            self.assertEqual(peer.messages[0].auth_user, "user")

    async def test_preference(self) -> None:
        """With all three offered, CRAM-MD5 is used; without it, PLAIN."""
        for offered, expected in (
            (("LOGIN", "PLAIN", "CRAM-MD5"), "CRAM-MD5"),
            (("LOGIN", "PLAIN"), "PLAIN"),
        ):
            peer, port = self.peer(starttls=True, auth=offered)
            await self.send(port, tls=TLSPolicy(), auth=("user", "secret"))
            self.assertEqual(peer.connections[0].auth_mechanism, expected)

    async def test_bad_password_is_temporary(self) -> None:
        """A 535 is a temporary failure at auth (a wrong password must not bounce mail)."""
        for mechanism in ("CRAM-MD5", "PLAIN", "LOGIN"):
            peer, port = self.peer(starttls=True, auth=(mechanism,))
            error = await self.failure(self.send(port, tls=TLSPolicy(), auth=("user", "nope")))
            self.assertEqual((error.phase, error.code, error.permanent), ("auth", 535, False))
            self.assertNotIn("MAIL", self.commands(peer))

    async def test_no_credentials_in_cleartext(self) -> None:
        """Without TLS credentials are not sent, unless the caller allows cleartext."""
        peer, port = self.peer(auth=("PLAIN",))
        error = await self.failure(self.send(port, auth=("user", "secret")))
        self.assertEqual((error.phase, error.permanent), ("auth", False))
        self.assertNotIn("AUTH", self.commands(peer))
        report = await self.send(port, auth=("user", "secret"), allow_cleartext_auth=True)
        self.assertTrue(report.authenticated)

    async def test_auth_not_offered(self) -> None:
        """Credentials given but no usable mechanism offered: temporary failure at auth."""
        _, port = self.peer(starttls=True)
        error = await self.failure(self.send(port, tls=TLSPolicy(), auth=("user", "secret")))
        self.assertEqual((error.phase, error.permanent), ("auth", False))


class HarakaServerTests(unittest.TestCase):
    """Delivery to the project's own server, stored in a Maildir."""

    def setUp(self) -> None:
        plugins = "rcpt_to.in_host_list\nqueue/maildir\n"
        self.server, self.port = start_server(self, {"plugins": plugins})
        self.maildir = self.server.base / "maildir"  # type: ignore[attr-defined]

    def send(
        self, body: bytes, pool: ConnectionPool | None = None, size: int = 7
    ) -> Deferred[DeliveryReport]:
        return deliver(
            reactor,
            ip="127.0.0.1",
            port=self.port,
            helo="client.test",
            mail_from="alice@a.test",
            recipients=[Recipient("bob@example.com")],
            message=chunks(body, size),
            size=len(body),
            timeouts=FAST,
            tls=NO_TLS,
            pool=pool,
        )

    async def test_stored_byte_exact(self) -> None:
        """The message stored by haraka_tw ends with exactly the body sent (8-bit, dots)."""
        body = BODY + b"caf\xc3\xa9\r\n..two dots\r\n.\r\n"
        report = await self.send(body)
        self.assertEqual(len(report.accepted), 1)
        [stored] = maildir_messages(self.maildir)
        self.assertTrue(stored.endswith(body), stored)

    async def test_every_chunk_boundary(self) -> None:
        """Cut at every offset, a body of dot lines is stored byte-exact each time."""
        body = b".\r\n..\r\n.x\r\n\r\n.\r\n"
        pool = ConnectionPool(reactor)
        self.addCleanup(pool.close)
        for cut in range(1, len(body) + 1):
            await self.send(body, pool=pool, size=cut)
        stored = maildir_messages(self.maildir)
        self.assertEqual(len(stored), len(body))
        for message in stored:
            self.assertEqual(message[-len(body) :], body)


class HypothesisThroughPeerTests(PeerCase):
    def test_any_body_any_chunking(self) -> None:
        """Hypothesis: any CRLF body in any chunking reaches a real peer byte-exact."""
        peer, port = self.peer()
        pool = ConnectionPool(reactor)
        self.addCleanup(pool.close)
        line = st.lists(st.sampled_from([b".", b"a", b" ", b"\xe9", b".."]), max_size=5)
        bodies = st.lists(line.map(b"".join)).map(lambda ls: b"".join(x + b"\r\n" for x in ls))

        @settings(max_examples=25, deadline=None, database=None)
        @given(bodies, st.integers(min_value=1, max_value=8))
        def check(body: bytes, size: int) -> None:
            count = len(peer.messages)
            blockingCallFromThread(
                reactor, lambda: self.send(port, message=chunks(body, size), size=None, pool=pool)
            )
            self.assertEqual(peer.messages[count].data, body)

        return deferToThread(check)  # type: ignore[return-value]
