"""What the forwarding queue plugins share (queue/smtp_forward, queue/lmtp,
queue/smtp_bridge, and queue/smtp_proxy for its routes): routes read from an ini file,
handing one message to a route's hosts, and the answer for the client.

- L{Route} / L{Routes}, L{read_route} / L{read_routes}: where and how a group of
  recipients is handed over (hosts, LMTP, TLS, AUTH, timeouts), per ini section;
- L{Forwarder}: one message to one route, its hosts in order, with the outbound client;
  the recipients' L{Outcome}s, gathered in a L{Tally};
- L{ForwardingPlugin}: the queue hook's machinery: group, hand over, answer (OK, DENYSOFT
  or DENY with the next hop's reply, L{client_reply}), queue what was deferred and bounce
  what was refused when some recipients have the message; L{mx_from_url} and
  L{ForwardingPlugin.requeued_route} route what it queued back to the same next hop.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from haraka_tw.codes import CONT, DENY, DENYSOFT, OK, HookResult
from haraka_tw.dns import Resolver
from haraka_tw.interfaces import IPluginContext
from haraka_tw.outbound import client
from haraka_tw.outbound.bounce import RecipientFailure, build_dsn, dsn_template
from haraka_tw.outbound.delivery import (
    DeliveryError,
    DeliveryReport,
    RcptResult,
    Recipient,
    Timeouts,
    TLSPolicy,
)
from haraka_tw.outbound.endpoint import Endpoint, parse_endpoint, parse_endpoints
from haraka_tw.outbound.mx import MXError, MXHost, MXResolver
from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.smtp.replies import Reply

__all__ = [
    "ROUTE_BOOLEANS",
    "SMTP_FORWARD_INI",
    "Forwarder",
    "ForwardingPlugin",
    "Outcome",
    "Route",
    "Routes",
    "Tally",
    "client_reply",
    "mx_from_url",
    "queue_wants",
    "read_route",
    "read_routes",
]

#: queue/smtp_forward's file, the one L{read_route} names in errors unless told another.
SMTP_FORWARD_INI = "smtp_forward.ini"

#: The booleans every route section may hold (declared for [main] and for every section).
ROUTE_BOOLEANS = (
    "-main.enable_tls",
    "-main.tls_verify",
    "-main.auth_cleartext",
    "-main.enable_outbound",
    "*.enable_tls",
    "*.tls_verify",
    "*.auth_cleartext",
    "*.enable_outbound",
)

# A failure here says nothing about the message: the next host of the pool may take it.
_TRY_NEXT = frozenset({"connect", "banner", "ehlo", "starttls", "auth"})
_MAIL_PARAMS = ("RET", "ENVID", "SMTPUTF8", "BODY")
_RCPT_PARAMS = ("NOTIFY", "ORCPT")


# -- routes ---------------------------------------------------------------------------------


#: seconds for the connection to a next hop, and again for its greeting: with the default
#: plugin timeout (30 s), a silent first host of a pool leaves time for the second
DEFAULT_CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class Route:
    """Where and how one group of recipients is handed over.

    @ivar name: the ini section it comes from (C{main}, a domain, or an address).
    @ivar hosts: tried in order; the next one only when one cannot be used at all.
    """

    name: str
    hosts: tuple[Endpoint, ...]
    lmtp: bool = False
    tls: TLSPolicy = field(default_factory=lambda: TLSPolicy(mode="none"))
    auth: tuple[str, str] | None = None
    allow_cleartext_auth: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    enable_outbound: bool = False

    @property
    def next_hop(self) -> str:
        """Haraka's C{queue.next_hop} note: C{smtp://host:port} (C{lmtp://} for LMTP;
        C{lmtp://host/path} for a Unix socket)."""
        first = self.hosts[0]
        where = f"{first.host}{quote(first.path)}" if first.path is not None else str(first)
        return f"{'lmtp' if self.lmtp else 'smtp'}://{where}"

    def mx_hosts(self) -> list[MXHost]:
        """The route as a get_mx answer for the outbound queue."""
        user, password = self.auth or (None, None)
        return [
            MXHost(
                exchange=e.host,
                priority=i,
                port=e.port,
                auth_user=user,
                auth_pass=password,
                using_lmtp=self.lmtp,
                from_dns=False,
                path=e.path,
            )
            for i, e in enumerate(self.hosts)
        ]


def read_route(
    name: str,
    section: Mapping[str, Any],
    main: Mapping[str, Any],
    *,
    default_host: str = "localhost",
    default_port: int = 25,
    lmtp: bool | None = None,
    where: str = SMTP_FORWARD_INI,
) -> Route:
    """One route: the keys of C{section}, else those of C{main}, else the defaults.

    @param lmtp: force LMTP on or off; None reads C{queue=lmtp}. When forced on, C{path}
        (Haraka's lmtp.ini key) names a Unix socket to use instead of the hosts.
    @raise ValueError: for a host, port or timeout that does not parse.
    """

    def get(key: str) -> Any:
        return section[key] if key in section else main.get(key)

    port = get("port") or default_port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{where} [{name}] port: {port!r} is not a port number")
    pool = get("forwarding_host_pool")
    path = get("path") if lmtp else None
    if "path" not in section and ("host" in section or "forwarding_host_pool" in section):
        path = None  # the section names its own host: [main]'s socket is not for it
    if isinstance(path, bool) or (path and not str(path).startswith("/")):
        raise ValueError(f"{where} [{name}] path: {path!r} is not an absolute socket path")
    try:
        if path:
            hosts = [Endpoint("localhost", port, path=str(path))]
        elif pool:
            hosts = parse_endpoints(pool, port)
        else:
            hosts = [parse_endpoint(str(get("host") or default_host), port)]
    except ValueError as e:
        raise ValueError(f"{where} [{name}]: {e}") from None
    if not hosts:
        raise ValueError(f"{where} [{name}]: no host")
    ca_file = str(get("tls_ca_file")) if get("tls_ca_file") else None
    if get("tls_verify"):
        tls = TLSPolicy(mode="required", verify=True, ca_file=ca_file)
    elif get("enable_tls"):
        tls = TLSPolicy(mode="opportunistic", ca_file=ca_file)
    else:
        tls = TLSPolicy(mode="none")
    user = get("auth_user")
    auth = (str(user), str(get("auth_pass") or "")) if user not in (None, "") else None
    connect = get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT
    if isinstance(connect, bool) or not isinstance(connect, int | float) or connect <= 0:
        raise ValueError(f"{where} [{name}] connect_timeout: {connect!r} is not seconds")
    return Route(
        name=name,
        hosts=tuple(hosts),
        lmtp=str(get("queue") or "").lower() == "lmtp" if lmtp is None else lmtp,
        tls=tls,
        auth=auth,
        allow_cleartext_auth=bool(get("auth_cleartext")),
        # The greeting gets the connection's time too: a host that answers the SYN but never
        # greets must give way to the next one of a pool well within the hook's timeout.
        timeouts=Timeouts(connect=float(connect), banner=float(connect)),
        enable_outbound=bool(get("enable_outbound")),
    )


@dataclass(frozen=True)
class Routes:
    """[main] and the per-domain (or per-address) routes of one ini file."""

    main: Route
    domains: Mapping[str, Route] = field(default_factory=dict)
    selector: str = "rcpt_to"
    one_message_per_rcpt: bool = False

    def by_name(self, name: str) -> Route | None:
        return self.main if name == "main" else self.domains.get(name.lower())

    def for_domain(self, domain: str) -> Route:
        return self.domains.get(domain.lower(), self.main)

    def for_sender(self, sender: Any) -> Route:
        if sender is None or sender.is_null:
            return self.main
        return (
            self.domains.get(sender.address.lower())
            or self.domains.get(sender.domain.lower())
            or self.main
        )

    def groups(self, txn: Any) -> list[tuple[Route, list[int]]]:
        """The recipients of C{txn} (by index) grouped by route, in order of appearance."""
        out: dict[tuple[str, int], tuple[Route, list[int]]] = {}
        for i, rcpt in enumerate(txn.rcpt_to):
            if self.selector == "mail_from":
                route = self.for_sender(txn.mail_from)
            else:
                route = self.for_domain(rcpt.domain)
            key = (route.name, i if self.one_message_per_rcpt else -1)
            out.setdefault(key, (route, []))[1].append(i)
        return list(out.values())


def read_routes(
    ini: Mapping[str, Mapping[str, Any]],
    *,
    default_host: str = "localhost",
    default_port: int = 25,
    lmtp: bool | None = None,
    where: str = SMTP_FORWARD_INI,
) -> Routes:
    """Every section of C{ini}: [main] and one route per other section.

    @raise ValueError: for a bad host, port, timeout or domain_selector.
    """
    main = ini.get("main", {})
    kw: dict[str, Any] = {
        "default_host": default_host,
        "default_port": default_port,
        "lmtp": lmtp,
        "where": where,
    }
    domains = {
        name.lower(): read_route(name.lower(), section, main, **kw)
        for name, section in ini.items()
        if name != "main"
    }
    selector = str(main.get("domain_selector") or "rcpt_to").lower()
    if selector not in ("rcpt_to", "mail_from"):
        raise ValueError(
            f"{where} [main] domain_selector: {selector!r} is not rcpt_to or mail_from"
        )
    return Routes(
        main=read_route("main", main, main, **kw),
        domains=domains,
        selector=selector,
        one_message_per_rcpt=bool(main.get("one_message_per_rcpt")),
    )


def queue_wants(notes: Any) -> Any:
    """The C{queue.wants} note (the flat key or the dotted path), or None."""
    return notes.get("queue.wants") or notes.get_path("queue.wants")


# -- one delivery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient.

    @ivar index: the recipient's place in C{transaction.rcpt_to}.
    @ivar result: the reply that decided it (or one made for a failure without a reply).
    @ivar from_server: whether C{result} is the next hop's own reply.
    @ivar where: the next hop's name or address, for logs and the DSN.
    """

    index: int
    result: RcptResult
    route: Route
    from_server: bool = True
    where: str = ""


@dataclass
class Tally:
    """The outcomes of a message's recipients, by kind."""

    accepted: list[Outcome] = field(default_factory=list)
    deferred: list[Outcome] = field(default_factory=list)
    bounced: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        if outcome.result.accepted:
            self.accepted.append(outcome)
        elif outcome.result.permanent:
            self.bounced.append(outcome)
        else:
            self.deferred.append(outcome)

    def merge(self, other: Tally) -> None:
        for outcome in (*other.accepted, *other.deferred, *other.bounced):
            self.add(outcome)

    def summary(self) -> str:
        def names(items: list[Outcome]) -> str:
            return ", ".join(o.result.recipient.address for o in items) or "-"

        return (
            f"accepted: {names(self.accepted)}; deferred: {names(self.deferred)};"
            f" refused: {names(self.bounced)}"
        )


def _shared_result(recipient: Recipient, error: DeliveryError) -> RcptResult:
    """A result for a recipient that shares the failure of the whole message."""
    code = error.code
    if code is None or code < 400 or (code >= 500) != error.permanent:
        code = 554 if error.permanent else 451
    return RcptResult(recipient, code, error.enhanced, error.text)


def _unreachable_result(recipient: Recipient, last: DeliveryError | MXError | None) -> RcptResult:
    """A result for a recipient no host could be asked about: always temporary (the next
    hop being unusable is this server's problem, not the sender's)."""
    if last is None:
        return RcptResult(recipient, 451, "4.4.1", "no host to hand the message to")
    enhanced = last.enhanced or "4.4.1"
    return RcptResult(recipient, 451, "4" + enhanced[1:], str(last))


class Forwarder:
    """Hands one message to one L{Route}: its hosts in order, each host's addresses in
    order, with L{client.deliver}.

    @param mx: gives the resolver for host names (made on first use); its C{local_mx_ok}
        should be on, since next hops are usually local or private addresses.
    """

    def __init__(self, reactor: Any, helo: str, mx: Callable[[], MXResolver]) -> None:
        self.reactor = reactor
        self.helo = helo
        self._mx = mx

    async def addresses(self, endpoint: Endpoint) -> list[str]:
        """The addresses to connect to for C{endpoint} (for a Unix socket, its path).

        @raise MXError: when the name has none.
        """
        if endpoint.path is not None:
            return [endpoint.path]
        try:
            return [str(ipaddress.ip_address(endpoint.host))]
        except ValueError:
            pass
        if endpoint.host.lower() == "localhost":
            return ["127.0.0.1"]
        host = MXHost(endpoint.host, 0, port=endpoint.port, from_dns=False)
        found = await self._mx().addresses([host])
        return [address.ip for address in found]

    async def hand_over(
        self,
        route: Route,
        txn: Any,
        indexes: list[int],
        warn: Callable[[str], None],
    ) -> Tally:
        """Deliver C{txn}'s message to the recipients at C{indexes} by C{route}; each next
        hop that cannot be reached is a line to C{warn}."""
        recipients = [
            Recipient(txn.rcpt_to[i].address, _rcpt_params(txn.rcpt_params, i)) for i in indexes
        ]
        index_of = {id(r): i for r, i in zip(recipients, indexes, strict=True)}
        stream = txn.message_stream
        last: DeliveryError | MXError | None = None
        for endpoint in route.hosts:
            try:
                addresses = await self.addresses(endpoint)
            except MXError as e:
                warn(f"next hop {endpoint}: {e}")
                last = e
                continue
            for ip in addresses:
                try:
                    report = await client.deliver(
                        self.reactor,
                        ip=ip,
                        port=endpoint.port,
                        path=endpoint.path,
                        host=endpoint.host,
                        helo=self.helo,
                        mail_from=txn.mail_from.address if txn.mail_from else "",
                        recipients=recipients,
                        message=stream.chunks,
                        size=stream.size,
                        lmtp=route.lmtp,
                        tls=route.tls,
                        auth=route.auth,
                        allow_cleartext_auth=route.allow_cleartext_auth,
                        timeouts=route.timeouts,
                        mail_params=_mail_params(txn.mail_params),
                    )
                except DeliveryError as e:
                    warn(f"next hop {endpoint}{'' if endpoint.path else f' [{ip}]'}: {e}")
                    if e.phase in _TRY_NEXT and not e.settled:
                        last = e
                        continue
                    return _from_error(e, recipients, index_of, route, str(endpoint))
                return _from_report(report, index_of, route)
        tally = Tally()
        for recipient in recipients:
            result = _unreachable_result(recipient, last)
            tally.add(Outcome(index_of[id(recipient)], result, route, from_server=False))
        return tally


def _rcpt_params(params: list[dict[str, str | None]], i: int) -> dict[str, str]:
    own = params[i] if i < len(params) else {}
    return {k: v for k, v in own.items() if k in _RCPT_PARAMS and v}


def _mail_params(params: Mapping[str, str | None]) -> dict[str, str | None]:
    return {k: v for k, v in params.items() if k in _MAIL_PARAMS}


def _from_report(report: DeliveryReport, index_of: dict[int, int], route: Route) -> Tally:
    tally = Tally()
    where = report.host or report.ip
    for result in (*report.accepted, *report.deferred, *report.bounced):
        tally.add(Outcome(index_of[id(result.recipient)], result, route, where=where))
    return tally


def _from_error(
    error: DeliveryError,
    recipients: list[Recipient],
    index_of: dict[int, int],
    route: Route,
    where: str,
) -> Tally:
    """The recipients the error settled keep their own replies; the others share it."""
    tally = Tally()
    settled = {id(r.recipient): r for r in error.settled}
    for recipient in recipients:
        own = settled.get(id(recipient))
        index = index_of[id(recipient)]
        if own is not None:
            tally.add(Outcome(index, own, route, where=where))
        else:
            result = _shared_result(recipient, error)
            tally.add(Outcome(index, result, route, error.code is not None, where))
    return tally


def client_reply(outcome: Outcome) -> Reply:
    """What the client is told for a refused recipient: the next hop's reply (a 421
    becomes 451: this session is not closing), or a plain one when there was no reply."""
    result = outcome.result
    code = result.code
    if result.permanent:
        code = code if 500 <= code < 600 else 550
        return Reply.of(code, result.enhanced, result.text)
    code = code if 400 <= code < 500 and code != 421 else 451
    if outcome.from_server:
        return Reply.of(code, result.enhanced, result.text)
    return Reply.of(451, "4.4.1", "Unable to hand the message to the next hop, try again later")


# -- the plugin machinery ---------------------------------------------------------------------


class ForwardingPlugin:
    """The queue hook queue/smtp_forward, queue/lmtp and queue/smtp_bridge share.

    A subclass sets L{name}, L{wants} and L{requeue}, calls L{setup} and L{watch} from
    C{register}, and implements L{load} and L{groups}.
    """

    name = "queue/smtp_forward"
    #: the C{queue.wants} value (transaction note) this plugin answers to
    wants = "smtp_forward"
    #: whether deferred recipients of a partly delivered message may be queued here
    requeue = True

    def setup(self, context: IPluginContext) -> None:
        self.name = context.name
        self.log = context.log
        self.config = context.config
        self.reactor = context.reactor
        self.server_notes: dict[str, Any] = context.server_notes
        self.me = str(context.config.get_value("me", None) or socket.getfqdn() or "localhost")
        self._resolver: MXResolver | None = None
        self.forwarder = Forwarder(self.reactor, self.me, self._mx_resolver)

    def watch(self, filename: str) -> None:
        """L{load} the settings now (an error stops start-up) and again whenever
        C{filename} changes (an error then is logged and the last good settings stay)."""
        self.load()
        self.config.on_change(filename, self._reload)

    def load(self) -> None:
        """Read the plugin's settings into it.

        @raise ValueError: for settings that cannot be used.
        """
        raise NotImplementedError

    def _reload(self) -> None:
        try:
            self.load()
        except ValueError as e:
            self.log.error(f"{e}; keeping the last good settings")

    def _mx_resolver(self) -> MXResolver:
        if self._resolver is None:
            resolver = Resolver.from_config(self.config, self.reactor)
            self._resolver = MXResolver(resolver, local_mx_ok=True, log=self.log.info)
        return self._resolver

    def groups(self, connection: Any) -> list[tuple[Route, list[int]]]:
        """The routes for the open transaction and the recipients (indexes) of each;
        an empty list leaves the message to the next queue plugin (CONT)."""
        raise NotImplementedError

    async def forward(self, connection: Any) -> HookResult:
        """Hand the transaction's message over; see the module docstring for the answer."""
        txn = connection.transaction
        if txn is None or not txn.rcpt_to:
            return HookResult(CONT)
        wants = queue_wants(txn.notes)
        if wants and wants != self.wants:
            connection.logdebug(f"skipped: queue.wants is {wants!r}", self.name)
            return HookResult(CONT)
        groups = self.groups(connection)
        if not groups:
            return HookResult(CONT)

        def warn(message: str) -> None:
            connection.logwarn(message, self.name)

        tally = Tally()
        for route, indexes in groups:
            part = await self.forwarder.hand_over(route, txn, indexes, warn)
            hosts = ", ".join(map(str, route.hosts))
            connection.loginfo(f"route {route.name} ({hosts}): {part.summary()}", self.name)
            tally.merge(part)
        return await self.answer(connection, tally)

    async def answer(self, connection: Any, tally: Tally) -> HookResult:
        """One answer for the whole message from its recipients' outcomes."""
        if not tally.accepted:
            if tally.deferred:
                return HookResult(DENYSOFT, client_reply(tally.deferred[0]))
            return HookResult(DENY, client_reply(tally.bounced[0]))
        if not tally.deferred and not tally.bounced:
            return HookResult(OK)
        problem = await self.settle_rest(connection, tally)
        if problem is None:
            return HookResult(OK)
        connection.logerror(
            f"{len(tally.accepted)} recipients have the message but the rest cannot be"
            f" kept here ({problem}): refusing, so the client retries (they get it twice)",
            self.name,
        )
        if tally.deferred:
            return HookResult(DENYSOFT, client_reply(tally.deferred[0]))
        return HookResult(DENY, client_reply(tally.bounced[0]))

    async def settle_rest(self, connection: Any, tally: Tally) -> str | None:
        """Queue the deferred recipients and a DSN for the refused ones; None when done,
        else why not."""
        outbound = self.server_notes.get("outbound")
        if outbound is None:
            return "no outbound queue"
        if tally.deferred and not self.requeue:
            return f"{self.name} cannot queue recipients for later"
        txn = connection.transaction
        sender = txn.mail_from.address if txn.mail_from else ""
        try:
            if tally.deferred:
                message = txn.message_stream.get_bytes()
                by_route: dict[str, list[Outcome]] = {}
                for outcome in tally.deferred:
                    by_route.setdefault(outcome.route.name, []).append(outcome)
                for items in by_route.values():
                    route = items[0].route
                    notes = {
                        "queue": {
                            "wants": self.wants,
                            "next_hop": route.next_hop,
                            "route": route.name,
                        }
                    }
                    rcpts = [o.result.recipient.address for o in items]
                    await outbound.send_email(sender, rcpts, message, notes=notes)
                    connection.loginfo(f"queued for a retry: {', '.join(rcpts)}", self.name)
            if tally.bounced:
                await self._bounce(connection, tally.bounced, outbound)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    async def _bounce(self, connection: Any, refused: list[Outcome], outbound: Any) -> None:
        txn = connection.transaction
        sender = txn.mail_from.address if txn.mail_from else ""
        if not sender:
            return  # a bounce is never bounced
        failures = []
        for outcome in refused:
            r = outcome.result
            failures.append(
                RecipientFailure(
                    QueueRecipient(r.recipient.address, params=dict(r.recipient.params)),
                    r.enhanced or "5.0.0",
                    diagnostic=f"{r.code} {r.enhanced or ''} {r.text}".replace("  ", " "),
                    remote_mta=outcome.where or None,
                    last_attempt=time.time(),
                )
            )
        todo = Todo(
            domain=refused[0].result.recipient.address.rpartition("@")[2].lower(),
            mail_from=sender,
            rcpt_to=[f.recipient for f in failures],
            uuid=txn.uuid,
            queue_time=txn.start_time,
            ret=txn.mail_params.get("RET"),
            envid=txn.mail_params.get("ENVID"),
        )
        dsn = build_dsn(
            todo,
            failures,
            action="failed",
            reporting_mta=self.me,
            message_chunks=txn.message_stream.chunks(),
            now=time.time(),
            template=dsn_template(self.config, "failed"),
        )
        if dsn is None:
            return
        await outbound.send_email("", [sender], dsn, notes={"dsn_for": txn.uuid})
        refused_names = ", ".join(f.recipient.address for f in failures)
        connection.loginfo(f"DSN queued to <{sender}> for {refused_names}", self.name)

    def requeued_route(self, hmail: Any, routes: Routes) -> list[MXHost] | None:
        """get_mx for a message this plugin queued (C{queue.wants} is ours): its route."""
        notes = hmail.notes
        if queue_wants(notes) != self.wants:
            return None
        route = routes.by_name(str(notes.get_path("queue.route") or ""))
        if route is not None:
            return route.mx_hosts()
        hop = notes.get_path("queue.next_hop")
        return [mx_from_url(str(hop))] if hop else None


def mx_from_url(url: str) -> MXHost:
    """Haraka's C{queue.next_hop}: C{smtp://[user:pass@]host[:port]} or C{lmtp://...}; an
    LMTP one to localhost with a path (C{lmtp://localhost/run/dovecot/lmtp}, as
    L{Route.next_hop} writes it) names a Unix socket."""
    parts = urlsplit(url)
    lmtp = parts.scheme == "lmtp"
    local = (parts.hostname or "localhost") == "localhost" and not parts.port
    path = unquote(parts.path) if lmtp and local and parts.path not in ("", "/") else None
    return MXHost(
        exchange=parts.hostname or "localhost",
        priority=0,
        port=parts.port or (24 if lmtp else 25),
        auth_user=parts.username or None,
        auth_pass=parts.password or None,
        using_lmtp=lmtp,
        from_dns=False,
        path=path,
    )
