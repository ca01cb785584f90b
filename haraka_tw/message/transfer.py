"""Content-Transfer-Encoding decoding as a part's content streams in, and text decoding.

L{decoder_for} gives the incremental decoder for an encoding: base64 and quoted-printable
may be split anywhere across chunks (base64 quanta and quoted-printable lines are completed
across them); any other encoding passes the bytes as they are. L{decode_text} turns a
text part's bytes into text with its declared charset, falling back to UTF-8.
"""

from __future__ import annotations

import binascii
from typing import Protocol

__all__ = [
    "Base64Decoder",
    "IdentityDecoder",
    "QuotedPrintableDecoder",
    "TransferDecoder",
    "decode_text",
    "decoder_for",
]


def decode_text(data: bytes, charset: str | None) -> str:
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


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_JUNK = bytes(c for c in range(256) if c not in _B64_ALPHABET + b"=")


class TransferDecoder(Protocol):
    """Decodes one part's content: L{decode} each chunk, L{flush} at its end."""

    def decode(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class IdentityDecoder:
    """7bit, 8bit, binary and unknown encodings: the bytes as they are."""

    def decode(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class Base64Decoder:
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


class QuotedPrintableDecoder:
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


def decoder_for(encoding: str) -> TransferDecoder:
    """The decoder for a (lower-case) Content-Transfer-Encoding."""
    if encoding == "base64":
        return Base64Decoder()
    if encoding == "quoted-printable":
        return QuotedPrintableDecoder()
    return IdentityDecoder()
