"""Streaming dot-stuffing for the DATA section (RFC 5321 4.5.2), right at every chunk boundary.

A L{DotStuffer} is fed the message in arbitrary chunks and returns what goes on the wire:

- Line endings become CRLF. A bare LF and a bare CR (one not followed by LF) each become
  CRLF, so no bare CR or bare LF ever reaches the peer (servers that close the SMTP
  smuggling hole, haraka_tw among them, reject those). A CRLF split across two chunks is
  still one CRLF: a chunk's trailing CR is held until the next byte is known.
- A ``.`` at the start of a line (the first line included) gets a second ``.``.
- L{DotStuffer.close} ends the last line with CRLF if it had none and adds the ``.`` CRLF
  terminator.

So the output never holds a line that is a lone ``.`` before the terminator, whatever the
input and however it was cut. The state carried between chunks is two flags (at the start
of a line; a CR held back), and each chunk costs a few ``count``/``replace`` calls in C.
"""

from __future__ import annotations

import re

__all__ = ["DotStuffer", "stuff"]

_NEWLINE = re.compile(rb"\r\n|\r|\n")


class DotStuffer:
    """Turn a message (CRLF line endings expected, bare CR/LF repaired) into DATA bytes.

    ``size`` counts the bytes returned so far, terminator included once closed.
    """

    def __init__(self) -> None:
        self._at_line_start = True  # the output so far is empty or ends with CRLF
        self._held_cr = False  # the input so far ends with a CR not yet written
        self._closed = False
        self.size = 0

    def feed(self, chunk: bytes) -> bytes:
        """The stuffed bytes for ``chunk`` (possibly fewer or more bytes than it holds)."""
        if self._closed:
            raise RuntimeError("DotStuffer.feed() after close()")
        data = b"\r" + chunk if self._held_cr else bytes(chunk)
        self._held_cr = data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            data = _NEWLINE.sub(b"\r\n", data)
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\r\n")
        self.size += len(data)
        return data

    def close(self) -> bytes:
        """The end of the message: any held CR as CRLF, a CRLF if the last line had none,
        then the ``.`` CRLF terminator."""
        if self._closed:
            raise RuntimeError("DotStuffer.close() called twice")
        self._closed = True
        tail = b""
        if self._held_cr:
            self._held_cr = False
            tail = b"\r\n"
        elif not self._at_line_start:
            tail = b"\r\n"
        self._at_line_start = True
        out = tail + b".\r\n"
        self.size += len(out)
        return out


def stuff(message: bytes) -> bytes:
    """The whole DATA section for ``message`` in one call (terminator included)."""
    stuffer = DotStuffer()
    return stuffer.feed(message) + stuffer.close()
