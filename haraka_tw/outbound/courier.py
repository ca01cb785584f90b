"""One delivery attempt of one queued message, and what follows from it.

L{Courier.attempt} is what the L{DeliveryScheduler} calls for a due entry:

1. send_email hook: DELAY (with seconds) puts the entry back without counting an attempt.
2. get_mx hook: OK with hosts routes the message; DENY bounces (5.1.2); DENYSOFT defers
   (4.1.2); anything else asks DNS (L{MXResolver}).
3. The client tries each MX address in turn. A failure before the server has answered the
   envelope (connect, banner, EHLO, STARTTLS, AUTH) moves on to the next address; once a
   server has answered MAIL, its answers decide this attempt.
4. Per recipient: delivered (the delivered hook), deferred (the deferred hook, then the
   retry policy; out of retries is a bounce), or bounced (the bounce hook, then a DSN to
   the sender unless it was a bounce itself). A message whose recipients disagree is split:
   the deferred ones go on in a new queue file, the original is removed.

Every queue change goes through the L{IOutboundQueue}, so a crash at any point leaves
each recipient either still queued or settled, never lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from haraka_tw.codes import Code, HookResult
from haraka_tw.hooks.runner import HookRunner
from haraka_tw.logging import HarakaLog, Level
from haraka_tw.outbound import client
from haraka_tw.outbound.bounce import RecipientFailure, bounce_todo, build_dsn
from haraka_tw.outbound.delivery import (
    DeliveryError,
    DeliveryReport,
    RcptResult,
    Recipient,
    Timeouts,
    TLSPolicy,
)
from haraka_tw.outbound.mx import MXAddress, MXError, MXHost, MXResolver
from haraka_tw.outbound.pool import ConnectionPool
from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.outbound.queue import QueueEntry
from haraka_tw.outbound.retry import RetryPolicy
from haraka_tw.smtp.state import Notes

__all__ = ["Courier", "HMail", "OutboundSettings"]

# Failures before any server answered the envelope: another address may do better.
_TRY_NEXT = frozenset({"connect", "banner", "ehlo", "starttls", "auth"})


@dataclass
class OutboundSettings:
    """The outbound.ini keys the courier uses (see docs/config.md)."""

    me: str = "localhost"
    enable_tls: bool = True
    force_tls_hosts: frozenset[str] = frozenset()
    no_tls_hosts: frozenset[str] = frozenset()
    allow_cleartext_auth: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    ca_file: str | None = None


class HMail:
    """What the outbound hooks get: one queued message on its way out (Haraka's hmail).

    @ivar todo: the envelope (domain, mail_from, rcpt_to, uuid, notes, ...).
    @ivar notes: the message's notes (kept in the queue file).
    """

    def __init__(self, entry: QueueEntry) -> None:
        self.entry = entry
        self.todo = entry.todo
        self.notes = Notes(entry.todo.notes)
        self.uuid = entry.todo.uuid
        self.transaction = None  # the runner's skip_plugins check looks here

    @property
    def domain(self) -> str:
        return self.todo.domain

    @property
    def attempts(self) -> int:
        return self.entry.attempts


@dataclass
class _Outcome:
    """How one attempt ended for each recipient."""

    delivered: list[RcptResult] = field(default_factory=list)
    deferred: list[tuple[QueueRecipient, str, str]] = field(default_factory=list)  # status, why
    bounced: list[tuple[QueueRecipient, str, str]] = field(default_factory=list)
    report: DeliveryReport | None = None
    remote: str | None = None


Deliver = Callable[..., Deferred[DeliveryReport]]


class Courier:
    """Carries out delivery attempts for the scheduler."""

    def __init__(
        self,
        *,
        queue: Any,
        runner: HookRunner,
        mx: MXResolver,
        retry: RetryPolicy,
        settings: OutboundSettings,
        reactor: Any,
        log: HarakaLog,
        reschedule: Callable[[QueueEntry], None],
        bounce_template: Callable[[str], list[str]],
        deliver: Deliver = client.deliver,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.queue = queue
        self.runner = runner
        self.mx = mx
        self.retry = retry
        self.settings = settings
        self.reactor = reactor
        self.log = log
        self.reschedule = reschedule  # hands a (new or renamed) entry back to the scheduler
        self.bounce_template = bounce_template
        self.deliver = deliver
        self.pool = pool

    def _log(self, level: Level, hmail: HMail, message: str, **fields: Any) -> None:
        self.log.log(level, message, uuid=hmail.uuid, origin="outbound", **fields)

    # -- the attempt ---------------------------------------------------------------------------

    def attempt(self, entry: QueueEntry) -> Deferred[None]:
        hmail = HMail(entry)
        d = self.runner.run("send_email", hmail)
        return d.addCallback(self._send_email_answered, hmail)

    def _send_email_answered(self, result: HookResult, hmail: HMail) -> Deferred[None]:
        if result.code is Code.DELAY:
            seconds = _seconds(result.message, 60.0)
            self._log(Level.INFO, hmail, f"send_email: delayed {seconds}s by {result.plugin}")
            return self._put_back(hmail, seconds, count=False, error=None)
        d = self.runner.run("get_mx", hmail, hmail.domain)
        return d.addCallback(self._get_mx_answered, hmail)

    def _get_mx_answered(self, result: HookResult, hmail: HMail) -> Deferred[None]:
        everyone = list(hmail.todo.rcpt_to)
        if result.code is Code.DENY:
            why = result.text or "get_mx refused delivery"
            return self._settle(hmail, _Outcome(bounced=[(r, "5.1.2", why) for r in everyone]))
        if result.code is Code.DENYSOFT:
            why = result.text or "get_mx deferred delivery"
            return self._settle(hmail, _Outcome(deferred=[(r, "4.1.2", why) for r in everyone]))
        if result.code is Code.OK and result.message:
            hosts: Deferred[Any] = defer.succeed(_mx_hosts(result.message, self.mx.port))
        else:
            hosts = self.mx.resolve(hmail.domain)
        d: Deferred[Any] = hosts.addCallback(self.mx.addresses)

        def route(addresses: list[MXAddress]) -> Deferred[None]:
            return self._try_addresses(hmail, addresses, 0, None)

        def unroutable(failure: Any) -> Deferred[None]:
            return self._dns_failed(hmail, failure)

        d.addCallbacks(route, unroutable)  # type: ignore[arg-type]
        return d

    def _dns_failed(self, hmail: HMail, failure: Any) -> Deferred[None]:
        error = failure.value
        if not isinstance(error, MXError):
            raise failure.value
        everyone = list(hmail.todo.rcpt_to)
        item = [(r, error.enhanced, str(error)) for r in everyone]
        outcome = _Outcome(bounced=item) if error.permanent else _Outcome(deferred=item)
        return self._settle(hmail, outcome)

    def _try_addresses(
        self, hmail: HMail, addresses: list[MXAddress], index: int, last: DeliveryError | None
    ) -> Deferred[None]:
        if index >= len(addresses):
            why = str(last) if last is not None else "no MX address to try"
            status = (last.enhanced if last and last.enhanced else None) or "4.4.1"
            everyone = [(r, _temporary(status), why) for r in hmail.todo.rcpt_to]
            return self._settle(hmail, _Outcome(deferred=everyone))
        address = addresses[index]
        d = self._deliver_to(hmail, address)

        def failed(failure: Any) -> Deferred[None]:
            error = failure.value
            if not isinstance(error, DeliveryError):
                raise error
            server = _server(address.mx.exchange, address.ip or address.mx.path)
            self._log(Level.INFO, hmail, f"delivery to {server} failed in {error.phase}: {error}")
            self._log_refusals(hmail, server, error.settled)
            if error.phase in _TRY_NEXT and not error.settled:
                return self._try_addresses(hmail, addresses, index + 1, error)
            return self._settle(hmail, _from_error(hmail, error, address))

        return d.addCallbacks(lambda report: self._delivered(hmail, report), failed)

    def _deliver_to(self, hmail: HMail, address: MXAddress) -> Deferred[DeliveryReport]:
        todo = hmail.todo
        mx = address.mx
        s = self.settings
        queue = self.queue
        entry = hmail.entry
        params: dict[str, str | None] = {}
        if todo.ret:
            params["RET"] = todo.ret
        if todo.envid:
            params["ENVID"] = todo.envid
        return self.deliver(
            self.reactor,
            ip=address.ip,
            port=mx.port,
            path=mx.path,
            host=mx.exchange,
            helo=mx.bind_helo or s.me,
            mail_from=todo.mail_from,
            recipients=[Recipient(r.address, dict(r.params)) for r in todo.rcpt_to],
            message=_Message(queue, entry),
            size=entry.message_size,
            lmtp=mx.using_lmtp,
            tls=self._tls_for(mx, todo),
            auth=(mx.auth_user, mx.auth_pass) if mx.auth_user and mx.auth_pass else None,
            allow_cleartext_auth=s.allow_cleartext_auth,
            bind=mx.bind,
            timeouts=s.timeouts,
            mail_params=params,
            pool=self.pool,
        )

    def _tls_for(self, mx: MXHost, todo: Todo) -> TLSPolicy:
        s = self.settings
        name = mx.exchange.lower()
        if todo.force_tls or name in s.force_tls_hosts or todo.domain in s.force_tls_hosts:
            return TLSPolicy(
                mode="required", verify=True, ca_file=s.ca_file, implicit=mx.implicit_tls
            )
        if mx.implicit_tls:  # TLS from the first byte: there is no plaintext to fall back to
            return TLSPolicy(mode="opportunistic", ca_file=s.ca_file, implicit=True)
        if not s.enable_tls or name in s.no_tls_hosts:
            return TLSPolicy(mode="none")
        return TLSPolicy(mode="opportunistic", ca_file=s.ca_file)

    def _delivered(self, hmail: HMail, report: DeliveryReport) -> Deferred[None]:
        by_address = {r.address: r for r in hmail.todo.rcpt_to}
        outcome = _Outcome(report=report, remote=report.host or report.ip)
        outcome.delivered = list(report.accepted)
        for result in report.deferred:
            rcpt = by_address[result.recipient.address]
            outcome.deferred.append((rcpt, result.enhanced or "4.0.0", _reply_text(result)))
        for result in report.bounced:
            rcpt = by_address[result.recipient.address]
            outcome.bounced.append((rcpt, result.enhanced or "5.0.0", _reply_text(result)))
        self._log_refusals(hmail, _server(report.host, report.ip), report.deferred + report.bounced)
        return self._settle(hmail, outcome)

    def _log_refusals(self, hmail: HMail, server: str, results: Iterable[RcptResult]) -> None:
        """A line for each recipient a server deferred or refused, with its reply (those it
        took, which an LMTP error's settled results hold too, have theirs elsewhere)."""
        for result in results:
            if result.code < 400:
                continue
            verb = "refused" if result.code >= 500 else "deferred"
            text = f"{server} {verb} {result.recipient.address}: {_reply_text(result)}"
            self._log(Level.INFO, hmail, text)

    # -- settling the recipients --------------------------------------------------------------

    def _settle(self, hmail: HMail, outcome: _Outcome) -> Deferred[None]:
        d: Deferred[Any] = defer.succeed(None)
        if outcome.delivered:
            d.addCallback(lambda _: self._run_delivered(hmail, outcome))
        if outcome.deferred:
            d.addCallback(lambda _: self._run_deferred(hmail, outcome))
        d.addCallback(lambda _: self._run_bounce(hmail, outcome) if outcome.bounced else None)
        d.addCallback(lambda _: self._update_queue(hmail, outcome))
        return d

    def _run_delivered(self, hmail: HMail, outcome: _Outcome) -> Deferred[Any]:
        report = outcome.report
        assert report is not None
        params = {
            "host": report.host,
            "ip": report.ip,
            "port": report.port,
            "response": report.response,
            "delay": time.time() - hmail.todo.queue_time,
            "mode": report.mode,
            "ok_recips": [r.recipient.address for r in outcome.delivered],
            "secured": report.secured,
            "authenticated": report.authenticated,
        }
        recipients = [r.recipient.address for r in outcome.delivered]
        self._log(
            Level.INFO,
            hmail,
            f"delivered to {_server(report.host, report.ip)}: {', '.join(recipients)}",
            response=report.response,
        )
        return self.runner.run("delivered", hmail, params)

    def _run_deferred(self, hmail: HMail, outcome: _Outcome) -> Deferred[Any]:
        attempts = hmail.attempts + 1
        delay = self.retry.delay_for(attempts)
        why = "; ".join(sorted({w for _, _, w in outcome.deferred}))
        if delay is None:  # out of retries: these bounce now
            self._log(Level.NOTICE, hmail, f"giving up after {attempts} attempts: {why}")
            outcome.bounced += [(r, _permanent(s), w) for r, s, w in outcome.deferred]
            outcome.deferred = []
            return defer.succeed(None)
        d = self.runner.run("deferred", hmail, {"delay": delay, "err": why})

        def answered(result: HookResult) -> None:
            if result.code is Code.CONT or result.code is Code.OK:
                hmail.next_delay = delay  # type: ignore[attr-defined]
            elif result.code is Code.DENYSOFT:
                hmail.next_delay = _seconds(result.message, delay)  # type: ignore[attr-defined]
            else:  # a plugin took the message off our hands: drop it silently
                self._log(Level.NOTICE, hmail, f"deferred hook {result.plugin} dropped it")
                outcome.deferred = []

        return d.addCallback(answered)

    def _run_bounce(self, hmail: HMail, outcome: _Outcome) -> Deferred[Any]:
        error = {
            "mx": outcome.remote,
            "bounced_rcpt": [r.address for r, _, _ in outcome.bounced],
            "deferred_rcpt": [r.address for r, _, _ in outcome.deferred],
            "message": "; ".join(sorted({w for _, _, w in outcome.bounced})),
        }
        d = self.runner.run("bounce", hmail, error)

        def answered(result: HookResult) -> Deferred[Any] | None:
            timed_out = result.code is Code.DENYSOFT and result.message == "plugin timeout"
            if result.code is not Code.CONT and not timed_out:  # a broken plugin keeps the DSN
                self._log(Level.NOTICE, hmail, f"bounce hook {result.plugin}: no DSN sent")
                return None
            return self._send_report(hmail, outcome.bounced, outcome.remote, "failed")

        return d.addCallback(answered)

    def _send_report(
        self,
        hmail: HMail,
        failed: list[tuple[QueueRecipient, str, str]],
        remote: str | None,
        action: str,
    ) -> Deferred[Any] | None:
        todo = hmail.todo
        now = time.time()
        envelope = bounce_todo(todo, now)
        if envelope is None:
            self._log(Level.INFO, hmail, f"no {action} report: the sender is <> (a bounce)")
            return None
        until = self.retry.retry_until(now, hmail.attempts + 1) if action == "delayed" else None
        failures = [
            RecipientFailure(
                r,
                status,
                diagnostic=why,
                remote_mta=remote,
                last_attempt=now,
                will_retry_until=until,
            )
            for r, status, why in failed
        ]
        dsn = build_dsn(
            todo,
            failures,
            action=action,
            reporting_mta=self.settings.me,
            message_chunks=self.queue.load_message(hmail.entry),
            now=now,
            template=self.bounce_template(action),
        )
        if dsn is None:
            return None
        first, status, why = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        self._log(
            Level.NOTICE,
            hmail,
            f"sending a {action} report to <{todo.mail_from}>: <{first.address}>"
            f" {status} {why}{more}",
        )
        d: Deferred[Any] = self.queue.add(envelope, [dsn])
        return d.addCallback(self.reschedule)

    def _update_queue(self, hmail: HMail, outcome: _Outcome) -> Deferred[None]:
        entry = hmail.entry
        if not outcome.deferred:
            return self.queue.remove(entry)  # type: ignore[no-any-return]
        # A delay notice is queued first; the entry records it as sent only after that.
        d = self._delay_notice(hmail, outcome)
        return d.addCallback(lambda sent: self._defer_entry(hmail, outcome, sent))

    def _defer_entry(self, hmail: HMail, outcome: _Outcome, notice_sent: bool) -> Deferred[None]:
        entry = hmail.entry
        when = time.time() + getattr(hmail, "next_delay", 60.0)
        why = "; ".join(sorted({w for _, _, w in outcome.deferred}))
        delay_report = {"dsn_delayed_sent": True} if notice_sent else {}
        if len(outcome.deferred) == len(hmail.todo.rcpt_to):
            d = self.queue.reschedule(entry, when, entry.attempts + 1, why, **delay_report)
            d.addCallback(self.reschedule)
            return d.addCallback(lambda _: None)  # type: ignore[no-any-return]
        # The recipients disagree: the deferred ones go on in a file of their own.
        rest = [r for r, _, _ in outcome.deferred]
        d = self.queue.split(entry, rest, when)

        def split_done(new: QueueEntry) -> Deferred[Any]:
            d2: Deferred[Any] = self.queue.reschedule(
                new, when, entry.attempts + 1, why, **delay_report
            )
            d2.addCallback(self.reschedule)
            return d2.addCallback(lambda _: self.queue.remove(entry))

        return d.addCallback(split_done)  # type: ignore[no-any-return]

    def _delay_notice(self, hmail: HMail, outcome: _Outcome) -> Deferred[bool]:
        """Queue one "delayed" report for recipients that asked NOTIFY=DELAY; fires True
        once it is durably queued (False when none was due)."""
        if hmail.todo.dsn_delayed_sent:
            return defer.succeed(False)
        wanted = [
            item for item in outcome.deferred if "DELAY" in item[0].params.get("NOTIFY", "").upper()
        ]
        if not wanted:
            return defer.succeed(False)
        d = self._send_report(hmail, wanted, outcome.remote, "delayed")
        if d is None:
            return defer.succeed(False)
        return d.addCallback(lambda _: True)

    def _put_back(
        self, hmail: HMail, seconds: float, *, count: bool, error: str | None
    ) -> Deferred[None]:
        entry = hmail.entry
        attempts = entry.attempts + (1 if count else 0)
        d: Deferred[Any] = self.queue.reschedule(entry, time.time() + seconds, attempts, error)
        d.addCallback(self.reschedule)
        return d.addCallback(lambda _: None)


#: messages up to this size are read from the queue file once per attempt and kept in memory
#: for its MX addresses; bigger ones are streamed from the file each time they are sent
KEEP_IN_MEMORY = 256 * 1024


class _Message:
    """The message of an entry, for the client: read from the queue file once per attempt
    when small (the client reads it twice: for 8-bit bytes, then to send it)."""

    def __init__(self, queue: Any, entry: QueueEntry) -> None:
        self._queue = queue
        self._entry = entry
        self._bytes: bytes | None = None

    def __call__(self) -> Iterable[bytes]:
        if self._bytes is not None:
            return (self._bytes,)
        chunks = self._queue.load_message(self._entry)
        if self._entry.message_size > KEEP_IN_MEMORY:
            return chunks  # type: ignore[no-any-return]
        self._bytes = b"".join(chunks)
        return (self._bytes,)


def _from_error(hmail: HMail, error: DeliveryError, address: MXAddress) -> _Outcome:
    """A failure after the envelope was answered: it decides every unsettled recipient."""
    outcome = _Outcome(remote=address.mx.exchange)
    settled = {r.recipient.address: r for r in error.settled}
    for rcpt in hmail.todo.rcpt_to:
        own = settled.get(rcpt.address)
        if own is not None:
            item = (rcpt, own.enhanced or f"{str(own.code)[0]}.0.0", _reply_text(own))
            (outcome.bounced if own.code >= 500 else outcome.deferred).append(item)
            continue
        status = error.enhanced or ("5.0.0" if error.permanent else "4.0.0")
        item = (rcpt, status, str(error))
        (outcome.bounced if error.permanent else outcome.deferred).append(item)
    return outcome


def _mx_hosts(answer: Any, port: int) -> list[MXHost]:
    """get_mx's answer: an MXHost, a host name, "host:port", or a list of those."""
    items: Iterable[Any] = answer if isinstance(answer, (list, tuple)) else [answer]
    hosts = []
    for i, item in enumerate(items):
        if isinstance(item, MXHost):
            hosts.append(replace(item, from_plugin=True))
            continue
        text = str(item)
        host, _, port_text = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
        hosts.append(
            MXHost(
                exchange=host or text,
                priority=i,
                port=int(port_text) if port_text.isdigit() else port,
                from_dns=False,
                from_plugin=True,
            )
        )
    return hosts


def _seconds(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _server(host: str | None, ip: str | None) -> str:
    """A server as the log names it: C{mx.example.net [198.51.100.25]}."""
    return f"{host or ip} [{ip}]"


def _reply_text(result: RcptResult) -> str:
    return f"{result.code} {result.enhanced + ' ' if result.enhanced else ''}{result.text}".strip()


def _temporary(status: str) -> str:
    return "4" + status[1:] if status[:1] == "5" else status


def _permanent(status: str) -> str:
    return "5" + status[1:] if status[:1] == "4" else status
