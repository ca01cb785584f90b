"""One node of the MIME tree (Haraka's C{transaction.body}): L{Body}, its L{PartKind},
and the MIME attributes read from the part's header (stdlib parameter parsing).

L{BodyParser<haraka_tw.message.body.BodyParser>} builds the tree as the body streams in;
L{BodyRewriter<haraka_tw.message.rewrite.BodyRewriter>} rewrites its text parts.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from email.header import decode_header, make_header
from email.message import Message
from email.utils import collapse_rfc2231_value

from haraka_tw.message.header import Header

__all__ = ["TEXT_LIMIT", "Body", "PartKind", "first_value"]

TEXT_LIMIT = 1024 * 1024  # decoded bytes kept per text part


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


def first_value(header: Header, name: str) -> str | None:
    """The first value of the field C{name}, or None when there is none."""
    values = header.get_all(name)
    return values[0] if values else None


def _describe(body: Body, default_type: str) -> None:
    """Fill C{body}'s MIME attributes from its header (stdlib parameter parsing)."""
    header = body.header
    fields: Message[str, str] = Message()
    fields.set_default_type(default_type)
    ctype = first_value(header, "Content-Type")
    if ctype is not None:
        fields["Content-Type"] = ctype
    disposition = first_value(header, "Content-Disposition")
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
    cte = first_value(header, "Content-Transfer-Encoding")
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
