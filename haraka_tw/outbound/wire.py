"""The client side of the SMTP wire, as plain functions over bytes (no reactor).

- L{ReplyReader}: server bytes in any chunking -> whole L{Reply} values, lines split in bulk.
- L{Capabilities}: the EHLO/LHLO keywords (RFC 5321 4.1.1.1) and what the client needs
  from them (PIPELINING, SIZE, 8BITMIME, SMTPUTF8, DSN, STARTTLS, AUTH).
- L{mail_command}, L{rcpt_command}: command lines with ESMTP parameters, refusing any
  value that could end the line early (no command injection through an address).
- L{sasl_initial}, L{sasl_answer}: the AUTH exchanges for CRAM-MD5, PLAIN and LOGIN.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from haraka_tw.smtp.replies import Reply

__all__ = [
    "AUTH_PREFERENCE",
    "Capabilities",
    "ReplyError",
    "ReplyReader",
    "choose_mechanism",
    "mail_command",
    "needs_smtputf8",
    "rcpt_command",
    "sasl_answer",
    "sasl_initial",
]

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# A path may hold anything but "<", ">" and control characters (a CR or LF would end the
# command line early); a parameter value not even SP or "=".
_PATH_UNSAFE = re.compile(r"[\x00-\x1f\x7f<>]")
_VALUE_UNSAFE = re.compile(r"[\x00-\x20\x7f=]")

# CRAM-MD5 keeps the password off the wire; PLAIN before LOGIN as Haraka orders them.
AUTH_PREFERENCE = ("CRAM-MD5", "PLAIN", "LOGIN")


class ReplyError(ValueError):
    """The server sent something that is not an SMTP reply (RFC 5321 4.2)."""


class ReplyReader:
    """Collect server bytes into replies.

    Lines end with CRLF; a bare LF is tolerated as a line end (a CR before it is dropped).
    A reply is its continuation lines (``250-``) and a final line (``250 `` or ``250``);
    every line of one reply must carry the same code. With ``enhanced`` (the default) the
    RFC 2034 enhanced status code is taken out of the text into L{Reply.enhanced}; without
    it the lines are kept as they came.
    """

    def __init__(self, max_line: int = 4096, max_lines: int = 1000, enhanced: bool = True) -> None:
        self._max_line = max_line
        self._max_lines = max_lines
        self._enhanced = enhanced
        self._tail = b""
        self._code = 0
        self._lines: list[str] = []

    def feed(self, data: bytes, *, last: bool = False) -> list[Reply]:
        """The replies completed by ``data``, in order.

        ``last``: the next reply is the last in plaintext (the answer to STARTTLS): return
        it alone and discard every byte after it, which the server must not have sent and
        the client must not read (RFC 3207 4.2).

        @raise ReplyError: for a line that is not part of a reply, or one too long.
        """
        buf = self._tail + data if self._tail else data
        pieces = buf.split(b"\n")
        self._tail = pieces.pop()
        out: list[Reply] = []
        for raw in pieces:
            reply = self._line(raw[:-1] if raw.endswith(b"\r") else raw)
            if reply is not None:
                out.append(reply)
                if last:
                    self._tail = b""
                    return out
        if len(self._tail) > self._max_line:
            raise ReplyError(f"reply line longer than {self._max_line} bytes")
        return out

    @property
    def idle(self) -> bool:
        """True when no partial reply is held (nothing received but not yet returned)."""
        return not self._tail and not self._lines

    def _line(self, raw: bytes) -> Reply | None:
        if len(raw) > self._max_line:
            raise ReplyError(f"reply line longer than {self._max_line} bytes")
        head = raw[:3]
        sep = raw[3:4]
        if len(head) < 3 or not head.isdigit() or sep not in (b"", b" ", b"-"):
            raise ReplyError(f"not an SMTP reply line: {raw[:80]!r}")
        code = int(head)
        if not 200 <= code <= 599:
            raise ReplyError(f"reply code out of range: {raw[:80]!r}")
        if self._lines and code != self._code:
            raise ReplyError(f"reply code changed inside a multi-line reply: {raw[:80]!r}")
        self._code = code
        self._lines.append(raw[4:].decode("utf-8", "replace"))
        if len(self._lines) > self._max_lines:
            raise ReplyError(f"reply longer than {self._max_lines} lines")
        if sep == b"-":
            return None
        lines, self._lines = self._lines, []
        return _reply(code, lines) if self._enhanced else Reply(code, None, tuple(lines))


def _reply(code: int, lines: list[str]) -> Reply:
    """A Reply with the RFC 2034 enhanced status code taken out of its lines."""
    match = _ENHANCED.match(lines[0])
    if match is None or match.group(1) != str(code)[0]:
        return Reply(code, None, tuple(lines))
    enhanced = ".".join(match.groups())
    stripped = []
    for line in lines:
        m = _ENHANCED.match(line)
        stripped.append(line[m.end() :] if m and ".".join(m.groups()) == enhanced else line)
    return Reply(code, enhanced, tuple(stripped))


@dataclass(frozen=True)
class Capabilities:
    """What an EHLO/LHLO reply advertised: keyword (upper case) -> its parameter words."""

    keywords: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: Reply) -> Capabilities:
        """Parse the lines after the first (the first names the server)."""
        keywords: dict[str, tuple[str, ...]] = {}
        for line in reply.lines[1:]:
            words = line.split()
            if not words:
                continue
            key, _, first = words[0].partition("=")  # the pre-RFC "AUTH=LOGIN PLAIN" form
            if not _KEYWORD.fullmatch(key):
                continue
            params = ([first] if first else []) + words[1:]
            key = key.upper()
            keywords[key] = keywords.get(key, ()) + tuple(params)
        return cls(keywords)

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.keywords

    @property
    def size_limit(self) -> int | None:
        """The SIZE the server declared (RFC 1870), None if it did not or declared 0."""
        params = self.keywords.get("SIZE")
        if not params or not params[0].isdigit():
            return None
        return int(params[0]) or None

    @property
    def auth(self) -> frozenset[str]:
        """The SASL mechanisms offered, upper case."""
        return frozenset(word.upper() for word in self.keywords.get("AUTH", ()))


def choose_mechanism(
    offered: frozenset[str], preference: tuple[str, ...] = AUTH_PREFERENCE
) -> str | None:
    """The first of ``preference`` (by default L{AUTH_PREFERENCE}) the server offers."""
    for mechanism in preference:
        if mechanism in offered:
            return mechanism
    return None


def needs_smtputf8(*addresses: str) -> bool:
    """True when an address has non-ASCII characters (RFC 6531)."""
    return not all(address.isascii() for address in addresses)


def _params(params: Mapping[str, str | None]) -> str:
    out = []
    for key, value in params.items():
        if not _KEYWORD.fullmatch(key):
            raise ValueError(f"bad ESMTP parameter name {key!r}")
        if value is None or value == "":
            out.append(f" {key}")
        elif _VALUE_UNSAFE.search(value):
            raise ValueError(f"bad value for ESMTP parameter {key}: {value!r}")
        else:
            out.append(f" {key}={value}")
    return "".join(out)


def _path(address: str) -> str:
    if _PATH_UNSAFE.search(address):
        raise ValueError(f"address not usable in an SMTP path: {address!r}")
    return f"<{address}>"


def mail_command(sender: str, params: Mapping[str, str | None]) -> bytes:
    """``MAIL FROM:<sender> K=V ...`` CRLF (an empty sender is the null path ``<>``).

    @raise ValueError: for a sender or parameter that would break the command line.
    """
    return f"MAIL FROM:{_path(sender)}{_params(params)}\r\n".encode()


def rcpt_command(recipient: str, params: Mapping[str, str | None]) -> bytes:
    """``RCPT TO:<recipient> K=V ...`` CRLF.

    @raise ValueError: for an empty address or anything that would break the command line.
    """
    if not recipient:
        raise ValueError("empty recipient address")
    return f"RCPT TO:{_path(recipient)}{_params(params)}\r\n".encode()


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _octets(value: str | bytes) -> bytes:
    """Credentials as they go into SASL: bytes as they are, text as UTF-8."""
    return value if isinstance(value, bytes) else value.encode()


def sasl_initial(mechanism: str, user: str | bytes, password: str | bytes) -> bytes:
    """The AUTH command line (CRLF included) that starts ``mechanism``.

    PLAIN goes with its initial response (RFC 4954 4); CRAM-MD5 and LOGIN wait for a 334.
    """
    if mechanism == "PLAIN":
        token = _b64(b"\0" + _octets(user) + b"\0" + _octets(password))
        return b"AUTH PLAIN " + token + b"\r\n"
    if mechanism in ("CRAM-MD5", "LOGIN"):
        return f"AUTH {mechanism}\r\n".encode()
    raise ValueError(f"unsupported SASL mechanism {mechanism!r}")


def sasl_answer(
    mechanism: str, step: int, challenge: str, user: str | bytes, password: str | bytes
) -> bytes:
    """The answer line (CRLF included) to the ``step``-th 334 challenge (0-based).

    @raise ValueError: for a challenge the mechanism cannot answer (bad base64, too many steps).
    """
    try:
        decoded = base64.b64decode(challenge.strip(), validate=True)
    except binascii.Error:
        raise ValueError(f"challenge is not base64: {challenge[:80]!r}") from None
    if mechanism == "CRAM-MD5" and step == 0:
        digest = hmac.new(_octets(password), decoded, "md5").hexdigest()
        return _b64(_octets(user) + b" " + digest.encode()) + b"\r\n"
    if mechanism == "LOGIN" and step in (0, 1):
        return _b64(_octets(user if step == 0 else password)) + b"\r\n"
    if mechanism == "PLAIN" and step == 0 and not decoded:
        return _b64(b"\0" + _octets(user) + b"\0" + _octets(password)) + b"\r\n"
    raise ValueError(f"unexpected {mechanism} challenge at step {step}")
