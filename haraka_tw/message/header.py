"""The message header as plugins see it: RFC 5322 fields, kept byte-exact until changed.

Each field is kept as its raw bytes (name, colon, value and its folded continuation lines,
with their CRLFs), so an untouched header serialises to exactly what the client sent.
Adding or removing fields changes only the fields concerned.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from email.header import decode_header, make_header

__all__ = ["Header", "HeaderCollector", "auth_results_value", "comment_text"]

# RFC 5322 ftext (printable ASCII but ":"), then ":"; spaces or tabs before the colon are
# the obsolete syntax (4.5) that readers still accept, so they must not hide a field from
# the checks (an "Authentication-Results :" left in place, a "Received :" not counted).
_NAME_AND_COLON = rb"[!-9;-~]+[ \t]*:"
_FIELD_NAME = re.compile(_NAME_AND_COLON)
_BAD_NAME = re.compile(r"[:\r\n ]")
_UNFOLDED_LINE = re.compile(r"\n(?![ \t])")  # a newline whose next line would start a field
# Complete header lines: a field (a name as _FIELD_NAME, then anything) or a continuation.
_FIELD_LINES = re.compile(rb"(?:" + _NAME_AND_COLON + rb"[^\n]*\n|[ \t][^\n]*\n)*")


_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+\Z")  # an RFC 2045 token


def auth_results_value(text: str) -> str:
    """A property value for an Authentication-Results entry (RFC 8601): a token as it
    is, anything else (an IPv6 address, a value with spaces) as a quoted-string."""
    if _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_COMMENT_UNSAFE = re.compile(r"[^ -'*-\[\]-~]")  # not printable ASCII, a parenthesis or backslash


def comment_text(text: str) -> str:
    """C{text} fit to stand inside a header comment, C{(...)}: only printable ASCII, no
    parenthesis or backslash (so no value can end the comment or the field)."""
    return _COMMENT_UNSAFE.sub("", text)


class Header:
    """An ordered list of header fields.

    A header from L{parse} is split into fields only when something asks for them: the
    core itself only adds the Received field on top, counts Received fields and renames any
    Authentication-Results, which (for an ASCII header without those names) can be
    answered from the raw bytes. A plugin that reads a field pays for the split once.
    """

    def __init__(self) -> None:
        self._split: list[tuple[str, bytes]] | None = []  # (lower-case name, raw field bytes)
        self._raw = b""  # fields received but not split yet (when _split is None)
        self._top: list[tuple[str, bytes]] = []  # fields added above them meanwhile
        self._raw_lower: bytes | None = None  # _raw lower-cased, once asked for

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        """Split header bytes (without the blank line) into fields."""
        header = cls()
        header._split = None
        header._raw = raw
        return header

    @property
    def _fields(self) -> list[tuple[str, bytes]]:
        fields = self._split
        if fields is None:
            fields = self._split = self._top
            fields.extend((_name_of(block), block) for block in _field_blocks(self._raw))
            self._raw, self._top, self._raw_lower = b"", [], None
        return fields

    @_fields.setter
    def _fields(self, fields: list[tuple[str, bytes]]) -> None:
        self._split, self._raw, self._top, self._raw_lower = fields, b"", [], None

    def _surely_absent(self, key: str) -> bool:
        """Whether no field received but not split yet is named C{key} (lower case), known
        without splitting: the name's bytes appear nowhere in an ASCII header."""
        if self._split is not None or not (key.isascii() and self._raw.isascii()):
            return False
        if self._raw_lower is None:  # (made once: the core asks twice per message)
            self._raw_lower = self._raw.lower()
        return key.encode() not in self._raw_lower

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n == name.lower() for n, _ in self._fields)

    def names(self) -> list[str]:
        """Field names in order, as written (not lower-cased)."""
        return [
            raw.split(b":", 1)[0].rstrip(b" \t").decode("utf-8", "replace")
            for _, raw in self._fields
        ]

    def fields(self) -> list[tuple[str, bytes]]:
        """Every field as (lower-case name, its raw bytes: name, colon, value as folded,
        CRLF), top first: what a signature over the header (DKIM) reads."""
        return list(self._fields)

    def get_all(self, name: str) -> list[str]:
        """Every value of C{name}, unfolded, without the trailing CRLF."""
        key = name.lower()
        return [_value_of(raw) for n, raw in self._fields if n == key]

    def count(self, name: str) -> int:
        """How many fields are named C{name} (their values are not decoded)."""
        key = name.lower()
        fields = self._top if self._surely_absent(key) else self._fields
        return sum(1 for n, _ in fields if n == key)

    def get(self, name: str) -> str:
        """The values of C{name} joined by newlines; "" when absent (as Haraka's get)."""
        return "\n".join(self.get_all(name))

    def get_decoded(self, name: str) -> str:
        """Like L{get}, with RFC 2047 encoded words decoded."""
        out = []
        for value in self.get_all(name):
            try:
                out.append(str(make_header(decode_header(value))))
            except Exception:  # undecodable words stay as sent
                out.append(value)
        return "\n".join(out)

    def add(self, name: str, value: str) -> None:
        """Add a field at the top (as Haraka's add)."""
        fields = self._split if self._split is not None else self._top
        fields.insert(0, (name.lower(), _field_bytes(name, value)))

    def add_on_top(self, other: Header) -> None:
        """Put C{other}'s fields above these, in their order (the fields plugins added
        before DATA go above the message's own, as trace fields do)."""
        fields = self._split if self._split is not None else self._top
        fields[0:0] = other.fields()

    def add_end(self, name: str, value: str) -> None:
        """Add a field at the bottom."""
        self._fields.append((name.lower(), _field_bytes(name, value)))

    def replace_first(self, name: str, value: str) -> None:
        """Give the topmost field named C{name} the value C{value}, in its place; add it
        at the top if there is none."""
        key = name.lower()
        fields = self._fields
        for i, (n, _) in enumerate(fields):
            if n == key:
                fields[i] = (key, _field_bytes(name, value))
                return
        self.add(name, value)

    def insert(self, index: int, name: str, value: str) -> None:
        """Add a field at position C{index} of the whole header (0: the top; past the end:
        the bottom), as a milter's "insert header" places it."""
        self._fields.insert(max(index, 0), (name.lower(), _field_bytes(name, value)))

    def remove(self, name: str, which: int | Collection[int] = 0) -> None:
        """Remove every field named C{name}; with C{which}, only those of them it names,
        as a milter counts: 1 the first, -1 the last (none past the count), 0 all."""
        key = name.lower()
        whiches = [which] if isinstance(which, int) else list(which)
        if 0 in whiches:
            self._fields = [(n, raw) for n, raw in self._fields if n != key]
            return
        places = [i for i, (n, _) in enumerate(self._fields) if n == key]
        count = len(places)
        doomed = {places[w - 1 if w > 0 else w] for w in whiches if -count <= w <= count}
        self._fields = [field for i, field in enumerate(self._fields) if i not in doomed]

    def rename(self, name: str, new_name: str) -> None:
        """Rename every field C{name} to C{new_name}, keeping its value and place."""
        key = name.lower()
        fields = self._top if self._surely_absent(key) else self._fields
        if not any(n == key for n, _ in fields):
            return
        self._fields = [
            (new_name.lower(), _field_bytes(new_name, _value_of(raw), raw=raw))
            if n == key
            else (n, raw)
            for n, raw in self._fields
        ]

    def to_bytes(self) -> bytes:
        """The fields as they go on the wire, each ending in CRLF."""
        if self._split is None:  # (the received fields as they came, under any added)
            return b"".join([*(raw for _, raw in self._top), self._raw])
        return b"".join(raw for _, raw in self._split)


def _field_blocks(raw: bytes) -> list[bytes]:
    """Group header lines into fields: a line starting with SP or HTAB continues the last."""
    blocks: list[bytes] = []
    for line in raw.splitlines(keepends=True):
        if blocks and line[:1] in (b" ", b"\t"):
            blocks[-1] += line
        else:
            blocks.append(line)
    return blocks


def _name_of(block: bytes) -> str:
    name, sep, _ = block.partition(b":")
    return name.strip().decode("utf-8", "replace").lower() if sep else ""


def _value_of(raw: bytes) -> str:
    _, _, value = raw.partition(b":")
    text = value.decode("utf-8", "surrogateescape")
    unfolded = text.replace("\r\n", "\n").replace("\n ", " ").replace("\n\t", "\t")
    return unfolded.strip()


def _field_bytes(name: str, value: str, raw: bytes | None = None) -> bytes:
    if not name or _BAD_NAME.search(name) is not None:
        raise ValueError(f"bad header field name {name!r}")
    if raw is not None:  # keep the original folding of the value
        _, _, tail = raw.partition(b":")
        return name.encode("ascii") + b":" + tail
    safe = value.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" in safe:
        # A newline in a value must continue the field, never start a new one (header
        # injection): a line that does not start with SP or HTAB gets a space first.
        safe = _UNFOLDED_LINE.sub("\n ", safe).replace("\n", "\r\n")
    return f"{name}: {safe}\r\n".encode("utf-8", "surrogateescape")


class HeaderCollector:
    """Finds the end of the header in a message arriving in pieces.

    The header ends at the first empty line, or at the first line that is neither a field
    nor a continuation (that line starts the body), or after C{max_lines} lines or
    C{max_bytes} bytes (the rest is body). Memory is bounded by C{max_bytes}.
    """

    def __init__(self, max_lines: int = 1000, max_bytes: int = 1024 * 1024) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to be complete header lines
        self._lines = 0
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """Add bytes; once the header ends return (header bytes, first body bytes)."""
        self._buf += data
        pos = self._scanned
        buf = self._buf
        if b"\n" not in data:  # no new line ends here: nothing to scan again
            return self._finish(pos) if len(buf) > self.max_bytes else None
        if pos == 0 and buf and buf[0] in (0x20, 0x09):  # (SP, HTAB)
            return self._scan_lines(pos)  # (the first line may not be a continuation)
        # Every complete field and continuation line at once; what stops the match is the
        # blank line, a line that is no field (both end the header) or an unfinished one.
        match = _FIELD_LINES.match(buf, pos)
        end = match.end() if match is not None else pos
        lines = self._lines + buf.count(b"\n", pos, end)
        if lines >= self.max_lines or end > self.max_bytes:
            return self._scan_lines(pos)  # a limit falls inside: find its line
        self._lines = lines
        if buf.find(b"\n", end) >= 0 or len(buf) > self.max_bytes:
            return self._finish(end)
        self._scanned = end
        return None

    def _scan_lines(self, pos: int) -> tuple[bytes, bytes] | None:
        """L{feed}'s work line by line, from C{pos}: the rule the fast path follows."""
        buf = self._buf
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) > self.max_bytes:
                    return self._finish(pos)
                self._scanned = pos
                return None
            line = bytes(buf[pos : nl + 1])
            if line in (b"\r\n", b"\n") or not _is_field_line(line, first=pos == 0):
                return self._finish(pos)
            self._lines += 1
            pos = nl + 1
            if self._lines >= self.max_lines or pos > self.max_bytes:
                return self._finish(pos)

    def finish(self) -> tuple[bytes, bytes]:
        """The message ended; whatever was collected is header (a last line without CRLF too)."""
        if self.done:
            return b"", b""
        return self._finish(len(self._buf))

    def _finish(self, at: int) -> tuple[bytes, bytes]:
        self.done = True
        head, body = bytes(self._buf[:at]), bytes(self._buf[at:])
        self._buf = bytearray()
        return head, body


def _is_field_line(line: bytes, first: bool) -> bool:
    if line[:1] in (b" ", b"\t"):
        return not first
    return _FIELD_NAME.match(line) is not None
