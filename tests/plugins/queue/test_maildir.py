"""queue/maildir: durable Maildir delivery readable by mailbox.Maildir."""

from __future__ import annotations

import mailbox
import os
import smtplib
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from haraka_tw.plugins.queue import maildir as module
from haraka_tw.plugins.queue.maildir import BatchWriter, Maildir
from tests.support import maildir_messages, start_server, temp_dir


def test_deliver_tmp_fsync_rename(tmp_path: Path) -> None:
    """deliver writes in tmp/, fsyncs the file and new/, renames into new/."""
    md = Maildir(tmp_path / "md")
    md.create()
    synced: list[int] = []
    real_fsync = os.fsync
    with mock.patch("os.fsync", side_effect=lambda fd: (synced.append(fd), real_fsync(fd))[1]):
        path = Path(md.deliver([b"Subject: x\r\n", b"\r\nbody\r\n"]))
    assert path.parent == tmp_path / "md" / "new"
    assert path.read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert len(synced) == 2  # the file and the new/ directory
    assert list((tmp_path / "md" / "tmp").iterdir()) == []
    box = mailbox.Maildir(tmp_path / "md", create=False)
    (msg,) = list(box)
    assert msg["Subject"] == "x"


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails (the stream raised) removes its tmp file and puts nothing in
    new/, also when it was the first delivery, which made the Maildir."""
    md = Maildir(tmp_path / "md")

    def chunks() -> Any:
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        md.deliver(chunks())
    assert list((tmp_path / "md" / "tmp").iterdir()) == []
    assert list((tmp_path / "md" / "new").iterdir()) == []


def test_created_on_first_delivery(tmp_path: Path) -> None:
    """A missing Maildir is created (0700) by the first delivery, as the server's user."""
    md = Maildir(tmp_path / "later" / "md")
    path = Path(md.deliver([b"x\r\n"]))
    assert path.read_bytes() == b"x\r\n"
    assert ((tmp_path / "later" / "md" / "cur").stat().st_mode & 0o777) == 0o700


def test_unique_names(tmp_path: Path) -> None:
    """Two deliveries in the same microsecond still get distinct names."""
    md = Maildir(tmp_path)
    assert len({md.unique_name() for _ in range(1000)}) == 1000


def test_a_batch_shares_one_fsync_of_new(tmp_path: Path) -> None:
    """sync_batch fsyncs each file and new/ once, and a failed message stops no other."""
    md = Maildir(tmp_path / "md")
    written = [md.write_tmp([f"{i}\r\n".encode()]) for i in range(3)]
    os.close(written[1][0])  # its fsync fails: EBADF
    synced: list[int] = []
    real_fsync = os.fsync
    with mock.patch("os.fsync", side_effect=lambda fd: (synced.append(fd), real_fsync(fd))[1]):
        results = md.sync_batch(written)
    for i in (0, 2):
        os.close(written[i][0])
    assert isinstance(results[1], OSError)
    assert [Path(r).read_bytes() for r in (results[0], results[2])] == [b"0\r\n", b"2\r\n"]
    assert len(synced) == 4  # three files (one failing), and new/ once
    assert len(list((tmp_path / "md" / "new").iterdir())) == 2
    assert list((tmp_path / "md" / "tmp").iterdir()) == []


def test_a_failed_fsync_of_new_fails_the_whole_batch(tmp_path: Path) -> None:
    """If new/ cannot be synced, no message of the batch is acknowledged."""
    md = Maildir(tmp_path / "md")
    written = [md.write_tmp([b"a\r\n"]), md.write_tmp([b"b\r\n"])]
    with mock.patch("haraka_tw.plugins.queue.maildir.fsync_dir", side_effect=OSError("EIO")):
        results = md.sync_batch(written)
    for fd, _ in written:
        os.close(fd)
    assert [str(r) for r in results] == ["EIO", "EIO"]
    assert len(list((tmp_path / "md" / "new").iterdir())) == 2  # unacknowledged, kept
    assert list((tmp_path / "md" / "tmp").iterdir()) == []


def test_without_fsync_nothing_is_synced(tmp_path: Path) -> None:
    """fsync=false: the file is renamed into new/, and neither it nor new/ is synced."""
    md = Maildir(tmp_path / "md", fsync=False)
    with mock.patch("os.fsync") as fsync:
        path = md.deliver([b"x\r\n"])
    assert fsync.call_count == 0
    assert Path(path).read_bytes() == b"x\r\n"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class BatchWriterTests(TestCase):
    def writer(self) -> tuple[Maildir, BatchWriter]:
        md = Maildir(temp_dir(self) / "md")
        writer = BatchWriter(md, reactor)
        self.addCleanup(writer.stop)
        return md, writer

    @inlineCallbacks
    def test_messages_arriving_during_a_write_go_in_one_batch(self) -> Deferred[None]:
        """Messages arriving while the thread works are written next, together."""
        md, writer = self.writer()
        batches: list[int] = []
        taken, gate = threading.Event(), threading.Event()
        real = md.sync_batch

        def counted(written: Any) -> list[str | Exception]:
            batches.append(len(written))
            taken.set()
            gate.wait(10)
            return real(written)

        md.sync_batch = counted  # type: ignore[method-assign]
        first = writer.submit([b"0\r\n"], threading.Event())
        yield deferToThread(taken.wait, 10)  # the thread holds the first
        rest = [writer.submit([f"{i}\r\n".encode()], threading.Event()) for i in range(1, 6)]
        gate.set()
        paths = yield gatherResults([first, *rest])
        self.assertEqual(batches, [1, 5])
        self.assertEqual(
            [Path(p).read_bytes() for p in paths], [f"{i}\r\n".encode() for i in range(6)]
        )

    @inlineCallbacks
    def test_a_failed_write_fails_only_its_message_and_leaks_nothing(self) -> Deferred[None]:
        """A write that fails in the thread fails its message alone; every file is closed."""
        md, writer = self.writer()
        yield writer.submit([b"warm\r\n"], threading.Event())  # (the thread exists)
        before = open_descriptors()

        def broken() -> Any:
            yield b"partial"
            raise OSError("disk full")

        answers = [
            writer.submit([b"a\r\n"], threading.Event()),
            writer.submit(broken(), threading.Event()),
            writer.submit([b"c\r\n"], threading.Event()),
        ]
        yield self.assertFailure(answers[1], OSError)
        paths = yield gatherResults([answers[0], answers[2]])
        self.assertEqual([Path(p).read_bytes() for p in paths], [b"a\r\n", b"c\r\n"])
        self.assertEqual(os.listdir(md.path / "tmp"), [])
        self.assertEqual(open_descriptors(), before)

    @inlineCallbacks
    def test_an_abandoned_write_is_removed_and_fails(self) -> Deferred[None]:
        """A message given up on during its write is removed; before it, never written."""
        md, writer = self.writer()
        during, before = threading.Event(), threading.Event()
        real = md.sync_batch

        def give_up_meanwhile(written: Any) -> list[str | Exception]:
            paths = real(written)
            during.set()
            return paths

        md.sync_batch = give_up_meanwhile  # type: ignore[method-assign]
        failure = yield self.assertFailure(writer.submit([b"x\r\n"], during), TimeoutError)
        self.assertIn("removed", str(failure))
        before.set()
        written: list[int] = []
        real_write = md.write_tmp
        md.write_tmp = lambda chunks: written.append(1) or real_write(chunks)  # type: ignore[method-assign]
        failure = yield self.assertFailure(writer.submit([b"y\r\n"], before), TimeoutError)
        self.assertIn("before the message was written", str(failure))
        self.assertEqual(written, [])
        self.assertEqual(os.listdir(md.path / "new"), [])
        self.assertEqual(os.listdir(md.path / "tmp"), [])

    @inlineCallbacks
    def test_a_failing_writer_answers_its_batch_and_goes_on(self) -> Deferred[None]:
        """A bug in the writer fails its batch (no session left waiting); the next works."""
        md, writer = self.writer()
        real = md.sync_batch
        md.sync_batch = lambda written: []  # type: ignore[method-assign] # (one short)
        self.patch(threading, "excepthook", lambda args: None)  # the bug's traceback
        failure = yield self.assertFailure(writer.submit([b"x\r\n"], threading.Event()), Exception)
        self.assertIn("maildir writer failed", str(failure))
        self.assertEqual(os.listdir(md.path / "tmp"), [])  # its write is removed
        md.sync_batch = real  # type: ignore[method-assign]
        path = yield writer.submit([b"next\r\n"], threading.Event())
        self.assertEqual(Path(path).read_bytes(), b"next\r\n")

    @inlineCallbacks
    def test_stopped_thread_starts_again_for_a_new_message(self) -> Deferred[None]:
        """After stop (the service stopping) a late message is still delivered."""
        md = Maildir(temp_dir(self) / "md")
        writer = BatchWriter(md, reactor)
        yield writer.submit([b"a\r\n"], threading.Event())
        thread = writer._thread
        assert thread is not None
        writer.stop()
        yield deferToThread(thread.join, 10)
        self.assertFalse(thread.is_alive())
        self.assertIsNone(writer._thread)
        path = yield writer.submit([b"b\r\n"], threading.Event())
        writer.stop()
        self.assertEqual(Path(path).read_bytes(), b"b\r\n")


class MaildirServerTests(TestCase):
    def writing_threads(self) -> list[str]:
        """The names of the threads that call Maildir.write_tmp from now on, in order."""
        writers: list[str] = []
        real_write = module.Maildir.write_tmp

        def write_tmp(md: Maildir, chunks: Any) -> Any:
            writers.append(threading.current_thread().name)
            return real_write(md, chunks)

        self.patch(module.Maildir, "write_tmp", write_tmp)
        return writers

    @inlineCallbacks
    def test_250_only_after_file_is_in_new(self) -> Deferred[None]:
        """Over a real socket: when the 250 arrives the message is already in new/."""
        server, port = start_server(self, {"plugins": "rcpt_to.in_host_list\nqueue/maildir\n"})
        newdir = server.base / "maildir" / "new"  # type: ignore[attr-defined]

        def send() -> list[str]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("a@client.test", ["b@example.com"], b"Subject: one\r\n\r\nbody\r\n")
                return os.listdir(newdir)

        names = yield deferToThread(send)
        self.assertEqual(len(names), 1)
        data = (newdir / names[0]).read_bytes()
        self.assertTrue(data.startswith(b"Received: from "))
        self.assertTrue(data.endswith(b"\r\nSubject: one\r\n\r\nbody\r\n"))

    @inlineCallbacks
    def test_without_fsync_only_small_messages_are_written_by_the_reactor(self) -> Deferred[None]:
        """fsync=false: a small message is written in the reactor; large or spooled, not."""
        server, port = start_server(
            self,
            {
                "plugins": "rcpt_to.in_host_list\nqueue/maildir\n",
                "maildir.ini": "[main]\npath={base}/maildir\nfsync=false\n",
                "connection.ini": "[main]\nspool_after=100000\n",
            },
        )
        newdir = server.base / "maildir" / "new"  # type: ignore[attr-defined]
        self.patch(module, "INLINE_LIMIT", 20000)
        writers = self.writing_threads()
        synced: list[int] = []
        self.patch(os, "fsync", synced.append)
        line = b"y" * 98 + b"\r\n"
        bodies = [line * 100, line * 500, line * 2000]  # 10 KB, 50 KB, 200 KB (spooled)

        def send() -> list[int]:
            counts = []
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                for body in bodies:
                    s.sendmail("a@client.test", ["b@example.com"], b"Subject: s\r\n\r\n" + body)
                    counts.append(len(os.listdir(newdir)))
            return counts

        counts = yield deferToThread(send)
        self.assertEqual(counts, [1, 2, 3])  # each in new/ by its 250
        self.assertEqual(writers, ["MainThread", "queue/maildir", "queue/maildir"])
        self.assertEqual(synced, [])
        stored = sorted(maildir_messages(newdir.parent), key=len)
        for body, data in zip(bodies, stored, strict=True):
            self.assertTrue(data.endswith(b"\r\nSubject: s\r\n\r\n" + body))

    @inlineCallbacks
    def test_with_fsync_every_message_is_written_by_the_thread(self) -> Deferred[None]:
        """fsync=true: the reactor never writes; the thread writes and syncs."""
        _server, port = start_server(self, {"plugins": "rcpt_to.in_host_list\nqueue/maildir\n"})
        writers = self.writing_threads()

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("a@client.test", ["b@example.com"], b"Subject: one\r\n\r\nbody\r\n")

        yield deferToThread(send)
        self.assertEqual(writers, ["queue/maildir"])

    def test_unwritable_maildir_is_451_not_lost(self) -> Deferred[None]:
        """If the Maildir cannot be written the client gets a 4xx (try again), never a 250."""
        return self.unwritable("true")

    def test_unwritable_maildir_is_451_without_fsync_too(self) -> Deferred[None]:
        """With fsync=false (written in the reactor) a failed write is a 4xx as well."""
        return self.unwritable("false")

    @inlineCallbacks
    def unwritable(self, fsync: str) -> Deferred[None]:
        server, port = start_server(
            self,
            {
                "plugins": "rcpt_to.in_host_list\nqueue/maildir\n",
                "maildir.ini": f"[main]\npath={{base}}/maildir\nfsync={fsync}\n",
            },
        )
        maildir = server.base / "maildir"  # type: ignore[attr-defined]
        maildir.write_text("a file where the Maildir should be")

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("c.test")
                s.mail("a@client.test")
                s.rcpt("b@example.com")
                return s.data(b"Subject: x\r\n\r\nbody\r\n")

        code, text = yield deferToThread(send)
        self.assertEqual(code, 450)
        self.assertIn(b"Temporary storage failure", text)


class MaildirTimeoutTests(TestCase):
    @inlineCallbacks
    def test_timed_out_write_is_removed(self) -> Deferred[None]:
        """A write that finishes after the hook timed out is removed: no duplicate on retry."""
        server, port = start_server(
            self, {"plugins": "rcpt_to.in_host_list\nqueue/maildir\n", "plugin_timeout": "1\n"}
        )
        newdir = server.base / "maildir" / "new"  # type: ignore[attr-defined]
        release = threading.Event()
        real_sync = module.Maildir.sync_batch

        def slow_sync(md: Maildir, written: Any) -> list[str | Exception]:
            paths = real_sync(md, written)
            release.wait(10)
            return paths

        self.patch(module.Maildir, "sync_batch", slow_sync)

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("c.test")
                s.mail("a@client.test")
                s.rcpt("b@example.com")
                return s.data(b"Subject: x\r\n\r\nbody\r\n")

        code, text = yield deferToThread(send)
        self.assertEqual((code, text), (450, b"4.3.0 plugin timeout"))
        self.assertEqual(len(os.listdir(newdir)), 1)  # written, not yet judged
        release.set()
        for _ in range(100):
            if not os.listdir(newdir):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(os.listdir(newdir), [])
