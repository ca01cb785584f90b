"""Streaming reader for the DATA section (RFC 5321 4.1.1.4, 4.5.2), safe against smuggling.

Fed the bytes that follow the 354 reply, chunk by chunk, it finds the end of the message,
removes dot-stuffing, flags or normalises bare CR / bare LF, wraps over-long lines and counts
the size, handing the message to a sink in pieces. No reactor, no per-line Python callback:
each chunk is handled with a few ``find`` / ``count`` / ``replace`` calls in C.

The message ends only at ``CRLF "." CRLF`` in the raw stream (its first line counts as preceded
by CRLF), never at ``LF "." LF`` or any other mix; lines are CRLF-terminated throughout.

How a chunk is cut so that results do not depend on chunking: every chunk is processed up to
its end except a tail held back for the next one, which is either a trailing CR (its LF may
come next) or, at the start of a line, ``.`` or ``.CR`` (a possible terminator). So a CRLF is
never split between two pieces, and a piece starts at a line start exactly when the previous
one ended with CRLF.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

__all__ = ["BareNewline", "ChunkNewlines", "DataReader"]

_TERMINATOR = b"\r\n.\r\n"
_BARE_NEWLINE = re.compile(rb"\r\n?|\n")


def _sink_nothing(data: bytes) -> None:
    """The sink of a finished reader."""


def _bare_newlines(raw: bytes) -> tuple[int, int]:
    """How many bare CRs and bare LFs C{raw} holds (a piece that never splits a CRLF)."""
    crlf = raw.count(b"\r\n")
    return raw.count(b"\r") - crlf, raw.count(b"\n") - crlf


def _normalise(out: bytes, bare_cr: int, bare_lf: int) -> bytes:
    """Turn every bare CR and bare LF into CRLF (plain ``replace`` when only one kind occurs)."""
    if not bare_cr:
        return out.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not bare_lf:
        return out.replace(b"\r\n", b"\r").replace(b"\r", b"\r\n")
    return _BARE_NEWLINE.sub(b"\r\n", out)


class BareNewline(enum.Enum):
    """What to do with a bare LF or bare CR in the body."""

    REJECT = "reject"  # count them and pass the bytes through; the caller rejects at the end
    NORMALISE = "normalise"  # count them and turn each into CRLF


class ChunkNewlines:
    """Bare LF and bare CR in a message sent in BDAT chunks (raw bytes, no terminator),
    counted across the chunks' boundaries and, with L{BareNewline.NORMALISE}, each turned
    into CRLF, as L{DataReader} does for DATA. A CR that ends a chunk is held back until
    the next chunk (or L{finish}) shows whether an LF follows it."""

    __slots__ = ("_held_cr", "_normalise", "bare_cr", "bare_lf")

    def __init__(self, bare_newline: BareNewline) -> None:
        self.bare_cr = 0
        self.bare_lf = 0
        self._normalise = bare_newline is BareNewline.NORMALISE
        self._held_cr = False

    def feed(self, data: bytes) -> bytes:
        """A chunk's bytes as they are to be stored (normalised if asked; a final CR held)."""
        if self._held_cr:
            data = b"\r" + data
        self._held_cr = data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        bare_cr, bare_lf = _bare_newlines(data)
        if bare_cr or bare_lf:
            self.bare_cr += bare_cr
            self.bare_lf += bare_lf
            if self._normalise:
                data = _normalise(data, bare_cr, bare_lf)
        return data

    def finish(self) -> bytes:
        """The message has ended: what was held back (a CR no LF followed, so bare)."""
        if not self._held_cr:
            return b""
        self._held_cr = False
        self.bare_cr += 1
        return b"\r\n" if self._normalise else b"\r"


class DataReader:
    """Consume DATA bytes until the end-of-data line; see the module docstring.

    Attributes, readable at any time: ``finished``; ``size`` (raw message bytes before
    unstuffing, terminator excluded); ``exceeded`` (``size`` passed ``max_bytes``: the sink got
    no more pieces from then on, so what it holds is an incomplete prefix of the message);
    ``bare_lf`` and ``bare_cr`` (counts); ``long_lines`` (a line was wrapped).
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        *,
        max_bytes: int = 0,
        max_line_length: int = 992,
        bare_newline: BareNewline = BareNewline.REJECT,
    ) -> None:
        """``sink`` receives the unstuffed message, CRLF line endings, in order, in pieces.

        ``max_bytes`` 0 means no limit. ``max_line_length`` (excluding CRLF) 0 disables
        wrapping; otherwise it must be at least 2, because a continuation line starts with SP.
        """
        if max_line_length < 0 or max_line_length == 1:
            raise ValueError("max_line_length must be 0 or at least 2")
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self._sink = sink
        self._max_bytes = max_bytes
        self._max_line = max_line_length
        self._normalise = bare_newline is BareNewline.NORMALISE
        self._held = b""
        self._at_line_start = True
        self._column = 0  # length of the current sink output line so far
        self.finished = False
        self.size = 0
        self.exceeded = False
        self.bare_lf = 0
        self.bare_cr = 0
        self.long_lines = False

    def feed(self, data: bytes) -> bytes | None:
        """Consume ``data``; ``None`` while the message continues, else the bytes after the
        terminator (possibly ``b""``), which belong to the command stream."""
        if self.finished:
            raise RuntimeError("DataReader.feed() called after the end of data")
        buf = self._held + data if self._held else data
        self._held = b""
        # Every terminator starts with CRLF ".", so one scan for that answers both "is there a
        # terminator?" and "is there dot-stuffing to undo?" for the common chunk with neither.
        dot = buf.find(b"\r\n.")
        if self._at_line_start and buf.startswith(b".\r\n"):
            end = 0
        else:
            end = buf.find(_TERMINATOR, dot) if dot >= 0 else -1
            if end >= 0:
                end += 2  # the CRLF before "." ends the last body line
        if end >= 0:
            self._process(buf[:end], 0 <= dot <= end - 3)
            self.close()
            return buf[end + 3 :]
        cut = self._hold_point(buf)
        self._held = buf[cut:]
        self._process(buf[:cut], 0 <= dot <= cut - 3)
        return None

    def close(self) -> None:
        """Take no more bytes (the end was seen, or the message was abandoned).

        Lets go of the sink: usually a bound method of the object that holds this reader,
        which would otherwise be left in a cycle for the garbage collector.
        """
        self.finished = True
        self._sink = _sink_nothing

    def _hold_point(self, buf: bytes) -> int:
        """Where to cut ``buf`` so the held tail is only a CR or a line-start ``.`` / ``.CR``."""
        n = len(buf)
        if buf.endswith(b"\r"):
            if buf.endswith(b"\r\n.\r") or (self._at_line_start and buf == b".\r"):
                return n - 2
            return n - 1
        if buf.endswith(b"\r\n.") or (self._at_line_start and buf == b"."):
            return n - 1
        return n

    def _process(self, raw: bytes, stuffed: bool) -> None:
        """Handle a piece that never splits a CRLF; it starts at a line start iff the previous
        piece ended with CRLF. ``stuffed``: the piece contains CRLF "." somewhere."""
        if not raw:
            return
        self.size += len(raw)
        bare_cr, bare_lf = _bare_newlines(raw)
        self.bare_cr += bare_cr
        self.bare_lf += bare_lf

        out = raw.replace(b"\r\n.", b"\r\n") if stuffed else raw
        if self._at_line_start and out.startswith(b"."):
            out = out[1:]
        self._at_line_start = raw.endswith(b"\r\n")
        if self._normalise and (bare_cr or bare_lf):
            out = _normalise(out, bare_cr, bare_lf)
        if self._max_line:
            out = self._wrap(out)

        if self._max_bytes and self.size > self._max_bytes:
            self.exceeded = True
        if out and not self.exceeded:
            self._sink(out)

    def _wrap(self, out: bytes) -> bytes:
        """Insert CRLF SP so that no output line exceeds the limit; track the column.

        Jumps a window of ``limit`` bytes at a time to the last CRLF inside it, so the cost is
        a few C calls per ``limit`` bytes rather than a Python step per line; only a line that
        is actually too long is cut up in Python.
        """
        limit = self._max_line
        size = len(out)
        start = -self._column  # where the current line began, relative to ``out``
        copied = 0
        pieces: list[bytes] = []
        while size - start > limit:
            crlf = out.rfind(b"\r\n", max(start, 0), start + limit + 2)
            if crlf >= 0:
                start = crlf + 2
                continue
            first = max(start, 0)
            stop = out.find(b"\r\n", first)
            stop = size if stop < 0 else stop
            pieces.append(out[copied:first])
            pieces.append(self._wrap_line(out[first:stop], first - start))
            copied = stop
            self.long_lines = True
            if stop == size:
                return b"".join(pieces)
            start = stop + 2
        last = out.rfind(b"\r\n", max(start, 0))
        self._column = size - start if last < 0 else size - last - 2
        if not pieces:
            return out
        pieces.append(out[copied:])
        return b"".join(pieces)

    def _wrap_line(self, line: bytes, column: int) -> bytes:
        """Wrap one line (no CRLF inside) that starts at ``column``; updates ``_column``."""
        limit = self._max_line
        pieces = []
        pos = 0
        while column + len(line) - pos > limit:
            take = limit - column
            pieces.append(line[pos : pos + take])
            pos += take
            column = 1  # the SP that starts the continuation line
        pieces.append(line[pos:])
        self._column = column + len(line) - pos
        return b"\r\n ".join(pieces)
