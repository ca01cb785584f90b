"""The relay manager's ordering and limits, on task.Clock."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.logging import Level
from haraka_tw.outbound.entry import QueueEntryMissing
from haraka_tw.outbound.scheduler import DeliveryScheduler, DomainLimits, Limits
from tests.support import ListLog


@dataclass
class Item:
    key: str
    domain: str
    due: float = 0.0


class SchedulerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.started: list[str] = []
        self.pending: dict[str, Deferred[None]] = {}
        self.log = ListLog()

    def attempt(self, item: Item) -> Deferred[None]:
        self.started.append(item.key)
        d: Deferred[None] = Deferred()
        self.pending[item.key] = d
        return d

    def finish(self, key: str) -> None:
        self.pending.pop(key).callback(None)
        self.clock.advance(0)

    def scheduler(self, limits: Limits | None = None) -> DeliveryScheduler:
        s = DeliveryScheduler(
            self.clock,
            self.attempt,
            due=lambda i: i.due,
            domain_of=lambda i: i.domain,
            key_of=lambda i: i.key,
            limits=limits,
            log=self.log,
        )
        s.start()
        self.addCleanup(s.stop)
        return s

    def test_due_entries_start_in_time_order(self) -> None:
        """Entries start when due, earliest first; a future entry waits for its time."""
        s = self.scheduler()
        s.add(Item("late", "a.test", due=30))
        s.add(Item("now", "a.test", due=0))
        s.add(Item("soon", "a.test", due=5))
        self.clock.advance(0)
        self.assertEqual(self.started, ["now"])
        self.clock.advance(5)
        self.assertEqual(self.started, ["now", "soon"])
        self.clock.advance(25)
        self.assertEqual(self.started, ["now", "soon", "late"])

    def test_global_concurrency(self) -> None:
        """No more than concurrency_max attempts at once; the next starts when one ends."""
        s = self.scheduler(Limits(concurrency_max=2))
        for i in range(5):
            s.add(Item(f"m{i}", f"d{i}.test"))
        self.clock.advance(0)
        self.assertEqual(len(self.started), 2)
        self.finish(self.started[0])
        self.assertEqual(len(self.started), 3)
        self.assertEqual(s.active, 2)

    def test_domains_take_turns(self) -> None:
        """A freed slot goes to the next domain with mail due, round the domains in turn,
        not always to the first domain."""
        s = self.scheduler(Limits(concurrency_max=1))
        for i in range(2):
            for domain in ("a", "b", "c"):
                s.add(Item(f"{domain}{i}", f"{domain}.test"))
        self.clock.advance(0)
        while len(self.started) < 6:
            self.finish(self.started[-1])
        self.assertEqual(self.started, ["a0", "b0", "c0", "a1", "b1", "c1"])

    def test_per_domain_concurrency(self) -> None:
        """A domain's concurrency limit holds its entries while others go on."""
        s = self.scheduler(Limits(domains={"slow.test": DomainLimits(concurrency=1)}))
        for i in range(3):
            s.add(Item(f"s{i}", "slow.test"))
        s.add(Item("f0", "fast.test"))
        self.clock.advance(0)
        self.assertEqual(sorted(self.started), ["f0", "s0"])
        self.finish("s0")
        self.assertIn("s1", self.started)
        self.assertNotIn("s2", self.started)

    def test_per_domain_rate(self) -> None:
        """rate_per_minute: a burst up to the rate, then one message per 60/rate seconds."""
        s = self.scheduler(Limits(domains={"rated.test": DomainLimits(rate_per_minute=2)}))
        for i in range(4):
            s.add(Item(f"r{i}", "rated.test"))
        self.clock.advance(0)
        for key in list(self.pending):
            self.finish(key)
        self.assertEqual(self.started, ["r0", "r1"])
        self.clock.advance(29)
        self.assertEqual(len(self.started), 2)
        self.clock.advance(1.5)
        self.assertEqual(len(self.started), 3)

    def test_flush_and_disabled(self) -> None:
        """flush(domain) makes waiting entries due now; disabled starts nothing until cleared."""
        s = self.scheduler()
        s.disabled = True
        s.add(Item("a", "x.test", due=1000))
        s.add(Item("b", "y.test", due=1000))
        self.assertEqual(s.flush("x.test"), 1)
        self.clock.advance(1)
        self.assertEqual(self.started, [])
        s.disabled = False
        s.run_due()
        self.assertEqual(self.started, ["a"])
        self.assertEqual(s.pending(), {"y.test": 1})

    def test_remove_waiting_entry(self) -> None:
        """remove() takes a waiting entry out; it never starts."""
        s = self.scheduler()
        s.add(Item("gone", "x.test", due=10))
        self.assertTrue(s.remove("gone"))
        self.clock.advance(20)
        self.assertEqual(self.started, [])
        self.assertFalse(s.remove("gone"))

    def test_readding_while_in_flight(self) -> None:
        """An attempt that reschedules its own entry (same key) gets it queued again."""
        s = self.scheduler()
        item = Item("again", "x.test")
        s.add(item)
        self.clock.advance(0)
        s.add(Item("again", "x.test", due=60))
        self.finish("again")
        self.clock.advance(60)
        self.assertEqual(self.started, ["again", "again"])

    def test_an_attempt_that_cannot_settle_is_tried_again_later(self) -> None:
        """An attempt that errors because the queue could not be written (a full disk) is
        an error in the log; its slot is freed, and the entry, still on disk as it was, is
        tried again retry_unsettled (300) seconds later instead of being forgotten."""
        s = self.scheduler(Limits(concurrency_max=1))
        s.add(Item("bad", "x.test"))
        s.add(Item("next", "x.test"))
        self.clock.advance(0)
        self.pending.pop("bad").errback(OSError(28, "No space left on device"))
        self.clock.advance(0)
        self.assertEqual(self.started, ["bad", "next"])
        self.assertEqual(
            self.log.messages(Level.ERROR),
            [
                "delivery attempt for bad could not be settled: [Errno 28] No space left on"
                " device; trying again in 300s"
            ],
        )
        self.finish("next")
        self.clock.advance(299)
        self.assertEqual(self.started, ["bad", "next"])
        self.clock.advance(1)
        self.assertEqual(self.started, ["bad", "next", "bad"])

    def test_an_entry_whose_file_is_gone_is_dropped_with_a_warning(self) -> None:
        """A queue file removed under the attempt: one WARN line, and nothing to retry."""
        s = self.scheduler()
        s.add(Item("gone", "x.test"))
        self.clock.advance(0)
        self.pending.pop("gone").errback(QueueEntryMissing("gone"))
        self.clock.advance(301)
        self.assertEqual(self.started, ["gone"])
        self.assertEqual(
            self.log.messages(Level.WARN), ["queue file gone is gone: nothing left to deliver"]
        )
        self.assertEqual(self.log.messages(Level.ERROR) + self.log.messages(Level.CRIT), [])

    def test_an_attempt_that_fails_with_a_bug_is_logged_and_not_retried(self) -> None:
        """Any other error is a bug: CRIT with its traceback; not retried every few
        minutes (the entry waits for a restart)."""
        s = self.scheduler()
        s.add(Item("bug", "x.test"))
        self.clock.advance(0)
        self.pending.pop("bug").errback(TypeError("boom"))
        self.clock.advance(301)
        self.assertEqual(self.started, ["bug"])
        (crit,) = self.log.messages(Level.CRIT)
        self.assertIn("delivery attempt for bug failed: Traceback", crit)
        self.assertIn("TypeError: boom", crit)
