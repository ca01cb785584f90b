"""BDAT (RFC 3030) and DSN parameters (RFC 3461), as transcripts."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.codes import DENY, OK
from haraka_tw.smtp.data import BareNewline
from haraka_tw.smtp.settings import SessionSettings
from tests.smtp.test_protocol import ENVELOPE, storing
from tests.support import Session, plugin_with, reply_codes

#: Any bytes, but a CR or LF only as part of a CRLF (what a message without BINARYMIME is).
CRLF_TEXT = st.lists(
    st.one_of(st.binary(max_size=60).map(lambda b: b.translate(None, b"\r\n")), st.just(b"\r\n")),
    max_size=120,
).map(b"".join)


def send_chunked(s: Session, body: bytes, cuts: list[int]) -> None:
    """C{body} as BDAT chunks of the sizes in C{cuts} (the last takes the rest), over
    reads of 97 bytes."""
    wire = b""
    pos = 0
    for i, n in enumerate(cuts):
        piece = body[pos : pos + n] if i < len(cuts) - 1 else body[pos:]
        pos += len(piece)
        last = b" LAST" if i == len(cuts) - 1 else b""
        wire += b"BDAT %d%s\r\n" % (len(piece), last) + piece
    for i in range(0, len(wire), 97):
        s.proto.dataReceived(wire[i : i + 97])


def bdat_session(stored: list[bytes], **kw: Any) -> Session:
    s = Session([storing(stored)], **kw)
    s.send(ENVELOPE)
    return s


class BdatTests(SynchronousTestCase):
    def test_chunks_then_last(self) -> None:
        """Chunks are acknowledged with their running size; LAST queues the message."""
        stored: list[bytes] = []
        s = bdat_session(stored)
        self.assertEqual(
            s.send(b"BDAT 14\r\nSubject: x\r\n\r\n"), "250 2.0.0 14 octets received\r\n"
        )
        out = s.send(b"BDAT 6 LAST\r\nbody\r\n")
        self.assertIn("250 2.0.0 Message Queued", out)
        self.assertTrue(stored[0].endswith(b"\r\nSubject: x\r\n\r\nbody\r\n"))
        self.assertTrue(stored[0].startswith(b"Received: "))

    def test_bdat_is_binary_exact(self) -> None:
        """BDAT bytes are stored as sent: dots, CRLF.CRLF, NUL and 8-bit are just data."""
        stored: list[bytes] = []
        s = bdat_session(stored)
        body = b"Subject: y\r\n\r\n.\r\n..\r\n\r\n.\r\nQUIT\r\n\x00\xff"
        out = s.send(b"BDAT %d LAST\r\n" % len(body) + body + b"NOOP\r\n")
        self.assertEqual(reply_codes(out), [250, 250])
        self.assertTrue(stored[0].endswith(body))

    def test_bare_newlines_in_chunks_are_refused(self) -> None:
        """A bare LF or bare CR in BDAT chunks gets the 550 5.6.0 that DATA gives (no
        BINARYMIME is offered, so the message must have CRLF lines), and nothing is
        stored; a CRLF split between two chunks is no bare newline."""
        for chunks in ([b"a\nb\r\n"], [b"a\rb\r\n"], [b"ab\r\n", b"x\r"], [b"a\r", b"b\r\n"]):
            stored: list[bytes] = []
            s = bdat_session(stored)
            for chunk in chunks[:-1]:
                s.send(b"BDAT %d\r\n" % len(chunk) + chunk)
            out = s.send(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
            self.assertIn("550 5.6.0 Bare LF or CR in message", out, chunks)
            self.assertEqual(stored, [], chunks)
        stored = []
        s = bdat_session(stored)
        s.send(b"BDAT 3\r\nA:\r")
        out = s.send(b"BDAT 9 LAST\r\n\nb\r\n\r\nc\r\n")
        self.assertIn("250 2.0.0 Message Queued", out)
        self.assertTrue(stored[0].endswith(b"A:\r\nb\r\n\r\nc\r\n"))

    def test_bare_newlines_in_chunks_normalised(self) -> None:
        """With bare_newline=normalise each bare LF or CR in the chunks becomes CRLF, a
        CR that ends the last chunk too."""
        stored: list[bytes] = []
        s = bdat_session(stored, settings=SessionSettings(bare_newline=BareNewline.NORMALISE))
        s.send(b"BDAT 6\r\nA: b\nc")
        s.send(b"BDAT 2\r\n\r\r")
        out = s.send(b"BDAT 3 LAST\r\n\nd\r")
        self.assertIn("250 2.0.0 Message Queued", out)
        self.assertTrue(stored[0].endswith(b"A: b\r\nc\r\n\r\nd\r\n"), stored)

    def test_pipelined_with_commands_in_one_write(self) -> None:
        """BDAT chunks mixed with pipelined commands in one write: replies in order."""
        stored: list[bytes] = []
        s = Session([storing(stored)])
        batch = (
            ENVELOPE + b"BDAT 3\r\nA: BDAT 5\r\nb\r\n\r\nBDAT 2 LAST\r\nxy"
            b"MAIL FROM:<c@d.e>\r\nRCPT TO:<f@g.h>\r\nBDAT 0 LAST\r\nQUIT\r\n"
        )
        out = s.send(batch)
        self.assertEqual(reply_codes(out)[-8:], [250, 250, 250, 250, 250, 250, 250, 221])
        self.assertTrue(stored[0].endswith(b"A: b\r\n\r\nxy"))
        self.assertEqual(len(stored), 2)

    def test_chunk_split_over_reads(self) -> None:
        """A chunk arriving byte by byte is read whole before the reply."""
        stored: list[bytes] = []
        s = bdat_session(stored)
        s.send(b"BDAT 10 LAST\r\n")
        replies = [s.send(bytes([byte])) for byte in b"Subject: z"]
        self.assertEqual(replies[:-1], [""] * 9)
        self.assertIn("Message Queued", replies[-1])
        self.assertEqual(len(stored), 1)

    def test_refused_chunk_is_still_read(self) -> None:
        """BDAT without MAIL: the chunk is read (not run as commands), then 503."""
        s = Session([storing([])])
        s.send(b"EHLO x\r\n")
        out = s.send(b"BDAT 17\r\nMAIL FROM:<e@x>\r\nNOOP\r\n")  # 17: the MAIL line
        self.assertEqual(reply_codes(out), [503, 250])

    def test_data_hook_denial_on_first_chunk(self) -> None:
        """The data hook runs at the first BDAT; a denial is the reply to that chunk."""
        s = Session([storing([]), ("d", plugin_with({"data": lambda c: (DENY, "no data")}))])
        s.send(ENVELOPE)
        out = s.send(b"BDAT 5\r\nhello")
        self.assertEqual(out, "554 5.7.1 no data\r\n")
        self.assertIsNone(s.connection.transaction)

    def test_async_data_hook_holds_the_chunk(self) -> None:
        """While the data hook answers later, the chunk bytes wait; then they are stored."""
        stored: list[bytes] = []
        pending: Deferred[Any] = Deferred()
        s = Session([storing(stored), ("d", plugin_with({"data": lambda c: pending}))])
        s.send(ENVELOPE)
        self.assertEqual(s.send(b"BDAT 8 LAST\r\nA: b\r\n\r\n"), "")
        pending.callback(OK)
        self.assertIn("Message Queued", s.read())
        self.assertTrue(stored[0].endswith(b"A: b\r\n\r\n"))

    def test_bad_bdat_closes(self) -> None:
        """BDAT without a size cannot be followed: 501 and close."""
        s = Session([storing([])])
        s.send(ENVELOPE)
        self.assertIn("501 5.5.4", s.send(b"BDAT lots\r\n"))
        self.assertTrue(s.closed)

    def test_bdat_needs_ehlo_and_no_data_after(self) -> None:
        """BDAT after HELO is refused; DATA after BDAT in one transaction is refused."""
        s = Session([storing([])])
        s.send(b"HELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
        self.assertEqual(s.codes(b"BDAT 2\r\nxyNOOP\r\n"), [503, 250])
        s = bdat_session([])
        self.assertEqual(s.codes(b"BDAT 2\r\nxyDATA\r\n"), [250, 503])

    def test_size_limit(self) -> None:
        """Chunks past max.bytes are read but not kept; LAST gets 550 Message too big!"""
        s = bdat_session([], settings=SessionSettings(me="mx.test", max_bytes=100))
        s.send(b"BDAT 80\r\n" + b"a" * 80)
        out = s.send(b"BDAT 80 LAST\r\n" + b"b" * 80)
        self.assertIn("552 5.3.4 Message too big!", out)

    @settings(max_examples=30, deadline=None)
    @given(CRLF_TEXT, st.lists(st.integers(1, 700), min_size=1, max_size=8))
    def test_any_body_any_chunking_byte_exact(self, body: bytes, cuts: list[int]) -> None:
        """Any bytes whose CR and LF come as CRLF, sent as BDAT chunks of any sizes (a CRLF
        split between two of them included), in any reads, are stored exactly."""
        stored: list[bytes] = []
        s = bdat_session(stored, settings=SessionSettings(me="mx.test", add_received=False))
        send_chunked(s, body, cuts)
        self.assertEqual(stored, [body])

    @settings(max_examples=30, deadline=None)
    @given(st.binary(max_size=3000), st.lists(st.integers(1, 700), min_size=1, max_size=8))
    def test_any_bytes_any_chunking_normalised(self, body: bytes, cuts: list[int]) -> None:
        """With bare_newline=normalise, any bytes in any chunks are stored with every bare
        CR and LF made CRLF: what DATA stores for the same bytes."""
        stored: list[bytes] = []
        normalising = SessionSettings(
            me="mx.test", add_received=False, bare_newline=BareNewline.NORMALISE
        )
        s = bdat_session(stored, settings=normalising)
        send_chunked(s, body, cuts)
        self.assertEqual(stored, [re.sub(rb"\r\n|\r|\n", b"\r\n", body)])


class DsnParamTests(SynchronousTestCase):
    def test_valid_dsn_params_kept(self) -> None:
        """RET, ENVID, NOTIFY and ORCPT are accepted and kept on the transaction."""
        s = Session([storing([])])
        s.send(b"EHLO x\r\n")
        self.assertIn("250", s.send(b"MAIL FROM:<a@b.c> RET=HDRS ENVID=QQ314159+2Bx\r\n"))
        out = s.send(b"RCPT TO:<d@e.f> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;d+40e.f\r\n")
        self.assertIn("250", out)
        txn = s.connection.transaction
        self.assertEqual(txn.mail_params["RET"], "HDRS")
        self.assertEqual(
            txn.rcpt_params[0], {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;d+40e.f"}
        )

    def test_invalid_dsn_params(self) -> None:
        """Bad RET, ENVID, NOTIFY or ORCPT: 501 naming the problem."""
        s = Session([storing([])])
        s.send(b"EHLO x\r\n")
        self.assertIn("501 5.5.4 Syntax error: RET", s.send(b"MAIL FROM:<a@b.c> RET=ALL\r\n"))
        s.send(b"MAIL FROM:<a@b.c>\r\n")
        for bad in (
            b"NOTIFY=NEVER,SUCCESS",
            b"NOTIFY=SOMETIMES",
            b"ORCPT=d@e.f",
            b"ORCPT=rfc822;a+zz",
        ):
            self.assertIn(
                "501 5.5.4 Syntax error: ", s.send(b"RCPT TO:<d@e.f> " + bad + b"\r\n"), bad
            )

    def test_advertised(self) -> None:
        """EHLO advertises CHUNKING and DSN."""
        out = Session().send(b"EHLO x\r\n")
        self.assertIn("250-CHUNKING\r\n", out)
        self.assertIn("250-DSN\r\n", out)
