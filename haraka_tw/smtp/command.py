"""Split one SMTP command line into its verb and argument.

Pure functions over bytes: no reactor, no I/O. The parser never raises, whatever the client
sent; it reports what is odd about the line (8-bit bytes, control characters) and leaves the
decision to the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Command", "parse_command"]

# NUL and every C0 control except HTAB, plus DEL. CR and LF count too: a well-formed line
# has had its CRLF removed before this check.
_BAD_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


# (not frozen: a frozen dataclass sets each field through object.__setattr__, and a
# session makes one of these per command line; nothing shares or hashes them)
@dataclass(slots=True)
class Command:
    """One parsed command line.

    ``verb`` is upper-cased ASCII (undecodable bytes become U+FFFD); ``argument`` is everything
    after the first run of spaces, trailing whitespace stripped, decoded as UTF-8 with
    ``surrogateescape`` so the original bytes can be recovered.
    """

    verb: str
    argument: str
    raw: bytes
    has_8bit: bool
    bad_bytes: bool


def _strip_line_ending(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def parse_command(line: bytes) -> Command:
    """Parse ``line`` (with or without its CRLF / LF ending); never raises.

    The verb is the bytes before the first space (as Haraka does, a line starting with a space
    has an empty verb); the argument follows the run of spaces after it.
    """
    raw = _strip_line_ending(line)
    verb_bytes, _, rest = raw.partition(b" ")
    # (positional arguments: the keyword forms cost a dict per call on this hot path)
    return Command(
        verb_bytes.decode("ascii", "replace").upper(),
        rest.lstrip(b" ").rstrip().decode("utf-8", "surrogateescape"),
        raw,
        not raw.isascii(),
        _BAD_BYTES.search(raw) is not None,
    )
