"""A client of SpamAssassin's spamd: one request per connection, SPAMC/1.5.

The request is a line (C{HEADERS SPAMC/1.5}), header lines (C{Content-length}, C{User})
and a blank line, then the message, exactly C{Content-length} bytes. spamd answers with a
status line (C{SPAMD/1.1 0 EX_OK}), header lines (C{Spam: True ; 15.2 / 5.0},
C{Content-length}) and a body: for C{HEADERS}, the message's header as SpamAssassin
rewrote it; for C{SYMBOLS}, the names of the tests that hit; for C{CHECK}, nothing.

The exchange itself (the message streamed from the spool, the reply bounded in size and
time) is L{haraka_tw.exchange}'s. The reply is read to at most C{MAX_REPLY} bytes;
anything else (a refused connection, a status other than 0, a reply cut short or too
long, no C{Spam:} line) is a L{SpamdError} saying what happened.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from haraka_tw.exchange import Address, ServiceError, ServiceTimeout, chained, exchange
from haraka_tw.exchange import parse_address as _parse_address

__all__ = [
    "DEFAULT_PORT",
    "MAX_REPLY",
    "SpamdError",
    "SpamdReply",
    "SpamdTimeout",
    "check",
    "parse_address",
    "parse_reply",
]

DEFAULT_PORT = 783
MAX_REPLY = 256 * 1024
PROTOCOL = "SPAMC/1.5"
_STATUS = re.compile(rb"^SPAMD/(\d+)\.(\d+) +(\d+) *(.*)$")
_SPAM = re.compile(
    r"^(true|false|yes|no) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)$", re.IGNORECASE
)
_COMMANDS = ("CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "HEADERS", "PROCESS")
_USER = re.compile(r"^[\x21-\x7e]{1,256}$")
SpamdError = ServiceError  # spamd could not be asked, or did not answer as the protocol says
SpamdTimeout = ServiceTimeout


def parse_address(text: str) -> Address:
    """Where spamd listens (L{haraka_tw.exchange.parse_address}, port 783 by default)."""
    return _parse_address(text, DEFAULT_PORT)


@dataclass(frozen=True)
class SpamdReply:
    """spamd's answer: the verdict of its C{Spam:} line, and the body."""

    is_spam: bool
    score: float
    threshold: float
    body: bytes

    def header_fields(self) -> list[tuple[str, str]]:
        """The fields of a C{HEADERS} body as (name, value), a folded value with its folds
        as C{"\\n"} and the continuation line's leading white space (a line of white space
        alone is dropped: it would end a header it is written into)."""
        fields: list[tuple[str, str]] = []
        continues = False  # (a line that is no field has no continuation either)
        for line in self.body.decode("utf-8", "replace").split("\n"):
            line = line.rstrip("\r")
            if not line:
                break  # the end of the header
            if line[:1] in (" ", "\t"):
                if continues and line.strip():
                    name, value = fields[-1]
                    fields[-1] = (name, f"{value}\n{line}")
                continue
            name, colon, value = line.partition(":")
            continues = bool(colon and name and " " not in name and "\t" not in name)
            if continues:
                fields.append((name, value.strip()))
        return fields

    def symbols(self) -> list[str]:
        """The tests of a C{SYMBOLS} body."""
        text = self.body.decode("ascii", "replace").strip()
        return [name for name in re.split(r"[,\s]+", text) if name]


def parse_reply(data: bytes) -> SpamdReply:
    """A whole reply of spamd; SpamdError when it is not one."""
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    status = _STATUS.match(first)
    if status is None:
        shown = first[:80].decode("ascii", "replace")
        raise SpamdError(f"spamd's reply is not SPAMD/x.y: {shown!r}")
    if status.group(3) != b"0":  # (an error is the status line alone)
        text = status.group(4).decode("ascii", "replace").strip()[:80]
        raise SpamdError(f"spamd answered {int(status.group(3))} {text}".rstrip())
    head, blank, body = data.partition(b"\r\n\r\n")
    if not blank:
        head, blank, body = data.partition(b"\n\n")
    if not blank:
        raise SpamdError("spamd's reply ended before its header did")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    spam = length = None
    for line in lines[1:]:
        name, _, value = line.decode("ascii", "replace").partition(":")
        name = name.strip().lower()
        if name == "spam":
            spam = _SPAM.match(value.strip())
            if spam is None:
                raise SpamdError(f"spamd's Spam line is not understood: {value.strip()[:80]!r}")
        elif name == "content-length":
            if not value.strip().isdigit():
                raise SpamdError(f"spamd's Content-length is not a number: {value.strip()[:40]!r}")
            length = int(value)
    if spam is None:
        raise SpamdError("spamd's reply has no Spam line")
    if length is not None:
        if len(body) < length:
            raise SpamdError(f"spamd's reply was cut short ({len(body)} of {length} bytes)")
        body = body[:length]
    return SpamdReply(
        is_spam=spam.group(1).lower() in ("true", "yes"),
        score=float(spam.group(2)),
        threshold=float(spam.group(3)),
        body=body,
    )


def check(
    reactor: Any,
    address: Address,
    message: Iterable[bytes],
    length: int,
    *,
    command: str = "HEADERS",
    user: str = "",
    timeout: float = 30.0,
    connect_timeout: float = 10.0,
    limit: int = MAX_REPLY,
) -> Deferred[SpamdReply]:
    """Ask spamd about C{message} (its pieces, C{length} bytes in all), within
    C{timeout} seconds in all, reading at most C{limit} bytes of reply (a HEADERS reply
    holds the whole header); SpamdError (SpamdTimeout) when it cannot say.

    @raise ValueError: for a C{command} spamd does not know, or a C{user} that is not
        printable ASCII without spaces (it would end the request's header)."""
    if command not in _COMMANDS:
        raise ValueError(f"not a spamd command: {command!r}")
    if user and not _USER.match(user):
        raise ValueError(f"not a spamd user name: {user!r}")
    head = [f"{command} {PROTOCOL}", f"Content-length: {length}"]
    if user:
        head.append(f"User: {user}")
    start = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8")
    answer = exchange(
        reactor,
        address,
        chained(start, message),
        name="spamd",
        limit=limit,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
    return answer.addCallback(parse_reply)
