"""DSNs (RFC 3464): every field, NOTIFY and RET, the size cap, and never a bounce of a bounce."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from haraka_tw.config import ConfigDirectory
from haraka_tw.outbound.bounce import (
    DEFAULT_BOUNCE_TEMPLATE,
    DEFAULT_DELAY_TEMPLATE,
    RecipientFailure,
    bounce_todo,
    build_dsn,
    dsn_template,
    should_notify,
)
from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.paths import default_config_dir

NOW = 1_700_000_000.0
ARRIVAL = NOW - 3600
ORIGINAL = (
    b"From: Alice <alice@x.test>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <orig@x.test>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def todo(**changes: object) -> Todo:
    """A message from alice@x.test to two recipients at example.com."""
    t = Todo(
        domain="example.com",
        mail_from="alice@x.test",
        rcpt_to=[
            QueueRecipient(
                "bob@example.com",
                "<Bob@Example.com>",
                {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;bob+2Balias@example.com"},
            ),
            QueueRecipient("carol@example.com"),
        ],
        uuid="U-1",
        queue_time=ARRIVAL,
        envid="QQ+2B314159",
    )
    for key, value in changes.items():
        setattr(t, key, value)
    return t


def failures(t: Todo, status: str = "5.1.1") -> list[RecipientFailure]:
    """A failure for each recipient of C{t}, as a remote MX would give."""
    return [
        RecipientFailure(
            recipient=r,
            status=status,
            diagnostic=f"{'550' if status[0] == '5' else '450'} {status} no such user {r.address}",
            remote_mta="mx1.example.com",
            last_attempt=NOW - 10,
            will_retry_until=NOW + 86400,
        )
        for r in t.rcpt_to
    ]


def parse(raw: bytes, **kw: Any) -> Any:
    """A message parsed by the email package (typed loosely: tests walk its parts)."""
    return email.message_from_bytes(raw, **kw)


def dsn(t: Todo, fails: list[RecipientFailure], action: str = "failed", **kw: Any) -> Any:
    """Build a DSN and parse it with the email package."""
    raw = build_dsn(
        t,
        fails,
        action=action,
        reporting_mta="mta.x.test",
        message_chunks=[ORIGINAL[:20], ORIGINAL[20:]],
        now=NOW,
        **kw,
    )
    assert raw is not None
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    assert b"\r" not in raw.replace(b"\r\n", b"")
    return parse(raw)


def test_failed_dsn_fields() -> None:
    """A failure report: the headers, the human part, every delivery-status field, and the
    whole original message."""
    t = todo()
    msg = dsn(t, failures(t), msgid="<dsn-1@mta.x.test>")
    assert msg["From"] == "MAILER-DAEMON@mta.x.test"
    assert msg["To"] == "alice@x.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-Id"] == "<dsn-1@mta.x.test>"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, returned = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_payload(decode=True).decode("utf-8")
    assert '"Grüße"' in text
    assert "Intended Recipients: bob@example.com, carol@example.com" in text
    assert "<Bob@Example.com>: 550 5.1.1 no such user bob@example.com" in text
    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.x.test"
    assert per_message["Original-Envelope-Id"] == "QQ+314159"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Original-Recipient"] == "rfc822; bob+alias@example.com"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.com"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user bob@example.com"
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 10
    assert bob["Will-Retry-Until"] is None
    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Original-Recipient"] is None
    assert returned.get_content_type() == "message/rfc822"
    (inner,) = returned.get_payload()
    assert inner["Message-ID"] == "<orig@x.test>"
    assert inner.get_payload() == "Hello Bob.\r\n"


def test_delayed_dsn() -> None:
    """A delay report goes only to recipients that asked (NOTIFY=DELAY), says when retrying
    stops, and returns only the headers."""
    t = todo(ret="FULL")
    msg = dsn(t, failures(t, "4.4.1"), action="delayed")
    assert msg["Subject"] == "delivery delayed"
    _human, status, returned = msg.get_payload()
    _per_message, *recipients = status.get_payload()
    assert [r["Final-Recipient"] for r in recipients] == ["rfc822; bob@example.com"]
    (bob,) = recipients
    assert (bob["Action"], bob["Status"]) == ("delayed", "4.4.1")
    assert parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp() == NOW + 86400
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Hello Bob" not in returned.get_payload()
    assert "Message-ID: <orig@x.test>" in returned.get_payload()


def test_ret_hdrs() -> None:
    """RET=HDRS returns the headers only."""
    t = todo(ret="HDRS")
    returned = dsn(t, failures(t)).get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload().startswith("From: Alice <alice@x.test>")
    assert "Hello Bob" not in returned.get_payload()


def test_size_cap() -> None:
    """A message larger than max_full_size is returned as its headers."""
    t = todo()
    returned = dsn(t, failures(t), max_full_size=30).get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject:" in returned.get_payload()


def test_reading_stops_early_and_closes() -> None:
    """Headers-only reports stop reading the original and close its iterator."""
    closed: list[bool] = []

    def chunks() -> Iterator[bytes]:
        try:
            yield ORIGINAL
            yield b"x" * 10_000_000
        finally:
            closed.append(True)

    t = todo(ret="HDRS")
    raw = build_dsn(
        t, failures(t), action="failed", reporting_mta="m", message_chunks=chunks(), now=NOW
    )
    assert raw is not None and len(raw) < 10_000
    assert closed == [True]


def test_temporary_status_becomes_permanent_in_a_failure() -> None:
    """Giving up after temporary failures reports 5.y.z, not 4.y.z."""
    t = todo()
    status = dsn(t, failures(t, "4.4.7")).get_payload()[1]
    assert [r["Status"] for r in status.get_payload()[1:]] == ["5.4.7", "5.4.7"]


def test_null_sender_never_bounced() -> None:
    """A message from <> gets no report, and bounce_todo has no envelope for it."""
    t = todo(mail_from="")
    raw = build_dsn(t, failures(t), action="failed", reporting_mta="m", message_chunks=[], now=1)
    assert raw is None
    assert bounce_todo(t, NOW) is None


def test_notify_never() -> None:
    """No report when every recipient said NOTIFY=NEVER."""
    t = todo(rcpt_to=[QueueRecipient("b@example.com", params={"NOTIFY": "NEVER"})])
    raw = build_dsn(t, failures(t), action="failed", reporting_mta="m", message_chunks=[], now=1)
    assert raw is None


@pytest.mark.parametrize(
    ("notify", "failed", "delayed"),
    [
        (None, True, False),
        ("NEVER", False, False),
        ("FAILURE", True, False),
        ("DELAY", False, True),
        ("failure,delay", True, True),
        ("SUCCESS", False, False),
    ],
)
def test_should_notify(notify: str | None, failed: bool, delayed: bool) -> None:
    """NOTIFY decides: default failures only, DELAY only when asked, SUCCESS is not ours."""
    r = QueueRecipient("x@y.test", params={"NOTIFY": notify} if notify else {})
    assert should_notify(r, "failed") is failed
    assert should_notify(r, "delayed") is delayed
    assert should_notify(r, "delivered") is False


def test_no_header_injection() -> None:
    """Line breaks in a remote reply cannot add header fields to the report."""
    t = todo(mail_from="alice@x.test\r\nBcc: eve@evil.test")
    bad = [RecipientFailure(t.rcpt_to[1], "5.0.0", diagnostic="550 no\r\nX-Injected: yes")]
    msg = dsn(t, bad)
    assert msg["Bcc"] is None
    status = msg.get_payload()[1]
    assert status.get_payload()[1]["X-Injected"] is None


def test_template_placeholders() -> None:
    """Every placeholder is filled; an unknown one becomes '?'."""
    t = todo()
    template = [
        "From: postmaster@{me}",
        "To: {to}",
        "Subject: {action}: {subject}",
        "",
        "{from} {recipients} {reason} {unknown} {pid}",
    ]
    msg = dsn(t, failures(t)[1:], template=template)
    assert str(make_header(decode_header(msg["Subject"]))) == "failed: Grüße"
    body = msg.get_payload()[0].get_payload(decode=True).decode()
    assert body.startswith("alice@x.test carol@example.com 550 5.1.1 no such user")
    assert " ? " in body


def test_eight_bit_original() -> None:
    """An 8-bit original is returned as message/rfc822 marked 8bit."""
    t = todo()
    raw = build_dsn(
        t,
        failures(t),
        action="failed",
        reporting_mta="m",
        message_chunks=[b"Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve\r\n"],
        now=NOW,
    )
    assert raw is not None
    msg = parse(raw, policy=email.policy.default)
    returned = list(msg.iter_parts())[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert msg["Content-Transfer-Encoding"] == "8bit"


def test_bounce_todo() -> None:
    """The report's envelope: from <> to the sender, at the sender's domain."""
    env = bounce_todo(todo(mail_from="Alice@X.Test"), NOW)
    assert env is not None
    assert (env.mail_from, env.domain, env.queue_time) == ("", "x.test", NOW)
    assert [r.address for r in env.rcpt_to] == ["Alice@X.Test"]
    assert env.notes == {"dsn_for": "U-1"}


def test_shipped_template(tmp_path: Path) -> None:
    """etc/outbound.bounce_message is the built-in template; an operator's file wins; the
    delay report has its own default."""
    shipped = ConfigDirectory([default_config_dir()])
    assert dsn_template(shipped, "failed") == DEFAULT_BOUNCE_TEMPLATE
    assert dsn_template(shipped, "delayed") == DEFAULT_DELAY_TEMPLATE
    (tmp_path / "outbound.bounce_message").write_text("Subject: mine\n\nsorry\n")
    mine = ConfigDirectory([default_config_dir(), tmp_path])
    assert dsn_template(mine, "failed") == ["Subject: mine", "", "sorry"]
