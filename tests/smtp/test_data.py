"""Tests for haraka_tw.smtp.data: the streaming, smuggling-safe DATA reader."""

from __future__ import annotations

import gc
import itertools
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haraka_tw.smtp.data import BareNewline, DataReader

REJECT = BareNewline.REJECT
NORMALISE = BareNewline.NORMALISE


@dataclass
class Run:
    """What a reader produced: sink output, leftover (None if unfinished) and the reader."""

    out: bytes
    leftover: bytes | None
    reader: DataReader
    pieces: int

    def state(self) -> tuple[object, ...]:
        r = self.reader
        return (r.finished, r.size, r.exceeded, r.bare_lf, r.bare_cr, r.long_lines)


def run(chunks: Sequence[bytes], **kwargs: object) -> Run:
    """Feed ``chunks`` in order until the reader finishes; unfed chunks join the leftover."""
    pieces: list[bytes] = []
    reader = DataReader(pieces.append, **kwargs)  # type: ignore[arg-type]
    leftover = None
    for i, chunk in enumerate(chunks):
        leftover = reader.feed(chunk)
        if leftover is not None:
            leftover += b"".join(chunks[i + 1 :])
            break
    return Run(b"".join(pieces), leftover, reader, len(pieces))


def split_at(data: bytes, points: Sequence[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (clamped, sorted, duplicates give empty chunks)."""
    cuts = sorted(min(p, len(data)) for p in points)
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def stuff(body_lines: Sequence[bytes]) -> bytes:
    """Dot-stuff CRLF lines as a sending client does."""
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in body_lines
    )


def oracle(
    raw: bytes, *, bare_newline: BareNewline = REJECT, max_line_length: int = 992
) -> tuple[bytes, bytes, int, int, int, bool] | None:
    """A slow line-at-a-time model of the reader: (out, leftover, size, bare_lf, bare_cr, long)."""
    if raw.startswith(b".\r\n"):
        end = 0
    else:
        found = raw.find(b"\r\n.\r\n")
        if found < 0:
            return None
        end = found + 2
    lines = raw[:end].split(b"\r\n")[:-1]
    out_lines: list[bytes] = []
    bare_lf = bare_cr = 0
    long_lines = False
    for line in lines:
        line = line.removeprefix(b".")
        bare_lf += line.count(b"\n")
        bare_cr += line.count(b"\r")
        parts = re.split(rb"\r|\n", line) if bare_newline is NORMALISE else [line]
        for part in parts:
            limit = max_line_length
            if limit and len(part) > limit:
                long_lines = True
                out_lines.append(part[:limit])
                part = part[limit:]
                while len(part) > limit - 1:
                    out_lines.append(b" " + part[: limit - 1])
                    part = part[limit - 1 :]
                part = b" " + part
            out_lines.append(part)
    out = b"".join(line + b"\r\n" for line in out_lines)
    return out, raw[end + 3 :], end, bare_lf, bare_cr, long_lines


# -- terminator -----------------------------------------------------------------------------


def test_simple_message() -> None:
    """A body followed by CRLF.CRLF ends; the sink gets the body, feed returns the rest."""
    r = run([b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"])
    assert r.out == b"Subject: x\r\n\r\nhello\r\n"
    assert r.leftover == b"QUIT\r\n"
    assert r.reader.finished
    assert r.reader.size == len(b"Subject: x\r\n\r\nhello\r\n")


def test_empty_message() -> None:
    """`.CRLF` at the very start is an empty message."""
    r = run([b".\r\nQUIT\r\n"])
    assert (r.out, r.leftover, r.reader.size, r.pieces) == (b"", b"QUIT\r\n", 0, 0)


def test_leftover_empty() -> None:
    """Nothing after the terminator gives b"", not None."""
    assert run([b"a\r\n.\r\n"]).leftover == b""


def test_unfinished_returns_none() -> None:
    """feed returns None while the message continues."""
    reader = DataReader(lambda _: None)
    assert reader.feed(b"a\r\nb\r\n") is None
    assert not reader.finished


def test_feed_after_finish_raises() -> None:
    """Feeding a finished reader is a RuntimeError."""
    reader = DataReader(lambda _: None)
    assert reader.feed(b".\r\n") == b""
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_finished_reader_lets_go_of_its_sink() -> None:
    """At the terminator the reader drops its sink, so its holder is freed without the collector."""

    class Holder:
        def __init__(self) -> None:
            self.got: list[bytes] = []
            self.reader = DataReader(self.sink)

        def sink(self, data: bytes) -> None:
            self.got.append(data)

    holder = Holder()
    assert holder.reader.feed(b"a\r\n") is None
    assert holder.reader.feed(b".\r\n") == b""
    assert holder.got == [b"a\r\n"]
    gone = weakref.ref(holder)
    gc.disable()
    try:
        del holder
        assert gone() is None
    finally:
        gc.enable()


def test_pipelined_commands_after_terminator_untouched() -> None:
    """Bytes after the terminator are returned verbatim, even a second terminator."""
    r = run([b"a\r\n.\r\nMAIL FROM:<a@b>\r\n.\r\n..\r\n"])
    assert r.leftover == b"MAIL FROM:<a@b>\r\n.\r\n..\r\n"


@pytest.mark.parametrize(
    "shape",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\rX", b"\r.\r\n", b"\n.\r", b"\r\n. \r\n"],
)
@pytest.mark.parametrize("policy", [REJECT, NORMALISE])
def test_smuggling_shapes_do_not_end(shape: bytes, policy: BareNewline) -> None:
    """Each smuggling shape inside a body leaves the message open; the real end is later."""
    body = b"x" + shape + b"MAIL FROM:<evil@example.com>\r\n"
    raw = body + b".\r\n"
    for chunks in ([raw], [bytes([b]) for b in raw]):
        r = run(chunks, bare_newline=policy)
        assert r.leftover == b""
        assert r.reader.size == len(body)
        assert r.out == oracle(raw, bare_newline=policy)[0]  # type: ignore[index]


@pytest.mark.parametrize("shape", [b"\n.\n", b"\n.\r\n", b"\r\n.\n"])
def test_smuggling_shape_at_start(shape: bytes) -> None:
    """A smuggling shape at the very start of the body does not end it either."""
    r = run([shape + b"x\r\n.\r\n"])
    assert r.reader.size == len(shape) + 3
    assert r.leftover == b""


def test_dot_lf_at_start_does_not_end() -> None:
    """`.LF` as the first line is not a terminator."""
    r = run([b".\nrest\r\n.\r\n"])
    assert r.out == b"\nrest\r\n"
    assert r.reader.bare_lf == 1


@pytest.mark.parametrize("policy", [REJECT, NORMALISE])
def test_terminator_split_everywhere(policy: BareNewline) -> None:
    """The terminator is found when split across chunks at every byte."""
    raw = b"line one\r\nline two\r\n.\r\nNOOP\r\n"
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            r = run([raw[:i], raw[i:j], raw[j:]], bare_newline=policy)
            assert (r.out, r.leftover) == (b"line one\r\nline two\r\n", b"NOOP\r\n")


# -- dot-unstuffing -------------------------------------------------------------------------


def test_unstuffing() -> None:
    """A leading dot is removed from every line, including the first."""
    r = run([b"..first\r\nmid\r\n..\r\n...x\r\n.y\r\n.\r\n"])
    assert r.out == b".first\r\nmid\r\n.\r\n..x\r\ny\r\n"


def test_unstuffing_only_at_crlf_line_start() -> None:
    """A dot after a bare LF is not at a line start and is kept."""
    assert run([b"a\n..b\r\n.\r\n"]).out == b"a\n..b\r\n"


def test_unstuffing_not_after_bare_newline_when_normalising() -> None:
    """Normalising does not unstuff a dot that followed a bare LF in the raw stream."""
    assert run([b"a\n..b\r\n.\r\n"], bare_newline=NORMALISE).out == b"a\r\n..b\r\n"


def test_unstuffing_across_chunks() -> None:
    """A stuffed dot right after a chunk boundary is still removed."""
    assert run([b"a\r\n", b"..b\r\n", b".", b".\r\n.\r\n"]).out == b"a\r\n.b\r\n.\r\n"


def test_dot_mid_line_at_chunk_start_kept() -> None:
    """A dot that starts a chunk but not a line is kept."""
    assert run([b"ab", b".c\r\n.\r\n"]).out == b"ab.c\r\n"


# -- bare CR / LF ---------------------------------------------------------------------------


def test_bare_newlines_counted_and_passed_through() -> None:
    """REJECT counts bare LF and CR and passes the bytes unchanged."""
    r = run([b"a\nb\rc\r\r\n\n\r\n.\r\n"])
    assert (r.reader.bare_lf, r.reader.bare_cr) == (2, 2)
    assert r.out == b"a\nb\rc\r\r\n\n\r\n"


def test_bare_newlines_normalised() -> None:
    """NORMALISE counts them and turns each bare LF / bare CR into CRLF."""
    r = run([b"a\nb\rc\r\r\n\n\r\n.\r\n"], bare_newline=NORMALISE)
    assert (r.reader.bare_lf, r.reader.bare_cr) == (2, 2)
    assert r.out == b"a\r\nb\r\nc\r\n\r\n\r\n\r\n"


def test_cr_at_chunk_end_decided_by_next_chunk() -> None:
    """A CR ending a chunk is bare or not depending on the next chunk's first byte."""
    assert run([b"a\r", b"\nb\r\n.\r\n"]).reader.bare_cr == 0
    r = run([b"a\r", b"b\r\n.\r\n"], bare_newline=NORMALISE)
    assert r.reader.bare_cr == 1
    assert r.out == b"a\r\nb\r\n"


def test_lf_at_chunk_start_after_crlf_is_bare() -> None:
    """An LF starting a chunk after a complete CRLF is bare."""
    assert run([b"a\r\n", b"\nb\r\n.\r\n"]).reader.bare_lf == 1


def test_normalised_dot_line_does_not_end() -> None:
    """A "." line formed by normalising bare LFs neither ends the message nor is unstuffed."""
    r = run([b"a\n.\nb\r\n.\r\nNOOP\r\n"], bare_newline=NORMALISE)
    assert r.out == b"a\r\n.\r\nb\r\n"
    assert r.leftover == b"NOOP\r\n"


# -- long lines -----------------------------------------------------------------------------


def test_long_line_wrapped() -> None:
    """A line over the limit is wrapped with CRLF SP so no output line exceeds it."""
    r = run([b"abcdefghij\r\nok\r\n.\r\n"], max_line_length=4)
    assert r.out == b"abcd\r\n efg\r\n hij\r\nok\r\n"
    assert r.reader.long_lines


def test_line_at_limit_not_wrapped() -> None:
    """A line of exactly max_line_length bytes is left alone."""
    r = run([b"abcd\r\n.\r\n"], max_line_length=4)
    assert r.out == b"abcd\r\n"
    assert not r.reader.long_lines


def test_long_line_wrapped_across_chunks() -> None:
    """Wrapping counts the column across chunk boundaries."""
    r = run([b"ab", b"cd", b"ef\r\n.\r\n"], max_line_length=4)
    assert r.out == b"abcd\r\n ef\r\n"


def test_wrapping_measures_unstuffed_line() -> None:
    """The stuffed dot does not count towards the line length."""
    assert run([b"..abc\r\n.\r\n"], max_line_length=4).out == b".abc\r\n"


def test_default_limit_992() -> None:
    """The default limit is 992 bytes, Haraka's max.data_line_length."""
    r = run([b"x" * 993 + b"\r\n" + b"y" * 992 + b"\r\n.\r\n"])
    assert r.out == b"x" * 992 + b"\r\n x\r\n" + b"y" * 992 + b"\r\n"
    assert r.reader.long_lines


def test_wrapping_disabled() -> None:
    """max_line_length=0 disables wrapping."""
    r = run([b"x" * 5000 + b"\r\n.\r\n"], max_line_length=0)
    assert r.out == b"x" * 5000 + b"\r\n"
    assert not r.reader.long_lines


@pytest.mark.parametrize("bad", [1, -1])
def test_bad_line_limit(bad: int) -> None:
    """A line limit of 1 (no room after the SP) or negative is refused."""
    with pytest.raises(ValueError):
        DataReader(lambda _: None, max_line_length=bad)


def test_negative_max_bytes() -> None:
    """A negative max_bytes is refused."""
    with pytest.raises(ValueError):
        DataReader(lambda _: None, max_bytes=-1)


# -- size -----------------------------------------------------------------------------------


def test_size_counts_raw_bytes() -> None:
    """size counts the raw body including stuffing, excluding the terminator."""
    r = run([b"..a\r\n.\r\n"])
    assert r.reader.size == 5
    assert r.out == b".a\r\n"


def test_max_bytes_stops_sink_but_finds_end() -> None:
    """Over max_bytes the sink stops, the reader keeps scanning and finds the end."""
    line = b"x" * 98 + b"\r\n"
    chunks = [line] * 50 + [b".\r\nQUIT\r\n"]
    r = run(chunks, max_bytes=1000)
    assert r.reader.exceeded
    assert r.reader.size == 5000
    assert r.out == line * 10
    assert r.leftover == b"QUIT\r\n"


def test_max_bytes_exactly_not_exceeded() -> None:
    """A message of exactly max_bytes is not over the limit."""
    r = run([b"x" * 8 + b"\r\n.\r\n"], max_bytes=10)
    assert not r.reader.exceeded
    assert r.out == b"x" * 8 + b"\r\n"


def test_max_bytes_memory_bounded() -> None:
    """Past the limit the reader holds at most a couple of bytes between feeds."""
    reader = DataReader(lambda _: None, max_bytes=10)
    for _ in range(100):
        reader.feed(b"y" * 1000 + b"\r")
        assert len(reader._held) <= 2
    assert reader.exceeded


def test_huge_line_memory_bounded() -> None:
    """A line with no CRLF at all is streamed, not accumulated."""
    pieces: list[bytes] = []
    reader = DataReader(pieces.append, max_line_length=0)
    for _ in range(100):
        reader.feed(b"z" * 1000)
    assert len(reader._held) == 0
    assert sum(map(len, pieces)) == 100_000


# -- properties -----------------------------------------------------------------------------

_token = st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b" ", b"..", b"\r\n.", b".\r\n"])
_tokens = st.lists(_token, max_size=30).map(b"".join)
_wild = st.one_of(_tokens, st.binary(max_size=60))
_line = st.one_of(
    st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b" "]), max_size=8).map(b"".join),
    st.binary(max_size=20),
).filter(lambda line: b"\r\n" not in line)
_splits = st.lists(st.integers(min_value=0, max_value=400), max_size=8)
_limits = st.sampled_from([0, 2, 3, 7, 992])
_policies = st.sampled_from([REJECT, NORMALISE])


@settings(max_examples=150, deadline=None)
@given(st.lists(_line, max_size=12), st.binary(max_size=20), _splits, st.booleans())
def test_stuffed_body_round_trips(
    lines: list[bytes], trailing: bytes, points: list[int], bytewise: bool
) -> None:
    """A stuffed, terminated body fed in any chunking gives back the body and the trailer."""
    body = b"".join(line + b"\r\n" for line in lines)
    raw = stuff(lines) + b".\r\n" + trailing
    chunks = [bytes([b]) for b in raw] if bytewise else split_at(raw, points)
    r = run(chunks, max_line_length=0)
    assert r.out == body
    assert r.leftover == trailing
    assert r.reader.size == len(stuff(lines))


@settings(max_examples=200, deadline=None)
@given(_wild, _splits, _limits, _policies, st.sampled_from([0, 5, 17]))
def test_chunking_does_not_change_results(
    raw: bytes, points: list[int], limit: int, policy: BareNewline, max_bytes: int
) -> None:
    """Any chunking gives the same output, leftover and counters as feeding it whole."""
    kwargs: dict[str, object] = {
        "max_line_length": limit,
        "bare_newline": policy,
        "max_bytes": max_bytes,
    }
    whole = run([raw], **kwargs)
    for chunks in (split_at(raw, points), [bytes([b]) for b in raw]):
        parts = run(chunks, **kwargs)
        assert parts.state() == whole.state()
        assert parts.leftover == whole.leftover
        if max_bytes == 0:
            assert parts.out == whole.out
        else:
            # once over the limit the sink holds an incomplete prefix, cut where a chunk ended
            unlimited = run([raw], max_line_length=limit, bare_newline=policy)
            assert unlimited.out.startswith(parts.out)
            if not whole.reader.exceeded:
                assert parts.out == unlimited.out


@settings(max_examples=200, deadline=None)
@given(_wild, _limits, _policies)
def test_matches_line_model(raw: bytes, limit: int, policy: BareNewline) -> None:
    """The bulk reader agrees with a slow line-at-a-time model on terminated input."""
    raw = raw + b"\r\n.\r\n"
    expected = oracle(raw, bare_newline=policy, max_line_length=limit)
    r = run([raw], bare_newline=policy, max_line_length=limit)
    assert expected is not None
    out, leftover, size, bare_lf, bare_cr, long_lines = expected
    assert r.out == out
    assert r.leftover == leftover
    assert (r.reader.size, r.reader.bare_lf, r.reader.bare_cr) == (size, bare_lf, bare_cr)
    assert r.reader.long_lines == long_lines
    if limit:
        assert all(len(line) <= limit for line in r.out.split(b"\r\n"))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(_line, max_size=6),
    st.sampled_from([b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n"]),
    st.binary(max_size=10),
    _splits,
    _policies,
)
def test_smuggling_shapes_never_end(
    lines: list[bytes], shape: bytes, after: bytes, points: list[int], policy: BareNewline
) -> None:
    """A smuggling shape placed in a body after a non-CR byte never ends the message early."""
    head = stuff(lines) + b"x" + shape
    if head.endswith(b"\r") and after.startswith(b"\n"):
        after = after[1:]
    body = head + after.replace(b"\r\n.\r\n", b"") + b"\r\n"
    if body.startswith(b".\r\n") or b"\r\n.\r\n" in body:
        return  # the shape completed a real terminator with its neighbours
    raw = body + b".\r\nTAIL"
    r = run(split_at(raw, points), bare_newline=policy, max_line_length=0)
    assert r.leftover == b"TAIL"
    assert r.reader.size == len(body)
