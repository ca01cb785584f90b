"""haraka-tw queue: list, stat, show, flush, delete and bounce, with and without a server
holding the queue."""

from __future__ import annotations

import email
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from haraka_tw.cli import main
from haraka_tw.outbound.qfile import QueueName, QueueRecipient, Todo
from haraka_tw.outbound.queue import QueueEntry, QueueStore
from tests.outbound.test_queue import hold_lock, stop

MESSAGE = b"From: a@x.test\r\nSubject: queued\r\nMessage-ID: <m1@x.test>\r\n\r\nsecret body\r\n"


@dataclass
class Setup:
    conf: Path
    queue: Path
    store: QueueStore
    due: QueueEntry
    deferred: QueueEntry
    other: QueueEntry
    null: QueueEntry

    def run(self, *args: str) -> int:
        return main(["queue", args[0], "-c", str(self.conf), *args[1:]])


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    """A config dir naming a queue dir holding four messages and one set-aside file."""
    conf, queue = tmp_path / "conf", tmp_path / "spool"
    conf.mkdir()
    (conf / "outbound.ini").write_text(f"[main]\nqueue_dir={queue}\n")
    (conf / "me").write_text("mta.x.test\n")
    store = QueueStore(queue, hostname="h")
    now = time.time()

    def add(domain: str, sender: str = "a@x.test", *rcpts: str) -> QueueEntry:
        todo = Todo(
            domain=domain,
            mail_from=sender,
            rcpt_to=[QueueRecipient(r) for r in rcpts or (f"b@{domain}",)],
            uuid=f"U-{domain}",
            queue_time=now - 7200,
        )
        return store.add(todo, [MESSAGE])

    due = add("example.com", "a@x.test", "b@example.com", "c@example.com")
    deferred = store.reschedule(add("example.com"), now + 3600, 2, "451 4.7.1 greylisted")
    other = store.reschedule(add("other.test"), now + 600, 1, "421 busy")
    null = add("null.test", "")
    (queue / f"error.{QueueName.new(now, hostname='h').format()}").write_bytes(b"")
    return Setup(conf, queue, store, due, deferred, other, null)


def test_list(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """list: a line per message with id, age, sender, recipients, tries, next, last error."""
    assert setup.run("list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "AGE", "FROM", "TO", "TRIES", "NEXT", "LAST", "ERROR"]
    by_id = {line.split()[0]: line for line in out[1:-1]}
    assert set(by_id) == {e.id for e in (setup.due, setup.deferred, setup.other, setup.null)}
    row = by_id[setup.deferred.id].split()
    assert row[1:7] == ["2h00m", "a@x.test", "b@example.com", "2", "in", "59m"]
    assert by_id[setup.deferred.id].endswith("451 4.7.1 greylisted")
    assert "b@example.com +1" in by_id[setup.due.id]
    assert "<>" in by_id[setup.null.id]
    assert out[-1] == "4 messages queued, 1 set aside as error.*"


def test_list_json(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """list --json: the same, as data."""
    assert setup.run("list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    entry = next(e for e in data["entries"] if e["id"] == setup.other.id)
    assert entry["domain"] == "other.test"
    assert (entry["attempts"], entry["last_error"]) == (1, "421 busy")
    assert entry["rcpt_to"] == ["b@other.test"]
    assert entry["size"] == len(MESSAGE)
    assert len(data["set_aside"]) == 1


def test_stat(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """stat: counts per domain and state, unreadable files counted as errors."""
    assert setup.run("stat") == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["DOMAIN", "DUE", "DEFERRED", "ERROR"],
        ["(unreadable)", "0", "0", "1"],
        ["example.com", "1", "1", "0"],
        ["null.test", "1", "0", "0"],
        ["other.test", "0", "1", "0"],
        ["total", "2", "2", "1"],
    ]
    assert setup.run("stat", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["domains"]["example.com"] == {"due": 1, "deferred": 1, "error": 0}
    assert data["total"] == {"due": 2, "deferred": 2, "error": 1}


def test_show(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """show: the envelope, the history and the headers, not the body."""
    assert setup.run("show", setup.deferred.id) == 0
    out = capsys.readouterr().out
    assert f"id:           {setup.deferred.id}" in out
    assert "to:           <b@example.com>" in out
    assert "#2: 451 4.7.1 greylisted" in out
    assert "Subject: queued\n" in out
    assert "secret body" not in out


def test_bad_ids_and_dirs(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad id, a missing queue dir or config dir: a message and status 1, no traceback."""
    assert setup.run("show", "nope") == 1
    assert "nope: no such message" in capsys.readouterr().err
    assert main(["queue", "list", "--queue-dir", str(tmp_path / "none")]) == 1
    assert "no queue directory" in capsys.readouterr().err
    assert main(["queue", "stat", "-c", str(tmp_path / "noconf")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_flush_direct(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """flush with no server: every deferred message is renamed due now; a domain narrows it."""
    assert setup.run("flush", "OTHER.test") == 0
    assert "flushed 1 message" in capsys.readouterr().out
    entries = {e.id: e for e in setup.store.listing().entries}
    now = time.time()
    assert entries[setup.other.id].next_attempt <= now
    assert entries[setup.other.id].attempts == 1
    assert entries[setup.deferred.id].next_attempt > now
    assert setup.run("flush") == 0
    assert all(e.next_attempt <= time.time() for e in setup.store.listing().entries)


def test_delete_direct(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """delete with no server removes the messages; an unknown id is reported, status 1."""
    assert setup.run("delete", setup.other.id, "bogus") == 1
    captured = capsys.readouterr()
    assert f"deleted {setup.other.id}" in captured.out
    assert "bogus: no such message" in captured.err
    assert setup.other.id not in {e.id for e in setup.store.listing().entries}
    assert setup.run("delete", setup.due.filename) == 0


def test_bounce_direct(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """bounce with no server removes the message and queues a DSN from <> to its sender; a
    message from <> is removed with no report."""
    assert setup.run("bounce", setup.due.id, setup.null.id) == 0
    out = capsys.readouterr().out
    assert f"bounced {setup.null.id} (no report due)" in out
    entries = {e.id: e for e in setup.store.listing().entries}
    assert setup.due.id not in entries and setup.null.id not in entries
    (report,) = [e for e in entries.values() if e.todo.mail_from == ""]
    assert f"report queued as {report.id}" in out
    assert (report.todo.domain, [r.address for r in report.todo.rcpt_to]) == (
        "x.test",
        ["a@x.test"],
    )
    msg: Any = email.message_from_bytes(b"".join(setup.store.load_message(report)))
    assert msg["From"] == "MAILER-DAEMON@mta.x.test"
    status = msg.get_payload()[1].get_payload()
    assert [r["Final-Recipient"] for r in status[1:]] == [
        "rfc822; b@example.com",
        "rfc822; c@example.com",
    ]
    assert status[1]["Status"] == "5.0.0"


def queue_files(queue: Path) -> list[str]:
    """The queue directory's queue and error files."""
    return sorted(p.name for p in queue.iterdir() if p.is_file() and p.name != ".lock")


def test_with_server_holding_the_lock(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """With a server holding the queue, flush, delete and bounce leave control files (and say
    so) and change nothing themselves."""
    before = queue_files(setup.queue)
    holder = hold_lock(setup.queue)
    try:
        assert setup.run("flush", "example.com") == 0
        assert setup.run("delete", setup.other.id) == 0
        assert setup.run("bounce", setup.due.filename) == 0
        assert setup.run("delete", "bogus") == 1
    finally:
        stop(holder)
    out = capsys.readouterr().out
    assert out.count(f"a running server (pid {holder.pid}) holds {setup.queue}") == 3
    assert "asked it to flush" in out and "asked it to bounce" in out
    assert queue_files(setup.queue) == before
    taken = [(c.action, c.args) for c in setup.store.take_controls()]
    assert taken == [
        ("flush", {"domain": "example.com"}),
        ("delete", {"ids": [setup.other.id]}),
        ("bounce", {"ids": [setup.due.id]}),
    ]
