"""haraka_tw.spamd without a spamd: its replies parsed (the real exchange is tested in
tests/plugins/test_spamassassin.py, against SpamAssassin's spamd)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw import spamd
from haraka_tw.exchange import Address


def ok(body: bytes, spam: bytes = b"False ; 2.5 / 5.0") -> bytes:
    return b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s\r\n\r\n" % (len(body), spam) + body


class ReplyTests(SynchronousTestCase):
    def test_a_verdict_and_its_body(self) -> None:
        """The Spam line's verdict, score and threshold (a whole-number score too, as spamd
        may print one), and a SYMBOLS body's names."""
        reply = spamd.parse_reply(ok(b"SYM_A,SYM_B", b"True ; 15 / 5.0"))
        self.assertEqual((reply.is_spam, reply.score, reply.threshold), (True, 15.0, 5.0))
        self.assertEqual(reply.symbols(), ["SYM_A", "SYM_B"])

    def test_what_is_no_reply(self) -> None:
        """Another protocol, an unreadable Spam line, a body cut short, no end of header,
        an error status (a line alone, as spamd sends it): each a SpamdError saying so."""
        for bad, why in (
            (b"HTTP/1.0 200 OK\r\n\r\n", "not SPAMD"),
            (b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n", "not understood"),
            (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 10\r\nSpam: True ; 1 / 5\r\n\r\nab", "cut"),
            (b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\n", "ended before"),
            (b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch)\r\n", "answered 76 Bad"),
            (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "no Spam line"),
        ):
            with self.assertRaises(spamd.SpamdError) as caught:
                spamd.parse_reply(bad)
            self.assertIn(why, str(caught.exception))

    def test_header_fields_keep_folds_but_no_blank_continuations(self) -> None:
        """A folded field keeps its folds; a continuation of white space alone is dropped
        (it would end the header it is written into); a continuation of a line that is
        no field is not given to the field before it."""
        reply = spamd.parse_reply(
            ok(
                b"X-Spam-Status: No, tests=A,\r\n\tB\r\n   \r\nnot a field\r\n\tstray\r\n"
                b"X-Spam-Level: *\r\n\r\nbody"
            )
        )
        self.assertEqual(
            reply.header_fields(), [("X-Spam-Status", "No, tests=A,\n\tB"), ("X-Spam-Level", "*")]
        )

    @given(st.binary(max_size=300))
    def test_any_bytes_are_a_reply_or_a_spamd_error(self, data: bytes) -> None:
        """Whatever a peer sends, parse_reply gives a reply or says why not, never another
        exception."""
        try:
            reply = spamd.parse_reply(data)
        except spamd.SpamdError:
            return
        reply.header_fields()
        reply.symbols()


class RequestTests(SynchronousTestCase):
    def test_user_and_command_checked(self) -> None:
        """A User with a line break or a space, or an unknown command, is refused before
        anything is sent (it would end the request's header)."""
        for kwargs in ({"user": "bob\r\nX: y"}, {"user": "bob smith"}, {"command": "TELL"}):
            self.assertRaises(
                ValueError,
                spamd.check,
                None,
                Address("localhost", 783),
                [b""],
                0,
                **kwargs,  # type: ignore[arg-type]
            )
