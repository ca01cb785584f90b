"""Reading a stored message back, in the form its consumer wants (Haraka's message_stream.pipe).

Options, as Haraka names them: C{line_endings} ("\\r\\n" for SMTP and LMTP, "\\n" for local
files and pipes), C{dot_stuffed} (a "." is added before every line that starts with one,
the first line included: RFC 5321 4.5.2, for a client writing DATA itself), C{ending_dot}
(".\\r\\n" is appended, after a line ending if the message lacks a final one) and
C{chunk_size}. Each chunk is transformed with a few C-level C{replace} calls; a CR at the
end of a chunk is held until the next, so neither a CRLF nor a line-starting "." is ever
misread at a chunk boundary. The message is never held whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # stream.py may import this module to offer a read method
    from haraka_tw.message.stream import MessageStream

__all__ = ["LineFormatter", "format_chunks", "read_message"]

CHUNK = 64 * 1024


class LineFormatter:
    """Rewrites line endings and adds dot-stuffing to a byte stream fed in chunks.

    Lines may end in CRLF or a bare LF on input; each is written with C{line_endings}. A
    bare CR is not a line ending and passes through as it is.
    """

    def __init__(
        self, *, line_endings: str = "\r\n", dot_stuffed: bool = False, ending_dot: bool = False
    ) -> None:
        if line_endings not in ("\r\n", "\n"):
            raise ValueError(f'line_endings must be "\\r\\n" or "\\n", not {line_endings!r}')
        self._crlf = line_endings == "\r\n"
        self._newline = line_endings.encode("ascii")
        self._dot_stuffed = dot_stuffed
        self._ending_dot = ending_dot
        self._cr = False  # the last chunk ended in a CR, held back
        self._line_start = True  # the output so far ends at the start of a line
        self._closed = False

    def feed(self, data: bytes) -> bytes:
        """Transform the next piece; the result may lag by one byte (a held CR)."""
        if self._closed:
            raise RuntimeError("LineFormatter.feed() called after close()")
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        if not data:
            return b""
        if self._crlf:
            if data.count(b"\n") != data.count(b"\r\n"):  # a bare LF: make every LF a CRLF
                data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        elif b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        if self._dot_stuffed:
            if b"\n." in data:
                data = data.replace(b"\n.", b"\n..")
            if self._line_start and data.startswith(b"."):
                data = b"." + data
        self._line_start = data.endswith(b"\n")
        return data

    def close(self) -> bytes:
        """The end of the message: a held CR, and the ending dot if asked for."""
        if self._closed:
            return b""
        self._closed = True
        out = b""
        if self._cr:
            out = b"\r"
            self._line_start = False
        if self._ending_dot:
            if not self._line_start:
                out += self._newline
            out += b"." + self._newline
        return out


def format_chunks(
    chunks: Iterable[bytes],
    *,
    line_endings: str = "\r\n",
    dot_stuffed: bool = False,
    ending_dot: bool = False,
    chunk_size: int = CHUNK,
) -> Iterator[bytes]:
    """Transform a message given in chunks; no input piece is handled whole when it is
    larger than C{chunk_size}, and empty pieces are never yielded."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    formatter = LineFormatter(
        line_endings=line_endings, dot_stuffed=dot_stuffed, ending_dot=ending_dot
    )
    for piece in chunks:
        for start in range(0, len(piece), chunk_size):
            out = formatter.feed(piece[start : start + chunk_size])
            if out:
                yield out
    out = formatter.close()
    if out:
        yield out


def read_message(
    stream: MessageStream,
    *,
    line_endings: str = "\r\n",
    dot_stuffed: bool = False,
    ending_dot: bool = False,
    chunk_size: int = CHUNK,
) -> Iterator[bytes]:
    """The stored message (current header, then body) in chunks, formatted as asked."""
    return format_chunks(
        stream.chunks(chunk_size),
        line_endings=line_endings,
        dot_stuffed=dot_stuffed,
        ending_dot=ending_dot,
        chunk_size=chunk_size,
    )
