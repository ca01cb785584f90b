"""The outbound side as one object: what the inbound server and plugins call, and what
starts, stops and reloads the delivery machinery.

- L{OutboundService.queue_transaction}: a relayed message (queue_outbound answered CONT)
  goes into the queue, one file per destination domain (per recipient with always_split),
  each fsynced; the returned Deferred fires only then, so the client's 250 means stored.
- L{OutboundService.send_email}: a plugin queues a message of its own.
- L{OutboundService.start}: take the queue directory's lock, scan it (every file is
  scheduled; torn ones set aside), start the scheduler and watch for control files left by
  C{haraka-tw queue}. L{OutboundService.flush} (SIGHUP) retries the deferred mail now.
- With smtp.ini nodes, each worker's service is given its L{Partition} of the queue: it
  delivers those files only, and the master, which holds the queue directory, hands it
  the control files' requests (L{OutboundService.control}).
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import replace
from email.utils import formatdate
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from haraka_tw.config import ConfigDirectory, ConfigError
from haraka_tw.config.formats import ini_count, ini_number
from haraka_tw.dns import Resolver
from haraka_tw.hooks.runner import HookRunner
from haraka_tw.logging import HarakaLog, Level
from haraka_tw.outbound.bounce import dsn_template
from haraka_tw.outbound.courier import Courier, OutboundSettings
from haraka_tw.outbound.delivery import Timeouts
from haraka_tw.outbound.entry import Listing
from haraka_tw.outbound.mx import MXResolver
from haraka_tw.outbound.partition import Partition
from haraka_tw.outbound.pool import ConnectionPool, PoolSettings
from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.outbound.queue import FileQueue, QueueEntry, passing, queue_dir_of
from haraka_tw.outbound.retry import RetryPolicy
from haraka_tw.outbound.scheduler import DeliveryScheduler, DomainLimits, Limits

__all__ = ["OutboundService", "read_limits"]

_BOOLEANS = ("-main.disabled", "+main.enable_tls", "-main.always_split", "-main.local_mx_ok")


def read_limits(ini: dict[str, dict[str, Any]]) -> Limits:
    """outbound.ini: [main] concurrency_max, domain_concurrency, domain_rate (messages per
    minute), and [domain.<name>] concurrency / rate for one destination domain."""
    main = ini.get("main", {})
    where = "outbound.ini [main]"
    default = DomainLimits(
        ini_count(main, "domain_concurrency", 0, where),
        ini_number(main, "domain_rate", 0, zero_ok=True, where=where),
    )
    domains = {}
    for section, keys in ini.items():
        if section.startswith("domain."):
            named = f"outbound.ini [{section}]"
            domains[section[len("domain.") :].lower()] = DomainLimits(
                ini_count(keys, "concurrency", default.concurrency, named),
                ini_number(keys, "rate", default.rate_per_minute, zero_ok=True, where=named),
            )
    total = ini_count(main, "concurrency_max", 100, where) or 100  # (0: the default, as Haraka)
    return Limits(total, default, domains)


def _hosts(value: Any) -> frozenset[str]:
    if not value:
        return frozenset()
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    return frozenset(str(v).strip().lower() for v in items if str(v).strip())


class OutboundService:
    """The queue, the scheduler and the courier, wired to the config."""

    def __init__(
        self,
        config: ConfigDirectory,
        reactor: Any,
        runner: HookRunner,
        log: HarakaLog,
        me: str,
        *,
        queue_dir: Path | None = None,
        resolver: Resolver | None = None,
        partition: Partition | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.runner = runner
        self.log = log
        self.me = me
        self.partition = partition
        self.queue = FileQueue(
            queue_dir or queue_dir_of(config), log=self._log_line, partition=partition
        )
        self.resolver = resolver or Resolver.from_config(config, reactor)
        self.pool = ConnectionPool(reactor)
        self.owner = False
        self._stopping = False
        self._rescans = defer.DeferredLock()  # one rescan at a time
        self._next_rescans: dict[str | None, Deferred[int]] = {}  # waiting for the lock
        self._bouncing: set[str] = set()  # ids the queue tools are bouncing now
        self._started: Deferred[None] = defer.succeed(None)
        self._load()
        self.scheduler = DeliveryScheduler(
            reactor,
            self._attempt,
            due=lambda e: e.next_attempt,
            domain_of=lambda e: e.todo.domain,
            key_of=lambda e: e.id,
            limits=self.limits,
            log=log,
        )
        self.scheduler.disabled = self.disabled
        self._controls = LoopingCall(self._take_controls)
        self._controls.clock = reactor
        config.on_change("outbound.ini", self._reload)
        config.on_change("dns.ini", self._reload)

    def _log_line(self, message: str) -> None:
        self.log.log(Level.WARN, message, origin="outbound")

    def _load(self) -> None:
        ini = self.config.get_ini("outbound.ini", booleans=_BOOLEANS)
        main = ini["main"]
        self.ini = ini
        self.disabled = bool(main.get("disabled", False))
        self.always_split = bool(main.get("always_split", False))
        self.limits = read_limits(ini)
        self.retry = RetryPolicy.from_ini(main, self._log_line)
        pooling = PoolSettings.from_ini(main)
        self.mx = MXResolver.from_config(self.config, self.resolver)
        self.settings = OutboundSettings(
            me=self.me,
            enable_tls=bool(main.get("enable_tls", True)),
            force_tls_hosts=_hosts(main.get("force_tls_hosts")),
            no_tls_hosts=_hosts(main.get("no_tls_hosts")),
            ca_file=str(main["ca_file"]) if main.get("ca_file") else None,
            timeouts=replace(
                Timeouts(),
                connect=ini_number(
                    main, "connect_timeout", 30, zero_ok=True, where="outbound.ini [main]"
                )
                or 30,  # (0 means the default, as Haraka reads it)
            ),
        )
        self.pool.configure(pooling)
        self.courier = Courier(
            queue=self.queue,
            runner=self.runner,
            mx=self.mx,
            retry=self.retry,
            settings=self.settings,
            reactor=self.reactor,
            log=self.log,
            reschedule=self._schedule,
            bounce_template=lambda action: dsn_template(self.config, action),
            pool=self.pool if pooling.enabled else None,
        )

    def _reload(self) -> None:
        try:
            self._load()
        except (ConfigError, ValueError) as e:
            self.log.log(Level.ERROR, f"{e}; keeping the last good outbound settings")
            return
        self.scheduler.limits = self.limits
        self.scheduler.disabled = self.disabled
        self.log.log(Level.NOTICE, f"outbound settings reloaded (disabled={self.disabled})")
        self.scheduler.run_due()

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Own the queue directory, schedule what it holds, start delivering.

        A queue directory that cannot be used is logged and leaves the inbound server
        running (relayed mail is then answered 4xx, never accepted and lost).
        """
        if self.owner:
            return self._started
        try:
            locked = self.queue.lock()
        except OSError as e:
            self.log.log(Level.CRIT, f"outbound queue unusable: {e}; not delivering")
            return defer.succeed(None)
        if not locked:
            self.log.log(
                Level.ERROR,
                f"queue directory {self.queue.queue_dir} is held by another process:"
                " not delivering",
            )
            return defer.succeed(None)
        self.owner = True
        self._stopping = False
        d = self.queue.scan()

        def scanned(entries: list[QueueEntry]) -> None:
            if self._stopping:  # stopped while the scan ran
                return
            for entry in entries:
                if not self.scheduler.holds(entry.id):  # (queued and started meanwhile)
                    self.scheduler.add(entry)
            part = f" in {self.partition}" if self.partition is not None else ""
            self.log.log(
                Level.NOTICE,
                f"outbound queue: {len(entries)} messages waiting{part}"
                f" (in {self.queue.queue_dir})",
            )
            self._run()

        def scan_failed(failure: Failure) -> None:
            if self._stopping:
                return
            self.log.log(
                Level.CRIT,
                f"outbound queue: scanning {self.queue.queue_dir} failed:"
                f" {failure.getErrorMessage()}; new messages are delivered, the files"
                " already there wait for a flush or a restart",
            )
            self._run()

        self._started = d.addCallbacks(scanned, scan_failed)
        return self._started

    def _run(self) -> None:
        """Deliver from now on: the scheduler, and (unless a worker) the queue's controls."""
        self.scheduler.start()
        if self.partition is None:  # a worker gets them from the master
            self._controls.start(1.0, now=False)

    def stop(self) -> Deferred[None]:
        """Stop delivering; fires once attempts in flight have settled and the lock is free."""
        self._stopping = True
        started, self._started = self._started, defer.succeed(None)
        d: Deferred[Any] = started.addBoth(lambda _: None)
        d.addCallback(lambda _: self._stop_now())
        return d

    def _stop_now(self) -> Deferred[None]:
        if self._controls.running:
            self._controls.stop()
        d = self.scheduler.stop()
        d.addCallback(lambda _: self.pool.close())

        def release(_: Any) -> None:
            if self.owner:
                self.queue.unlock()
                self.owner = False

        return d.addBoth(release)

    def flush(self, domain: str | None = None) -> int:
        """Retry deferred mail now (SIGHUP; C{haraka-tw queue flush}), and pick up the queue
        files this process does not know (L{rescan})."""
        count = self.scheduler.flush(domain)
        self.log.log(Level.NOTICE, f"outbound flush{' of ' + domain if domain else ''}: {count}")
        self.rescan(domain)
        return count

    def rescan(self, domain: str | None = None) -> Deferred[int]:
        """Read the queue directory again and schedule the files it holds that this process
        does not (moved in while it runs: a queue brought over from another host); those
        of C{domain} (all, if None) are due now. Fires with how many were taken.

        No file is attempted twice: an id the scheduler holds or has in flight is skipped,
        and the listing is used only once the writes under way when it was read have been
        scheduled (L{IOutboundQueue.writes_settled}); a file gone by then was delivered or
        renamed. Before the first scan has finished (and after L{stop}) there is nothing to
        do: the scan takes everything. A rescan asked for while one runs comes after it.
        """
        waiting = self._next_rescans.get(domain)
        if waiting is None:  # (else a burst of flushes shares the one not yet begun)
            waiting = self._next_rescans[domain] = Deferred()
            self._rescans.run(self._rescan, domain).addBoth(_copy_to, waiting)
        out: Deferred[int] = Deferred()
        waiting.addBoth(_copy_to, out)
        return out

    def _rescan(self, domain: str | None) -> Deferred[int]:
        self._next_rescans.pop(domain, None)  # begun: a flush from now on needs another
        if not (self.owner and self.scheduler.running):
            return defer.succeed(0)
        d: Deferred[Any] = self.queue.look(self.scheduler.holds)
        d.addCallback(lambda listing: self.queue.writes_settled().addCallback(lambda _: listing))
        d.addCallback(self._adopt, domain)

        def failed(failure: Failure) -> int:
            self._log_failure(failure, f"re-reading {self.queue.queue_dir}")
            return 0

        return d.addErrback(failed)

    def _adopt(self, listing: Listing, domain: str | None) -> int:
        for path, why in listing.bad:
            self.log.log(
                Level.WARN,
                f"outbound queue: cannot read {path.name} ({why}); left where it is",
                origin="outbound",
            )
        if not self.scheduler.running:  # stopped meanwhile
            return 0
        taken = []
        settled = time.time() - RESCAN_SETTLED
        for entry in listing.entries:
            if self.scheduler.holds(entry.id) or entry.id in self._bouncing:
                continue
            try:
                if entry.path.stat().st_mtime > settled:
                    self.log.log(
                        Level.INFO,
                        f"outbound queue: {entry.filename} changed in the last"
                        f" {RESCAN_SETTLED:.0f}s (still being copied?): left for the next flush",
                        origin="outbound",
                    )
                    continue
            except OSError:
                continue  # gone: delivered, or renamed by a retry
            due = domain is None or entry.todo.domain.lower() == domain.lower()
            self.scheduler.add(entry, due=0.0 if due else None)
            taken.append(entry.id)
        if taken:
            shown = ", ".join(taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
            self.log.log(
                Level.NOTICE,
                f"outbound queue: {len(taken)} file(s) found on re-reading"
                f" {self.queue.queue_dir}: {shown}",
                origin="outbound",
            )
        return len(taken)

    # -- adding mail -------------------------------------------------------------------------

    def queue_transaction(self, connection: Any) -> Deferred[list[QueueEntry]]:
        """Queue a relayed message: fires once every queue file is durably written.

        Fails (so the client gets 4xx) when this process does not own the queue directory:
        mail accepted there would wait for another process's restart.
        """
        if not self.owner:
            return defer.fail(RuntimeError("the outbound queue is not running in this process"))
        txn = connection.transaction
        d = self.runner.run("pre_send_trans_email", connection)

        def queue_it(_: Any) -> Deferred[list[QueueEntry]]:
            header = txn.header
            if "Message-Id" not in header:
                header.add_end("Message-Id", f"<{txn.uuid}@{self.me}>")
            if "Date" not in header:
                header.add_end("Date", formatdate(localtime=True))
            rcpts = [
                QueueRecipient(r.address, r.format(), _dsn_params(p))
                for r, p in zip(txn.rcpt_to, txn.rcpt_params, strict=False)
            ]
            return self._add(
                mail_from=txn.mail_from.address if txn.mail_from else "",
                recipients=rcpts,
                chunks=lambda: txn.message_stream.chunks(),
                uuid=txn.uuid,
                notes=_plain(txn.notes),
                ret=txn.mail_params.get("RET"),
                envid=txn.mail_params.get("ENVID"),
            )

        return d.addCallback(queue_it)

    def send_email(
        self,
        mail_from: str,
        recipients: Iterable[str],
        message: bytes,
        *,
        notes: dict[str, Any] | None = None,
    ) -> Deferred[list[QueueEntry]]:
        """Queue a message a plugin made (CRLF line endings, not dot-stuffed)."""
        rcpts = [QueueRecipient(r) for r in recipients]
        return self._add(
            mail_from=mail_from,
            recipients=rcpts,
            chunks=lambda: [message],
            uuid=str(uuidlib.uuid4()).upper(),
            notes=dict(notes or {}),
            ret=None,
            envid=None,
        )

    def _add(
        self,
        *,
        mail_from: str,
        recipients: list[QueueRecipient],
        chunks: Any,
        uuid: str,
        notes: dict[str, Any],
        ret: str | None,
        envid: str | None,
    ) -> Deferred[list[QueueEntry]]:
        groups: dict[str, list[QueueRecipient]] = {}
        mail_from = self._qualified(mail_from) if mail_from else ""
        for rcpt in recipients:
            address = self._qualified(rcpt.address)
            if address != rcpt.address:
                rcpt = QueueRecipient(address, rcpt.original, rcpt.params)
            domain = address.rpartition("@")[2].lower()
            key = f"{domain}\0{rcpt.address}" if self.always_split else domain
            groups.setdefault(key, []).append(rcpt)
        now = time.time()
        adds = []
        for i, (key, rcpts) in enumerate(groups.items()):
            todo = Todo(
                domain=key.split("\0")[0],
                mail_from=mail_from,
                rcpt_to=rcpts,
                uuid=uuid if len(groups) == 1 else f"{uuid}.{i + 1}",
                queue_time=now,
                notes=notes,
                ret=ret,
                envid=envid,
            )
            adds.append(self.queue.add(todo, chunks()))
        d: Deferred[Any] = defer.DeferredList(adds, consumeErrors=True)

        def added(results: list[tuple[bool, Any]]) -> Any:
            entries = [value for ok, value in results if ok]
            failures = [value for ok, value in results if not ok]
            if failures:
                # All or nothing: the client is told 4xx and will send the message again,
                # so a file already written for one domain would be delivered twice.
                removed = [
                    self.queue.remove(entry).addErrback(self._log_failure, "taking back")
                    for entry in entries
                ]
                return defer.DeferredList(removed).addCallback(lambda _: failures[0])
            for entry in entries:
                self._schedule(entry)
            return entries

        return d.addCallback(added)

    def _log_failure(self, failure: Failure, doing: str) -> None:
        self.log.log(Level.ERROR, f"outbound queue: {doing}: {failure.getErrorMessage()}")

    def _qualified(self, address: str) -> str:
        """An address without a domain (a relayed RCPT TO:<postmaster>, a plugin's
        send_email("root", ...)) is this host's, as Postfix qualifies it: C{name@me}. No
        queue file holds a recipient nothing could be sent to."""
        _, at, domain = address.rpartition("@")
        return address if at and domain else f"{address.rstrip('@')}@{self.me}"

    def _schedule(self, entry: QueueEntry) -> None:
        if self.owner:
            self.scheduler.add(entry)

    def _schedule_report(self, report: QueueEntry | None) -> None:
        if report is not None:
            self._schedule(report)

    def _attempt(self, entry: QueueEntry) -> Deferred[None]:
        return self.courier.attempt(entry)

    # -- haraka-tw queue --------------------------------------------------------------------

    def _take_controls(self) -> Deferred[None]:
        d = self.queue.take_controls()

        def act(controls: list[Any]) -> None:
            for control in controls:
                self.control(control.action, control.args)

        def failed(failure: Failure) -> None:  # (logged; the next check comes all the same)
            self.log.log(Level.ERROR, f"queue control: {failure.getErrorMessage()}")

        return d.addCallback(act).addErrback(failed)

    def control(self, action: str, args: dict[str, Any]) -> None:
        """Carry out a request of C{haraka-tw queue} (flush, delete, bounce) on the files
        this service delivers. One this version cannot use is logged and left."""
        known = _CONTROLS.get(action)
        problem = f"not an action ({', '.join(_CONTROLS)})" if known is None else known(args)
        if problem is not None:
            self.log.log(Level.WARN, f"queue control: {action} {args!r} ignored: {problem}")
            return
        self.log.log(Level.NOTICE, f"queue control: {action} {args}", origin="outbound")
        if action == "flush":
            self.flush(args.get("domain"))
            return
        ids = set(args["ids"])
        d = self.queue.look()
        d.addCallback(
            lambda listing: self._act_on(action, [e for e in listing.entries if e.id in ids])
        )

    def _act_on(self, action: str, entries: list[QueueEntry]) -> None:
        from haraka_tw.outbound.tools import bounce_entry

        for entry in entries:
            if self.scheduler.in_flight(entry.id):
                self.log.log(Level.WARN, f"{action} {entry.id}: being delivered now; try again")
                continue
            self.scheduler.remove(entry.id)
            if action == "delete":
                self.queue.remove(entry)
            else:
                bounce = partial(bounce_entry, entry=entry, config=self.config, now=time.time())
                self._bouncing.add(entry.id)  # (a rescan must not take it meanwhile)
                d = self.queue.write(bounce)
                d.addBoth(passing, self._bouncing.discard, entry.id)
                d.addCallbacks(self._schedule_report, self._bounce_failed, errbackArgs=(entry,))

    def _bounce_failed(self, failure: Failure, entry: QueueEntry) -> None:
        self.log.log(
            Level.ERROR,
            f"bounce {entry.id}: {failure.getErrorMessage()}; it stays in the queue",
            origin="outbound",
        )
        self.scheduler.add(entry)


#: seconds a file found by a rescan must have gone unchanged: one written more recently
#: may still be being copied in (a Haraka file has no size of its own to check it by)
RESCAN_SETTLED = 10.0


def _copy_to(result: Any, out: Deferred[Any]) -> Any:
    out.callback(result)
    return result


def _flush_problem(args: dict[str, Any]) -> str | None:
    domain = args.get("domain")
    return None if domain is None or isinstance(domain, str) else "domain is not text"


def _ids_problem(args: dict[str, Any]) -> str | None:
    ids = args.get("ids")
    if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
        return None
    return "ids is not a list of queue ids"


#: the queue control requests: action -> what is wrong with its arguments (None: nothing)
_CONTROLS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "flush": _flush_problem,
    "delete": _ids_problem,
    "bounce": _ids_problem,
}


def _dsn_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in params.items() if k in ("NOTIFY", "ORCPT") and v}


def _plain(notes: Any) -> dict[str, Any]:
    """Notes that survive JSON (a queue file): plain values only."""
    out: dict[str, Any] = {}
    for key, value in dict(notes).items():
        if isinstance(value, (str, int, float, bool, type(None), list, dict)):
            out[key] = value
    return out
