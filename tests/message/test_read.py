"""Tests for haraka_tw.message.read: a stored message read back with Haraka's options."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haraka_tw.message.header import Header
from haraka_tw.message.read import LineFormatter, format_chunks, read_message
from haraka_tw.message.stream import MessageStream
from haraka_tw.smtp.data import DataReader


def stream_of(header: bytes, body: bytes, tmp_path: Path | None = None) -> MessageStream:
    """A message stream holding ``body``; spooled from the first byte when given a dir."""
    spool = str(tmp_path) if tmp_path is not None else None
    s = MessageStream(Header.parse(header), spool, 0 if tmp_path is not None else -1)
    s.write(body)
    return s


def split_at(data: bytes, points: Sequence[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (clamped and sorted)."""
    cuts = sorted(min(p, len(data)) for p in points)
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


def unstuff(wire: bytes) -> bytes:
    """What a receiving server stores of ``wire`` (DATA with its end-of-data line)."""
    pieces: list[bytes] = []
    reader = DataReader(pieces.append, max_line_length=0)
    assert reader.feed(wire) == b""
    return b"".join(pieces)


def test_default_is_the_message_as_stored() -> None:
    """With no options the current header and the body come back unchanged."""
    s = stream_of(b"Subject: x\r\n", b"\r\n.hello\r\nworld\r\n")
    s.header.add("Received", "by me")
    assert b"".join(read_message(s)) == s.get_bytes()


def test_lf_line_endings() -> None:
    """line_endings="\\n" turns every CRLF into LF, header included."""
    s = stream_of(b"Subject: x\r\nX: a\r\n b\r\n", b"\r\nline 1\r\nline 2\r\n")
    assert b"".join(read_message(s, line_endings="\n")) == (
        b"Subject: x\nX: a\n b\n\nline 1\nline 2\n"
    )


def test_dot_stuffing_and_ending_dot() -> None:
    """Lines starting with "." get another; the ending dot line is appended."""
    s = stream_of(b"Subject: x\r\n", b"\r\n.\r\n..two\r\nmid.dle\r\n.")
    out = b"".join(read_message(s, dot_stuffed=True, ending_dot=True))
    assert out == b"Subject: x\r\n\r\n..\r\n...two\r\nmid.dle\r\n..\r\n.\r\n"


def test_first_line_is_stuffed() -> None:
    """The very first line of the output is dot-stuffed too."""
    out = b"".join(format_chunks([b".first\r\n", b".second"], dot_stuffed=True))
    assert out == b"..first\r\n..second"


def test_ending_dot_with_lf() -> None:
    """With "\\n" line endings the ending dot is ".\\n"; an empty message is just the dot."""
    assert b"".join(format_chunks([b"a\r\n"], line_endings="\n", ending_dot=True)) == b"a\n.\n"
    assert b"".join(format_chunks([], ending_dot=True)) == b".\r\n"


def test_bare_lf_becomes_crlf() -> None:
    """A bare LF is written as CRLF when the output wants CRLF; a bare CR is left alone."""
    out = b"".join(format_chunks([b"a\nb\r\nc\rd\n"]))
    assert out == b"a\r\nb\r\nc\rd\r\n"


def test_crlf_and_dot_split_across_chunks() -> None:
    """A CRLF split over two chunks, then a "." starting the next line, is stuffed once."""
    out = b"".join(format_chunks([b"a\r", b"\n", b".b\r", b"\n.", b"c"], dot_stuffed=True))
    assert out == b"a\r\n..b\r\n..c"
    lf = b"".join(format_chunks([b"a\r", b"\n", b"b\r"], line_endings="\n"))
    assert lf == b"a\nb\r"


def test_large_pieces_are_cut_to_chunk_size() -> None:
    """An input piece larger than chunk_size comes out in pieces of about that size."""
    body = b"\r\n" + b"x" * 9000 + b"\r\n"
    out = list(read_message(stream_of(b"A: b\r\n", body), chunk_size=1000))
    assert max(len(o) for o in out) <= 1000
    assert b"".join(out) == b"A: b\r\n" + body


def test_spooled_stream(tmp_path: Path) -> None:
    """A spooled body reads back the same, dot-stuffed, through DataReader to the original."""
    body = b"\r\n" + b"".join(b".%d\r\n" % i for i in range(5000))
    s = stream_of(b"Subject: spooled\r\n", body, tmp_path)
    assert s.spooled
    wire = b"".join(read_message(s, dot_stuffed=True, ending_dot=True, chunk_size=777))
    assert unstuff(wire) == s.get_bytes()
    s.close()


def test_bad_options() -> None:
    """Unknown line endings or a non-positive chunk size are refused."""
    with pytest.raises(ValueError):
        LineFormatter(line_endings="\r")
    with pytest.raises(ValueError):
        list(format_chunks([b"x"], chunk_size=0))


def test_formatter_after_close() -> None:
    """close() is idempotent; feeding after it is an error."""
    f = LineFormatter(ending_dot=True)
    assert f.feed(b"x\r") == b"x"
    assert f.close() == b"\r\r\n.\r\n"
    assert f.close() == b""
    with pytest.raises(RuntimeError):
        f.feed(b"y")


_line = st.one_of(
    st.lists(st.sampled_from([b".", b"..", b"a", b" ", b"\r"]), max_size=6).map(b"".join),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
).filter(lambda line: not line.endswith(b"\r"))
_points = st.lists(st.integers(min_value=0, max_value=300), max_size=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(_line, max_size=15), _points)
def test_dot_stuffing_round_trips_through_data_reader(
    lines: list[bytes], points: list[int]
) -> None:
    """Stuffed output with the ending dot, read by DataReader, gives back the message."""
    message = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join(format_chunks(split_at(message, points), dot_stuffed=True, ending_dot=True))
    assert unstuff(wire) == message


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=200).map(lambda b: b.replace(b"x", b"\r\n").replace(b"y", b".")),
    _points,
    st.sampled_from(["\r\n", "\n"]),
    st.booleans(),
    st.booleans(),
    st.integers(min_value=1, max_value=64),
)
def test_chunking_never_matters(
    data: bytes, points: list[int], endings: str, stuffed: bool, dot: bool, size: int
) -> None:
    """Any chunking and chunk size give the same bytes as formatting the message whole."""
    options = {"line_endings": endings, "dot_stuffed": stuffed, "ending_dot": dot}
    whole = b"".join(format_chunks([data], **options))  # type: ignore[arg-type]
    parts = format_chunks(split_at(data, points), chunk_size=size, **options)  # type: ignore[arg-type]
    assert b"".join(parts) == whole


@settings(max_examples=100, deadline=None)
@given(st.lists(_line, max_size=15), _points)
def test_lf_output_is_crlf_output_without_cr(lines: list[bytes], points: list[int]) -> None:
    """The "\\n" form is the "\\r\\n" form with each CRLF made LF."""
    message = b"".join(line + b"\r\n" for line in lines)
    lf = b"".join(format_chunks(split_at(message, points), line_endings="\n", dot_stuffed=True))
    crlf = b"".join(format_chunks([message], dot_stuffed=True))
    assert lf == crlf.replace(b"\r\n", b"\n")
