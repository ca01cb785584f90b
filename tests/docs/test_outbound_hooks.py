"""docs/hooks.md's outbound hooks do what haraka_tw/outbound/courier.py does.

Each test runs one delivery attempt through a real L{Courier} (a MemoryQueue, a hook runner
with the test's plugins, a fake SMTP client) and checks a statement of hooks.md.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.codes import DELAY, DENY, DENYSOFT, OK
from haraka_tw.hooks.runner import HookRunner, LoadedPlugin
from haraka_tw.outbound.courier import Courier, OutboundSettings
from haraka_tw.outbound.delivery import DeliveryReport, RcptResult
from haraka_tw.outbound.mx import MXResolver
from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.outbound.queue import MemoryQueue, QueueEntry
from haraka_tw.outbound.retry import RetryPolicy
from tests.support import ListLog, plugin_with

HOOKS_MD = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"
MESSAGE = b"From: alice@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


def _hook_section(hook: str) -> str:
    text = HOOKS_MD.read_text(encoding="utf-8")
    start = text.index(f"\n### `{hook}`")
    end = text.find("\n### ", start + 1)
    return text[start:end]


def _documented_keys(hook: str, argument: str) -> set[str]:
    """The keys the bullet for C{argument} names, e.g. "- `params`: `dict`: `delay` ..."."""
    section = _hook_section(hook)
    m = re.search(rf"^- `{argument}`: `dict`: (.+?)(?=^\S|\Z)", section, re.M | re.S)
    assert m is not None, f"no `{argument}` bullet under {hook}"
    return set(re.findall(r"`(\w+)`", m[1])) - {"None", "SMTP", "LMTP"}


class _Attempt:
    """One Courier attempt with the given plugins and the given SMTP outcome."""

    def __init__(
        self,
        case: SynchronousTestCase,
        hooks: dict[str, Any],
        *,
        code: int = 250,
        enhanced: str | None = None,
        retry: RetryPolicy | None = None,
        notify: str | None = None,
    ) -> None:
        self.queue = MemoryQueue()
        self.calls: list[dict[str, Any]] = []
        self.seen: dict[str, Any] = {}
        hooks = {"get_mx": lambda h, d: (OK, "192.0.2.25"), **hooks}  # no DNS here
        plugins = [LoadedPlugin("p", plugin_with(hooks))]
        clock = Clock()
        log = ListLog()
        self.code, self.enhanced = code, enhanced
        courier = Courier(
            queue=self.queue,
            runner=HookRunner(plugins, clock, log),
            mx=MXResolver(object(), port=2526, local_mx_ok=True),  # type: ignore[arg-type]
            retry=retry or RetryPolicy.haraka_default(),
            settings=OutboundSettings(me="mx.test"),
            reactor=clock,
            log=log,
            reschedule=lambda entry: None,
            bounce_template=lambda action: ["Subject: report", "", "{reason}"],
            deliver=self._deliver,
        )
        params = {"NOTIFY": notify} if notify else {}
        todo = Todo(
            domain="example.net",
            mail_from="alice@example.com",
            rcpt_to=[QueueRecipient("bob@example.net", params=params)],
            uuid="U1",
            queue_time=time.time(),
        )
        self.entry: QueueEntry = case.successResultOf(self.queue.add(todo, [MESSAGE]))
        self.start = time.time()
        case.successResultOf(courier.attempt(self.entry))

    def _deliver(self, reactor: Any, **kw: Any) -> defer.Deferred[DeliveryReport]:
        self.calls.append(kw)
        report = DeliveryReport(
            host=kw["host"],
            ip=kw["ip"],
            port=kw["port"],
            mode="SMTP",
            secured=False,
            tls_version=None,
            tls_cipher=None,
            tls_verified=False,
            authenticated=False,
            greeting="220 peer",
            response="250 2.0.0 ok",
        )
        for rcpt in kw["recipients"]:
            report.add(RcptResult(rcpt, self.code, self.enhanced, "said the peer"))
        return defer.succeed(report)

    def original(self) -> QueueEntry | None:
        """The entry under test as it now stands in the queue, or None if removed."""
        found = self.queue.files.get(self.entry.id)
        return found[0] if found else None

    def reports(self) -> list[bytes]:
        """The DSNs queued (messages from <>)."""
        return [self.queue.message(e) for e in self.queue.entries() if e.todo.mail_from == ""]


def _record(seen: dict[str, Any], name: str, answer: Any = None) -> Any:
    def hook(hmail: Any, *args: Any) -> Any:
        seen[name] = args
        return answer

    return hook


class SendEmailTests(SynchronousTestCase):
    def test_delay(self) -> None:
        """(DELAY, seconds) puts the attempt off by that much, not counted as a failure."""
        run = _Attempt(self, {"send_email": lambda h: (DELAY, 300)})
        self.assertEqual(run.calls, [])
        entry = run.original()
        assert entry is not None
        self.assertEqual(entry.attempts, 0)
        self.assertLess(abs(entry.next_attempt - run.start - 300), 5)

    def test_delay_default(self) -> None:
        """DELAY without a number waits 60 seconds."""
        run = _Attempt(self, {"send_email": lambda h: DELAY})
        entry = run.original()
        assert entry is not None
        self.assertLess(abs(entry.next_attempt - run.start - 60), 5)
        self.assertIn("default 60", _hook_section("send_email"))


class GetMxTests(SynchronousTestCase):
    def test_ok_hosts_with_and_without_port(self) -> None:
        """OK names the hosts, tried in order; a host without a port uses mx_port."""
        run = _Attempt(self, {"get_mx": lambda h, d: (OK, ["192.0.2.7:2525", "192.0.2.8"])})
        self.assertEqual([(c["ip"], c["port"]) for c in run.calls], [("192.0.2.7", 2525)])
        self.assertIsNone(run.original())  # delivered: the file is gone

    def test_deny_bounces_5_1_2(self) -> None:
        """DENY bounces every recipient with 5.1.2, and the sender gets a report."""
        seen: dict[str, Any] = {}
        run = _Attempt(self, {"get_mx": lambda h, d: DENY, "bounce": _record(seen, "bounce")})
        self.assertEqual(run.calls, [])
        self.assertIsNone(run.original())
        (error,) = seen["bounce"]
        self.assertEqual(error["bounced_rcpt"], ["bob@example.net"])
        self.assertEqual(error["message"], "get_mx refused delivery")
        (report,) = run.reports()
        self.assertIn(b"Status: 5.1.2", report)
        self.assertIn("`5.1.2`", _hook_section("get_mx"))

    def test_denysoft_defers_4_1_2(self) -> None:
        """DENYSOFT defers every recipient with 4.1.2 (seen in a NOTIFY=DELAY report)."""
        run = _Attempt(self, {"get_mx": lambda h, d: DENYSOFT}, notify="FAILURE,DELAY")
        entry = run.original()
        assert entry is not None
        self.assertEqual(entry.attempts, 1)
        (report,) = run.reports()
        self.assertIn(b"Status: 4.1.2", report)
        self.assertIn("`4.1.2`", _hook_section("get_mx"))


class DeferredTests(SynchronousTestCase):
    def test_params_and_cont(self) -> None:
        """deferred gets delay and err; CONT retries after params["delay"]."""
        seen: dict[str, Any] = {}
        run = _Attempt(self, {"deferred": _record(seen, "deferred")}, code=451)
        (params,) = seen["deferred"]
        self.assertEqual(set(params), _documented_keys("deferred", "params"))
        self.assertEqual(params["delay"], 64.0)
        entry = run.original()
        assert entry is not None
        self.assertEqual(entry.attempts, 1)
        self.assertLess(abs(entry.next_attempt - run.start - 64), 5)

    def test_denysoft_seconds(self) -> None:
        """(DENYSOFT, seconds) retries after that many seconds."""
        run = _Attempt(self, {"deferred": lambda h, p: (DENYSOFT, 600)}, code=451)
        entry = run.original()
        assert entry is not None
        self.assertLess(abs(entry.next_attempt - run.start - 600), 5)

    def test_other_drops(self) -> None:
        """Any other answer drops the deferred recipients: no retry, no report."""
        run = _Attempt(self, {"deferred": lambda h, p: DENY}, code=451)
        self.assertIsNone(run.original())
        self.assertEqual(run.reports(), [])

    def test_out_of_retries_bounces_without_the_hook(self) -> None:
        """With no retry left, deferred does not run; the recipients bounce, 4 made 5."""
        seen: dict[str, Any] = {}
        run = _Attempt(
            self,
            {"deferred": _record(seen, "deferred")},
            code=451,
            enhanced="4.2.2",
            retry=RetryPolicy(()),
        )
        self.assertNotIn("deferred", seen)
        self.assertIsNone(run.original())
        (report,) = run.reports()
        self.assertIn(b"Status: 5.2.2", report)


class BounceTests(SynchronousTestCase):
    def test_error_and_cont_sends_a_report(self) -> None:
        """bounce gets its error dict; CONT lets the report go to the sender."""
        seen: dict[str, Any] = {}
        run = _Attempt(self, {"bounce": _record(seen, "bounce")}, code=550, enhanced="5.1.1")
        (error,) = seen["bounce"]
        self.assertEqual(set(error), _documented_keys("bounce", "error"))
        self.assertIsNone(run.original())
        (report,) = run.reports()
        self.assertIn(b"Status: 5.1.1", report)

    def test_anything_else_sends_none(self) -> None:
        """Any other answer (OK here) sends no report; the recipient still leaves."""
        run = _Attempt(self, {"bounce": lambda h, e: OK}, code=550)
        self.assertIsNone(run.original())
        self.assertEqual(run.reports(), [])


class DeliveredTests(SynchronousTestCase):
    def test_params(self) -> None:
        """delivered gets the documented params."""
        seen: dict[str, Any] = {}
        _Attempt(self, {"delivered": _record(seen, "delivered")})
        (params,) = seen["delivered"]
        self.assertEqual(set(params), _documented_keys("delivered", "params"))
        self.assertEqual(params["ok_recips"], ["bob@example.net"])
