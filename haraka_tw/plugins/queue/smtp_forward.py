"""queue/smtp_forward: hand each message to another SMTP (or LMTP) server at queue time.

smtp_forward.ini (every key optional; a C{[domain]} section overrides [main] for that
domain, and takes the keys it does not set from [main])::

    [main]
    ; the next hop (host, host:port, [v6]:port), or a pool tried in order
    host=localhost
    port=25
    ;forwarding_host_pool=10.0.0.1:25, 10.0.0.2:25
    ; STARTTLS when offered (certificate not checked)
    ;enable_tls=false
    ; STARTTLS required, certificate checked
    ;tls_verify=false
    ; trust roots for tls_verify (else the system's)
    ;tls_ca_file=
    ; AUTH to the next hop (CRAM-MD5 > PLAIN > LOGIN)
    ;auth_user=
    ;auth_pass=
    ; AUTH allowed without TLS
    ;auth_cleartext=false
    ; speak LMTP to the next hop
    ;queue=lmtp
    ; seconds for the connection, and again for the greeting, per host
    ;connect_timeout=10
    ; also forward relayed mail (queue_outbound)
    ;enable_outbound=false
    ;check_sender=false
    ;check_recipient=false
    ; the route by the recipients' domains (rcpt_to) or the sender's (mail_from)
    ;domain_selector=rcpt_to
    ;one_message_per_rcpt=false

The answer is OK only once the next hop has said 250 to the message, so the client's 250
means the next hop has it. Recipients are grouped by route (the section of their domain,
else [main]); each group is one delivery and the answers are combined:

- every recipient accepted: OK;
- none accepted: DENYSOFT if any was deferred, else DENY, with the next hop's own reply
  (a 4xx or 5xx the client sees as it was given; no reply at all is 451 4.4.1);
- some accepted: the message has reached them, so the answer is OK once the rest are
  recorded here: deferred recipients go into the outbound queue (routed back to the same
  next hop by this plugin's get_mx hook), permanently refused ones get a DSN. If that
  cannot be done, the answer is DENYSOFT (any deferred) or DENY, and the accepted
  recipients will get the message again when the client retries.

Routes, the hand-over and the answer are L{haraka_tw.plugins.queue.forwarding}'s, shared
with queue/lmtp and queue/smtp_bridge; this module re-exports its names.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, OK, HookResult
from haraka_tw.interfaces import (
    IGetMxHook,
    IMailHook,
    IPluginContext,
    IQueueHook,
    IQueueOutboundHook,
    IRcptHook,
    IRegistration,
)
from haraka_tw.plugins.queue.forwarding import (
    ROUTE_BOOLEANS,
    SMTP_FORWARD_INI,
    Forwarder,
    ForwardingPlugin,
    Outcome,
    Route,
    Routes,
    Tally,
    client_reply,
    mx_from_url,
    queue_wants,
    read_route,
    read_routes,
)

__all__ = [
    "ROUTE_BOOLEANS",
    "Forwarder",
    "ForwardingPlugin",
    "Outcome",
    "Plugin",
    "Route",
    "Routes",
    "Tally",
    "client_reply",
    "mx_from_url",
    "queue_wants",
    "read_route",
    "read_routes",
]

_BOOLEANS = (
    *ROUTE_BOOLEANS,
    "-main.check_sender",
    "-main.check_recipient",
    "-main.one_message_per_rcpt",
)


@implementer(IRegistration, IQueueHook, IQueueOutboundHook, IGetMxHook, IMailHook, IRcptHook)
class Plugin(ForwardingPlugin):
    """queue/smtp_forward; see the module docstring."""

    name = "queue/smtp_forward"
    wants = "smtp_forward"

    def register(self, context: IPluginContext) -> None:
        self.setup(context)
        self.watch(SMTP_FORWARD_INI)
        self.log.info(f"forwarding to {', '.join(map(str, self.routes.main.hosts))}")
        self._warn_cleartext(self.routes)

    def load(self) -> None:
        ini = self.config.get_ini(SMTP_FORWARD_INI, booleans=_BOOLEANS)
        self.check_sender = bool(ini["main"].get("check_sender"))
        self.check_recipient = bool(ini["main"].get("check_recipient"))
        self.routes = read_routes(ini)

    def _warn_cleartext(self, routes: Routes) -> None:
        for route in (routes.main, *routes.domains.values()):
            if route.auth and route.tls.mode == "none" and not route.allow_cleartext_auth:
                self.log.warn(
                    f"[{route.name}] has auth_user but no TLS: AUTH will be refused"
                    " (set enable_tls=true, or auth_cleartext=true)"
                )

    def groups(self, connection: Any) -> list[tuple[Route, list[int]]]:
        return self.routes.groups(connection.transaction)

    # -- hooks --------------------------------------------------------------------------

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Any:
        """check_sender: a sender in a domain of this file must be relaying."""
        if not self.check_sender or sender.is_null or not sender.domain:
            return CONT
        if sender.domain.lower() not in self.routes.domains:
            return CONT
        connection.transaction.notes["local_sender"] = True
        if not connection.relaying:
            return DENY, "Spoofed MAIL FROM"
        return CONT

    def hook_rcpt(self, connection: Any, recipient: Any, params: Any) -> Any:
        """check_recipient: accept recipients in the domains of this file."""
        if not self.check_recipient or not recipient.domain:
            return CONT
        if recipient.domain.lower() in self.routes.domains:
            return OK
        return CONT

    def hook_queue(self, connection: Any) -> Deferred[HookResult]:
        return Deferred.fromCoroutine(self.forward(connection))

    def hook_queue_outbound(self, connection: Any) -> Any:
        """Relayed mail: forwarded only when every route it takes has enable_outbound."""
        txn = connection.transaction
        if txn is None:
            return CONT
        if not all(route.enable_outbound for route, _ in self.groups(connection)):
            return CONT
        return Deferred.fromCoroutine(self.forward(connection))

    def hook_get_mx(self, hmail: Any, domain: str) -> Any:
        """Route outbound mail: a message queued here goes back to its route; mail for a
        domain with its own section goes to that section's host (as in Haraka)."""
        wants = queue_wants(hmail.notes)
        if wants and wants not in (self.wants, "outbound"):
            return CONT
        requeued = self.requeued_route(hmail, self.routes)
        if requeued:
            return OK, requeued
        if self.routes.selector == "mail_from":
            sender = hmail.todo.mail_from
            key = sender.rpartition("@")[2].lower()
            route = self.routes.domains.get(sender.lower()) or self.routes.domains.get(key)
        else:
            route = self.routes.domains.get(domain.lower())
        if route is None:
            return CONT
        return OK, route.mx_hosts()
