"""The outbound queue: the durable directory, crash safety, the lock, control files, and the
memory queue keeping the same contract."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.outbound.qfile import QueueName, QueueRecipient, Todo, read_todo
from haraka_tw.outbound.queue import (
    FileQueue,
    IOutboundQueue,
    MemoryQueue,
    QueueEntry,
    QueueEntryMissing,
    QueueStore,
    queue_dir_of,
)

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@x.test\r\nTo: b@example.com\r\nSubject: t\r\n\r\nbody\r\n"
NOW = 1_700_000_000.0


def run_now(f: Callable[[], T]) -> Deferred[T]:
    """A thread runner that runs the work at once, in this thread."""
    return maybeDeferred(f)


def result(d: Deferred[T]) -> T:
    """The result of a Deferred that has fired (its failure raised)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    value: T = out[0]
    return value


def make_todo(domain: str = "example.com", *rcpts: str, sender: str = "a@x.test") -> Todo:
    """A todo for a few recipients at one domain."""
    addresses = rcpts or (f"b@{domain}",)
    return Todo(
        domain=domain,
        mail_from=sender,
        rcpt_to=[QueueRecipient(a) for a in addresses],
        uuid="U-1",
        queue_time=0,
        notes={"k": "v"},
    )


def clock_at(t: float) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


def file_queue(path: Path, t: float = NOW, **kw: Any) -> FileQueue:
    """A FileQueue that runs its disk work at once, on a clock at C{t}."""
    return FileQueue(path, clock=clock_at(t), threads=run_now, hostname="qhost", **kw)


@pytest.fixture(params=["file", "memory"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> IOutboundQueue:
    """Each implementation of IOutboundQueue."""
    if request.param == "file":
        return file_queue(tmp_path / "queue")
    return MemoryQueue(clock=clock_at(NOW))


# -- the contract, for both -------------------------------------------------------------


def test_provides_interface(queue: IOutboundQueue) -> None:
    """Both queues provide IOutboundQueue."""
    assert IOutboundQueue.providedBy(queue)


def test_add_then_scan(queue: IOutboundQueue) -> None:
    """An added message is due now, with no attempts, and comes back from scan whole."""
    entry = result(queue.add(make_todo(), [MESSAGE[:10], MESSAGE[10:]]))
    assert (entry.attempts, entry.next_attempt, entry.name.arrival) == (0, NOW, NOW)
    assert entry.todo.queue_time == NOW
    assert entry.message_size == len(MESSAGE)
    (scanned,) = result(queue.scan())
    assert scanned.id == entry.id
    assert scanned.todo == entry.todo
    assert b"".join(queue.load_message(scanned)) == MESSAGE


def test_add_later(queue: IOutboundQueue) -> None:
    """add with next_attempt schedules the first try later; scan orders by next attempt."""
    later = result(queue.add(make_todo("a.test"), [MESSAGE], next_attempt=NOW + 60))
    sooner = result(queue.add(make_todo("b.test"), [MESSAGE]))
    assert [e.id for e in result(queue.scan())] == [sooner.id, later.id]


def test_reschedule_keeps_history(queue: IOutboundQueue) -> None:
    """reschedule renames with the new attempt count and time and keeps each error."""
    entry = result(queue.add(make_todo(), [MESSAGE]))
    once = result(queue.reschedule(entry, NOW + 64, 1, "451 4.3.0 try later"))
    twice = result(queue.reschedule(once, NOW + 192, 2, "421 4.4.2 timeout"))
    assert (twice.id, twice.attempts, twice.next_attempt) == (entry.id, 2, NOW + 192)
    assert twice.last_error == "421 4.4.2 timeout"
    assert [(a.attempt, a.error) for a in twice.history] == [
        (1, "451 4.3.0 try later"),
        (2, "421 4.4.2 timeout"),
    ]
    (scanned,) = result(queue.scan())
    assert scanned.filename == twice.filename
    assert scanned.history == twice.history


def test_reschedule_without_error_and_dsn_flag(queue: IOutboundQueue) -> None:
    """A reschedule with no error adds no history; dsn_delayed_sent is remembered."""
    entry = result(queue.add(make_todo(), [MESSAGE]))
    flushed = result(queue.reschedule(entry, NOW, 0, None, dsn_delayed_sent=True))
    assert flushed.history == ()
    (scanned,) = result(queue.scan())
    assert scanned.todo.dsn_delayed_sent is True


def test_split(queue: IOutboundQueue) -> None:
    """split makes a second file: same message, arrival, attempts, history; fewer recipients."""
    todo = make_todo("example.com", "b@example.com", "c@example.com")
    entry = result(queue.add(todo, [MESSAGE]))
    entry = result(queue.reschedule(entry, NOW + 64, 1, "450 busy"))
    part = result(queue.split(entry, [entry.todo.rcpt_to[1]]))
    assert part.id != entry.id
    assert [r.address for r in part.todo.rcpt_to] == ["c@example.com"]
    assert (part.name.arrival, part.attempts, part.next_attempt) == (NOW, 1, NOW + 64)
    assert part.last_error == "450 busy"
    assert b"".join(queue.load_message(part)) == MESSAGE
    scanned = {e.id: e for e in result(queue.scan())}
    assert len(scanned[entry.id].todo.rcpt_to) == 2
    assert scanned[part.id].history == entry.history


def test_remove(queue: IOutboundQueue) -> None:
    """remove deletes the entry; removing it again is not an error."""
    entry = result(queue.add(make_todo(), [MESSAGE]))
    result(queue.remove(entry))
    result(queue.remove(entry))
    assert result(queue.scan()) == []


def test_remove_takes_the_file_out_at_once(tmp_path: Path) -> None:
    """FileQueue.remove renames the file into trash/ before it answers (no thread); the
    files discarded meanwhile are unlinked together on one thread, with their sidecars."""
    held: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def later(f: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        held.append((f, d))
        return d

    def run_held() -> None:
        f, d = held.pop(0)
        d.callback(f())

    queue = FileQueue(tmp_path / "queue", clock=clock_at(NOW), threads=later)
    store = queue.store
    entries = [store.add(make_todo(), [MESSAGE]) for _ in range(4)]
    entries[3] = store.reschedule(entries[3], NOW + 60, 1, "451 try later")
    assert store._state_path(entries[3].id).exists()
    for entry in entries:
        result(queue.remove(entry))  # fired already
        assert not entry.path.exists()
    assert store.listing().entries == []
    assert len(held) == 1  # the first file's unlink; the other three wait for it
    assert len(list(store.trash.iterdir())) == 4
    run_held()
    assert len(held) == 1  # the three others, together
    run_held()
    assert list(store.trash.iterdir()) == []
    assert not store._state_path(entries[3].id).exists()
    result(queue.remove(entries[0]))  # gone already: not an error
    run_held()
    assert held == []


def test_one_file_that_cannot_be_unlinked_does_not_keep_the_others(tmp_path: Path) -> None:
    """empty_trash goes on past a file it cannot unlink and then says how many are left;
    what is left stays in trash/ (never queued again) for the next start."""
    store = QueueStore(tmp_path / "queue", now=lambda: NOW)
    entries = [store.add(make_todo(), [MESSAGE]) for _ in range(3)]
    discarded = [(store.discard(entry), entry) for entry in entries]
    stuck = discarded[0][0]
    assert stuck is not None
    stuck.unlink()
    stuck.mkdir()  # unlink() of a directory fails with an OSError other than "missing"
    with pytest.raises(OSError, match=r"1 left in trash/ until the next start"):
        store.empty_trash(discarded)
    assert [p.name for p in store.trash.iterdir()] == [stuck.name]
    assert store.listing().entries == []


def test_trash_left_at_a_stop_is_removed_at_start(tmp_path: Path) -> None:
    """Files discarded but not yet unlinked when the server stopped are removed by scan;
    trash/ missing (an older queue directory) is made on demand."""
    store = QueueStore(tmp_path / "queue", now=lambda: NOW)
    entry = store.add(make_todo(), [MESSAGE])
    assert not store.trash.exists()  # made when first needed
    trashed = store.discard(entry)
    assert trashed is not None and trashed.exists() and not entry.path.exists()
    assert store.discard(entry) is None
    assert store.scan() == []
    assert list(store.trash.iterdir()) == []


def test_gone_entry(queue: IOutboundQueue) -> None:
    """reschedule and split of a removed entry fail with QueueEntryMissing."""
    entry = result(queue.add(make_todo(), [MESSAGE]))
    result(queue.remove(entry))
    with pytest.raises(QueueEntryMissing):
        result(queue.reschedule(entry, NOW + 1, 1, "x"))
    with pytest.raises(QueueEntryMissing):
        result(queue.split(entry, entry.todo.rcpt_to))


def test_look_reads_without_changing(queue: IOutboundQueue) -> None:
    """look lists what is queued now, as scan would, and settles at once when no write is
    under way."""
    first = result(queue.add(make_todo("one.test"), [MESSAGE]))
    second = result(queue.add(make_todo("two.test"), [MESSAGE], next_attempt=NOW + 60))
    listing = result(queue.look())
    assert [e.id for e in listing.entries] == [first.id, second.id]
    assert result(queue.writes_settled()) is None


def test_look_leaves_an_unreadable_file_where_it_is(tmp_path: Path) -> None:
    """A file look cannot read (perhaps still being copied in) is reported, not set aside:
    only the start-up scan renames files."""
    q = file_queue(tmp_path / "q")
    q.store.ensure_dirs()
    torn = tmp_path / "q" / QueueName.new(NOW, NOW, hostname="elsewhere").format()
    torn.write_bytes(b"\x00\x00\x01\x00{")
    listing = result(q.look())
    assert listing.entries == []
    assert [p for p, _ in listing.bad] == [torn]
    assert torn.exists()


class HeldThreads:
    """A thread runner that does the work at once but fires each Deferred when the test
    says, in the order the test chooses."""

    def __init__(self) -> None:
        self.held: list[tuple[Deferred[Any], Any]] = []

    def __call__(self, f: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        try:
            value: Any = f()
        except Exception:
            value = Failure()
        self.held.append((d, value))
        return d

    def fire(self, index: int) -> None:
        d, value = self.held[index]
        if isinstance(value, Failure):
            d.errback(value)
        else:
            d.callback(value)


def test_writes_settled_fires_after_the_writers_callbacks(tmp_path: Path) -> None:
    """A write finished on its thread whose caller has not had the entry yet keeps
    writes_settled waiting; it fires after the callbacks the caller added."""
    threads = HeldThreads()
    q = FileQueue(tmp_path / "q", clock=clock_at(NOW), threads=threads, hostname="qhost")
    order: list[str] = []
    q.add(make_todo(), [MESSAGE]).addCallback(lambda entry: order.append("scheduled"))
    settled = q.writes_settled().addCallback(lambda _: order.append("settled"))
    assert order == []
    assert len(q.store.listing().entries) == 1  # on disk, not yet handed back
    threads.fire(0)
    assert order == ["scheduled", "settled"]
    result(settled)
    order.clear()
    result(q.writes_settled().addCallback(lambda _: order.append("nothing under way")))
    assert order == ["nothing under way"]


def test_a_failed_write_settles_too(tmp_path: Path) -> None:
    """writes_settled does not wait for ever on a write that failed, nor swallow its
    failure from the writer."""
    entry = result(file_queue(tmp_path / "q").add(make_todo(), [MESSAGE]))
    entry.path.unlink()
    threads = HeldThreads()
    q = FileQueue(tmp_path / "q", clock=clock_at(NOW), threads=threads, hostname="qhost")
    failed: list[Failure] = []
    q.reschedule(entry, NOW, 1, "x").addErrback(failed.append)
    settled: list[None] = []
    q.writes_settled().addCallback(settled.append)
    assert settled == []
    threads.fire(0)
    assert settled == [None]
    assert [f.type for f in failed] == [QueueEntryMissing]


def test_controls(queue: IOutboundQueue) -> None:
    """Control requests come back oldest first, each once."""
    result(queue.post_control("flush", {"domain": "example.com"}))
    result(queue.post_control("delete", {"ids": ["x"]}))
    taken = result(queue.take_controls())
    assert [(c.action, c.args) for c in taken] == [
        ("flush", {"domain": "example.com"}),
        ("delete", {"ids": ["x"]}),
    ]
    assert result(queue.take_controls()) == []


# -- the file queue ---------------------------------------------------------------------


def fired(entry: QueueEntry, events: list[tuple[str, str]]) -> QueueEntry:
    """Record that the Deferred fired."""
    events.append(("fired", str(entry.path)))
    return entry


def test_add_is_durable_before_it_fires(tmp_path: Path) -> None:
    """add writes in tmp/, fsyncs the file, renames it in and fsyncs the directory, and
    only then fires."""
    q = file_queue(tmp_path / "q")
    q.store.ensure_dirs()
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a: Any, b: Any) -> None:
        events.append(("rename", str(b)))
        real_rename(a, b)

    with mock.patch("os.fsync", fsync), mock.patch("os.rename", rename):
        entry = result(q.add(make_todo(), [MESSAGE]).addCallback(fired, events))
    final = str(tmp_path / "q" / entry.filename)
    assert events[0][0] == "fsync" and events[0][1].startswith(str(tmp_path / "q" / "tmp"))
    assert events[1:] == [
        ("rename", final),
        ("fsync", str(tmp_path / "q")),
        ("fired", final),
    ]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails fails the Deferred and leaves no file, in tmp/ or the queue."""
    q = file_queue(tmp_path / "q")

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        result(q.add(make_todo(), chunks()))
    assert list((tmp_path / "q" / "tmp").iterdir()) == []
    assert [p.name for p in (tmp_path / "q").iterdir() if p.is_file()] == []


def test_scan_cleans_up_and_sets_aside(tmp_path: Path) -> None:
    """scan removes unfinished temp files (ours and Haraka's), renames torn and empty files
    error.<name> with a log line, leaves strangers alone, drops orphan sidecars."""
    lines: list[str] = []
    q = file_queue(tmp_path / "q", log=lines.append)
    good = result(q.add(make_todo(), [MESSAGE]))
    torn = result(q.add(make_todo("t.test"), [MESSAGE]))
    torn.path.write_bytes(torn.path.read_bytes()[:-5])
    empty_name = QueueName.new(NOW, hostname="h").format()
    (tmp_path / "q" / empty_name).write_bytes(b"")
    (tmp_path / "q" / "tmp" / "half-written").write_bytes(b"\x00\x00")
    (tmp_path / "q" / "__tmp__.123_456_0_1_abc_1_h").write_bytes(b"x")
    (tmp_path / "q" / "README").write_text("not mail")
    (tmp_path / "q" / "state" / "1_2_orphan_3_h.json").write_text("{}")
    scanned = result(q.scan())
    assert [e.id for e in scanned] == [good.id]
    names = sorted(p.name for p in (tmp_path / "q").iterdir() if p.is_file())
    assert names == sorted(
        [".lock"] * 0 + ["README", good.filename, f"error.{torn.filename}", f"error.{empty_name}"]
    )
    assert list((tmp_path / "q" / "tmp").iterdir()) == []
    assert list((tmp_path / "q" / "state").iterdir()) == []
    assert any("torn" in line and torn.filename in line for line in lines)
    assert any("zero bytes" in line for line in lines)
    assert any("README" in line for line in lines)


def test_scan_adopts_haraka_file(tmp_path: Path) -> None:
    """A file Haraka wrote is picked up by scan like one of ours."""
    from tests.outbound.test_qfile import HARAKA_TODO, haraka_file

    qdir = tmp_path / "q"
    qdir.mkdir()
    name = "1508455115683_1508455115683_0_90253_9Q4o4V_1_haraka"
    (qdir / name).write_bytes(haraka_file(HARAKA_TODO, MESSAGE))
    (entry,) = result(file_queue(qdir).scan())
    assert (entry.filename, entry.todo.domain, entry.todo.mail_from) == (
        name,
        "tnpi.net",
        "Matt@tnpi.net",
    )
    assert b"".join(file_queue(qdir).load_message(entry)) == MESSAGE


def test_sidecar_survives_restart(tmp_path: Path) -> None:
    """History written by one FileQueue is read by the next (a restart)."""
    first = file_queue(tmp_path / "q")
    entry = result(first.add(make_todo(), [MESSAGE]))
    result(first.reschedule(entry, NOW + 64, 1, "451 greylisted"))
    (again,) = result(file_queue(tmp_path / "q", NOW + 100).scan())
    assert (again.attempts, again.last_error) == (1, "451 greylisted")
    assert (tmp_path / "q" / "state" / f"{entry.id}.json").exists()
    result(first.remove(again))
    assert not (tmp_path / "q" / "state" / f"{entry.id}.json").exists()


def test_load_message_streams(tmp_path: Path) -> None:
    """load_message gives the message in 64 KiB chunks, not all at once."""
    q = file_queue(tmp_path / "q")
    big = b"Subject: big\r\n\r\n" + b"x" * 200_000
    entry = result(q.add(make_todo(), [big]))
    chunks = list(q.load_message(entry))
    assert [len(c) for c in chunks[:-1]] == [65536] * 3
    assert b"".join(chunks) == big


def test_lock_is_exclusive(tmp_path: Path) -> None:
    """Only one holder of the queue directory at a time; unlock lets the next take it."""
    first, second = file_queue(tmp_path / "q"), file_queue(tmp_path / "q")
    assert first.lock()
    assert first.lock()  # already ours
    assert not second.lock()
    assert first.store.lock_holder() == os.getpid()
    first.unlock()
    assert second.lock()
    second.unlock()


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    """A lock held by another process makes lock() answer False, until that process ends."""
    q = file_queue(tmp_path / "q")
    q.store.ensure_dirs()
    holder = hold_lock(tmp_path / "q")
    try:
        assert not q.lock()
        assert q.store.lock_holder() == holder.pid
    finally:
        stop(holder)
    assert q.lock()
    q.unlock()


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill a helper process and close its pipe."""
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def hold_lock(queue_dir: Path) -> subprocess.Popen[str]:
    """A process that holds queue_dir/.lock (and writes its pid there) until killed."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.write(fd, b'%d\\n' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(queue_dir / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_unreadable_control_set_aside(tmp_path: Path) -> None:
    """A control file that is not JSON is set aside (error.*) and the others still taken."""
    lines: list[str] = []
    q = file_queue(tmp_path / "q", log=lines.append)
    result(q.post_control("flush", {"domain": None}))
    (tmp_path / "q" / "control" / "00000000000000000000-bad-x.json").write_text("{nope")
    assert [c.action for c in result(q.take_controls())] == ["flush"]
    assert [p.name for p in (tmp_path / "q" / "control").iterdir()] == [
        "error.00000000000000000000-bad-x.json"
    ]
    assert lines


def test_queue_dir_of(tmp_path: Path) -> None:
    """queue_dir: outbound.ini [main] queue_dir, else Haraka's queue_dir file, else var/queue;
    relative paths from the working directory."""
    conf = tmp_path / "conf"
    conf.mkdir()
    assert queue_dir_of(ConfigDirectory([conf]), cwd=tmp_path) == tmp_path / "var" / "queue"
    (conf / "queue_dir").write_text("/srv/haraka/queue\n")
    assert queue_dir_of(ConfigDirectory([conf]), cwd=tmp_path) == Path("/srv/haraka/queue")
    (conf / "outbound.ini").write_text("[main]\nqueue_dir=spool/out\n")
    assert queue_dir_of(ConfigDirectory([conf]), cwd=tmp_path) == tmp_path / "spool" / "out"


class ThreadedFileQueueTests(TestCase):
    """With the real thread pool (trial spins the reactor)."""

    def test_add_runs_in_a_thread(self) -> Deferred[None]:
        """add's disk work runs off the reactor thread; the file is complete when it fires."""
        q = FileQueue(Path(tempfile.mkdtemp()) / "q")
        seen: list[int] = []
        main = threading.get_ident()

        def chunks() -> Iterator[bytes]:
            seen.append(threading.get_ident())
            yield MESSAGE

        def check(entry: QueueEntry) -> None:
            assert seen and seen != [main]
            todo, offset = read_todo(entry.path)
            assert entry.path.read_bytes()[offset:] == MESSAGE
            assert todo.rcpt_to == make_todo().rcpt_to
            shutil.rmtree(entry.path.parent)

        return q.add(make_todo(), chunks()).addCallback(check)


# -- kill -9 while writing ----------------------------------------------------------------

WRITER = r"""
import hashlib, random, sys
from twisted.internet import reactor
from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.outbound.queue import FileQueue

queue = FileQueue(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
count = [0]

def body(i, size):
    line = (b"%08d " % i) * 7 + b"\r\n"
    yield b"Subject: %d\r\n\r\n" % i
    sent = 0
    while sent < size:
        yield line * 1024
        sent += len(line) * 1024

def one(_=None):
    i = count[0] = count[0] + 1
    tag = f"{sys.argv[2]}-{i}"
    size = rng.randrange(50_000, 1_500_000)
    todo = Todo(domain="example.com", mail_from="a@x.test",
                rcpt_to=[QueueRecipient("b@example.com")], uuid=tag, queue_time=0,
                notes={"i": i, "size": size})
    d = queue.add(todo, body(i, size))
    d.addCallback(lambda entry: print(entry.filename, flush=True))
    d.addCallback(one)

reactor.callWhenRunning(one)
reactor.run()
"""


def expected_body(i: int, size: int) -> bytes:
    """The message the writer script makes for (i, size)."""
    line = (b"%08d " % i) * 7 + b"\r\n"
    block = line * 1024
    n = -(-size // len(block)) if size > 0 else 0
    return b"Subject: %d\r\n\r\n" % i + block * n


def test_kill_9_while_adding(tmp_path: Path) -> None:
    """A writer killed at random moments leaves only complete files in the queue: every
    add that fired is there whole, nothing partial is, and scan clears the rest."""
    qdir = tmp_path / "q"
    acknowledged: list[str] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(4)
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(qdir), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        acknowledged.append(proc.stdout.readline().strip())  # at least one done
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        acknowledged += [line for line in out.splitlines() if line]
    lines: list[str] = []
    entries = result(file_queue(qdir, log=lines.append).scan())
    names = {e.filename for e in entries}
    assert set(acknowledged) <= names
    for entry in entries:
        body = b"".join(file_queue(qdir).load_message(entry))
        want = expected_body(entry.todo.notes["i"], entry.todo.notes["size"])
        assert hashlib.sha256(body).digest() == hashlib.sha256(want).digest(), entry.filename
    assert not [p for p in qdir.iterdir() if p.name.startswith("error.")]
    assert list((qdir / "tmp").iterdir()) == []


def test_store_find(tmp_path: Path) -> None:
    """find takes an id or a whole file name; an unknown one is None."""
    store = QueueStore(tmp_path / "q", now=lambda: NOW, hostname="h")
    entry = store.add(make_todo(), [MESSAGE])
    assert store.find(entry.id) == entry
    assert store.find(entry.filename) == entry
    assert store.find("1_2_nope_3_h") is None


def test_scan_keeps_files_being_written_now(tmp_path: Path) -> None:
    """scan() removes other processes' leftovers from tmp/, never this store's own writes
    (a message arriving while the queue is scanned at start must not lose its file)."""
    from haraka_tw.outbound.store import QueueStore

    store = QueueStore(tmp_path / "q")
    store.ensure_dirs()
    ours = store.tmp / f"1_2_0_1_x_1_h.{store.token}.123.1.2.abc"
    theirs = store.tmp / "1_2_0_1_x_1_h.othertoken.123.1.2.abc"
    ours.write_bytes(b"half written")
    theirs.write_bytes(b"left by a crash")
    store.scan()
    assert ours.exists()
    assert not theirs.exists()
