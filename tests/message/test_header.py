"""The message header: byte-exact fields, folding, add/remove, and the streaming collector."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from haraka_tw.message.header import Header, HeaderCollector

RAW = (
    b"Subject: hello\r\n"
    b"Received: from a\r\n\tby b\r\n"
    b"Received: from c\r\n"
    b"To: =?utf-8?q?J=C3=B6rg?= <j@x>\r\n"
)


def test_untouched_header_is_byte_exact() -> None:
    """An untouched header serialises to exactly the bytes received."""
    assert Header.parse(RAW).to_bytes() == RAW


def test_get_unfolds_and_joins() -> None:
    """get() unfolds continuation lines and joins repeated fields with newlines."""
    h = Header.parse(RAW)
    assert h.get_all("received") == ["from a\tby b", "from c"]
    assert h.get("Received") == "from a\tby b\nfrom c"
    assert h.get("Missing") == ""
    assert "subject" in h and "Cc" not in h
    assert (h.count("RECEIVED"), h.count("Subject"), h.count("Cc")) == (2, 1, 0)


def test_get_decoded() -> None:
    """get_decoded() decodes RFC 2047 encoded words."""
    assert Header.parse(RAW).get_decoded("To") == "J\u00f6rg <j@x>"


def test_add_remove_rename() -> None:
    """add puts a field on top, add_end at the bottom, remove drops all of a name."""
    h = Header.parse(RAW)
    h.add("X-Top", "1")
    h.add_end("X-End", "2")
    h.remove("received")
    h.rename("Subject", "Old-Subject")
    assert h.to_bytes() == (
        b"X-Top: 1\r\nOld-Subject: hello\r\nTo: =?utf-8?q?J=C3=B6rg?= <j@x>\r\nX-End: 2\r\n"
    )


def test_remove_one_and_insert_as_a_milter_counts() -> None:
    """remove(name, which) drops only the field it names (1 the first, -1 the last, none
    past the count); insert(index, ...) puts a field at that place of the whole header
    (0 the top, past the end the bottom)."""
    h = Header.parse(b"A: 1\r\nB: x\r\nA: 2\r\nA: 3\r\n")
    h.remove("a", 1)
    h.remove("A", -1)
    h.remove("a", 5)
    h.remove("a", -5)
    assert h.to_bytes() == b"B: x\r\nA: 2\r\n"
    h.insert(0, "Top", "t")
    h.insert(2, "Mid", "m")
    h.insert(99, "End", "e")
    assert h.to_bytes() == b"Top: t\r\nB: x\r\nMid: m\r\nA: 2\r\nEnd: e\r\n"


def test_replace_first_and_fields() -> None:
    """replace_first changes the topmost field of a name in its place (adding one on top
    when there is none); fields() gives every field's raw bytes, top first."""
    h = Header.parse(b"A: 1\r\nB: x\r\n  folded\r\nA: 2\r\n")
    assert h.fields() == [("a", b"A: 1\r\n"), ("b", b"B: x\r\n  folded\r\n"), ("a", b"A: 2\r\n")]
    h.replace_first("a", "one")
    h.replace_first("C", "new")
    assert h.to_bytes() == b"C: new\r\na: one\r\nB: x\r\n  folded\r\nA: 2\r\n"


def test_added_value_cannot_inject_fields() -> None:
    """A newline inside an added value continues the field; it never starts a new one."""
    h = Header()
    h.add("X-Note", "a\r\nBcc: victim@x\nmore")
    assert h.to_bytes() == b"X-Note: a\r\n Bcc: victim@x\r\n more\r\n"
    assert "Bcc" not in h


def test_collector_finds_blank_line_across_chunks() -> None:
    """The collector splits header from body wherever the chunks break."""
    message = b"A: 1\r\nB: 2\r\n\r\nbody\r\n"
    for cut in range(1, len(message)):
        c = HeaderCollector()
        got = c.feed(message[:cut])
        # Once the header has ended, later chunks are body and go past the collector.
        got = (got[0], got[1] + message[cut:]) if got else c.feed(message[cut:])
        assert got == (b"A: 1\r\nB: 2\r\n", b"\r\nbody\r\n"), cut


def test_collector_non_header_line_starts_body() -> None:
    """A line that is not a field ends the header; it belongs to the body."""
    c = HeaderCollector()
    assert c.feed(b"A: 1\r\nnot a header\r\nrest") == (b"A: 1\r\n", b"not a header\r\nrest")


def test_space_before_the_colon_is_still_a_field() -> None:
    """RFC 5322's obsolete syntax (a space or tab before the colon) is a field, named
    without the space: it neither ends the header nor escapes renaming and counting."""
    raw = b"Authentication-Results : evil; dkim=pass\r\nReceived\t: x\r\nSubject: s\r\n"
    c = HeaderCollector()
    assert c.feed(raw + b"\r\nbody\r\n") == (raw, b"\r\nbody\r\n")
    header = Header.parse(raw)
    assert header.count("Received") == 1
    assert header.names() == ["Authentication-Results", "Received", "Subject"]
    header.rename("Authentication-Results", "Original-Authentication-Results")
    assert header.to_bytes().startswith(b"Original-Authentication-Results: evil; dkim=pass\r\n")
    assert "Authentication-Results" not in header


def test_collector_limits() -> None:
    """After max_lines fields, or max_bytes, the rest is body: memory stays bounded."""
    c = HeaderCollector(max_lines=2)
    assert c.feed(b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n") == (b"A: 1\r\nB: 2\r\n", b"C: 3\r\n\r\n")
    c = HeaderCollector(max_bytes=100)
    head, body = c.feed(b"A: " + b"x" * 200) or (b"", b"")
    assert head == b"" and len(body) == 203


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_collector_chunking_independent(data: bytes, step: int) -> None:
    """Feeding in any chunking gives the same split as feeding whole; nothing is lost."""
    whole = HeaderCollector()
    expect = whole.feed(data) or whole.finish()
    c = HeaderCollector()
    got = None
    for i in range(0, len(data), step):
        got = got or c.feed(data[i : i + step])
        if got:
            rest = data[i + step :]
            got = (got[0], got[1] + rest)
            break
    got = got or c.finish()
    assert got == expect
    assert got[0] + got[1] == data


class _LineByLine(HeaderCollector):
    """The collector with its fast path off: each feed scanned line by line."""

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        self._buf += data
        return self._scan_lines(self._scanned)


_HEADERISH = st.lists(
    st.sampled_from([b"A: 1\r\n", b"Bb:\n", b" cont\r\n", b"\tx\r\n", b"\r\n", b"\n", b"no\r\n"])
    | st.binary(max_size=12),
    max_size=12,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(
    _HEADERISH,
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=4, max_value=80),
)
def test_collector_fast_path_is_the_line_rule(
    data: bytes, step: int, max_lines: int, max_bytes: int
) -> None:
    """The whole-block scan splits as the line-by-line rule does, limits and chunks alike."""
    splits = []
    for collector in (
        HeaderCollector(max_lines, max_bytes),
        _LineByLine(max_lines, max_bytes),
    ):
        got = None
        for i in range(0, len(data), step):
            got = collector.feed(data[i : i + step])
            if got:
                got = (got[0], got[1] + data[i + step :])
                break
        splits.append(got or collector.finish())
    assert splits[0] == splits[1]


_RAW_HEADERS = st.lists(
    st.sampled_from(
        [
            b"Received: a\r\n",
            b"received :b\r\n",
            b"RECEIVED\r\n :c\r\n",
            b"Authentication-Results: x\r\n",
            b"Subject: hi\r\n",
            b" folded\r\n",
            b"\tfolded\r\n",
            b"X-\xe2\x84\xaa: kelvin sign\r\n",
            b"bare\rcr: y\r\n",
            b"Received\r\n",
        ]
    )
    | st.binary(max_size=10),
    max_size=8,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(_RAW_HEADERS, st.sampled_from(["Received", "authentication-results", "X-K", "Subject"]))
def test_header_split_late_answers_as_split_at_once(raw: bytes, name: str) -> None:
    """A header split only when asked gives what one split at parse time gives."""
    late, early = Header.parse(raw), Header.parse(raw)
    assert early.names() is not None  # (split now)
    for h in (late, early):
        h.rename("Authentication-Results", "Original-Authentication-Results")
        h.add("Received", "from a\nby b")
    assert late.count(name) == early.count(name)
    assert late.to_bytes() == early.to_bytes()
    assert late.get_all(name) == early.get_all(name)
    assert late.names() == early.names()
    assert late.to_bytes() == early.to_bytes()
    # Added on top while unsplit, then changed in ways that need the split.
    for ops in (("add_end",), ("remove",), ("len",)):
        late, early = Header.parse(raw), Header.parse(raw)
        early.names()
        for h in (late, early):
            h.add("X-Top", "1")
            if ops[0] == "add_end":
                h.add_end("X-End", "2")
            elif ops[0] == "remove":
                h.remove(name)
        assert len(late) == len(early), ops
        assert late.to_bytes() == early.to_bytes(), ops


def test_added_field_value_folds_every_line() -> None:
    """Each line of an added value continues the field: CR, LF or CRLF cannot start one."""
    h = Header()
    h.add("X-A", "one\ntwo\r\n\tthree\rfour\n")
    assert h.to_bytes() == b"X-A: one\r\n two\r\n\tthree\r\n four\r\n \r\n"
