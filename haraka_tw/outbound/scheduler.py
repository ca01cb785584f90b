"""The relay manager: when each queued message is tried, within which limits, and what
happens after each attempt.

L{DeliveryScheduler} keeps every queue entry in a per-destination-domain queue ordered by
next attempt. A tick (every C{tick} seconds, and whenever something changes) starts the
entries that are due, as long as the global C{concurrency_max}, the domain's concurrency
and the domain's rate allow. One delivery attempt is L{DeliveryAttempt}: the send_email
hook, MX routing (get_mx hook or DNS), the client over each MX address in turn, then the
per-recipient outcome: delivered, deferred (the entry is split off and rescheduled by the
retry policy), or bounced (a DSN is queued, unless the message was itself a bounce).

Time and the reactor are injected (a task.Clock in tests). The queue, the MX lookup and
the SMTP client are passed in, so the scheduler is tested with fakes and the real parts
are tested on their own and end to end.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from haraka_tw.logging import HarakaLog, Level
from haraka_tw.outbound.entry import QueueEntryMissing
from haraka_tw.outbound.qfile import QueueFileError

__all__ = ["DeliveryScheduler", "DomainLimits", "Limits"]


@dataclass(frozen=True)
class DomainLimits:
    """Per destination domain: messages in flight at once, and messages per minute."""

    concurrency: int = 0  # 0: only the global limit applies
    rate_per_minute: float = 0  # 0: no rate limit


@dataclass(frozen=True)
class Limits:
    """outbound.ini: concurrency_max, and per-domain limits ([domains] or [domain.<name>])."""

    concurrency_max: int = 100
    default: DomainLimits = DomainLimits()
    domains: dict[str, DomainLimits] = field(default_factory=dict)

    def for_domain(self, domain: str) -> DomainLimits:
        return self.domains.get(domain.lower(), self.default)


class _TokenBucket:
    """Messages per minute for one domain: a bucket refilled continuously, burst of 1 min."""

    def __init__(self, rate_per_minute: float, now: float) -> None:
        self.rate = rate_per_minute / 60.0
        self.capacity = max(1.0, rate_per_minute)
        self.tokens = self.capacity
        self.stamp = now

    def take(self, now: float) -> float:
        """0 if a message may go now (and count it), else seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _Domain:
    name: str
    heap: list[tuple[float, int, Any]] = field(default_factory=list)
    active: int = 0
    bucket: _TokenBucket | None = None


Attempt = Callable[[Any], Deferred[Any]]


class DeliveryScheduler:
    """Per-domain queues of entries, started within the limits when due.

    @param attempt: C{attempt(entry)} delivers once and fires when the entry is settled
        for now (delivered, rescheduled, bounced or set aside); the scheduler only orders.
    @param due: C{due(entry)} the time (reactor seconds) the entry should next be tried.
    @param domain_of: C{domain_of(entry)} its destination domain.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        attempt: Attempt,
        *,
        due: Callable[[Any], float],
        domain_of: Callable[[Any], str],
        key_of: Callable[[Any], str],
        limits: Limits | None = None,
        log: HarakaLog | None = None,
        tick: float = 1.0,
        retry_unsettled: float = 300.0,
    ) -> None:
        self.reactor = reactor
        self.attempt = attempt
        self.due = due
        self.domain_of = domain_of
        self.key_of = key_of
        self.limits = limits or Limits()
        self.log = log or HarakaLog()
        self.disabled = False
        self._domains: dict[str, _Domain] = {}
        self._active = 0
        self._queued: set[str] = set()  # entries waiting in a domain heap, by key
        self._seq = itertools.count()
        self._ticker = LoopingCall(self.run_due)
        self._ticker.clock = reactor
        self._tick = tick
        self.retry_unsettled = retry_unsettled
        self._in_flight: dict[str, Deferred[Any]] = {}
        self._parked: set[str] = set()  # failed by a bug: left for a restart
        self._order: list[_Domain] = []  # the domains in the order they came
        self._turn = 0  # where the next pass over them starts

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._ticker.running:
            self._ticker.start(self._tick, now=True)

    def stop(self) -> Deferred[None]:
        """Stop starting attempts; fires when the attempts in flight have settled."""
        if self._ticker.running:
            self._ticker.stop()
        pending = list(self._in_flight.values())
        return defer.DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)

    # -- what the queue tells us ---------------------------------------------------------------

    def add(self, entry: Any, due: float | None = None) -> None:
        """Schedule an entry (new, or rescheduled after an attempt), at its own due time
        unless C{due} says otherwise."""
        key = self.key_of(entry)
        if key in self._queued:
            return
        self._queued.add(key)
        dom = self._domain(self.domain_of(entry))
        when = self.due(entry) if due is None else due
        heapq.heappush(dom.heap, (when, next(self._seq), entry))
        self.reactor.callLater(0, self.run_due)

    @property
    def running(self) -> bool:
        """Whether due entries are being started (between L{start} and L{stop})."""
        return bool(self._ticker.running)

    def remove(self, key: str) -> bool:
        """Take a waiting entry out (deleted by the queue tools); False if not waiting."""
        if key not in self._queued:
            return False
        self._queued.discard(key)
        for dom in self._domains.values():
            kept = [item for item in dom.heap if self.key_of(item[2]) != key]
            if len(kept) != len(dom.heap):
                dom.heap = kept
                heapq.heapify(dom.heap)
        return True

    def in_flight(self, key: str) -> bool:
        return key in self._in_flight

    def holds(self, key: str) -> bool:
        """Whether the entry is waiting here, being attempted, or left for a restart."""
        return key in self._queued or key in self._in_flight or key in self._parked

    def flush(self, domain: str | None = None) -> int:
        """Make every waiting entry (of C{domain}) due now; how many were waiting."""
        count = 0
        for dom in self._domains.values():
            if domain is not None and dom.name != domain.lower():
                continue
            dom.heap = [(0.0, seq, entry) for _, seq, entry in dom.heap]
            heapq.heapify(dom.heap)
            count += len(dom.heap)
        self.run_due()
        return count

    def pending(self) -> dict[str, int]:
        """Entries waiting per domain (not counting those in flight)."""
        return {name: len(d.heap) for name, d in self._domains.items() if d.heap}

    @property
    def active(self) -> int:
        return self._active

    # -- starting attempts --------------------------------------------------------------------

    def run_due(self) -> None:
        """Start every due entry the limits allow, one per domain in turn.

        The turn goes round: each pass starts at the domain after the last one that
        started an entry, so domains take turns and a freed slot goes to the next domain
        with mail due, without a walk over every domain from the first.
        """
        if self.disabled:
            return
        now = self.reactor.seconds()
        limit = self.limits.concurrency_max
        order = self._order
        while self._active < limit:
            count, start = len(order), self._turn
            started = False
            for i in range(count):
                if self._active >= limit:
                    break
                dom = order[(start + i) % count]
                if dom.heap and dom.heap[0][0] <= now and self._start_one(dom, now):
                    self._turn = (start + i + 1) % count
                    started = True
            if not started:
                return

    def _start_one(self, dom: _Domain, now: float) -> bool:
        limits = self.limits.for_domain(dom.name)
        if limits.concurrency and dom.active >= limits.concurrency:
            return False
        if limits.rate_per_minute:
            if dom.bucket is None or dom.bucket.rate != limits.rate_per_minute / 60.0:
                dom.bucket = _TokenBucket(limits.rate_per_minute, now)
            wait = dom.bucket.take(now)
            if wait > 0:
                self.reactor.callLater(wait, self.run_due)
                return False
        _, _, entry = heapq.heappop(dom.heap)
        key = self.key_of(entry)
        self._queued.discard(key)
        dom.active += 1
        self._active += 1
        d = defer.maybeDeferred(self.attempt, entry)
        self._in_flight[key] = d

        def settled(result: Any) -> None:
            dom.active -= 1
            self._active -= 1
            self._in_flight.pop(key, None)
            if isinstance(result, Failure):
                self._attempt_failed(entry, key, result)
            self.reactor.callLater(0, self.run_due)

        d.addBoth(settled)
        return True

    def _attempt_failed(self, entry: Any, key: str, failure: Failure) -> None:
        """An attempt that could not settle its entry because the queue could not be
        written (a full disk, say) or its file no longer reads as scanned leaves the entry
        as it was on disk: it is tried again later, not forgotten until a restart. One
        whose file is gone has nothing left. Anything else is a bug: logged with its
        traceback, and the entry waits for a restart rather than failing the same way
        every few minutes (a flush's rescan leaves it too: it may have reached some of
        its recipients)."""
        if failure.check(QueueEntryMissing, FileNotFoundError):
            self.log.log(Level.WARN, f"queue file {key} is gone: nothing left to deliver")
        elif failure.check(OSError, QueueFileError):
            self.log.log(
                Level.ERROR,
                f"delivery attempt for {key} could not be settled:"
                f" {failure.getErrorMessage()}; trying again in {self.retry_unsettled:.0f}s",
            )
            self.add(entry, due=self.reactor.seconds() + self.retry_unsettled)
        else:
            self._parked.add(key)
            self.log.log(Level.CRIT, f"delivery attempt for {key} failed: {failure.getTraceback()}")

    def _domain(self, name: str) -> _Domain:
        key = name.lower()
        dom = self._domains.get(key)
        if dom is None:
            dom = self._domains[key] = _Domain(key)
            self._order.append(dom)
        return dom
