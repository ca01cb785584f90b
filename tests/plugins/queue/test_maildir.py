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

from haraka_tw.plugins.queue.maildir import BatchWriter, Maildir
from tests.support import start_server, temp_dir


def test_deliver_tmp_fsync_rename(tmp_path: Path) -> None:
    """deliver writes in tmp/, fsyncs the file and new/, renames into new/."""
    md = Maildir(tmp_path / "md")
    md.create()
    synced: list[int] = []
    real_fsync = os.fsync
    with mock.patch("os.fsync", side_effect=lambda fd: (synced.append(fd), real_fsync(fd))[1]):
        path = md.deliver([b"Subject: x\r\n", b"\r\nbody\r\n"])
    assert path.parent == tmp_path / "md" / "new"
    assert path.read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert len(synced) == 2  # the file and the new/ directory
    assert list((tmp_path / "md" / "tmp").iterdir()) == []
    box = mailbox.Maildir(tmp_path / "md", create=False)
    (msg,) = list(box)
    assert msg["Subject"] == "x"


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails removes its tmp file and puts nothing in new/."""
    md = Maildir(tmp_path / "md")
    md.create()

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
    path = md.deliver([b"x\r\n"])
    assert path.read_bytes() == b"x\r\n"
    assert ((tmp_path / "later" / "md" / "cur").stat().st_mode & 0o777) == 0o700


def test_unique_names(tmp_path: Path) -> None:
    """Two deliveries in the same microsecond still get distinct names."""
    md = Maildir(tmp_path)
    assert len({md.unique_name() for _ in range(1000)}) == 1000


def test_a_batch_shares_one_fsync_of_new(tmp_path: Path) -> None:
    """deliver_batch fsyncs each file and new/ once; a failed message leaves nothing and
    does not stop the others."""
    md = Maildir(tmp_path / "md")
    md.create()

    def broken() -> Any:
        yield b"partial"
        raise OSError("disk full")

    synced: list[int] = []
    real_fsync = os.fsync
    with mock.patch("os.fsync", side_effect=lambda fd: (synced.append(fd), real_fsync(fd))[1]):
        results = md.deliver_batch([[b"one\r\n"], broken(), [b"three\r\n"]])
    assert isinstance(results[1], OSError)
    assert [r.read_bytes() for r in (results[0], results[2])] == [b"one\r\n", b"three\r\n"]
    assert len(synced) == 3  # two files, and new/ once
    assert len(list((tmp_path / "md" / "new").iterdir())) == 2
    assert list((tmp_path / "md" / "tmp").iterdir()) == []


def test_a_failed_fsync_of_new_fails_the_whole_batch(tmp_path: Path) -> None:
    """If new/ cannot be synced, no message of the batch is acknowledged."""
    md = Maildir(tmp_path / "md")
    with mock.patch("haraka_tw.plugins.queue.maildir.fsync_dir", side_effect=OSError("EIO")):
        results = md.deliver_batch([[b"a\r\n"], [b"b\r\n"]])
    assert [str(r) for r in results] == ["EIO", "EIO"]


class BatchWriterTests(TestCase):
    @inlineCallbacks
    def test_messages_arriving_during_a_write_go_in_one_batch(self) -> Deferred[None]:
        """While the thread writes one message, those that arrive wait and are written
        together next; each gets its own answer."""
        md = Maildir(temp_dir(self) / "md")
        writer = BatchWriter(md, reactor)
        self.addCleanup(writer.stop)
        batches: list[int] = []
        taken, gate = threading.Event(), threading.Event()
        real = md.deliver_batch

        def counted(messages: Any) -> list[Path | Exception]:
            batches.append(len(messages))
            taken.set()
            gate.wait(10)
            return real(messages)

        md.deliver_batch = counted  # type: ignore[method-assign]
        first = writer.submit([b"0\r\n"], threading.Event())
        yield deferToThread(taken.wait, 10)  # the thread holds the first
        rest = [writer.submit([f"{i}\r\n".encode()], threading.Event()) for i in range(1, 6)]
        gate.set()
        paths = yield gatherResults([first, *rest])
        self.assertEqual(batches, [1, 5])
        self.assertEqual([p.read_bytes() for p in paths], [f"{i}\r\n".encode() for i in range(6)])

    @inlineCallbacks
    def test_an_abandoned_write_is_removed_and_fails(self) -> Deferred[None]:
        """A message whose hook timed out while it was written is removed, not kept; one
        given up on before its turn is not written at all."""
        md = Maildir(temp_dir(self) / "md")
        writer = BatchWriter(md, reactor)
        self.addCleanup(writer.stop)
        during, before = threading.Event(), threading.Event()
        real = md.deliver_batch

        def give_up_meanwhile(messages: Any) -> list[Path | Exception]:
            paths = real(messages)
            during.set()
            return paths

        md.deliver_batch = give_up_meanwhile  # type: ignore[method-assign]
        failure = yield self.assertFailure(writer.submit([b"x\r\n"], during), TimeoutError)
        self.assertIn("removed", str(failure))
        before.set()
        written: list[int] = []
        md.deliver_batch = lambda messages: written.append(len(messages)) or []  # type: ignore[method-assign]
        yield self.assertFailure(writer.submit([b"y\r\n"], before), TimeoutError)
        self.assertEqual(list((md.path / "new").iterdir()), [])
        self.assertEqual(written, [])  # nothing to write: not even called

    @inlineCallbacks
    def test_a_failing_writer_answers_its_batch_and_goes_on(self) -> Deferred[None]:
        """A bug in the writer fails the messages of its batch (the sessions answer 4xx)
        instead of leaving them waiting, and the next message is written."""
        md = Maildir(temp_dir(self) / "md")
        writer = BatchWriter(md, reactor)
        self.addCleanup(writer.stop)
        real = md.deliver_batch
        md.deliver_batch = lambda messages: []  # type: ignore[method-assign] # (one short)
        self.patch(threading, "excepthook", lambda args: None)  # the bug's traceback
        failure = yield self.assertFailure(writer.submit([b"x\r\n"], threading.Event()), Exception)
        self.assertIn("maildir writer failed", str(failure))
        md.deliver_batch = real  # type: ignore[method-assign]
        path = yield writer.submit([b"next\r\n"], threading.Event())
        self.assertEqual(path.read_bytes(), b"next\r\n")

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
        self.assertEqual(path.read_bytes(), b"b\r\n")


class MaildirServerTests(TestCase):
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
    def test_unwritable_maildir_is_451_not_lost(self) -> Deferred[None]:
        """If the Maildir cannot be written the client gets a 4xx (try again), never a 250."""
        server, port = start_server(self, {"plugins": "rcpt_to.in_host_list\nqueue/maildir\n"})
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
        from haraka_tw.plugins.queue import maildir as module

        server, port = start_server(
            self, {"plugins": "rcpt_to.in_host_list\nqueue/maildir\n", "plugin_timeout": "1\n"}
        )
        newdir = server.base / "maildir" / "new"  # type: ignore[attr-defined]
        release = threading.Event()
        real_deliver = module.Maildir.deliver_batch

        def slow_deliver(md: Maildir, messages: Any) -> list[Path | Exception]:
            paths = real_deliver(md, messages)
            release.wait(10)
            return paths

        self.patch(module.Maildir, "deliver_batch", slow_deliver)

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
