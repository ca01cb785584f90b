"""The queue file format: Haraka's layout, our fields, names, and every way a file is bad."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haraka_tw.outbound.qfile import (
    QueueFileError,
    QueueName,
    QueueRecipient,
    Todo,
    escape_host,
    message_reader,
    parse_todo,
    read_todo,
    read_todo_from,
    write_queue_file,
)

MESSAGE = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n.leading dot stays\r\n"


def sample_todo(**changes: object) -> Todo:
    """A todo with every field set, some of it non-ASCII."""
    todo = Todo(
        domain="example.com",
        mail_from="sender@x.test",
        rcpt_to=[
            QueueRecipient("b@example.com", "<B@Example.com>", {"NOTIFY": "FAILURE,DELAY"}),
            QueueRecipient("jörg@example.com", params={"ORCPT": "rfc822;j+2Bx@example.com"}),
        ],
        uuid="5E9B7A1C-0000-4000-8000-000000000001.1",
        queue_time=1_700_000_000.123,
        notes={"attachment_files": ["FileWíthÁccent Chars.pdf"], "n": 3, "ok": True},
        force_tls=True,
        ret="HDRS",
        envid="QQ314159",
        dsn_delayed_sent=False,
    )
    for key, value in changes.items():
        setattr(todo, key, value)
    return todo


def queue_bytes(todo: Todo, message: bytes = MESSAGE) -> bytes:
    """A whole queue file in memory."""
    buf = io.BytesIO()
    write_queue_file(buf, todo, [message[:7], message[7:]])
    return buf.getvalue()


def haraka_file(todo_json: str, message: bytes, declared: int | None = None) -> bytes:
    """A queue file as Haraka writes it: newline-wrapped, tab-indented JSON."""
    todo = f"\n{todo_json}\n".encode()
    length = len(todo) if declared is None else declared
    return struct.pack(">I", length) + todo + message


HARAKA_TODO = json.dumps(
    {
        "queue_time": 1508521948402,
        "domain": "tnpi.net",
        "rcpt_to": [
            {
                "original": "<matt@tnpi.net>",
                "original_host": "tnpi.net",
                "host": "tnpi.net",
                "user": "matt",
            }
        ],
        "mail_from": {
            "original": "<Matt@TNPI.net>",
            "original_host": "TNPI.net",
            "host": "tnpi.net",
            "user": "Matt",
        },
        "notes": {"queue": {"wants": "lmtp"}, "attachment_files": ["Wíth Áccent.pdf"]},
        "uuid": "C3A226B2-5751-4EED-81EB-813C9937C164.1.1",
    },
    indent="\t",
    ensure_ascii=False,
)


def test_round_trip_with_non_ascii(tmp_path: Path) -> None:
    """Every todo field, non-ASCII notes and addresses included, survives write and read."""
    todo = sample_todo()
    path = tmp_path / "q"
    path.write_bytes(queue_bytes(todo))
    read, offset = read_todo(path)
    assert read == todo
    assert read.message_size == len(MESSAGE)
    assert b"".join(message_reader(path, offset, chunk=5)) == MESSAGE


@pytest.mark.parametrize("haraka", [False, True])
def test_a_message_changed_since_it_was_read_is_refused(tmp_path: Path, haraka: bool) -> None:
    """Given the message's size when the file was scanned, a file (ours, or Haraka's,
    whose todo records no size) cut short or grown since (another process, a disk error)
    raises, naming the file, before any byte goes out: never a partial message sent as a
    whole one."""
    path = tmp_path / "q"
    path.write_bytes(haraka_file(HARAKA_TODO, MESSAGE) if haraka else queue_bytes(sample_todo()))
    _, offset = read_todo(path)
    size = path.stat().st_size - offset  # (what the scan saw)
    assert b"".join(message_reader(path, offset, size)) == MESSAGE
    for changed in (path.read_bytes()[:-7], path.read_bytes() + b"GARBAGE"):
        path.write_bytes(changed)
        reader = message_reader(path, offset, size)
        with pytest.raises(QueueFileError, match=rf"^{path}: the message is \d+ bytes, "):
            next(reader)


def test_round_trip_through_fd(tmp_path: Path) -> None:
    """write_queue_file also takes a file descriptor, and returns the bytes written."""
    path = tmp_path / "q"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        written = write_queue_file(fd, sample_todo(), [MESSAGE])
    finally:
        os.close(fd)
    assert written == path.stat().st_size
    assert read_todo(path)[0].message_size == len(MESSAGE)


def test_layout_is_haraka_readable() -> None:
    """Length prefix counts bytes; the todo is a JSON object with Haraka's keys and shapes."""
    blob = queue_bytes(sample_todo())
    (length,) = struct.unpack(">I", blob[:4])
    data = json.loads(blob[4 : 4 + length].decode("utf-8"))
    assert blob[4 + length :] == MESSAGE
    assert data["queue_time"] == 1_700_000_000_123
    assert data["mail_from"] == {
        "original": "<sender@x.test>",
        "original_host": "x.test",
        "host": "x.test",
        "user": "sender",
        "address": "sender@x.test",
    }
    rcpt = data["rcpt_to"][0]
    assert (rcpt["original"], rcpt["user"], rcpt["host"]) == ("<B@Example.com>", "b", "example.com")
    assert rcpt["params"] == {"NOTIFY": "FAILURE,DELAY"}
    assert data["message_size"] == len(MESSAGE)
    assert blob[4 + length - 1 : 4 + length] == b"}"


def test_null_sender_written_as_haraka_does() -> None:
    """The null sender is Haraka's <> object (user and host null) and reads back as ""."""
    blob = queue_bytes(sample_todo(mail_from=""))
    (length,) = struct.unpack(">I", blob[:4])
    data = json.loads(blob[4 : 4 + length])
    assert data["mail_from"]["original"] == "<>"
    assert data["mail_from"]["user"] is None
    assert parse_todo(blob[4 : 4 + length]).mail_from == ""


def test_reads_haraka_file(tmp_path: Path) -> None:
    """A file in Haraka's own shape (address objects, no address/params/message_size) reads."""
    path = tmp_path / "1508455115683_1508455115683_0_90253_9Q4o4V_1_haraka"
    path.write_bytes(haraka_file(HARAKA_TODO, MESSAGE))
    todo, offset = read_todo(path)
    assert todo.domain == "tnpi.net"
    assert todo.mail_from == "Matt@tnpi.net"
    assert todo.rcpt_to == [QueueRecipient("matt@tnpi.net", "<matt@tnpi.net>", {})]
    assert todo.queue_time == pytest.approx(1508521948.402)
    assert todo.notes["attachment_files"] == ["Wíth Áccent.pdf"]
    assert todo.uuid == "C3A226B2-5751-4EED-81EB-813C9937C164.1.1"
    assert (todo.force_tls, todo.ret, todo.envid, todo.message_size) == (False, None, None, None)
    assert b"".join(message_reader(path, offset)) == MESSAGE


def test_reads_haraka_null_sender_and_plain_strings() -> None:
    """Haraka's null sender object and plain string addresses are both understood."""
    data = {
        "domain": "d.test",
        "mail_from": {"original": "<>", "user": None, "host": None},
        "rcpt_to": ["<x@d.test>", "y@d.test"],
    }
    todo = parse_todo(json.dumps(data).encode())
    assert todo.mail_from == ""
    assert [r.address for r in todo.rcpt_to] == ["x@d.test", "y@d.test"]
    assert todo.rcpt_to[0].original == "<x@d.test>"


def _bad(blob: bytes, tmp_path: Path, name: str = "f") -> QueueFileError:
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(QueueFileError) as caught:
        read_todo(path)
    assert str(path) in str(caught.value)  # the error names the file
    return caught.value


def test_zero_length_file(tmp_path: Path) -> None:
    """A zero-length file is a QueueFileError, not a crash."""
    assert "zero bytes" in _bad(b"", tmp_path).reason


def test_truncated_length_prefix(tmp_path: Path) -> None:
    """Fewer than four bytes: no todo length."""
    assert "truncated" in _bad(b"\x00\x00\x01", tmp_path).reason


def test_declared_length_zero(tmp_path: Path) -> None:
    """A declared todo length of zero is an error."""
    assert "zero" in _bad(b"\x00\x00\x00\x00{}", tmp_path).reason


def test_declared_length_too_long(tmp_path: Path) -> None:
    """A declared length past the end of the file (Haraka's 9999-byte fixture) is an error."""
    blob = struct.pack(">I", 9999) + b'{"domain":"example.com"'
    assert "wrong declared todo length 9999" in _bad(blob, tmp_path).reason


def test_declared_length_too_short(tmp_path: Path) -> None:
    """A length counted in characters, not bytes (Haraka's old bug), cuts the JSON short."""
    todo = f"\n{HARAKA_TODO}\n"
    error = _bad(haraka_file(HARAKA_TODO, MESSAGE, declared=len(todo)), tmp_path)
    assert "todo" in error.reason


def test_declared_length_swallows_message(tmp_path: Path) -> None:
    """A declared length longer than the JSON takes message bytes into it: bad todo."""
    todo = f"\n{HARAKA_TODO}\n".encode()
    error = _bad(haraka_file(HARAKA_TODO, MESSAGE, declared=len(todo) + 10), tmp_path)
    assert "todo" in error.reason


def test_bad_json(tmp_path: Path) -> None:
    """A todo that is not JSON is an error naming the file."""
    assert "bad JSON" in _bad(struct.pack(">I", 6) + b"{nope}", tmp_path).reason


def test_json_not_a_todo(tmp_path: Path) -> None:
    """JSON that is not an object, or lacks the domain or the recipients, is an error."""
    for body in (b'["x"]', b'{"rcpt_to": []}', b'{"domain": "d", "rcpt_to": 5}'):
        assert _bad(struct.pack(">I", len(body)) + body, tmp_path).reason


@pytest.mark.parametrize(
    ("todo", "reason"),
    [
        (b'{"domain": "d.test", "rcpt_to": []}', "rcpt_to is empty"),
        (b'{"domain": null, "rcpt_to": ["a@d.test"]}', "domain is None"),
        (b'{"domain": " ", "rcpt_to": ["a@d.test"]}', "domain is ' '"),
        (b'{"domain": "d.test", "rcpt_to": [{"address": "bob"}]}', "'bob' has no domain"),
        (b'{"domain": "d.test", "rcpt_to": ["bob@"]}', "'bob@' has no domain"),
        (b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "mail_from": "al\xffce@x"}', "UTF-8"),
        (b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "uuid": "\\udcff"}', "UTF-8"),
        (b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "message_size": 1e999}', "infinity"),
        (b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "message_size": -5}', "size"),
        (b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "queue_time": NaN}', "not a time"),
        (b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "queue_time": Infinity}', "not a time"),
        (b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "queue_time": -1}', "not a time"),
        (
            b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "queue_time": 1' + b"0" * 400 + b"}",
            "OverflowError",
        ),
        (
            b'{"domain": "d.test", "rcpt_to": ["a@d.test"], "n": '
            + b"[" * 100000
            + b"]" * 100000
            + b"}",
            "nested too deeply",
        ),
    ],
)
def test_a_todo_nothing_could_be_sent_for(todo: bytes, reason: str, tmp_path: Path) -> None:
    """No recipient, no domain, a recipient without a domain, an address that was not
    UTF-8, a size or time that is no number (inf, NaN, negative, too big for a float), JSON
    nested past Python's recursion limit: nothing could go out, so the file is unreadable
    (set aside), not a delivery (or a queue scan) that fails every time it is tried."""
    assert reason in _bad(struct.pack(">I", len(todo)) + todo, tmp_path).reason


def test_torn_message(tmp_path: Path) -> None:
    """A file cut inside the message disagrees with message_size: torn."""
    blob = queue_bytes(sample_todo())
    assert "torn" in _bad(blob[:-3], tmp_path).reason


def test_missing_file(tmp_path: Path) -> None:
    """A missing or unreadable file is a QueueFileError, not an OSError."""
    with pytest.raises(QueueFileError, match="cannot read"):
        read_todo(tmp_path / "gone")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_never_crash(blob: bytes) -> None:
    """Any bytes at all either read as a todo or raise QueueFileError."""
    with contextlib.suppress(QueueFileError):
        read_todo_from(io.BytesIO(blob), "fuzz", len(blob))


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=30),
    st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4),
    st.binary(max_size=200),
)
def test_round_trip_any_text(local: str, notes: dict[str, str], message: bytes) -> None:
    """Any local part, any text notes and any message bytes round-trip."""
    local = local.replace("@", "_") or "x"
    todo = sample_todo(mail_from=f"{local}@x.test", notes=notes)
    blob = queue_bytes(todo, message)
    read, offset = read_todo_from(io.BytesIO(blob), "mem", len(blob))
    assert read.mail_from == todo.mail_from
    assert read.notes == notes
    assert blob[offset:] == message


# -- names --------------------------------------------------------------------------------


def test_name_parse_haraka() -> None:
    """A Haraka file name parses; times come out in seconds."""
    name = QueueName.parse("1508455115683_1508455116000_3_90253_9Q4o4V_1_haraka")
    assert name.arrival == 1508455115.683
    assert name.next_attempt == 1508455116.0
    assert (name.attempts, name.pid, name.rand, name.counter, name.host) == (
        3,
        90253,
        "9Q4o4V",
        1,
        "haraka",
    )
    assert name.format() == "1508455115683_1508455116000_3_90253_9Q4o4V_1_haraka"


def test_name_round_trip_and_id() -> None:
    """A new name formats and parses back equal; rescheduling keeps the id."""
    name = QueueName.new(1_700_000_000.5, 1_700_000_060.25, hostname="mx_1:a")
    assert QueueName.parse(name.format()) == name
    assert name.host == escape_host("mx_1:a") == "mx\\1371\\072a"
    later = name.rescheduled(1_700_000_999.0, 2)
    assert later.id == name.id
    assert later.format() != name.format()
    assert later.format().split("_")[1:3] == ["1700000999000", "2"]


def test_names_are_unique() -> None:
    """Many names made at the same instant are all different."""
    names = {QueueName.new(1.0).format() for _ in range(5000)}
    assert len(names) == 5000


@pytest.mark.parametrize(
    "bad",
    [
        "zero-length",
        "error.1508455115683_1508455115683_0_90253_9Q4o4V_1_haraka",
        "__tmp__.1508455115683_1508455115683_0_90253_9Q4o4V_1_haraka",
        "1_2_3_4_5_6",
        "a_2_3_4_r_6_h",
        "1_2_3_4__6_h",
        "253402300800000_1_0_4_r_6_h",  # (a time past the year 9999: no date can show it)
        "1_" + "9" * 200 + "_0_4_r_6_h",
    ],
)
def test_name_parse_rejects(bad: str) -> None:
    """What is not a queue file name raises QueueFileError naming it."""
    with pytest.raises(QueueFileError, match="not a queue file name"):
        QueueName.parse(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_name_never_crashes(name: str) -> None:
    """Any text either parses as a queue file name (and formats back) or raises
    QueueFileError."""
    try:
        parsed = QueueName.parse(name)
    except QueueFileError:
        return
    assert QueueName.parse(parsed.format()) == parsed


def test_a_fifo_under_a_queue_file_name_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO (or anything but a regular file) is a QueueFileError, not a read that waits
    for a writer that never comes."""
    path = tmp_path / QueueName.new(1_700_000_000, hostname="h").format()
    os.mkfifo(path)
    with pytest.raises(QueueFileError, match="not a regular file"):
        read_todo(path)
