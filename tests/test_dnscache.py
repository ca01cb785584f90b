"""haraka_tw.dnscache.AnswerCache on a task.Clock, and the TTLs haraka_tw.dns reads from
answers (built with dnspython, no network)."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rrset
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.dns import DNSError, NoAnswer, NXDomain, _read_answer
from haraka_tw.dnscache import AnswerCache, Cached


class _Asker:
    """A query function that counts its calls and answers as told."""

    def __init__(self, *answers: Cached[str] | Exception | Deferred[Cached[str]]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> Deferred[Cached[str]]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


class AnswerCacheTests(SynchronousTestCase):
    """Kept for the TTL, bounded, one query for many askers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache: AnswerCache[str, str] = AnswerCache(self.clock, size=3)

    def test_kept_for_its_ttl(self) -> None:
        """An answer is given from the cache until its TTL runs out, then asked again."""
        ask = _Asker(Cached("one", 300), Cached("two", 300))
        self.assertEqual(self.successResultOf(self.cache.ask("k", ask)), "one")
        self.clock.advance(299)
        self.assertEqual(self.successResultOf(self.cache.ask("k", ask)), "one")
        self.assertEqual(ask.calls, 1)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.cache.ask("k", ask)), "two")
        self.assertEqual((ask.calls, self.cache.hits, self.cache.misses), (2, 1, 2))

    def test_max_ttl(self) -> None:
        """A long TTL is cut to max_ttl."""
        cache: AnswerCache[str, str] = AnswerCache(self.clock, max_ttl=10)
        ask = _Asker(Cached("a", 86400))
        cache.ask("k", ask)
        self.clock.advance(10)
        cache.ask("k", ask)
        self.assertEqual(ask.calls, 2)

    def test_ttl_zero_is_not_kept(self) -> None:
        """An answer with TTL 0 serves its askers and is not kept."""
        ask = _Asker(Cached("a", 0))
        self.cache.ask("k", ask)
        self.cache.ask("k", ask)
        self.assertEqual((ask.calls, len(self.cache)), (2, 0))

    def test_negative_answer_kept_briefly(self) -> None:
        """A negative answer fails each asker with its own copy, for at most negative_ttl."""
        cache: AnswerCache[str, str] = AnswerCache(
            self.clock, negative_ttl=60, copy_error=lambda e: NXDomain("x.test", "A", "gone")
        )
        ask = _Asker(Cached(NXDomain("x.test", "A", "gone"), 3600))
        first = self.failureResultOf(cache.ask("k", ask), NXDomain).value
        self.clock.advance(59)
        second = self.failureResultOf(cache.ask("k", ask), NXDomain).value
        self.assertIsNot(first, second)
        self.assertEqual(ask.calls, 1)
        self.clock.advance(1)
        self.failureResultOf(cache.ask("k", ask), NXDomain)
        self.assertEqual(ask.calls, 2)

    def test_failures_are_not_kept(self) -> None:
        """A query that fails (timeout, SERVFAIL) is asked again by the next asker."""
        ask = _Asker(DNSError("x.test", "A", "SERVFAIL"), Cached("a", 300))
        self.failureResultOf(self.cache.ask("k", ask), DNSError)
        self.assertEqual(self.successResultOf(self.cache.ask("k", ask)), "a")
        self.assertEqual(ask.calls, 2)

    def test_bounded_least_recently_used_first_out(self) -> None:
        """Past size answers, the one asked for least recently goes."""
        for key in ("a", "b", "c"):
            self.cache.ask(key, _Asker(Cached(key, 300)))
        self.cache.ask("a", _Asker(Cached("not asked", 300)))  # a is used: b is the oldest
        self.cache.ask("d", _Asker(Cached("d", 300)))
        self.assertEqual(len(self.cache), 3)
        kept = _Asker(Cached("not asked", 300))
        for key in ("c", "a", "d"):
            self.assertEqual(self.successResultOf(self.cache.ask(key, kept)), key)
        self.assertEqual(kept.calls, 0)
        again = _Asker(Cached("b again", 300))
        self.assertEqual(self.successResultOf(self.cache.ask("b", again)), "b again")
        self.assertEqual(again.calls, 1)

    def test_one_query_for_many_askers(self) -> None:
        """Askers of a question already on its way wait for that one query."""
        answer: Deferred[Cached[str]] = Deferred()
        ask = _Asker(answer)
        waiting = [self.cache.ask("k", ask) for _ in range(3)]
        self.assertEqual(ask.calls, 1)
        self.assertNoResult(waiting[0])
        answer.callback(Cached("a", 300))
        self.assertEqual([self.successResultOf(d) for d in waiting], ["a"] * 3)

    def test_a_failed_query_fails_every_asker(self) -> None:
        """A failure reaches each asker waiting for it."""
        answer: Deferred[Cached[str]] = Deferred()
        waiting = [self.cache.ask("k", _Asker(answer)) for _ in range(2)]
        answer.errback(DNSError("x.test", "A", "timeout"))
        for d in waiting:
            self.failureResultOf(d, DNSError)

    def test_cancel_one_asker(self) -> None:
        """One asker cancelling leaves the query going for the others."""
        cancelled: list[bool] = []
        answer: Deferred[Cached[str]] = Deferred(lambda d: cancelled.append(True))
        first, second = (self.cache.ask("k", _Asker(answer)) for _ in range(2))
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(cancelled, [])
        answer.callback(Cached("a", 300))
        self.assertEqual(self.successResultOf(second), "a")

    def test_cancel_every_asker_cancels_the_query(self) -> None:
        """When nobody waits any more, the query is cancelled and a new asker starts anew."""
        cancelled: list[bool] = []
        answer: Deferred[Cached[str]] = Deferred(lambda d: cancelled.append(True))
        ask = _Asker(answer, Cached("b", 300))
        first, second = (self.cache.ask("k", ask) for _ in range(2))
        first.cancel()
        self.assertEqual(cancelled, [])
        second.cancel()
        self.assertEqual(cancelled, [True])
        for d in (first, second):
            self.failureResultOf(d, CancelledError)
        self.assertEqual(self.successResultOf(self.cache.ask("k", ask)), "b")
        self.assertEqual(ask.calls, 2)

    def test_clear(self) -> None:
        """clear() forgets every answer."""
        ask = _Asker(Cached("a", 300))
        self.cache.ask("k", ask)
        self.cache.clear()
        self.cache.ask("k", ask)
        self.assertEqual(ask.calls, 2)

    def test_size_must_be_positive(self) -> None:
        """A cache of no answers is refused."""
        with self.assertRaises(ValueError):
            AnswerCache(self.clock, size=0)


def _response(rcode: int = dns.rcode.NOERROR, *sections: tuple[str, str]) -> dns.message.Message:
    """A response to an A query for www.example.test with (section, record text) added."""
    query = dns.message.make_query("www.example.test", "A")
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for section, text in sections:
        name, ttl, rdtype, rdata = text.split(" ", 3)
        rrset = dns.rrset.from_text(name, int(ttl), "IN", rdtype, rdata)
        (response.answer if section == "answer" else response.authority).append(rrset)
    return dns.message.from_wire(response.to_wire())  # as it comes off the wire


class AnswerTTLTests(SynchronousTestCase):
    """How long an answer may be kept is read from the answer itself."""

    def test_positive(self) -> None:
        """The smallest TTL of the CNAME chain and the answer."""
        response = _response(
            dns.rcode.NOERROR,
            ("answer", "www.example.test. 600 CNAME web.example.test."),
            ("answer", "web.example.test. 120 A 192.0.2.1"),
        )
        result = _read_answer(response, "www.example.test", "A")  # type: ignore[arg-type]
        self.assertEqual(result.ttl, 120)
        self.assertFalse(result.negative)

    def test_nxdomain_with_soa(self) -> None:
        """NXDOMAIN: the SOA's negative TTL (the smaller of its TTL and MINIMUM)."""
        soa = "example.test. 900 SOA ns.example.test. h.example.test. 1 2 3 4 30"
        response = _response(dns.rcode.NXDOMAIN, ("authority", soa))
        result = _read_answer(response, "www.example.test", "A")  # type: ignore[arg-type]
        self.assertIsInstance(result.value, NXDomain)
        self.assertEqual(result.ttl, 30)

    def test_no_data_without_soa(self) -> None:
        """No records and no SOA: a negative answer all the same (the cache caps its time)."""
        result = _read_answer(_response(), "www.example.test", "A")  # type: ignore[arg-type]
        self.assertIsInstance(result.value, NoAnswer)
        self.assertTrue(result.negative)
