"""A client of ClamAV's clamd: one C{zINSTREAM} scan per connection.

The request is C{zINSTREAM} and a NUL, then the data in chunks, each a 4-byte big-endian
length and that many bytes, then a chunk of length 0. clamd answers one line, ended by a
NUL, and closes: C{stream: OK}, C{stream: <name> FOUND} (C{<name>(<hash>:<size>)} with
C{ExtendedDetectionInfo}), C{stream: <why> ERROR}, or, past its C{StreamMaxLength},
C{INSTREAM size limit exceeded. ERROR} (sent as soon as a chunk would pass the limit,
while the rest may still be on its way).

The first chunk is a C{Received} line (as Haraka's plugin sends it), so that clamd takes
the stream for mail. The exchange (the message streamed from the spool, the answer
bounded in size and time) is L{haraka_tw.exchange}'s.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from haraka_tw.exchange import Address, ServiceError, chained, exchange
from haraka_tw.exchange import parse_address as _parse_address

__all__ = [
    "DEFAULT_PORT",
    "PREDATA",
    "ClamdAnswer",
    "parse_address",
    "parse_answer",
    "request_size",
    "scan",
]

DEFAULT_PORT = 3310
MAX_ANSWER = 4096
PREDATA = b"Received: from Haraka clamd plugin\r\n"
_COMMAND = b"zINSTREAM\0"
_CHUNK = 64 * 1024
_FOUND = re.compile(r"^stream: (.+?)(?:\([0-9a-f]*:\d+\))? FOUND$")
_NAME_CHARACTERS = re.compile(r"[^\x21-\x7e]")


@dataclass(frozen=True)
class ClamdAnswer:
    """What clamd said: clean, C{virus} found (its signature's name, printable ASCII),
    or the stream was over clamd's size limit."""

    virus: str | None = None
    size_limit: bool = False

    @property
    def clean(self) -> bool:
        return self.virus is None and not self.size_limit


def parse_address(text: str) -> Address:
    """Where clamd listens (L{haraka_tw.exchange.parse_address}, port 3310 by default)."""
    return _parse_address(text, DEFAULT_PORT)


def parse_answer(data: bytes) -> ClamdAnswer:
    """clamd's answer; ServiceError when it is an error or not an answer."""
    line = data.split(b"\0", 1)[0].strip().decode("utf-8", "replace")
    if line == "stream: OK":
        return ClamdAnswer()
    found = _FOUND.match(line)
    if found is not None:
        name = _NAME_CHARACTERS.sub("?", found.group(1).strip())[:200]
        return ClamdAnswer(virus=name or "UNKNOWN")
    if line.startswith("INSTREAM size limit exceeded"):
        return ClamdAnswer(size_limit=True)
    shown = re.sub(r"[^\x20-\x7e]", "?", line)[:120]
    if line.endswith(" ERROR"):
        raise ServiceError(f"clamd: {shown}")
    raise ServiceError(f"clamd's answer is not one: {shown!r}" if shown else "clamd said nothing")


def request_size(message_size: int) -> int:
    """Bytes of the stream clamd counts against its C{StreamMaxLength}: the Received line
    and the message."""
    return len(PREDATA) + message_size


def _frames(message: Iterable[bytes]) -> Iterator[bytes]:
    """The request: the command, the Received line, the message in chunks, the end."""
    pieces = chained(PREDATA, message)
    try:
        yield _COMMAND
        for piece in pieces:
            for at in range(0, len(piece), _CHUNK):
                chunk = piece[at : at + _CHUNK]
                yield struct.pack("!I", len(chunk)) + chunk
        yield struct.pack("!I", 0)
    finally:
        pieces.close()  # (the spool file is let go when the exchange ends early)


def scan(
    reactor: Any,
    address: Address,
    message: Iterable[bytes],
    *,
    timeout: float = 30.0,
    connect_timeout: float = 10.0,
) -> Deferred[ClamdAnswer]:
    """Have clamd at C{address} scan C{message} (its pieces), within C{timeout} seconds in
    all; ServiceError (ServiceTimeout) when it cannot say."""
    answer = exchange(
        reactor,
        address,
        _frames(message),
        name="clamd",
        limit=MAX_ANSWER,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
    return answer.addCallback(parse_answer)
