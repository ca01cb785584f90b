"""Body filters and banners (Haraka's add_body_filter and banner), applied to text parts
while the body streams through the L{BodyParser<haraka_tw.message.body.BodyParser>}.

L{BodyRewriter} listens to the parser's pieces of raw body (a part's header, a leaf's
content, a multipart's own bytes) and writes them out again, replacing only the text parts
that a L{BodyFilter} or the L{Banner} change (each such part is held, bounded, until it
ends), re-encoded and with the header fields to match.
"""

from __future__ import annotations

import binascii
import html
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message

from haraka_tw.message.header import Header
from haraka_tw.message.part import TEXT_LIMIT, Body, PartKind, first_value

__all__ = ["Banner", "BodyFilter", "BodyRewriter"]


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
        from haraka_tw.message.body import BodyParser  # body.py imports this module

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
        fields["Content-Type"] = first_value(header, "Content-Type") or part.content_type
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
