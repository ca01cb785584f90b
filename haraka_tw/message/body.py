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

The tree's node (L{Body}, L{PartKind}) is in L{haraka_tw.message.part}, the transfer
decoders in L{haraka_tw.message.transfer}, and L{BodyRewriter}, L{BodyFilter} and L{Banner}
in L{haraka_tw.message.rewrite}; this module re-exports them.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from haraka_tw.message.header import Header, HeaderCollector
from haraka_tw.message.part import TEXT_LIMIT, Body, PartKind
from haraka_tw.message.rewrite import Banner, BodyFilter, BodyRewriter
from haraka_tw.message.transfer import decode_text, decoder_for

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

PART_HEADER_LIMIT = 64 * 1024  # bytes of one part's header
MAX_DEPTH = 30  # nesting of multiparts and embedded messages
_MAX_DELIMITER_PADDING = 1024  # spaces/tabs allowed after a boundary before the line end


# -- attachments -----------------------------------------------------------------------------


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
        self._decoder = decoder_for(body.transfer_encoding)
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
            body.bodytext = decode_text(bytes(self._text), body.charset)
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
