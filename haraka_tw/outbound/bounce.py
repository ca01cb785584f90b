"""Delivery status notifications (RFC 3464): the failed and delayed reports, from <>.

A DSN is ``multipart/report; report-type=delivery-status`` with three parts:

1. the human part: the outbound.bounce_message template (headers, blank line, body; as
   Haraka's) with ``{placeholders}`` filled in (``pid date me from to subject recipients
   reason extended_reason msgid action``; an unknown one becomes ``?``);
2. ``message/delivery-status``: Reporting-MTA, Original-Envelope-Id (ENVID), Arrival-Date,
   then per recipient Final-Recipient, Original-Recipient (ORCPT), Action, Status,
   Remote-MTA, Diagnostic-Code, Last-Attempt-Date and, for a delay, Will-Retry-Until;
3. the original: ``message/rfc822`` (RET=FULL, or no RET) when it is at most
   C{max_full_size} bytes, else ``text/rfc822-headers`` (RET=HDRS, larger messages, and
   every delayed report).

Who is told: never the null sender (a bounce is not bounced); a recipient's NOTIFY decides
per recipient (NEVER: nobody; absent: failures only; DELAY only when asked for).
"""

from __future__ import annotations

import os
import quopri
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header, decode_header, make_header
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from functools import partial

from haraka_tw.config import ConfigDirectory
from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.smtp.dsn import DSNError, xtext_decode

__all__ = [
    "DEFAULT_BOUNCE_TEMPLATE",
    "DEFAULT_DELAY_TEMPLATE",
    "MAX_FULL_SIZE",
    "RecipientFailure",
    "bounce_todo",
    "build_dsn",
    "dsn_template",
    "should_notify",
]

#: A returned message larger than this is cut to its headers.
MAX_FULL_SIZE = 1024 * 1024
_MAX_HEADERS = 256 * 1024
_MAX_DIAGNOSTIC = 900
_ADDRESS_FIELDS = frozenset({"from", "to", "cc", "reply-to", "sender"})

DEFAULT_BOUNCE_TEMPLATE = [
    "Received: (Haraka {pid} invoked for bounce); {date}",
    "Date: {date}",
    "From: MAILER-DAEMON@{me}",
    "To: {to}",
    "Auto-Submitted: auto-replied",
    "Subject: failure notice",
    "Message-Id: {msgid}",
    "",
    "Hi. This is the Haraka Mailer program at {me}.",
    "I'm afraid I wasn't able to deliver your message",
    '    "{subject}"',
    "to the following addresses.",
    "This is a permanent error; I've given up. Sorry it didn't work out.",
    "",
    "Intended Recipients: {recipients}",
    "Failure Reason: {reason}",
    "",
    "{extended_reason}",
]

DEFAULT_DELAY_TEMPLATE = [
    "Date: {date}",
    "From: MAILER-DAEMON@{me}",
    "To: {to}",
    "Auto-Submitted: auto-replied",
    "Subject: delivery delayed",
    "Message-Id: {msgid}",
    "",
    "Hi. This is the Haraka Mailer program at {me}.",
    "Your message",
    '    "{subject}"',
    "has not yet been delivered to the following addresses.",
    "This is a temporary problem; I will keep trying. You need not send it again.",
    "",
    "Delayed Recipients: {recipients}",
    "Reason: {reason}",
    "",
    "{extended_reason}",
]


@dataclass(frozen=True)
class RecipientFailure:
    """What went wrong for one recipient.

    @ivar status: the enhanced status, C{x.y.z} (a failed report turns 4.y.z into 5.y.z).
    @ivar diagnostic: the remote reply as text, e.g. C{"550 5.1.1 No such user"}.
    @ivar remote_mta: the host that answered, when one did.
    @ivar reason: words for the human part when there is no remote reply (e.g. a DNS
        failure, or an operator's bounce); the default is the diagnostic, else the status.
    """

    recipient: QueueRecipient
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None
    reason: str | None = None

    @property
    def human_reason(self) -> str:
        """What the human part says went wrong."""
        return self.reason or self.diagnostic or self.status


def should_notify(recipient: QueueRecipient, action: str) -> bool:
    """Whether a C{failed} or C{delayed} report is wanted for C{recipient} (its NOTIFY).

    Success reports are not ours to send (the receiving MTA relays NOTIFY=SUCCESS).
    """
    notify = recipient.params.get("NOTIFY")
    words = {w.strip().upper() for w in notify.split(",")} if notify else {"FAILURE"}
    if "NEVER" in words:
        return False
    if action == "failed":
        return "FAILURE" in words
    if action == "delayed":
        return "DELAY" in words
    return False


def dsn_template(config: ConfigDirectory, action: str) -> list[str]:
    """The template for a report: outbound.bounce_message for failures,
    outbound.delay_message for delays; the built-in default where the file is missing."""
    if action == "delayed":
        return config.get_data("outbound.delay_message", DEFAULT_DELAY_TEMPLATE)
    return config.get_data("outbound.bounce_message", DEFAULT_BOUNCE_TEMPLATE)


def bounce_todo(original: Todo, now: float) -> Todo | None:
    """The envelope of a report on C{original}: from <> to its sender, or None for a null
    (or domainless) sender, which is never sent a report."""
    sender = original.mail_from
    local, at, domain = sender.rpartition("@")
    if not sender or not at or not local or not domain:
        return None
    return Todo(
        domain=domain.lower(),
        mail_from="",
        rcpt_to=[QueueRecipient(address=sender)],
        uuid=str(uuid.uuid4()).upper(),
        queue_time=now,
        notes={"dsn_for": original.uuid},
    )


def _date(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, tz=UTC))


def _one_line(text: str, limit: int = _MAX_DIAGNOSTIC) -> str:
    flat = re.sub(r"[\r\n\t]+", " ", text).strip()
    return flat[:limit]


def _decoded(value: str) -> str:
    try:
        return xtext_decode(value)
    except DSNError:
        return value


def _split_header(data: bytes) -> bytes:
    """The header block of a message (through the blank line that ends it)."""
    m = re.search(rb"\r?\n\r?\n", data)
    head = data[: m.end()] if m else data
    if len(head) > _MAX_HEADERS:
        head = head[:_MAX_HEADERS]
        head = head[: head.rfind(b"\n") + 1]
    return head if head.endswith(b"\n") else head + b"\r\n"


def _subject(headers: bytes) -> str:
    raw = BytesHeaderParser().parsebytes(headers).get("Subject", "")
    try:
        return _one_line(str(make_header(decode_header(str(raw)))), 200)
    except (ValueError, LookupError):
        return _one_line(str(raw), 200)


def _collect(chunks: Iterable[bytes], keep_full: bool, cap: int) -> tuple[bytes, bool]:
    """Read the original: all of it if C{keep_full} and within C{cap}, else its headers.

    Returns (bytes, whether they are the whole message).
    """
    buf = bytearray()
    limit = cap if keep_full else _MAX_HEADERS
    it: Iterator[bytes] = iter(chunks)
    try:
        for chunk in it:
            buf += chunk
            if not keep_full and re.search(rb"\r?\n\r?\n", buf):
                break
            if len(buf) > limit:
                return _split_header(bytes(buf)), False
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    data = bytes(buf)
    return (data, True) if keep_full else (_split_header(data), False)


def _placeholder(values: dict[str, str], header: bool, m: re.Match[str]) -> str:
    text = values.get(m.group(1)) or "?"
    return _one_line(text, 998) if header else text


def _fill(template: Sequence[str], values: dict[str, str]) -> tuple[list[str], list[str]]:
    """The filled template's header lines and body lines."""
    headers: list[str] = []
    body: list[str] = []
    in_headers = True
    for line in template:
        if in_headers and line == "":
            in_headers = False
            continue

        filled = re.sub(r"\{(\w+)\}", partial(_placeholder, values, in_headers), line)
        if in_headers:
            headers.extend(_encoded_header(filled).split("\r\n"))
        else:
            body.extend(filled.splitlines() or [""])
    return headers, body


def _encoded_header(line: str) -> str:
    """A header line with a non-ASCII unstructured value made RFC 2047 words (address
    fields stay as they are: an internationalised address is not encoded that way)."""
    name, colon, value = line.partition(":")
    if line.isascii() or not colon or name.strip().lower() in _ADDRESS_FIELDS:
        return line
    encoded = Header(value.strip(), "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}"


def _text_part(lines: list[str]) -> list[bytes]:
    text = "\n".join(lines) + "\n"
    if text.isascii():
        body = text.replace("\n", "\r\n").encode("ascii")
        head = [b"Content-Type: text/plain; charset=us-ascii", b"Content-Transfer-Encoding: 7bit"]
    else:
        encoded = quopri.encodestring(text.encode("utf-8", "surrogateescape"))
        body = encoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        head = [
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: quoted-printable",
        ]
    return [*head, b"", body]


def _status_fields(
    todo: Todo,
    failures: Sequence[RecipientFailure],
    action: str,
    reporting_mta: str,
    arrival: float,
) -> bytes:
    out = [f"Reporting-MTA: dns; {reporting_mta}"]
    if todo.envid:
        out.append(f"Original-Envelope-Id: {_one_line(_decoded(todo.envid), 100)}")
    out.append(f"Arrival-Date: {_date(arrival)}")
    for failure in failures:
        rcpt = failure.recipient
        status = failure.status
        if action == "failed" and status.startswith("4"):
            status = "5" + status[1:]
        out.append("")
        out.append(f"Final-Recipient: rfc822; {rcpt.address}")
        orcpt = rcpt.params.get("ORCPT")
        if orcpt:
            kind, _, value = orcpt.partition(";")
            out.append(f"Original-Recipient: {kind.strip()}; {_one_line(_decoded(value), 500)}")
        out.append(f"Action: {action}")
        out.append(f"Status: {status}")
        if failure.remote_mta:
            out.append(f"Remote-MTA: dns; {_one_line(failure.remote_mta, 255)}")
        if failure.diagnostic:
            out.append(f"Diagnostic-Code: smtp; {_one_line(failure.diagnostic)}")
        if failure.last_attempt is not None:
            out.append(f"Last-Attempt-Date: {_date(failure.last_attempt)}")
        if action == "delayed" and failure.will_retry_until is not None:
            out.append(f"Will-Retry-Until: {_date(failure.will_retry_until)}")
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape")


def build_dsn(
    todo: Todo,
    failures: Sequence[RecipientFailure],
    *,
    action: str,
    reporting_mta: str,
    message_chunks: Iterable[bytes],
    now: float,
    template: Sequence[str] | None = None,
    arrival: float | None = None,
    ret: str | None = None,
    max_full_size: int = MAX_FULL_SIZE,
    msgid: str | None = None,
) -> bytes | None:
    """The report on C{failures} of C{todo}'s message, as CRLF bytes; None when no report
    is due (a null sender, or no recipient whose NOTIFY asks for one).

    @param action: ``"failed"`` or ``"delayed"``.
    @param reporting_mta: this host's name (config C{me}).
    @param message_chunks: the original message (read only as far as needed).
    @param template: the human part's template (default: the built-in one for C{action}).
    @param arrival: Arrival-Date (default C{todo.queue_time}).
    @param ret: ``FULL`` or ``HDRS`` (default C{todo.ret}; neither means FULL, capped).
    """
    if action not in ("failed", "delayed"):
        raise ValueError(f"a report's action is failed or delayed, not {action!r}")
    wanted = [f for f in failures if should_notify(f.recipient, action)]
    if not todo.mail_from or not wanted:
        return None
    if template is None:
        template = DEFAULT_BOUNCE_TEMPLATE if action == "failed" else DEFAULT_DELAY_TEMPLATE
    effective_ret = (ret or todo.ret or "FULL").upper()
    keep_full = action == "failed" and effective_ret != "HDRS"
    original, whole = _collect(message_chunks, keep_full, max_full_size)
    headers = original if not whole else _split_header(original)
    reasons = [f"{f.recipient.original or f.recipient.address}: {f.human_reason}" for f in wanted]
    me = reporting_mta
    values = {
        "pid": str(os.getpid()),
        "date": _date(now),
        "me": me,
        "from": todo.mail_from,
        "to": todo.mail_from,
        "subject": _subject(headers),
        "recipients": ", ".join(f.recipient.address for f in wanted),
        "reason": wanted[0].human_reason,
        "extended_reason": "\n".join(reasons),
        "msgid": msgid or f"<{uuid.uuid4()}@{me}>",
        "action": action,
    }
    head_lines, body_lines = _fill(template, values)
    status = _status_fields(todo, wanted, action, reporting_mta, arrival or todo.queue_time)
    returned = original if whole else headers
    if not returned.endswith(b"\n"):
        returned += b"\r\n"
    boundary = f"boundary_{uuid.uuid4().hex}"
    delimiter = f"--{boundary}".encode()
    parts: list[bytes] = [line.encode("utf-8", "surrogateescape") for line in head_lines]
    parts += [
        b"MIME-Version: 1.0",
        b"Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"'.encode(),
        *_cte(status + returned),
        b"",
        b"This is a MIME-encapsulated message.",
        b"",
        delimiter,
        *_text_part(body_lines),
        delimiter,
        b"Content-Type: message/delivery-status",
        *_cte(status),
        b"",
        status,
        delimiter,
    ]
    if whole:
        parts += [b"Content-Type: message/rfc822"]
    else:
        parts += [
            b"Content-Description: Undelivered Message Headers",
            b"Content-Type: text/rfc822-headers",
        ]
    parts += [*_cte(returned), b"", returned]
    return b"\r\n".join(parts) + b"\r\n" + delimiter + b"--\r\n"


def _cte(data: bytes) -> list[bytes]:
    """The Content-Transfer-Encoding line for 8-bit content (none for 7-bit)."""
    return [] if data.isascii() else [b"Content-Transfer-Encoding: 8bit"]
