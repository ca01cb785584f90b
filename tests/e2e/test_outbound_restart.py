"""The outbound queue under the real command: C{twistd -n haraka --config DIR} as a
subprocess relaying to a loopback peer found through a loopback DNS server (both in the
test's reactor): a clean restart, a C{kill -9}, and C{haraka-tw queue} against the
running server's queue directory.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.outbound.queue import QueueEntry, QueueStore
from tests.dnsserver import serve
from tests.e2e.outbound_world import (
    Twistd,
    WorldPeer,
    message_id,
    queue_listing,
    wait_until,
)
from tests.smtp_peers import PeerScript
from tests.support import TWISTD, free_port, temp_dir

# twistd stopped by SIGTERM re-raises it after a clean shutdown (see test_twistd).
CLEAN_STOP = frozenset({0, -15})
SENDER = "alice@client.test"

ZONE = """
$ORIGIN test.
@          300 IN SOA ns.test. admin.test. 1 60 60 60 60
dest       300 IN MX 10 mx.dest
mx.dest    300 IN A 127.0.0.1
client     300 IN MX 10 mx.dest
"""


def message(mid: str) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <bob@dest.test>\r\nSubject: restart\r\n"
        f"Message-Id: {mid}\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\nHello.\r\n"
    ).encode()


def move_in(scratch: Path, queue_dir: Path, mid: str, due_in: float = 0) -> QueueEntry:
    """A queue file for bob@dest.test written by another host's queue in C{scratch} and
    moved into C{queue_dir}, an hour old (mv keeps a file's time: well past a copy's)."""
    other = QueueStore(scratch, log=lambda line: None)
    todo = Todo("dest.test", SENDER, [QueueRecipient("bob@dest.test")], mid, 0)
    entry = other.add(todo, [message(mid)], next_attempt=time.time() + due_in)
    moved = queue_dir / entry.filename
    os.rename(entry.path, moved)
    os.utime(moved, (time.time() - 3600,) * 2)
    return entry


# Enough that the kill always comes mid-stream: with 60, a fast outbound side could let the
# client finish first on a busy machine (seen once in CI).
KILL_CLIENT_MESSAGES = 300


class TwistdOutboundCase(TestCase):
    def setUp(self) -> None:
        if not TWISTD.exists():
            raise SkipTest("no twistd next to this Python")
        self.base = temp_dir(self)
        self.smtp_port = free_port()
        self.peer_port = free_port()
        self.queue_dir = self.base / "queue"

    def twistd(self, intervals: str) -> Twistd:
        dns = serve(self, ZONE, origin="test.")
        return Twistd(
            self,
            self.base,
            {
                "smtp.ini": f"[main]\nlisten=127.0.0.1:{self.smtp_port}\n",
                "me": "mx.test\n",
                "plugins": "tests.e2e.outbound_world:Factory\n",
                "outbound.ini": f"[main]\nqueue_dir={self.queue_dir}\nmx_port={self.peer_port}\n"
                f"local_mx_ok=true\ntemp_fail_intervals={intervals}\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\n",
            },
        )

    def start_peer(self, script: PeerScript | None = None) -> WorldPeer:
        peer = WorldPeer(script or PeerScript(name="mx.dest"))
        peer.start("127.0.0.1", self.peer_port)
        self.addCleanup(peer.stop)
        return peer

    def send(self, mids: list[str]) -> Deferred[None]:
        def run() -> None:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as s:
                for mid in mids:
                    self.assertEqual(s.sendmail(SENDER, ["bob@dest.test"], message(mid)), {})

        return deferToThread(run)

    def deferred_once(self, count: int) -> bool:
        """C{count} messages queued, each tried once and refused a connection."""
        entries = queue_listing(self.queue_dir)
        return len(entries) == count and all(
            e.attempts == 1 and "connect" in (e.last_error or "") for e in entries
        )

    def queue_empty(self) -> bool:
        return not queue_listing(self.queue_dir)

    def queued_ids(self) -> set[str]:
        """The Message-Ids of the messages in the queue directory."""
        store = QueueStore(self.queue_dir, log=lambda line: None)
        return {message_id(b"".join(store.load_message(e))) for e in store.listing().entries}


class RestartTests(TwistdOutboundCase):
    @inlineCallbacks
    def test_deferred_messages_survive_sigterm_and_go_exactly_once(self) -> Deferred[None]:
        """Queued while the peer is down, SIGTERM, restart with the peer up: each delivered once."""
        server = self.twistd("5s*10")
        yield server.start(self.smtp_port)
        mids = [f"<restart{i}@t>" for i in range(5)]
        yield self.send(mids)
        yield wait_until(lambda: self.deferred_once(5), 10, "five refused first attempts")
        code = yield server.stop()
        self.assertIn(code, CLEAN_STOP, server.output())
        self.assertEqual(self.queued_ids(), set(mids))
        peer = self.start_peer()
        yield server.start(self.smtp_port)
        yield wait_until(lambda: len(peer.messages) >= 5, 20, "the five deliveries")
        yield wait_until(self.queue_empty, 5, "the queue to drain")
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(sorted(peer.ids()), sorted(mids))
        code = yield server.stop()
        self.assertIn(code, CLEAN_STOP, server.output())


class KillTests(TwistdOutboundCase):
    @inlineCallbacks
    def test_kill_9_while_receiving_and_delivering_loses_nothing(self) -> Deferred[None]:
        """kill -9 mid-stream, restart: no 250'd message lost; duplicates only if in flight.

        SMTP cannot give exactly-once across a crash during delivery: a message the peer
        took whose queue file was not yet removed (the 250 after the dot not yet read or
        acted on) is sent again after the restart. So this asserts no loss, and that any
        duplicate is a message the peer had before the kill and that was still queued.
        """
        peer = self.start_peer(PeerScript(name="mx.dest", delays={"DOT": 0.15}))
        server = self.twistd("5s*10")
        yield server.start(self.smtp_port)
        accepted: list[str] = []
        stop = threading.Event()

        def client() -> None:
            for i in range(KILL_CLIENT_MESSAGES):
                mid = f"<kill{i}@t>"
                if stop.is_set():
                    return
                try:
                    with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=5) as s:
                        refused = s.sendmail(SENDER, ["bob@dest.test"], message(mid))
                except (OSError, smtplib.SMTPException):
                    return
                if not refused:
                    accepted.append(mid)

        sending = deferToThread(client)

        def mid_stream() -> bool:
            # Some delivered and removed, some accepted and not yet delivered or settled.
            settled = len(accepted) - len(queue_listing(self.queue_dir))
            return len(accepted) >= 10 and settled >= 3 and len(peer.messages) >= 4

        yield wait_until(mid_stream, 20, "mail flowing")
        yield server.kill()
        stop.set()
        yield sending
        before_kill = set(peer.ids())
        queued_at_kill = self.queued_ids()
        self.assertLess(len(accepted), KILL_CLIENT_MESSAGES, "the client finished before the kill")
        self.assertTrue(before_kill - queued_at_kill, "nothing was delivered and settled")
        yield server.start(self.smtp_port)
        yield wait_until(self.queue_empty, 20, "the queue to drain after the restart")
        yield deferLater(reactor, 1.0, lambda: None)
        code = yield server.stop()
        self.assertIn(code, CLEAN_STOP, server.output())
        counts = Counter(peer.ids())
        self.assertEqual([m for m in accepted if counts[m] == 0], [], "lost after a 250")
        duplicates = {m for m, n in counts.items() if n > 1}
        self.assertLessEqual(duplicates, before_kill & queued_at_kill, "duplicates not in flight")
        self.assertEqual({m: n for m, n in counts.items() if n > 2}, {})
        if duplicates:
            print(f"kill -9: {len(duplicates)} in-flight message(s) delivered twice")


class QueueToolTests(TwistdOutboundCase):
    @inlineCallbacks
    def test_queue_list_stat_delete_flush_against_a_running_server(self) -> Deferred[None]:
        """haraka-tw queue vs a running server: list shows the error; delete drops; flush sends."""
        server = self.twistd("1h*3")
        yield server.start(self.smtp_port)
        yield self.send(["<keep@t>", "<drop@t>"])
        yield wait_until(lambda: self.deferred_once(2), 10, "two refused first attempts")

        listed = yield deferToThread(server.tool, "list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        entries = json.loads(listed.stdout)["entries"]
        ids = {message_id(self.message_of(e["id"])): e["id"] for e in entries}
        self.assertEqual(sorted(ids), ["<drop@t>", "<keep@t>"])
        for e in entries:
            self.assertEqual(e["attempts"], 1)
            self.assertIn(f"cannot connect to 127.0.0.1:{self.peer_port}", e["last_error"])
        text = yield deferToThread(server.tool, "list")
        self.assertEqual(text.returncode, 0, text.stderr)
        for ident in ids.values():
            line = next(line for line in text.stdout.splitlines() if line.startswith(ident))
            self.assertIn("connect", line)
            self.assertIn("in 59m", line)
        self.assertIn("2 messages queued", text.stdout)
        stat = yield deferToThread(server.tool, "stat", "--json")
        self.assertEqual(json.loads(stat.stdout)["domains"]["dest.test"]["deferred"], 2)

        deleted = yield deferToThread(server.tool, "delete", ids["<drop@t>"])
        self.assertEqual(deleted.returncode, 0, deleted.stderr)
        self.assertIn("asked it to delete", deleted.stdout)
        yield wait_until(lambda: len(queue_listing(self.queue_dir)) == 1, 3, "the delete")
        self.assertEqual(self.queued_ids(), {"<keep@t>"})

        peer = self.start_peer()
        flushed = yield deferToThread(server.tool, "flush")
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        self.assertIn("asked it to flush", flushed.stdout)
        yield wait_until(lambda: peer.messages, 4, "the flushed message to go now")
        yield wait_until(self.queue_empty, 3, "the queue to drain")
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(peer.ids(), ["<keep@t>"])
        code = yield server.stop()
        self.assertIn(code, CLEAN_STOP, server.output())

    @inlineCallbacks
    def test_a_file_moved_into_the_queue_goes_on_the_next_flush(self) -> Deferred[None]:
        """A queue file from elsewhere (another host's queue), renamed into the directory
        of a running server, waits until a flush re-reads it; then it is delivered once."""
        server = self.twistd("1h*3")
        yield server.start(self.smtp_port)
        peer = self.start_peer()
        move_in(self.base / "other-host", self.queue_dir, "<moved@t>", due_in=3600)
        yield deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(peer.messages, [])  # not read yet
        flushed = yield deferToThread(server.tool, "flush")
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        yield wait_until(lambda: peer.messages, 5, "the moved-in message to go")
        yield wait_until(self.queue_empty, 3, "the queue to drain")
        found = f"1 file(s) found on re-reading {self.queue_dir}"
        yield wait_until(lambda: found in server.output(), 3, "the log line")
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(peer.ids(), ["<moved@t>"])
        code = yield server.stop()
        self.assertIn(code, CLEAN_STOP, server.output())

    @inlineCallbacks
    def test_flushes_while_mail_flows_deliver_each_message_once(self) -> Deferred[None]:
        """SIGHUP (reload, flush and re-read of the queue) every 20 ms while messages are
        queued and delivered: every message arrives, and none twice. A re-read sees files
        just written and files in flight; it must take neither."""
        server = self.twistd("5s*10")
        yield server.start(self.smtp_port)
        peer = self.start_peer()
        mids = [f"<flow{i}@t>" for i in range(80)]
        sending = self.send(mids)
        proc = server.proc
        assert proc is not None
        while not sending.called:
            proc.send_signal(signal.SIGHUP)
            yield deferLater(reactor, 0.02, lambda: None)
        yield sending
        yield wait_until(lambda: len(peer.messages) >= len(mids), 20, "every delivery")
        yield wait_until(self.queue_empty, 5, "the queue to drain")
        yield deferLater(reactor, 1.0, lambda: None)
        counts = Counter(peer.ids())
        self.assertEqual(sorted(counts), sorted(mids))
        self.assertEqual({m: n for m, n in counts.items() if n > 1}, {})
        yield wait_until(lambda: server.output().count("outbound flush") > 5, 3, "the flushes")
        code = yield server.stop()
        self.assertIn(code, CLEAN_STOP, server.output())

    def message_of(self, ident: str) -> Any:
        store = QueueStore(self.queue_dir, log=lambda line: None)
        entry = store.find(ident)
        assert entry is not None, ident
        return b"".join(store.load_message(entry))
