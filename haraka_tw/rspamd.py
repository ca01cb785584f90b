"""A client of rspamd's HTTP protocol: one message scanned, its verdict read.

L{check} sends the message to rspamd's normal worker as C{POST /checkv2} (HTTP/1.1, with
its C{Content-Length}, the envelope in request headers as rspamd reads them, and
C{Connection: close}, so the answer ends where the connection does), streamed a chunk at a
time by L{haraka_tw.exchange}, over TCP, a Unix socket, or TLS. The answer is read to at
most L{MAX_REPLY} bytes within one time limit.

What rspamd answers is checked, not taken on trust: a status other than 200, a body that is
not a JSON object, or one that carries an C{error} (rspamd's own error answers carry
C{error} and C{error_domain}, with a 500) is an L{RspamdError}, never a clean scan.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from haraka_tw.exchange import Address, ServiceError, chained, exchange

__all__ = [
    "MAX_REPLY",
    "RspamdError",
    "check",
    "header_text",
    "is_header_name",
    "parse_answer",
    "request_head",
]

#: The most of rspamd's answer read: a verdict with every symbol, URL and address of a
#: large message fits many times over.
MAX_REPLY = 4 * 1024 * 1024

_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


class RspamdError(ServiceError):
    """rspamd's answer is not a verdict."""


def is_header_name(name: str) -> bool:
    """Whether C{name} may name an HTTP header (an RFC 9110 token)."""
    return _TOKEN.match(name) is not None


def header_text(value: str) -> str:
    """C{value} fit for one request header line: control characters (a CR or LF would end
    the header and start another) become one space each run, and the ends are trimmed."""
    return _UNSAFE.sub(" ", value).strip()


def request_head(path: str, host: str, length: int, headers: Sequence[tuple[str, str]]) -> bytes:
    """The request line and header of a scan of C{length} bytes.

    @raise ValueError: for a header name that is not an HTTP token (values are made safe
        by L{header_text}; one that is empty then is left out)."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Connection: close",
        f"Content-Length: {length}",
    ]
    for name, value in headers:
        if not is_header_name(name):
            raise ValueError(f"not an HTTP header name: {name!r}")
        text = header_text(value)
        if text:
            lines.append(f"{name}: {text}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def _body(answer: bytes) -> tuple[int, str, bytes]:
    """The status, reason and body of an HTTP/1.1 answer read to the end of the
    connection (a C{Content-Length} or chunked body is taken as it says)."""
    head, sep, rest = answer.partition(b"\r\n\r\n")
    if not sep:
        if not answer:
            raise RspamdError("rspamd closed the connection without answering")
        raise RspamdError("rspamd's answer ended inside its header")
    lines = head.split(b"\r\n")
    status = _STATUS.match(lines[0])
    if status is None:
        raise RspamdError(f"rspamd's answer is not HTTP: {lines[0][:80]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "chunked" in fields.get("transfer-encoding", "").lower():
        rest = _dechunked(rest)
    elif "content-length" in fields:
        try:
            length = int(fields["content-length"])
        except ValueError:
            raise RspamdError(
                f"rspamd's Content-Length is no number: {fields['content-length'][:40]!r}"
            ) from None
        if len(rest) < length:
            raise RspamdError(f"rspamd's answer was cut short ({len(rest)} of {length} bytes)")
        rest = rest[:length]
    if fields.get("compression"):
        raise RspamdError(f"rspamd's answer is compressed ({fields['compression'][:20]})")
    offset = fields.get("message-offset")  # (the body_block flag: the message after JSON)
    if offset is not None and offset.isdigit():
        rest = rest[: int(offset)]
    reason = (status.group(2) or b"").decode("latin-1")
    return int(status.group(1)), reason, rest


def _dechunked(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise RspamdError("rspamd's chunked answer was cut short")
        try:
            size = int(data[pos:end].split(b";", 1)[0], 16)
        except ValueError:
            raise RspamdError("rspamd's chunked answer is malformed") from None
        if size == 0:
            return bytes(out)
        start = end + 2
        if len(data) < start + size + 2:
            raise RspamdError("rspamd's chunked answer was cut short")
        out += data[start : start + size]
        pos = start + size + 2


def parse_answer(answer: bytes) -> dict[str, Any]:
    """rspamd's verdict from its whole HTTP answer.

    @raise RspamdError: for an answer that is not HTTP, a status other than 200, a body
        that is not a JSON object, or one that is empty or names an C{error}."""
    status, reason, body = _body(answer)
    try:
        data = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError) as e:  # (nesting deeper than Python's stack)
        if status != 200:
            raise RspamdError(f"rspamd answered {status} {reason}".rstrip()) from None
        raise RspamdError(f"rspamd's answer is not JSON: {e}") from None
    error = data.get("error") if isinstance(data, dict) else None
    if status != 200:
        said = f": {header_text(str(error))[:200]}" if error else ""
        raise RspamdError(f"rspamd answered {status} {reason}{said}".rstrip())
    if not isinstance(data, dict) or not data:
        raise RspamdError(
            "rspamd's answer is empty" if not data else "rspamd's answer is not a JSON object"
        )
    if error:
        raise RspamdError(f"rspamd: {header_text(str(error))[:200]}")
    return data


def check(
    reactor: Any,
    address: Address,
    message: Iterable[bytes],
    length: int,
    *,
    path: str = "/checkv2",
    headers: Sequence[tuple[str, str]] = (),
    tls: IOpenSSLClientConnectionCreator | None = None,
    timeout: float = 29.0,
    limit: int = MAX_REPLY,
) -> Deferred[dict[str, Any]]:
    """Ask rspamd at C{address} about C{message} (its pieces, C{length} bytes in all),
    with the request C{headers}, within C{timeout} seconds in all (connecting included);
    its verdict. RspamdError for an answer that is none, ServiceError (ServiceTimeout)
    when it cannot be asked.

    @raise ValueError: for a header name that is not an HTTP token."""
    host = "localhost" if address.path else str(address)
    head = request_head(path, host, length, headers)
    answer = exchange(
        reactor,
        address,
        chained(head, message),
        name="rspamd",
        limit=limit,
        timeout=timeout,
        connect_timeout=timeout,
        tls=tls,
    )
    return answer.addCallback(parse_answer)
