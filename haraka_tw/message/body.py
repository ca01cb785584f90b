"""The message body as a MIME tree, parsed as it streams in (Haraka's C{transaction.body}).

L{BodyParser} is fed the bytes that follow the top-level header (what the transaction's
L{MessageStream} receives: normally starting with the blank line) in chunks of any size, and
builds a tree of L{Body} nodes. It never holds the message: per part it keeps the header, and
for text parts the decoded bytes up to C{text_limit}; attachments are decoded incrementally
(base64 quanta and quoted-printable lines may be split anywhere) and handed to the plugins'
attachment hooks as they arrive.

Multipart bodies follow RFC 2046 5.1: a delimiter is C{"--" boundary} at the start of a
line, optionally C{"--"} (the close delimiter), optional spaces or tabs, then the line end;
the line end before it belongs to the delimiter. The preamble and the epilogue are ignored,
multiparts nest, a missing close delimiter is tolerated and a delimiter may be split across
chunks. C{message/rfc822} parts are parsed as embedded messages.

Every raw byte belongs to exactly one of: a part's header (with its blank line), a leaf's
content, or a multipart's own bytes (preamble, delimiter lines, epilogue). L{BodyRewriter}
listens to those pieces and writes them out again, replacing only the text parts that body
filters or a banner change (each such part is held, bounded, until it ends).
"""

from __future__ import annotations

import binascii
import contextlib
import enum
import html
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Protocol

from haraka_tw.message.header import Header, HeaderCollector

__all__ = [
    "AttachmentHook",
    "AttachmentInfo",
    "AttachmentSink",
    "Banner",
    "Body",
    "BodyFilter",
    "BodyParser",
    "BodyRewriter",
    "PartKind",
]

TEXT_LIMIT = 1024 * 1024  # decoded bytes kept per text part
PART_HEADER_LIMIT = 64 * 1024  # bytes of one part's header
MAX_DEPTH = 30  # nesting of multiparts and embedded messages
_MAX_DELIMITER_PADDING = 1024  # spaces/tabs allowed after a boundary before the line end


class PartKind(enum.Enum):
    """What the parser does with a part's content."""

    MULTIPART = "multipart"  # split into child parts at the boundary
    TEXT = "text"  # text/* and message/* (but rfc822): decoded, kept in C{bodytext}
    MESSAGE = "message"  # message/rfc822 and message/global: an embedded message, one child
    #: everything else, and any part with Content-Disposition: attachment (a forwarded
    #: message too), and a multipart or message nested too deep: decoded and streamed to
    #: the attachment hooks, not kept
    ATTACHMENT = "attachment"


class Body:
    """One node of the MIME tree.

    C{content_type} is lower-case C{type/subtype} (RFC 2045 defaults applied);
    C{params} the Content-Type parameters (RFC 2231 decoded, names lower-case);
    C{charset} lower-case or None; C{transfer_encoding} lower-case, "7bit" when absent;
    C{disposition} "inline" / "attachment" / None; C{filename} from Content-Disposition
    filename or Content-Type name (RFC 2231 and RFC 2047 decoded); C{bodytext} the decoded
    text of a TEXT part (line endings as in the message), at most C{text_limit} bytes of it
    (C{truncated} tells); C{size} the decoded size of a leaf's content.
    """

    def __init__(
        self, header: Header, parent: Body | None = None, default_type: str = "text/plain"
    ) -> None:
        self.header = header
        self.parent = parent
        self.children: list[Body] = []
        self.depth: int = 0 if parent is None else parent.depth + 1
        #: inside a message/rfc822 part (body filters and banners leave these alone)
        self.embedded: bool = parent is not None and (
            parent.embedded or parent.kind is PartKind.MESSAGE
        )
        self.content_type = default_type
        self.params: dict[str, str] = {}
        self.charset: str | None = None
        self.boundary: str | None = None
        self.disposition: str | None = None
        self.filename: str | None = None
        self.transfer_encoding = "7bit"
        self.kind: PartKind = PartKind.TEXT
        self.bodytext = ""
        self.truncated = False
        self.size = 0
        _describe(self, default_type)

    @property
    def is_html(self) -> bool:
        """Whether this is a text/html part."""
        return self.content_type == "text/html"

    @property
    def is_attachment(self) -> bool:
        """Whether this part's content went to the attachment hooks."""
        return self.kind is PartKind.ATTACHMENT

    def walk(self) -> Iterator[Body]:
        """This node and every node below it, depth first, in message order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def __repr__(self) -> str:
        return f"<Body {self.content_type} {self.kind.value} children={len(self.children)}>"


def _first(header: Header, name: str) -> str | None:
    values = header.get_all(name)
    return values[0] if values else None


def _describe(body: Body, default_type: str) -> None:
    """Fill C{body}'s MIME attributes from its header (stdlib parameter parsing)."""
    header = body.header
    fields: Message[str, str] = Message()
    fields.set_default_type(default_type)
    ctype = _first(header, "Content-Type")
    if ctype is not None:
        fields["Content-Type"] = ctype
    disposition = _first(header, "Content-Disposition")
    if disposition is not None:
        fields["Content-Disposition"] = disposition
    body.content_type = fields.get_content_type()
    for name, value in (fields.get_params(header="content-type") or [])[1:]:
        body.params[name.lower()] = collapse_rfc2231_value(value)
    charset = fields.get_content_charset()
    body.charset = (charset.strip() or None) if charset else None
    boundary = fields.get_boundary()
    body.boundary = boundary or None
    body.disposition = fields.get_content_disposition()
    body.filename = _decode_filename(fields)
    cte = _first(header, "Content-Transfer-Encoding")
    body.transfer_encoding = (cte or "").strip().lower() or "7bit"


def _decode_filename(fields: Message[str, str]) -> str | None:
    name = fields.get_filename()
    if name is None:
        return None
    if "=?" in name:
        with contextlib.suppress(ValueError, LookupError, UnicodeError):  # kept as sent
            name = str(make_header(decode_header(name)))
    # Raw 8-bit bytes arrive as surrogate escapes; give plugins a clean str.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode_text(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset; fall back to UTF-8, then to replacement characters."""
    name = (charset or "us-ascii").lower()
    if name in ("us-ascii", "ascii", "ansi_x3.4-1968"):
        name = "utf-8"  # a superset; 8-bit text mislabelled as ASCII is common
    for candidate in (name, "utf-8"):
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    try:
        return data.decode(name, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


# -- transfer decoding -----------------------------------------------------------------------

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_JUNK = bytes(c for c in range(256) if c not in _B64_ALPHABET + b"=")


class _Decoder(Protocol):
    def decode(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    """7bit, 8bit, binary and unknown encodings: the bytes as they are."""

    def decode(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Base64:
    """Base64, any chunking: non-alphabet bytes dropped, quanta completed across chunks.

    A run of C{=} ends a segment (so concatenated encodings decode in full); a segment whose
    length is not a multiple of four is completed with padding, a stray sixth bit dropped.
    """

    def __init__(self) -> None:
        self._pending = b""  # fewer than four alphabet characters

    def decode(self, data: bytes) -> bytes:
        data = data.translate(None, _B64_JUNK)
        if self._pending:
            data = self._pending + data
        out = b""
        if b"=" in data:
            *ended, data = data.split(b"=")
            out = b"".join(_b64_segment(piece) for piece in ended if piece)
        cut = len(data) - len(data) % 4
        self._pending = data[cut:]
        return out + _a2b(data[:cut]) if cut else out

    def flush(self) -> bytes:
        pending, self._pending = self._pending, b""
        return _b64_segment(pending)


def _b64_segment(piece: bytes) -> bytes:
    extra = len(piece) % 4
    if extra == 1:
        piece = piece[:-1]
    elif extra:
        piece += b"=" * (4 - extra)
    return _a2b(piece)


def _a2b(data: bytes) -> bytes:
    if not data:
        return b""
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:  # pragma: no cover - only whole, padded quanta get here
        return b""


class _QuotedPrintable:
    """Quoted-printable, any chunking: whole lines are decoded; a partial line is held.

    A line longer than C{limit} is decoded in pieces cut where no C{=XX} escape or soft line
    break can be split, so memory stays bounded on malformed input.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._line = b""
        self._limit = limit

    def decode(self, data: bytes) -> bytes:
        if self._line:
            data = self._line + data
        nl = data.rfind(b"\n") + 1
        done, rest = data[:nl], data[nl:]
        if len(rest) > self._limit:
            cut = len(rest)
            while cut > 0 and (rest[cut - 1] in b"=\r" or (cut > 1 and rest[cut - 2] == 0x3D)):
                cut -= 1
            if cut == 0:  # nothing but "=" signs: garbage, decode it as it is
                cut = len(rest)
            done, rest = data[: nl + cut], rest[cut:]
        self._line = rest
        return binascii.a2b_qp(done) if done else b""

    def flush(self) -> bytes:
        line, self._line = self._line, b""
        return binascii.a2b_qp(line) if line else b""


def _decoder_for(encoding: str) -> _Decoder:
    if encoding == "base64":
        return _Base64()
    if encoding == "quoted-printable":
        return _QuotedPrintable()
    return _Identity()


# -- attachments, filters, banners -----------------------------------------------------------


@dataclass
class AttachmentInfo:
    """What an attachment hook is told about one attachment.

    C{size} (decoded bytes) is final when L{AttachmentSink.end} is called.
    """

    content_type: str
    filename: str | None
    header: Header
    part: Body
    size: int = 0


class AttachmentSink(Protocol):
    """Receives one attachment's decoded bytes, in order, as they arrive."""

    def data(self, chunk: bytes) -> None:
        """Decoded bytes of the attachment (never empty)."""

    def end(self, info: AttachmentInfo) -> None:
        """The attachment is complete; C{info.size} is its decoded size."""


#: Called when an attachment starts; returns a sink for its bytes, or None to skip them.
AttachmentHook = Callable[[AttachmentInfo], "AttachmentSink | None"]


@dataclass(frozen=True)
class BodyFilter:
    """Rewrites the decoded text of matching text parts (Haraka's add_body_filter).

    C{ct_match}: a string matches content types starting with it ("text/", "text/html");
    a compiled pattern is searched in the content type. C{fn(content_type, charset, text)}
    returns the new text.
    """

    ct_match: str | re.Pattern[str]
    fn: Callable[[str, str, str], str]

    def matches(self, content_type: str) -> bool:
        """Whether this filter applies to C{content_type} (lower-case type/subtype)."""
        if isinstance(self.ct_match, str):
            return content_type.startswith(self.ct_match.lower())
        return self.ct_match.search(content_type) is not None


@dataclass(frozen=True)
class Banner:
    """Text appended to text/plain parts and HTML put before </body> of text/html parts.

    Without C{html}, the HTML banner is C{text} escaped, with line breaks as <br>.
    """

    text: str
    html: str | None = None

    def html_banner(self) -> str:
        """The HTML form of the banner."""
        if self.html is not None:
            return self.html
        return "<br>\n".join(html.escape(line) for line in self.text.splitlines())


# -- the parser ------------------------------------------------------------------------------


class _Context:
    """What every part reader of one message shares: limits, hooks, counters, the rewriter."""

    def __init__(
        self,
        *,
        max_mime_parts: int,
        text_limit: int,
        max_depth: int,
        hooks: Sequence[AttachmentHook],
        rewriter: BodyRewriter | None,
    ) -> None:
        self.max_mime_parts = max_mime_parts
        self.text_limit = text_limit
        self.max_depth = max_depth
        self.hooks = list(hooks)
        self.rewriter = rewriter
        self.part_count = 0
        self.too_many_parts = False
        self.too_deep = False
        self.errors: list[Exception] = []

    def may_open_part(self) -> bool:
        return not self.too_many_parts

    def count_part(self) -> None:
        self.part_count += 1
        if 0 < self.max_mime_parts < self.part_count:
            self.too_many_parts = True

    def classify(self, body: Body) -> PartKind:
        """What to do with C{body}'s content (see L{PartKind})."""
        major = body.content_type.partition("/")[0]
        attached = body.disposition == "attachment"
        if major == "multipart":
            if body.boundary is None:
                return PartKind.TEXT  # nothing to split on
            return self._nesting(body, PartKind.MULTIPART)
        if body.content_type in ("message/rfc822", "message/global") and not attached:
            return self._nesting(body, PartKind.MESSAGE)
        if major in ("text", "message") and not attached:
            return PartKind.TEXT
        return PartKind.ATTACHMENT

    def _nesting(self, body: Body, kind: PartKind) -> PartKind:
        if body.depth < self.max_depth:
            return kind
        self.too_deep = True
        return PartKind.ATTACHMENT  # handed to the attachment hooks whole


class _PartReader:
    """One part: its header (unless given), the blank line, then its content."""

    def __init__(
        self,
        ctx: _Context,
        *,
        parent: Body | None = None,
        default_type: str = "text/plain",
        body: Body | None = None,
        emit: bool = True,
    ) -> None:
        self._ctx = ctx
        self._parent = parent
        self._default_type = default_type
        self._emit = emit and ctx.rewriter is not None
        self.body = body
        self._collector = HeaderCollector(max_bytes=PART_HEADER_LIMIT) if body is None else None
        self._head = b""
        self._pending = b""  # the start of a possible blank line
        self._content: _Leaf | _Multipart | None = None

    def feed(self, data: bytes) -> None:
        if self._collector is not None:
            split = self._collector.feed(data)
            if split is None:
                return
            self._header_done(split[0])
            data = split[1]
        if self._content is None:
            data = self._pending + data
            if data in (b"", b"\r"):
                self._pending = data
                return
            self._pending = b""
            blank = 2 if data.startswith(b"\r\n") else 1 if data.startswith(b"\n") else 0
            self._begin(data[:blank])
            data = data[blank:]
        if data:
            assert self._content is not None
            self._content.feed(data)

    def close(self) -> None:
        if self._collector is not None:
            head, rest = self._collector.finish()
            self._header_done(head)
            self._pending = rest
        if self._content is None:
            pending, self._pending = self._pending, b""
            self._begin(b"")
            assert self._content is not None
            if pending:
                self._content.feed(pending)
        assert self._content is not None and self.body is not None
        self._content.close()
        if self._emit:
            assert self._ctx.rewriter is not None
            self._ctx.rewriter.finish(self.body)

    def _header_done(self, head: bytes) -> None:
        self._collector = None
        self._head = head
        body = Body(Header.parse(head), self._parent, self._default_type)
        if self._parent is not None:
            self._parent.children.append(body)
        self._ctx.count_part()
        self.body = body

    def _begin(self, blank: bytes) -> None:
        body = self.body
        assert body is not None
        body.kind = self._ctx.classify(body)
        if self._emit:
            assert self._ctx.rewriter is not None
            self._ctx.rewriter.begin(body, self._head, blank)
        if body.kind is PartKind.MULTIPART:
            self._content = _Multipart(self._ctx, body, self._emit)
        else:
            self._content = _Leaf(self._ctx, body, self._emit)


class _Leaf:
    """The content of a part that is not split: decoded, then kept, streamed or parsed."""

    def __init__(self, ctx: _Context, body: Body, emit: bool) -> None:
        self._ctx = ctx
        self._body = body
        self._emit = emit
        self._decoder = _decoder_for(body.transfer_encoding)
        self._text = bytearray()
        self._sinks: list[AttachmentSink] = []
        self._info: AttachmentInfo | None = None
        self._inner: _PartReader | None = None
        if body.kind is PartKind.ATTACHMENT:
            self._start_attachment()
        elif body.kind is PartKind.MESSAGE:
            self._inner = _PartReader(ctx, parent=body, emit=False)

    def feed(self, data: bytes) -> None:
        if self._emit:
            assert self._ctx.rewriter is not None
            self._ctx.rewriter.content(self._body, data)
        self._deliver(self._decoder.decode(data))

    def close(self) -> None:
        self._deliver(self._decoder.flush())
        body = self._body
        if body.kind is PartKind.TEXT:
            body.bodytext = _decode_text(bytes(self._text), body.charset)
            self._text = bytearray()
        elif self._inner is not None:
            self._inner.close()
        elif self._info is not None:
            self._info.size = body.size
            for sink in self._sinks:
                try:
                    sink.end(self._info)
                except Exception as e:  # a plugin's error must not break the intake
                    self._ctx.errors.append(e)

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        body = self._body
        body.size += len(data)
        if body.kind is PartKind.TEXT:
            room = self._ctx.text_limit - len(self._text)
            if len(data) > room:
                body.truncated = True
                data = data[: max(room, 0)]
            self._text += data
        elif self._inner is not None:
            self._inner.feed(data)
        else:
            for sink in list(self._sinks):
                try:
                    sink.data(data)
                except Exception as e:  # a plugin's error must not break the intake
                    self._ctx.errors.append(e)
                    self._sinks.remove(sink)

    def _start_attachment(self) -> None:
        body = self._body
        info = AttachmentInfo(body.content_type, body.filename, body.header, body)
        self._info = info
        for hook in self._ctx.hooks:
            try:
                sink = hook(info)
            except Exception as e:  # a plugin's error must not break the intake
                self._ctx.errors.append(e)
                continue
            if sink is not None:
                self._sinks.append(sink)


class _Verdict(enum.Enum):
    DELIMITER = 1
    CONTENT = 2  # not a delimiter line after all
    MORE = 3  # cannot tell until more bytes arrive


_PADDING = re.compile(rb"[ \t]*")


def _delimiter_end(buf: bytes, at: int, final: bool) -> tuple[_Verdict, int, bool]:
    """Is the rest of the line from C{at} (just after C{--boundary}) a delimiter's ending?

    Returns the verdict, where the delimiter line ends and whether it is the close delimiter.
    """
    n = len(buf)
    begin = at
    close = buf.startswith(b"--", at)
    if close:
        at += 2
    elif at == n - 1 and buf[at] == 0x2D and not final:  # "-": maybe the first of "--"
        return _Verdict.MORE, 0, False
    end = _PADDING.match(buf, at)
    at = end.end() if end else at
    if at == n or (at == n - 1 and buf[at] == 0x0D):
        if final:
            return _Verdict.DELIMITER, n, close
        if at - begin > _MAX_DELIMITER_PADDING:
            return _Verdict.CONTENT, 0, False
        return _Verdict.MORE, 0, False
    if buf[at] == 0x0A:
        return _Verdict.DELIMITER, at + 1, close
    if buf.startswith(b"\r\n", at):
        return _Verdict.DELIMITER, at + 2, close
    return _Verdict.CONTENT, 0, False


class _Multipart:
    """A multipart's content: preamble, parts between delimiters, epilogue."""

    def __init__(self, ctx: _Context, body: Body, emit: bool) -> None:
        self._ctx = ctx
        self._body = body
        self._emit = emit
        assert body.boundary is not None
        self._dash = b"--" + body.boundary.encode("utf-8", "surrogateescape")
        self._child_type = (
            "message/rfc822" if body.content_type == "multipart/digest" else ("text/plain")
        )
        self._buf = b""
        self._line_start = True  # whether _buf starts at the start of a line
        self._child: _PartReader | None = None
        self._closed = False  # the close delimiter was seen: the rest is epilogue

    def feed(self, data: bytes) -> None:
        buf, self._buf = self._buf + data if self._buf else data, b""
        self._scan(buf, final=False)

    def close(self) -> None:
        buf, self._buf = self._buf, b""
        self._scan(buf, final=True)
        self._end_child()

    def _scan(self, buf: bytes, final: bool) -> None:
        dash = self._dash
        search = 0
        while buf and not self._closed:
            start = -1
            if search == 0 and self._line_start:
                if buf.startswith(dash):
                    start = line_break = 0
                elif not final and len(buf) < len(dash) and dash.startswith(buf):
                    self._buf = buf
                    return
            if start < 0:
                nl = buf.find(b"\n" + dash, search)
                if nl < 0:
                    break
                start = nl + 1
                line_break = nl - 1 if nl > 0 and buf[nl - 1] == 0x0D else nl
            verdict, end, close = _delimiter_end(buf, start + len(dash), final)
            if verdict is _Verdict.CONTENT:
                search = start + 1
                continue
            buf = self._hand(buf, line_break)
            if verdict is _Verdict.MORE:
                self._buf = buf
                return
            self._end_child()
            self._structure(buf[: end - line_break])
            buf = buf[end - line_break :]
            self._line_start = True
            search = 0
            if close:
                self._closed = True
            elif self._ctx.may_open_part():
                self._child = _PartReader(
                    self._ctx, parent=self._body, default_type=self._child_type, emit=self._emit
                )
        if self._closed or final:
            self._hand(buf, len(buf))
            return
        self._buf = self._hand(buf, self._hold_point(buf))

    def _hold_point(self, buf: bytes) -> int:
        """Where a possible delimiter (or the CR of its line break) starts at the end."""
        nl = buf.rfind(b"\n")
        if nl >= 0 and len(buf) - nl - 1 < len(self._dash) and self._dash.startswith(buf[nl + 1 :]):
            return nl - 1 if nl > 0 and buf[nl - 1] == 0x0D else nl
        return len(buf) - 1 if buf.endswith(b"\r") else len(buf)

    def _hand(self, buf: bytes, upto: int) -> bytes:
        """Pass C{buf[:upto]} to the current part (or drop it as preamble or epilogue)."""
        if upto <= 0:
            return buf
        if self._child is not None and not self._closed:
            self._child.feed(buf[:upto])
        else:
            self._structure(buf[:upto])
        self._line_start = buf[upto - 1] == 0x0A
        return buf[upto:]

    def _structure(self, data: bytes) -> None:
        if self._emit and data:
            assert self._ctx.rewriter is not None
            self._ctx.rewriter.structure(self._body, data)

    def _end_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.close()


class BodyParser:
    """Builds the MIME tree of one message from its body bytes; see the module docstring.

    Call L{feed} with every body chunk (the bytes after the top-level header, as the message
    stream receives them) and L{close} at the end of data. Each returns the bytes to store:
    the input itself when there is no C{rewriter}, else the rewritten body so far.

    Readable at any time: C{body} (the root L{Body}), C{mime_part_count}, C{too_many_parts}
    (more than C{max_mime_parts} parts: parsing has stopped and the caller should answer
    554 and disconnect), C{too_deep} (nesting past C{max_depth}: the deeper part was treated
    as an attachment), C{errors} (exceptions raised by attachment hooks and their sinks).
    """

    def __init__(
        self,
        header: Header,
        *,
        max_mime_parts: int = 1000,
        text_limit: int = TEXT_LIMIT,
        max_depth: int = MAX_DEPTH,
        attachment_hooks: Iterable[AttachmentHook] = (),
        rewriter: BodyRewriter | None = None,
    ) -> None:
        """C{max_mime_parts} 0 means no limit."""
        self._ctx = _Context(
            max_mime_parts=max_mime_parts,
            text_limit=text_limit,
            max_depth=max_depth,
            hooks=list(attachment_hooks),
            rewriter=rewriter,
        )
        self._rewriter = rewriter
        self.body = Body(header)
        self._root: _PartReader | None = _PartReader(self._ctx, body=self.body)
        self.closed = False

    @property
    def mime_part_count(self) -> int:
        """Parts below the top level seen so far (Haraka's transaction.mime_part_count)."""
        return self._ctx.part_count

    @property
    def too_many_parts(self) -> bool:
        """Whether the message has more than C{max_mime_parts} parts."""
        return self._ctx.too_many_parts

    @property
    def too_deep(self) -> bool:
        """Whether parts nest deeper than C{max_depth}."""
        return self._ctx.too_deep

    @property
    def errors(self) -> list[Exception]:
        """Exceptions raised by attachment hooks and sinks (each sink stops at its first)."""
        return self._ctx.errors

    def feed(self, data: bytes) -> bytes:
        """Parse more body bytes; returns the bytes to store."""
        if self.closed:
            raise RuntimeError("BodyParser.feed() called after close()")
        if self._root is not None:
            self._root.feed(data)
            if self._ctx.too_many_parts:
                if self._rewriter is not None:  # the rest, cut short, must not be rewritten
                    self._rewriter.stop()
                self._stop()
        elif self._rewriter is not None:
            self._rewriter.structure(self.body, data)
        return self._rewriter.take() if self._rewriter is not None else data

    def close(self) -> bytes:
        """The body ended: finish every open part; returns the last bytes to store."""
        if not self.closed:
            self.closed = True
            self._stop()
        return self._rewriter.take() if self._rewriter is not None else b""

    def _stop(self) -> None:
        """Finish the tree; from now on bytes pass through unparsed."""
        root, self._root = self._root, None
        if root is not None:
            root.close()
        if self._rewriter is not None:
            self._rewriter.release()


# -- the rewriter ----------------------------------------------------------------------------


_NEWLINES = re.compile(r"\r\n|\r|\n")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_MAX_LINE = 998


class _Held:
    """A text part being held until it ends, so its content can be replaced."""

    def __init__(self, part: Body, head: bytes, blank: bytes) -> None:
        self.part = part
        self.head = head
        self.blank = blank
        self.content: list[bytes] = []
        self.size = 0

    def raw(self) -> bytes:
        return self.head + self.blank + b"".join(self.content)


class BodyRewriter:
    """Applies body filters and a banner to text parts while the body streams through.

    Give it to L{BodyParser} as C{rewriter}; the parser's L{BodyParser.feed} and
    L{BodyParser.close} then return the rewritten body. Only text parts that a filter
    matches (text/plain and text/html ones too when there is a banner), outside embedded
    messages, are held, at most C{hold_limit} raw bytes each; a longer part, or one whose
    text was truncated, passes through unchanged. A part whose text does not change is
    written back byte for byte. A changed part is re-encoded with its transfer encoding
    (7bit text that is no longer ASCII, or has lines over 998 bytes, becomes
    quoted-printable) and its charset (UTF-8 when the new text does not fit it); its header
    is updated to match. For the top-level part that means the message header itself: that
    change is made in L{close}, so it shows only if the header is written out afterwards.
    """

    def __init__(
        self,
        filters: Sequence[BodyFilter] = (),
        banner: Banner | None = None,
        *,
        hold_limit: int = 4 * TEXT_LIMIT,
    ) -> None:
        self.filters = list(filters)
        self.banner = banner
        self.hold_limit = hold_limit
        self._out: list[bytes] = []
        self._held: _Held | None = None
        self._stopped = False

    @classmethod
    def rewrite(
        cls,
        header: Header,
        chunks: Iterable[bytes],
        filters: Sequence[BodyFilter] = (),
        banner: Banner | None = None,
    ) -> Iterator[bytes]:
        """Rewrite a whole body given in chunks (e.g. a stored message read back)."""
        parser = BodyParser(header, max_mime_parts=0, rewriter=cls(filters, banner))
        for chunk in chunks:
            out = parser.feed(chunk)
            if out:
                yield out
        out = parser.close()
        if out:
            yield out

    # The parser calls these, in message order; together they carry every byte once.

    def begin(self, part: Body, head: bytes, blank: bytes) -> None:
        """A part starts: its raw header and the blank line after it."""
        if self._applies(part):
            self._held = _Held(part, head, blank)
        else:
            self._write(head + blank)

    def content(self, part: Body, data: bytes) -> None:
        """Raw (still encoded) content of a leaf part."""
        held = self._held
        if held is None or held.part is not part:
            self._write(data)
            return
        held.content.append(data)
        held.size += len(data)
        if held.size > self.hold_limit:
            self.release()

    def structure(self, part: Body, data: bytes) -> None:
        """Bytes of a multipart that belong to no child: preamble, delimiters, epilogue."""
        self._write(data)

    def finish(self, part: Body) -> None:
        """A part ended."""
        held = self._held
        if held is None or held.part is not part:
            return
        self._held = None
        raw = b"".join(held.content)
        text = self._new_text(part)
        if text is None or part.truncated:
            self._write(held.head + held.blank + raw)
            return
        payload, header_changed = _encode_text(part, text, raw.endswith(b"\n"))
        head = part.header.to_bytes() if header_changed and part.parent is not None else held.head
        self._write(head + held.blank + payload)

    def release(self) -> None:
        """Stop holding the current part: write what was held; it passes through unchanged."""
        held, self._held = self._held, None
        if held is not None:
            self._write(held.raw())

    def stop(self) -> None:
        """Write out what is held and rewrite nothing from now on."""
        self._stopped = True
        self.release()

    def take(self) -> bytes:
        """The output produced since the last call."""
        out, self._out = self._out, []
        return b"".join(out)

    def _write(self, data: bytes) -> None:
        if data:
            self._out.append(data)

    def _applies(self, part: Body) -> bool:
        if self._stopped or part.kind is not PartKind.TEXT or part.embedded:
            return False
        if self.banner is not None and part.content_type in ("text/plain", "text/html"):
            return True
        return any(f.matches(part.content_type) for f in self.filters)

    def _new_text(self, part: Body) -> str | None:
        """The part's text after filters and banner, or None when it is unchanged."""
        text = original = part.bodytext
        charset = part.charset or "us-ascii"
        for f in self.filters:
            if f.matches(part.content_type):
                text = f.fn(part.content_type, charset, text)
        if self.banner is not None:
            if part.content_type == "text/plain":
                text = _append_banner(text, self.banner.text)
            elif part.content_type == "text/html":
                text = _insert_html_banner(text, self.banner.html_banner())
        return None if text == original else text


def _append_banner(text: str, banner: str) -> str:
    sep = "" if not text or text.endswith("\n") else "\r\n"
    return f"{text}{sep}{banner}\r\n"


def _insert_html_banner(text: str, banner: str) -> str:
    ends = list(_BODY_END.finditer(text))
    if not ends:
        return _append_banner(text, banner)
    at = ends[-1].start()
    return text[:at] + banner + text[at:]


def _encode_text(part: Body, text: str, ends_with_newline: bool) -> tuple[bytes, bool]:
    """The new content bytes of C{part}, and whether its header had to change."""
    text = _NEWLINES.sub("\r\n", text)
    charset = part.charset or "us-ascii"
    new_charset: str | None = None
    try:
        data = text.encode(charset)
    except (LookupError, UnicodeEncodeError):
        new_charset = "utf-8"
        data = text.encode("utf-8")
    encoding = part.transfer_encoding
    new_encoding: str | None = None
    if encoding not in ("base64", "quoted-printable"):
        long_lines = any(len(line) > _MAX_LINE for line in data.split(b"\r\n"))
        if long_lines or (encoding not in ("8bit", "binary") and not data.isascii()):
            new_encoding = encoding = "quoted-printable"
    if encoding == "base64":
        lines = [
            binascii.b2a_base64(data[i : i + 57], newline=False) for i in range(0, len(data), 57)
        ]
        payload = b"\r\n".join(lines) + (b"\r\n" if ends_with_newline and lines else b"")
    elif encoding == "quoted-printable":
        payload = binascii.b2a_qp(data, istext=True)
    else:
        payload = data
    if new_charset is None and new_encoding is None:
        return payload, False
    _set_mime_fields(part, new_charset, new_encoding)
    return payload, True


def _set_mime_fields(part: Body, charset: str | None, encoding: str | None) -> None:
    header = part.header
    if charset is not None:
        fields: Message[str, str] = Message()
        fields["Content-Type"] = _first(header, "Content-Type") or part.content_type
        fields.set_param("charset", charset)
        header.remove("Content-Type")
        header.add_end("Content-Type", str(fields["Content-Type"]))
        part.charset = charset
    if encoding is not None:
        header.remove("Content-Transfer-Encoding")
        header.add_end("Content-Transfer-Encoding", encoding)
        part.transfer_encoding = encoding
    if part.parent is None and "MIME-Version" not in header:
        header.add_end("MIME-Version", "1.0")
