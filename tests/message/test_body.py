"""Tests for haraka_tw.message.body: the streaming MIME parser, attachments and rewriting."""

from __future__ import annotations

import base64
import email
import hashlib
import itertools
import re
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from email import policy
from email.message import EmailMessage, Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haraka_tw.message.body import (
    AttachmentInfo,
    AttachmentSink,
    Banner,
    Body,
    BodyFilter,
    BodyParser,
    BodyRewriter,
    PartKind,
)
from haraka_tw.message.header import Header, HeaderCollector

# -- helpers ---------------------------------------------------------------------------------


class Capture:
    """An attachment hook that keeps every attachment's bytes and end-of-stream info."""

    def __init__(self) -> None:
        self.started: list[AttachmentInfo] = []
        self.data: list[bytearray] = []
        self.ended: list[AttachmentInfo] = []

    def __call__(self, info: AttachmentInfo) -> AttachmentSink:
        self.started.append(info)
        buf = bytearray()
        self.data.append(buf)
        capture = self

        class Sink:
            def data(self, chunk: bytes) -> None:
                assert chunk
                buf.extend(chunk)

            def end(self, info: AttachmentInfo) -> None:
                capture.ended.append(info)

        return Sink()

    def blobs(self) -> list[bytes]:
        return [bytes(b) for b in self.data]


def split_message(raw: bytes) -> tuple[Header, bytes]:
    """The top-level header and the body bytes, as the intake hands them over."""
    collector = HeaderCollector()
    split = collector.feed(raw)
    head, body = split if split is not None else collector.finish()
    return Header.parse(head), body


def split_at(data: bytes, points: Sequence[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (clamped and sorted)."""
    cuts = sorted(min(p, len(data)) for p in points)
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


def parse(
    raw: bytes, chunks: Iterable[bytes] | None = None, **kwargs: object
) -> tuple[BodyParser, Capture, bytes]:
    """Parse a whole message (header included); returns the parser, captures and output."""
    header, body = split_message(raw)
    capture = Capture()
    parser = BodyParser(header, attachment_hooks=[capture], **kwargs)  # type: ignore[arg-type]
    out = b"".join(parser.feed(c) for c in (chunks if chunks is not None else [body]))
    out += parser.close()
    return parser, capture, out


def parse_body(
    header: Header, chunks: Iterable[bytes], **kwargs: object
) -> tuple[BodyParser, Capture]:
    """Parse body ``chunks`` under ``header``; returns the parser and the captures."""
    capture = Capture()
    parser = BodyParser(header, attachment_hooks=[capture], **kwargs)  # type: ignore[arg-type]
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()
    return parser, capture


def snapshot(parser: BodyParser, capture: Capture) -> list[object]:
    """Everything the parser found, comparable between runs."""
    nodes: list[object] = [
        (
            b.depth,
            b.content_type,
            b.kind,
            b.charset,
            b.transfer_encoding,
            b.filename,
            b.bodytext,
            b.size,
            b.truncated,
            b.header.to_bytes(),
            len(b.children),
        )
        for b in parser.body.walk()
    ]
    ends = [(i.content_type, i.filename, i.size) for i in capture.ended]
    return [nodes, capture.blobs(), ends, parser.mime_part_count, parser.too_many_parts]


def rewrite(raw: bytes, chunks: Iterable[bytes] | None = None, **kwargs: object) -> bytes:
    """The message (header included) after a rewriter built from ``kwargs``."""
    header, body = split_message(raw)
    rewriter = BodyRewriter(**kwargs)  # type: ignore[arg-type]
    parser = BodyParser(header, rewriter=rewriter)
    out = b"".join(parser.feed(c) for c in (chunks if chunks is not None else [body]))
    out += parser.close()
    return header.to_bytes() + out


def reparse(raw: bytes) -> EmailMessage:
    """``raw`` as Python's email package reads it."""
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def content(part: Message) -> str:
    """A text part's content as the email package gives it, with LF line endings."""
    assert isinstance(part, EmailMessage)
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def decoded_text(part: Message) -> str:
    """A part's payload, transfer-decoded, then decoded with its charset."""
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "utf-8")


def agrees_with_email(raw: bytes, parser: BodyParser, capture: Capture) -> None:
    """Node by node, the tree matches what Python's email package makes of ``raw``."""
    ours = list(parser.body.walk())
    theirs = list(email.message_from_bytes(raw, policy=policy.compat32).walk())
    assert [b.content_type for b in ours] == [m.get_content_type() for m in theirs]
    blobs = iter(capture.blobs())
    for body, msg in zip(ours, theirs, strict=True):
        assert body.filename == msg.get_filename()
        if body.kind is PartKind.TEXT:
            assert body.bodytext == decoded_text(msg)
        elif body.kind is PartKind.ATTACHMENT:
            assert next(blobs) == msg.get_payload(decode=True)


def mixed_sample() -> bytes:
    """multipart/mixed: alternative (plain QP, html), a base64 attachment with a 2231 name."""
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["Subject"] = "sample"
    msg.set_content("Grüße aus Köln\n" + "long line " * 30 + "\n", cte="quoted-printable")
    msg.add_alternative("<html><body><p>Hi there</p></body></html>\n", subtype="html")
    msg.add_attachment(
        bytes(range(256)) * 40,
        maintype="application",
        subtype="pdf",
        filename="Résumé 2024.pdf",
    )
    return msg.as_bytes(policy=policy.SMTP)


ATTACHMENT_BYTES = bytes(range(256)) * 40
MIXED = mixed_sample()  # built once: its boundaries are random

# -- the tree --------------------------------------------------------------------------------


def test_multipart_mixed_tree() -> None:
    """A mixed message gives a tree of alternative (plain, html) and the attachment."""
    parser, _, out = parse(MIXED)
    root = parser.body
    assert root.content_type == "multipart/mixed" and root.kind is PartKind.MULTIPART
    alt, attachment = root.children
    assert alt.content_type == "multipart/alternative"
    plain, html = alt.children
    assert plain.bodytext.startswith("Grüße aus Köln\r\nlong line long line")
    assert plain.charset == "utf-8" and plain.transfer_encoding == "quoted-printable"
    assert html.is_html and not plain.is_html
    assert html.bodytext == "<html><body><p>Hi there</p></body></html>\r\n"
    assert attachment.is_attachment and attachment.filename == "Résumé 2024.pdf"
    assert attachment.size == len(ATTACHMENT_BYTES)
    assert parser.mime_part_count == 4
    assert out == split_message(MIXED)[1]  # no rewriter: bytes pass untouched


def test_attachment_hook_gets_decoded_bytes_and_size() -> None:
    """The attachment hook sees the info, then every decoded byte, then the final size."""
    _, capture, _ = parse(MIXED)
    assert [i.filename for i in capture.started] == ["Résumé 2024.pdf"]
    assert capture.started[0].content_type == "application/pdf"
    assert capture.blobs() == [ATTACHMENT_BYTES]
    assert capture.ended[0].size == len(ATTACHMENT_BYTES)


def test_agrees_with_email_package() -> None:
    """Content types, filenames, texts and attachment bytes match Python's email package."""
    raw = MIXED
    parser, capture, _ = parse(raw)
    agrees_with_email(raw, parser, capture)


def test_byte_by_byte_feed_gives_same_tree() -> None:
    """Feeding one byte at a time (every boundary split every way) changes nothing."""
    raw = MIXED
    _, body = split_message(raw)
    whole = snapshot(*parse(raw)[:2])
    bytewise = snapshot(*parse(raw, [bytes([b]) for b in body])[:2])
    assert bytewise == whole


def test_quoted_printable_soft_breaks() -> None:
    """Soft line breaks join lines, =XX escapes decode, in any chunking."""
    raw = (
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"caf=E9 au lait, tr=\r\n"
        b"=E8s bien=\r\n"
        b" =3D ok\r\n"
    )
    _, body = split_message(raw)
    for size in (1, 2, 3, 5, 100):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        parser = parse(raw, chunks)[0]
        assert parser.body.bodytext == "café au lait, très bien =3D ok\r\n".replace("=3D", "=")


def test_no_mime_at_all() -> None:
    """A message without MIME headers is one text/plain us-ascii part."""
    raw = b"Subject: plain\r\nFrom: a@b\r\n\r\nJust text.\r\n--not a boundary\r\n"
    parser, capture, _ = parse(raw)
    body = parser.body
    assert (body.content_type, body.kind, body.children) == ("text/plain", PartKind.TEXT, [])
    assert body.bodytext == "Just text.\r\n--not a boundary\r\n"
    assert body.charset is None and body.transfer_encoding == "7bit"
    assert parser.mime_part_count == 0 and capture.started == []


def test_body_without_blank_line() -> None:
    """When the header ended at a non-field line, the body starts at that line."""
    header = Header.parse(b"Subject: x\r\n")
    parser, _ = parse_body(header, [b"no blank line here\r\n"])
    assert parser.body.bodytext == "no blank line here\r\n"


def test_lf_only_message() -> None:
    """Bare LF line endings are understood as well as CRLF."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=XY\n\n"
        b"--XY\nContent-Type: text/plain\n\nhello\n--XY\n"
        b"Content-Type: application/x-thing\nContent-Transfer-Encoding: base64\n\nAAEC\n--XY--\n"
    )
    parser, capture, _ = parse(raw)
    assert [c.content_type for c in parser.body.children] == ["text/plain", "application/x-thing"]
    assert parser.body.children[0].bodytext == "hello"
    assert capture.blobs() == [b"\x00\x01\x02"]


MULTI = (
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"This is the preamble.\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain\r\n\r\n"
    b"one\r\n"
    b"--b1x not a delimiter\r\n"
    b"--b1 x not a delimiter either\r\n"
    b" --b1\r\n"
    b"--b1 \t\r\n"
    b"Content-Type: text/plain\r\n\r\n"
    b"two\r\n"
    b"--b1--\r\n"
    b"This is the epilogue.\r\n"
    b"--b1\r\n"
)


def test_preamble_epilogue_and_near_delimiters() -> None:
    """Preamble and epilogue are dropped; lines that only look like delimiters are content."""
    parser, _, _ = parse(MULTI)
    one, two = parser.body.children
    assert one.bodytext == (
        "one\r\n--b1x not a delimiter\r\n--b1 x not a delimiter either\r\n --b1"
    )
    assert two.bodytext == "two"
    assert parser.mime_part_count == 2


def test_missing_final_boundary() -> None:
    """Without a close delimiter the last part ends with the message; hooks still end."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n"
        b"--zz\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
        b"--zz\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"iVBORw0K\r\n"
    )
    parser, capture, _ = parse(raw)
    assert [c.content_type for c in parser.body.children] == ["text/plain", "image/png"]
    assert capture.blobs() == [b"\x89PNG\r\n"]
    assert capture.ended[0].size == 6


def test_multipart_without_boundary_is_text() -> None:
    """A multipart with no boundary parameter cannot be split: its content is kept as text."""
    raw = b"Content-Type: multipart/mixed\r\n\r\n--x\r\nhello\r\n"
    parser, _, _ = parse(raw)
    assert parser.body.kind is PartKind.TEXT and parser.body.bodytext == "--x\r\nhello\r\n"


def test_boundary_never_closed_in_nested_part() -> None:
    """An inner multipart left open is closed by the outer delimiter."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=out\r\n\r\n"
        b"--out\r\nContent-Type: multipart/alternative; boundary=in\r\n\r\n"
        b"--in\r\nContent-Type: text/plain\r\n\r\ninner\r\n"
        b"--out\r\nContent-Type: text/plain\r\n\r\nafter\r\n--out--\r\n"
    )
    parser, _, _ = parse(raw)
    alt, after = parser.body.children
    assert alt.children[0].bodytext == "inner"
    assert after.bodytext == "after"


def test_filename_from_rfc2047_name() -> None:
    """A Content-Type name in RFC 2047 encoded words is decoded."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b'Content-Type: application/octet-stream; name="=?utf-8?B?0L/RgNC40LLQtdGCLnR4dA==?="\r\n'
        b"\r\nbytes\r\n--q--\r\n"
    )
    _, capture, _ = parse(raw)
    assert capture.started[0].filename == "привет.txt"


def test_filename_rfc2231_continuations() -> None:
    """RFC 2231 continued, charset-tagged filenames are joined and decoded."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment;\r\n"
        b" filename*0*=utf-8''%E2%82%AC%20rate;\r\n"
        b' filename*1="s.xlsx"\r\n'
        b"\r\nbytes\r\n--q--\r\n"
    )
    _, capture, _ = parse(raw)
    assert capture.started[0].filename == "€ rates.xlsx"


def test_text_attachment_goes_to_hooks() -> None:
    """A text part with Content-Disposition: attachment is an attachment, not body text."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b"Content-Type: text/csv\r\nContent-Disposition: attachment; filename=a.csv\r\n"
        b"\r\na,b\r\n1,2\r\n--q--\r\n"
    )
    parser, capture, _ = parse(raw)
    assert parser.body.children[0].is_attachment
    assert capture.blobs() == [b"a,b\r\n1,2"]


def test_embedded_message() -> None:
    """A message/rfc822 part is parsed as a message: its header and its own parts."""
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner text\n")
    inner.add_attachment(b"\x00inner", maintype="application", subtype="zip", filename="i.zip")
    outer = EmailMessage()
    outer["Subject"] = "outer"
    outer.set_content("see below\n")
    outer.add_attachment(inner, disposition="inline")
    raw = outer.as_bytes(policy=policy.SMTP)
    parser, capture, _ = parse(raw)
    agrees_with_email(raw, parser, capture)
    message = parser.body.children[1]
    assert message.kind is PartKind.MESSAGE
    (embedded,) = message.children
    assert embedded.header.get("Subject") == "forwarded"
    assert embedded.embedded and all(b.embedded for b in embedded.walk())
    assert capture.blobs() == [b"\x00inner"]
    assert parser.mime_part_count == 5  # text, rfc822, embedded root, its text, its zip


def test_digest_parts_default_to_rfc822() -> None:
    """Parts of a multipart/digest without a Content-Type are messages."""
    raw = (
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
        b"--d\r\n\r\nSubject: one\r\n\r\nfirst\r\n--d--\r\n"
    )
    parser, _, _ = parse(raw)
    (part,) = parser.body.children
    assert part.content_type == "message/rfc822" and part.kind is PartKind.MESSAGE
    assert part.children[0].bodytext == "first"


def test_text_is_capped() -> None:
    """Text past text_limit is dropped and the part marked truncated; size counts it all."""
    raw = b"Content-Type: text/plain\r\n\r\n" + b"a" * 5000
    parser, _, _ = parse(raw, text_limit=1000)
    assert parser.body.bodytext == "a" * 1000
    assert parser.body.truncated and parser.body.size == 5000


def test_charsets() -> None:
    """Text is decoded with its charset; undecodable or unknown charsets fall back safely."""
    cases = [
        (b"iso-8859-1", b"caf\xe9", "café"),
        (b"us-ascii", "caf\u00e9".encode(), "café"),  # mislabelled UTF-8
        (b"x-unknown", b"plain", "plain"),
        (b"utf-8", b"bad \xff", "bad \ufffd"),
        (b"x-unknown", b"bad \xff", "bad \ufffd"),
    ]
    for charset, data, text in cases:
        raw = b"Content-Type: text/plain; charset=" + charset + b"\r\n\r\n" + data
        assert parse(raw)[0].body.bodytext == text


def test_base64_concatenated_and_junk() -> None:
    """Base64 with junk characters, split quanta and two padded runs decodes in full."""
    raw = (
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"QQ==\r\nQU*JD\r\nQkM\r\n"
    )
    _, body = split_message(raw)
    for size in (1, 2, 3, 7):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert parse(raw, chunks)[1].blobs() == [b"AABCBC"]


def test_quoted_printable_long_lines() -> None:
    """A QP line of any length decodes the same in any chunking, memory bounded."""
    raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    cases = [
        (b"=41" * 3000 + b"=\r\nz", "A" * 3000 + "z"),
        (b"a" * 4095 + b"=4" + b"1b", "a" * 4095 + "Ab"),
        (b"a" * 4094 + b"=\r\nb", "a" * 4094 + "b"),
    ]
    for content, text in cases:
        assert parse(raw + content)[0].body.bodytext == text
        for size in (1000, 4097, 333):
            chunks = [content[i : i + size] for i in range(0, len(content), size)]
            assert parse(raw + content, [b"\r\n", *chunks])[0].body.bodytext == text
    # nothing but "=" signs: garbage with no safe place to cut, still decoded piecewise
    garbage = [b"\r\n"] + [b"=" * 1000] * 9
    assert 0 < len(parse(raw, garbage)[0].body.bodytext) <= 9000


def test_delimiter_with_endless_padding_is_content() -> None:
    """A boundary followed by more than 1 KiB of spaces is not waited on forever."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=p\r\n\r\n--p\r\n\r\nstart\r\n--p"
        + b" " * 2000
        + b"x\r\n--p--\r\n"
    )
    _, body = split_message(raw)
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    parser = parse(raw, chunks)[0]
    assert parser.body.children[0].bodytext == "start\r\n--p" + " " * 2000 + "x"
    assert snapshot(*parse(raw)[:2]) == snapshot(*parse(raw, chunks)[:2])


# -- limits and plugin errors ----------------------------------------------------------------


def many_parts(n: int) -> bytes:
    """A multipart/mixed message of ``n`` small text parts."""
    parts = b"".join(b"--m\r\nContent-Type: text/plain\r\n\r\npart\r\n" for _ in range(n))
    return b"Content-Type: multipart/mixed; boundary=m\r\n\r\n" + parts + b"--m--\r\n"


def test_too_many_parts() -> None:
    """Past max_mime_parts the parser flags it, stops parsing, and bytes pass through."""
    raw = many_parts(10)
    _, body = split_message(raw)
    chunks = [body[i : i + 40] for i in range(0, len(body), 40)]
    parser, _, out = parse(raw, chunks, max_mime_parts=3)
    assert parser.too_many_parts
    assert parser.mime_part_count == 4
    assert len(parser.body.children) == 4
    assert out == body
    ok, _, _ = parse(raw, max_mime_parts=10)
    assert not ok.too_many_parts and ok.mime_part_count == 10


def test_too_many_parts_with_rewriter_keeps_every_byte() -> None:
    """When parsing stops, a rewriter writes what it holds unchanged and passes the rest."""
    raw = many_parts(10)
    header, body = split_message(raw)
    for size in (50, 75, len(body)):
        rewriter = BodyRewriter([BodyFilter("text/", lambda ct, cs, t: t + "!")])
        parser = BodyParser(header, max_mime_parts=2, rewriter=rewriter)
        out = b"".join(parser.feed(body[i : i + size]) for i in range(0, len(body), size))
        out += parser.close()
        assert parser.too_many_parts
        assert out.replace(b"part!", b"part") == body  # only whole parts were rewritten


def test_too_deep() -> None:
    """Nesting past max_depth is flagged and the deeper multipart handed over whole."""
    depth = 6
    opening = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(depth)
    )
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + opening + b"deep\r\n"
    parser, capture, _ = parse(raw, max_depth=3)
    assert parser.too_deep
    deepest = list(parser.body.walk())[-1]
    assert deepest.depth == 3 and deepest.is_attachment
    assert capture.started[0].content_type == "multipart/mixed"
    assert parse(raw, max_depth=30)[0].too_deep is False


def test_hook_errors_are_collected() -> None:
    """A failing hook or sink is recorded in errors; other hooks carry on."""

    class Boom(Exception):
        pass

    def bad_hook(info: AttachmentInfo) -> AttachmentSink:
        raise Boom("start")

    class BadSink:
        def data(self, chunk: bytes) -> None:
            raise Boom("data")

        def end(self, info: AttachmentInfo) -> None:
            raise AssertionError("not called after a failed data()")

    class BadEnd:
        def data(self, chunk: bytes) -> None:
            pass

        def end(self, info: AttachmentInfo) -> None:
            raise Boom("end")

    header, body = split_message(MIXED)
    capture = Capture()
    parser = BodyParser(
        header,
        attachment_hooks=[
            bad_hook,
            lambda i: BadSink(),
            lambda i: None,
            lambda i: BadEnd(),
            capture,
        ],
    )
    parser.feed(body)
    parser.close()
    assert [str(e) for e in parser.errors] == ["start", "data", "end"]
    assert capture.blobs() == [ATTACHMENT_BYTES]


def test_feed_after_close() -> None:
    """Feeding a closed parser is a programming error."""
    parser = BodyParser(Header())
    parser.feed(b"\r\nx")
    assert parser.close() == b""
    assert parser.close() == b""
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


# -- hypothesis: chunking never matters ------------------------------------------------------

_text = st.text(  # no "_": the boundaries use it, so content never holds one
    st.characters(min_codepoint=32, max_codepoint=0x24F, exclude_characters="_")
    | st.sampled_from("\n\n..=-- \t"),
    max_size=200,
)
_cte = st.sampled_from([None, "quoted-printable", "base64"])
_names = st.text(
    st.characters(min_codepoint=48, max_codepoint=0x24F, categories=("L", "N")) | st.just(" "),
    min_size=1,
    max_size=15,
).map(lambda s: s.strip() or "x")


@st.composite
def emails(draw: st.DrawFn) -> bytes:
    """Messages as Python's email package writes them: text, html, attachments, nesting."""
    msg = EmailMessage()
    msg["Subject"] = "generated"
    msg.set_content(draw(_text), cte=draw(_cte))
    if draw(st.booleans()):
        msg.add_alternative("<p>" + draw(_text) + "</p>", subtype="html", cte=draw(_cte))
    for _ in range(draw(st.integers(0, 3))):
        msg.add_attachment(
            draw(st.binary(max_size=600)),
            maintype="application",
            subtype="octet-stream",
            filename=draw(_names),
        )
    if draw(st.booleans()):
        inner = EmailMessage()
        inner["Subject"] = "inner"
        inner.set_content(draw(_text), cte=draw(_cte))
        msg.add_attachment(inner, disposition="inline")
    for i, part in enumerate(msg.walk()):  # the email package would pick random ones
        if part.is_multipart():
            part.set_boundary(f"_b{i}_")
    return msg.as_bytes(policy=policy.SMTP)


_points = st.lists(st.integers(min_value=0, max_value=4000), max_size=12)


@settings(max_examples=60, deadline=None)
@given(emails(), _points)
def test_generated_messages_any_chunking(raw: bytes, points: list[int]) -> None:
    """Any message fed in any chunking gives the tree and attachment bytes of the email package."""
    _, body = split_message(raw)
    parser, capture, out = parse(raw, split_at(body, points))
    agrees_with_email(raw, parser, capture)
    assert snapshot(parser, capture) == snapshot(*parse(raw)[:2])
    assert out == body


_token = st.sampled_from(
    [
        b"--B",
        b"--B--",
        b"--C",
        b"--C--",
        b"\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"-",
        b" ",
        b"x",
        b"Content-Type: multipart/mixed; boundary=C",
        b"Content-Type: text/plain",
        b"Content-Type: text/html",
        b"Content-Type: message/rfc822",
        b"Content-Type: multipart/digest; boundary=B",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b"Content-Disposition: attachment; filename=a",
        b"QUJD",
        b"Q",
        b"=",
        b"==",
        b"=4",
        b"=\r\n",
        b"\xc3\xa9",
        b"Subject: s",
    ]
)
_mimeish = st.lists(_token, max_size=60).map(b"".join)
_tops = st.sampled_from(
    [b"Content-Type: multipart/mixed; boundary=B\r\n", b"Content-Type: text/plain\r\n", b""]
)


@settings(max_examples=200, deadline=None)
@given(_tops, _mimeish, _points, st.booleans())
def test_mime_like_noise_any_chunking(
    top: bytes, body: bytes, points: list[int], bytewise: bool
) -> None:
    """On MIME-like noise, chunking changes neither the tree nor the rewritten bytes."""
    header = Header.parse(top)
    chunks = [bytes([b]) for b in body] if bytewise else split_at(body, points)
    whole = snapshot(*parse_body(header, [body], max_mime_parts=8, text_limit=50))
    parts = snapshot(*parse_body(header, chunks, max_mime_parts=8, text_limit=50))
    assert parts == whole
    identity = [BodyFilter("", lambda ct, cs, t: t)]
    upper = [BodyFilter("text/", lambda ct, cs, t: t.upper())]
    for filters in (identity, upper):
        outs = []
        for feed in ([body], chunks):
            p = BodyParser(Header.parse(top), rewriter=BodyRewriter(filters, Banner("B")))
            outs.append(b"".join(p.feed(c) for c in feed) + p.close())
        assert outs[0] == outs[1]
    p = BodyParser(header, rewriter=BodyRewriter(identity))
    assert b"".join(p.feed(c) for c in chunks) + p.close() == body


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), _points)
def test_arbitrary_bytes_never_crash(body: bytes, points: list[int]) -> None:
    """Any bytes under a multipart header parse without error, the same in any chunking."""
    header = Header.parse(b'Content-Type: multipart/mixed; boundary="\xff"\r\n')
    whole = snapshot(*parse_body(header, [body]))
    assert snapshot(*parse_body(header, split_at(body, points))) == whole


_header_token = st.sampled_from(
    [
        b"Content-Type:",
        b"Content-Disposition:",
        b"Content-Transfer-Encoding:",
        b" multipart/mixed",
        b" text/plain",
        b" message/rfc822",
        b" base64",
        b";",
        b" boundary=",
        b'"',
        b"'",
        b"*0*",
        b"*1",
        b"=",
        b"name",
        b"filename",
        b"charset",
        b"utf-8''",
        b"%E2",
        b"%",
        b"=?utf-8?B?",
        b"=?x?Q?",
        b"?=",
        b"\r\n",
        b" ",
        b"\xff",
        b"attachment",
        b"\\",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_header_token, max_size=30).map(b"".join), st.binary(max_size=40))
def test_any_part_header_parses(head: bytes, content: bytes) -> None:
    """Header parameters of any shape, top-level or in a part, never break the parser."""
    parse_body(Header.parse(head + b"\r\n"), [content])
    header = Header.parse(b"Content-Type: multipart/mixed; boundary=B\r\n")
    parse_body(header, [b"--B\r\n" + head + b"\r\n\r\n" + content])


def test_attached_message_is_an_attachment() -> None:
    """A message/rfc822 part with Content-Disposition: attachment goes whole to the hooks."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
        b"Subject: inner\r\n\r\nhi\r\n--q--\r\n"
    )
    parser, capture, _ = parse(raw)
    assert parser.body.children[0].is_attachment
    assert capture.blobs() == [b"Subject: inner\r\n\r\nhi"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), _points, st.sampled_from(["base64", "quoted-printable"]))
def test_decoders_any_chunking(content: bytes, points: list[int], cte: str) -> None:
    """Transfer decoding of any content is independent of chunking."""
    header = Header.parse(
        b"Content-Type: application/x-y\r\nContent-Transfer-Encoding: " + cte.encode() + b"\r\n"
    )
    body = b"\r\n" + content
    whole = parse_body(header, [body])[1].blobs()
    assert parse_body(header, split_at(body, points))[1].blobs() == whole


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), _points, st.sampled_from(["base64", "quoted-printable"]))
def test_attachment_bytes_round_trip(data: bytes, points: list[int], cte: str) -> None:
    """Whatever bytes are attached come back out of the hook exactly."""
    msg = EmailMessage()
    msg.set_content("see attached\n")
    msg.add_attachment(data, "application", "octet-stream", cte=cte, filename="f")
    raw = msg.as_bytes(policy=policy.SMTP)
    assert cte.encode() in raw
    _, body = split_message(raw)
    assert parse(raw, split_at(body, points))[1].blobs() == [data]


# -- memory ----------------------------------------------------------------------------------


BLOCK = bytes(range(256)) * 222  # 56,832 bytes: a whole number of 57-byte base64 lines


def big_message(blocks: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """The body of a message with one base64 attachment of ``blocks`` x BLOCK, in chunks."""
    encoded = base64.encodebytes(BLOCK).replace(b"\n", b"\r\n")
    yield (
        b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=big.bin\r\n\r\n"
    )
    for _ in range(blocks):
        for i in range(0, len(encoded), chunk):
            yield encoded[i : i + chunk]
    yield b"--B--\r\n"


class Digest:
    """An attachment sink that hashes what it is given."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def data(self, chunk: bytes) -> None:
        self.hash.update(chunk)

    def end(self, info: AttachmentInfo) -> None:
        self.size = info.size


def test_large_attachment_bounded_memory() -> None:
    """A 20 MiB attachment streams through with peak traced memory under 2 MiB."""
    blocks = 20 * 1024 * 1024 // len(BLOCK) + 1
    expected = hashlib.sha256()
    for _ in range(blocks):
        expected.update(BLOCK)
    sinks: list[Digest] = []

    def hook(info: AttachmentInfo) -> Digest:
        sinks.append(Digest())
        return sinks[-1]

    header = Header.parse(b"Content-Type: multipart/mixed; boundary=B\r\n")
    rewriter = BodyRewriter(banner=Banner("banner"))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        parser = BodyParser(header, attachment_hooks=[hook], rewriter=rewriter)
        out = 0
        for chunk in big_message(blocks):
            out += len(parser.feed(chunk))
        out += len(parser.close())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (digest,) = sinks
    assert digest.size == blocks * len(BLOCK) >= 20 * 1024 * 1024
    assert digest.hash.digest() == expected.digest()
    assert parser.body.children[0].bodytext == "see attached"
    assert out > digest.size  # the rewritten body came out, banner and all
    assert peak < 2 * 1024 * 1024, peak  # about 0.5 MB measured


# -- body filters and banners ----------------------------------------------------------------


def test_banner_and_filter_rewrite_text_parts() -> None:
    """Banners land in text/plain and text/html; filters change text; the rest is byte-exact."""
    raw = MIXED
    out = rewrite(
        raw,
        filters=[BodyFilter("text/plain", lambda ct, cs, t: t.replace("Köln", "Bonn"))],
        banner=Banner("-- \nScanned ✓"),
    )
    msg = reparse(out)
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None and html is not None
    assert content(plain).startswith("Grüße aus Bonn\n")
    assert content(plain).endswith("\n-- \nScanned ✓\n")
    assert content(html) == "<html><body><p>Hi there</p>-- <br>\nScanned ✓</body></html>\n"
    (attachment,) = msg.iter_attachments()
    assert attachment.get_content() == ATTACHMENT_BYTES
    # the attachment's raw bytes are untouched
    tail = raw[raw.index(b"Content-Type: application/pdf") :]
    assert out.endswith(tail)


def test_rewrite_unchanged_is_byte_exact_in_any_chunking() -> None:
    """Filters that change nothing give back the input exactly, however it is chunked."""
    raw = MIXED
    _, body = split_message(raw)
    same = [BodyFilter("text/", lambda ct, cs, t: t)]
    for size in (1, 13, 4096):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert rewrite(raw, chunks, filters=same) == raw


def test_filter_arguments_and_regex_match() -> None:
    """A filter gets (content type, charset, text); a pattern is searched in the type."""
    seen: list[tuple[str, str]] = []

    def spy(ct: str, charset: str, text: str) -> str:
        seen.append((ct, charset))
        return text

    rewrite(MIXED, filters=[BodyFilter(re.compile("html$"), spy)])
    assert seen == [("text/html", "utf-8")]


def test_7bit_part_becomes_quoted_printable() -> None:
    """A 7bit us-ascii part given non-ASCII text is re-encoded as QP with charset UTF-8."""
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
        b"Content-Type: text/plain; format=flowed\r\n\r\nplain\r\n--q--\r\n"
    )
    out = rewrite(raw, banner=Banner("Grüße"))
    part = reparse(out).get_body(("plain",))
    assert part is not None
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content_charset() == "utf-8"
    assert part.get_param("format") == "flowed"
    assert content(part) == "plain\nGrüße\n"


def test_base64_text_part_stays_base64() -> None:
    """A base64 text part is re-encoded as base64."""
    msg = EmailMessage()
    msg.set_content("bonjour\n", cte="base64")
    msg.add_attachment(b"x", maintype="application", subtype="octet-stream")
    out = rewrite(msg.as_bytes(policy=policy.SMTP), banner=Banner("fin"))
    part = reparse(out).get_body(("plain",))
    assert part is not None and part["Content-Transfer-Encoding"] == "base64"
    assert content(part) == "bonjour\nfin\n"


def test_rewriting_a_non_mime_message_updates_its_header() -> None:
    """For a single-part message the top-level header gets the new charset and encoding."""
    raw = b"Subject: hi\r\n\r\nhello\r\n"
    out = rewrite(raw, banner=Banner("€ banner"))
    msg = reparse(out)
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(msg) == "hello\n€ banner\n"


def test_embedded_messages_are_not_rewritten() -> None:
    """Banners and filters leave a forwarded message/rfc822 part alone."""
    inner = EmailMessage()
    inner["Subject"] = "fwd"
    inner.set_content("inner\n")
    outer = EmailMessage()
    outer.set_content("outer\n")
    outer.add_attachment(inner, disposition="inline")
    raw = outer.as_bytes(policy=policy.SMTP)
    out = rewrite(raw, banner=Banner("B"))
    assert out.count(b"\r\nB\r\n") == 1
    assert raw[raw.index(b"Subject: fwd") :] in out


def test_hold_limit_passes_large_parts_unchanged() -> None:
    """A text part over the hold limit, or truncated, passes through unchanged."""
    raw = b"Content-Type: text/plain\r\n\r\n" + b"line\r\n" * 100
    assert rewrite(raw, banner=Banner("B"), hold_limit=100) == raw
    header, body = split_message(raw)
    parser = BodyParser(header, text_limit=10, rewriter=BodyRewriter(banner=Banner("B")))
    assert parser.feed(body) + parser.close() == body


def test_rewrite_classmethod() -> None:
    """BodyRewriter.rewrite transforms a stored body given in chunks, as it streams."""
    header, body = split_message(MIXED)
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    pieces = list(BodyRewriter.rewrite(header, chunks, banner=Banner("b")))
    assert len(pieces) > 10 and b"\r\nb\r\n" in b"".join(pieces)
    header, body = split_message(b"Content-Type: text/html\r\n\r\n<p>x</p>")
    out = b"".join(
        BodyRewriter.rewrite(header, [body[:3], body[3:]], banner=Banner("b", "<i>b</i>"))
    )
    assert out == b"\r\n<p>x</p>\r\n<i>b</i>\r\n"


def test_body_api() -> None:
    """Body exposes walk(), is_html, is_attachment and a readable repr."""
    parser = parse(MIXED)[0]
    kinds = [b.kind for b in parser.body.walk()]
    assert kinds == [
        PartKind.MULTIPART,
        PartKind.MULTIPART,
        PartKind.TEXT,
        PartKind.TEXT,
        PartKind.ATTACHMENT,
    ]
    assert repr(parser.body) == "<Body multipart/mixed multipart children=2>"
    assert isinstance(parser.body.children[0], Body)
