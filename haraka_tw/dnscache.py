"""The resolver's memory: answers kept for their TTL, and one query for many askers.

:class:`AnswerCache` sits in front of :class:`haraka_tw.dns.Resolver`'s queries. Outbound
delivery asks the same three questions (MX of the domain, A and AAAA of its MX host) for
every message; without a cache each message costs three round trips to the nameserver
and the CPU to build and parse them.

- A positive answer is kept for the smallest TTL of its CNAME chain and answer RRset
  (dnspython's ``ChainingResult.minimum_ttl``), at most ``max_ttl`` seconds.
- A negative answer (NXDOMAIN, or no records of the type) is kept for its SOA's negative
  TTL (RFC 2308: the smaller of the SOA's TTL and MINIMUM), at most ``negative_ttl``
  seconds, which is also the time for a negative answer that carries no SOA.
- Failures (timeouts, SERVFAIL, REFUSED, unusable answers) are never kept: the next
  asker asks again.
- A TTL of 0 is not kept.
- At most ``size`` answers; past that the least recently used goes first.
- Questions already on their way are not asked twice: later askers wait for the same
  answer. Each asker's Deferred may be cancelled on its own; the query itself is
  cancelled (its socket closed) once nobody waits for it any more.

Time is the resolver's clock (a ``task.Clock`` in tests).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

__all__ = ["DEFAULT_MAX_TTL", "DEFAULT_NEGATIVE_TTL", "DEFAULT_SIZE", "AnswerCache", "Cached"]

DEFAULT_SIZE = 10000
DEFAULT_MAX_TTL = 86400.0  # a day, as unbound's cache-max-ttl
DEFAULT_NEGATIVE_TTL = 60.0  # "briefly": a domain created a minute ago is seen

K = TypeVar("K")
V = TypeVar("V")


class Cached(Generic[V]):
    """What a query gave: C{value} (an answer, or a negative answer as an exception to
    raise) and how many seconds it may be kept (0: not at all)."""

    __slots__ = ("negative", "ttl", "value")

    def __init__(self, value: V | Exception, ttl: float) -> None:
        self.value = value
        self.ttl = ttl
        self.negative = isinstance(value, Exception)


class _Flight(Generic[V]):
    """One query on its way and the askers waiting for it."""

    __slots__ = ("query", "waiting")

    def __init__(self, query: Deferred[Cached[V]]) -> None:
        self.query = query
        self.waiting: list[Deferred[V]] = []


class AnswerCache(Generic[K, V]):
    """Answers by question, kept for their TTL; see the module docstring.

    @param clock: what C{seconds()} is now.
    @param size: the most answers kept.
    @param max_ttl: the longest a positive answer is kept, in seconds.
    @param negative_ttl: the longest a negative answer is kept, in seconds.
    @param copy_error: makes a fresh exception for each asker of a negative answer (so one
        asker's traceback never lands on another's).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        size: int = DEFAULT_SIZE,
        max_ttl: float = DEFAULT_MAX_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        copy_error: Callable[[Exception], Exception] = lambda e: e,
    ) -> None:
        if size < 1:
            raise ValueError("an answer cache holds at least one answer")
        self.clock = clock
        self.size = size
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._copy_error = copy_error
        self._answers: OrderedDict[K, tuple[float, V | Exception]] = OrderedDict()
        self._flights: dict[K, _Flight[V]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """How many answers are held (some may have expired and not yet been dropped)."""
        return len(self._answers)

    def ask(self, key: K, query: Callable[[], Deferred[Cached[V]]]) -> Deferred[V]:
        """The answer to C{key}: kept, on its way, or asked now with C{query()}.

        C{query} fires with a L{Cached} (a failure, for an answer that is not to be kept).
        The returned Deferred fires with the answer, or fails with the negative answer's
        exception or the query's failure.
        """
        held = self.peek(key)
        if held is not None:
            return self._deliver(held)
        self.misses += 1
        flight = self._flights.get(key)
        first = flight is None
        if flight is None:
            flight = self._flights[key] = _Flight(query())
        waiter: Deferred[V] = Deferred(lambda d: self._left(key, flight, d))
        flight.waiting.append(waiter)
        if first:  # after the waiter is in: a query may answer at once
            flight.query.addBoth(self._landed, key, flight)
        return waiter

    def peek(self, key: K) -> V | Exception | None:
        """The kept answer to C{key} (a negative one as its exception), or None when
        nothing is kept for it: at once, asking nobody."""
        held = self._answers.get(key)
        if held is None:
            return None
        expires, value = held
        if expires <= self.clock.seconds():
            del self._answers[key]
            return None
        self._answers.move_to_end(key)
        self.hits += 1
        return value

    def clear(self) -> None:
        """Forget every kept answer (queries on their way still land)."""
        self._answers.clear()

    # -- internals -----------------------------------------------------------------------

    def _deliver(self, value: V | Exception) -> Deferred[V]:
        if isinstance(value, Exception):
            failed: Deferred[V] = Deferred()
            failed.errback(Failure(self._copy_error(value)))
            return failed
        done: Deferred[V] = Deferred()
        done.callback(value)
        return done

    def _landed(self, result: Cached[V] | Failure, key: K, flight: _Flight[V]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        waiting, flight.waiting = flight.waiting, []
        if isinstance(result, Failure):
            for waiter in waiting:
                waiter.errback(result)
            return None
        self._keep(key, result)
        for waiter in waiting:
            if result.negative:
                assert isinstance(result.value, Exception)
                waiter.errback(Failure(self._copy_error(result.value)))
            else:
                waiter.callback(result.value)  # type: ignore[arg-type]
        return None

    def _keep(self, key: K, result: Cached[V]) -> None:
        longest = self.negative_ttl if result.negative else self.max_ttl
        ttl = min(result.ttl, longest)
        if ttl <= 0:
            return
        self._answers[key] = (self.clock.seconds() + ttl, result.value)
        self._answers.move_to_end(key)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)

    def _left(self, key: K, flight: _Flight[V], waiter: Deferred[V]) -> None:
        """An asker cancelled: the query goes on while anyone else waits for it."""
        if waiter in flight.waiting:
            flight.waiting.remove(waiter)
        if not flight.waiting and self._flights.get(key) is flight:
            del self._flights[key]
            flight.query.cancel()
