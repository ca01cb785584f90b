"""The outbound queue shared by worker processes (smtp.ini nodes=2), under the real
command: each worker delivers its partition, a killed worker's queued mail is taken by its
replacement, and C{haraka-tw queue flush} reaches every worker through the master. The
loopback DNS server and the receiving peer run in the test's reactor.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from haraka_tw.outbound.partition import partition_of
from tests.dnsserver import serve
from tests.e2e.outbound_world import Twistd, queue_listing, wait_until
from tests.e2e.test_outbound_restart import (
    CLEAN_STOP,
    SENDER,
    ZONE,
    TwistdOutboundCase,
    message,
    move_in,
)

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


class NodesQueueTests(TwistdOutboundCase):
    def twistd_nodes(self) -> Twistd:
        dns = serve(self, ZONE, origin="test.")
        return Twistd(
            self,
            self.base,
            {
                "smtp.ini": f"[main]\nlisten=127.0.0.1:{self.smtp_port}\nnodes=2\n",
                "me": "mx.test\n",
                "plugins": "tests.e2e.outbound_world:Factory\n",
                "outbound.ini": f"[main]\nqueue_dir={self.queue_dir}\nmx_port={self.peer_port}\n"
                "local_mx_ok=true\ntemp_fail_intervals=1h*3\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\n",
            },
        )

    def send_apart(self, mids: list[str]) -> Deferred[None]:
        """Each message on its own connection, four at a time (so both workers take some)."""

        def one(mid: str) -> None:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as s:
                self.assertEqual(s.sendmail(SENDER, ["bob@dest.test"], message(mid)), {})

        def run() -> None:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(one, mids))

        return deferToThread(run)

    @inlineCallbacks
    def test_a_killed_workers_queue_is_delivered_by_its_replacement(self) -> Deferred[None]:
        """Mail queued by a worker that is then killed -9 is delivered once the peer is
        up: its replacement takes the dead worker's partition at start; flush reaches it."""
        server = self.twistd_nodes()
        yield server.start(self.smtp_port)
        ready = re.compile(r"outbound queue: (\d+) messages waiting in partition (\d) of 2")
        yield wait_until(lambda: len(ready.findall(server.output())) == 2, 20, "both workers")
        mids = [f"<nodes{i}@t>" for i in range(12)]
        yield self.send_apart(mids)
        yield wait_until(lambda: self.deferred_once(12), 15, "twelve refused first attempts")

        workers = {int(i): int(p) for i, p in STARTED.findall(server.output())}
        by_writer = Counter(e.name.pid for e in queue_listing(self.queue_dir))
        self.assertLessEqual(set(by_writer), set(workers.values()))  # workers wrote them
        victim, victim_pid = max(workers.items(), key=lambda item: by_writer[item[1]])
        self.assertGreater(by_writer[victim_pid], 0)
        os.kill(victim_pid, signal.SIGKILL)

        def taken_over() -> re.Match[str] | None:
            text = server.output()
            after = text[text.find(f"worker {victim} started", text.find("SIGKILL")) :]
            return re.search(
                rf"outbound queue: (\d+) messages waiting in partition {victim}", after
            )

        found = yield wait_until(taken_over, 20, "the replacement's start-up scan")
        self.assertEqual(int(found.group(1)), by_writer[victim_pid])

        # Files from another host's queue, moved in: each worker takes its partition's.
        moved = [f"<moved{i}@t>" for i in range(8)]
        partitions: Counter[int] = Counter()
        for mid in moved:
            entry = move_in(self.base / "other-host", self.queue_dir, mid)
            partitions[partition_of(entry.id, 2)] += 1
        peer = self.start_peer()
        flushed = yield deferToThread(server.tool, "flush")
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        self.assertIn("asked it to flush", flushed.stdout)
        everything = mids + moved
        yield wait_until(lambda: len(peer.messages) >= 20, 15, "the twenty deliveries")
        yield wait_until(self.queue_empty, 5, "the queue to drain")
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(sorted(peer.ids()), sorted(everything))  # each exactly once
        for index in (0, 1):  # the master handed the request to each worker
            self.assertRegex(server.output(), rf"worker\.{index}#info\] .*queue control: flush")
            if partitions[index]:
                found = rf"worker\.{index}#.*{partitions[index]} file\(s\) found on re-reading"
                yield wait_until(lambda f=found: re.search(f, server.output()), 3, "the re-read")
        code = yield server.stop()
        self.assertIn(code, CLEAN_STOP, server.output())
