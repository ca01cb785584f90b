"""The streaming dot-stuffer, byte by byte and against the server's own DATA reader."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from haraka_tw.outbound.dotstuff import DotStuffer, stuff
from haraka_tw.smtp.data import BareNewline, DataReader

# Lines built from the pieces that matter at a line start and at a line end.
_LINE = st.lists(
    st.sampled_from([b".", b"..", b"a", b" ", b"\xe9", b"\r", b"\n", b"x.y", b"\x00"]),
    max_size=6,
).map(b"".join)
CRLF_BODIES = st.lists(_LINE.map(lambda line: line.replace(b"\r", b"").replace(b"\n", b"")))
CRLF_BODIES = CRLF_BODIES.map(lambda lines: b"".join(line + b"\r\n" for line in lines))
ANY_BODIES = st.one_of(st.binary(max_size=200), st.lists(_LINE).map(b"\r\n".join))


def feed_in_pieces(body: bytes, cuts: list[int]) -> bytes:
    """Stuff ``body`` cut at the (sorted, clipped) offsets in ``cuts``."""
    stuffer = DotStuffer()
    out = []
    start = 0
    for cut in sorted(min(c, len(body)) for c in cuts):
        out.append(stuffer.feed(body[start:cut]))
        start = cut
    out.append(stuffer.feed(body[start:]))
    out.append(stuffer.close())
    return b"".join(out)


def unstuff(wire: bytes) -> tuple[bytes, DataReader, bytes | None]:
    """What haraka_tw's server-side reader makes of ``wire``: message, reader, leftover."""
    pieces: list[bytes] = []
    reader = DataReader(pieces.append, max_line_length=0, bare_newline=BareNewline.REJECT)
    rest = reader.feed(wire)
    return b"".join(pieces), reader, rest


def normalise(body: bytes) -> bytes:
    """The body with every CRLF, bare CR and bare LF as CRLF, ending with CRLF if non-empty."""
    out = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


class DotStufferTests(unittest.TestCase):
    def test_leading_dot_of_first_line(self) -> None:
        """A "." that starts the message is doubled."""
        self.assertEqual(stuff(b".hidden\r\n"), b"..hidden\r\n.\r\n")

    def test_dot_after_crlf_only(self) -> None:
        """A "." after CRLF is doubled; one inside a line is left alone."""
        self.assertEqual(stuff(b"a.b\r\n.\r\n..x\r\n"), b"a.b\r\n..\r\n...x\r\n.\r\n")

    def test_close_ends_the_last_line(self) -> None:
        """close() adds CRLF to an unterminated last line, then the terminator."""
        self.assertEqual(stuff(b"no newline"), b"no newline\r\n.\r\n")
        self.assertEqual(stuff(b"newline\r\n"), b"newline\r\n.\r\n")

    def test_empty_message(self) -> None:
        """An empty message is the terminator alone."""
        self.assertEqual(stuff(b""), b".\r\n")

    def test_bare_lf_and_bare_cr_become_crlf(self) -> None:
        """Bare LF and bare CR are both turned into CRLF, and stuffing follows."""
        self.assertEqual(stuff(b"a\n.b\rc\r\n"), b"a\r\n..b\r\nc\r\n.\r\n")

    def test_crlf_split_across_chunks(self) -> None:
        """A CR at the end of a chunk and LF at the start of the next stay one CRLF."""
        stuffer = DotStuffer()
        out = stuffer.feed(b"a\r") + stuffer.feed(b"\n.b\r") + stuffer.feed(b"\n")
        self.assertEqual(out + stuffer.close(), b"a\r\n..b\r\n.\r\n")

    def test_dot_at_the_start_of_a_chunk(self) -> None:
        """A line-start "." that opens a chunk is stuffed (Twisted's transformChunk misses it)."""
        stuffer = DotStuffer()
        out = stuffer.feed(b"one\r\n") + stuffer.feed(b".\r\nRCPT TO:<x>\r\n")
        self.assertEqual(out + stuffer.close(), b"one\r\n..\r\nRCPT TO:<x>\r\n.\r\n")

    def test_held_cr_then_dot(self) -> None:
        """A trailing bare CR followed by a "." chunk becomes CRLF and the dot is stuffed."""
        stuffer = DotStuffer()
        out = stuffer.feed(b"a\r") + stuffer.feed(b".")
        self.assertEqual(out + stuffer.close(), b"a\r\n..\r\n.\r\n")

    def test_trailing_cr_at_close(self) -> None:
        """A CR held at close() ends the line once, not twice."""
        self.assertEqual(stuff(b"a\r"), b"a\r\n.\r\n")

    def test_size_counts_output(self) -> None:
        """size is the number of bytes returned, terminator included."""
        stuffer = DotStuffer()
        total = len(stuffer.feed(b".a\r\n")) + len(stuffer.close())
        self.assertEqual(stuffer.size, total)

    def test_feed_after_close(self) -> None:
        """Feeding or closing after close() is an error."""
        stuffer = DotStuffer()
        stuffer.close()
        self.assertRaises(RuntimeError, stuffer.feed, b"x")
        self.assertRaises(RuntimeError, stuffer.close)

    def test_every_split_point(self) -> None:
        """Cutting a tricky body at any one or two offsets gives the same bytes."""
        body = b".\r\n..\r\nx\r\n.\r\n\r\n.\r\r\n.\n.end"
        whole = stuff(body)
        for i in range(len(body) + 1):
            for j in range(i, len(body) + 1):
                self.assertEqual(feed_in_pieces(body, [i, j]), whole, (i, j))

    @settings(max_examples=150, deadline=None)
    @given(CRLF_BODIES, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
    def test_round_trip_through_data_reader(self, body: bytes, cuts: list[int]) -> None:
        """A CRLF body in any chunking comes back byte-exact from the server's DataReader."""
        wire = feed_in_pieces(body, cuts)
        message, reader, rest = unstuff(wire)
        self.assertEqual(rest, b"")
        self.assertEqual(message, body)
        self.assertEqual((reader.bare_cr, reader.bare_lf), (0, 0))

    @settings(max_examples=150, deadline=None)
    @given(ANY_BODIES, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
    def test_any_body_is_safe(self, body: bytes, cuts: list[int]) -> None:
        """Any bytes in any chunking: same as whole, no early "." line, no bare CR/LF."""
        wire = feed_in_pieces(body, cuts)
        self.assertEqual(wire, stuff(body))
        lines = wire.split(b"\r\n")
        self.assertEqual(lines[-2:], [b".", b""])
        self.assertNotIn(b".", lines[:-2])
        message, reader, rest = unstuff(wire)
        self.assertEqual(rest, b"")
        self.assertEqual(message, normalise(body))
        self.assertEqual((reader.bare_cr, reader.bare_lf), (0, 0))
