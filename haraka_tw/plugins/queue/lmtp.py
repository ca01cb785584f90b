"""queue/lmtp: deliver each inbound message over LMTP (RFC 2033), answering OK only once
the LMTP server has taken it.

lmtp.ini (Haraka's file)::

    [main]
    host=localhost
    port=24

    [example.com]        ; mail for one domain goes elsewhere
    host=10.1.1.1
    port=2400

    [example.org]        ; or to an LMTP server's Unix socket (Dovecot's, say)
    path=/run/dovecot/lmtp

A section takes the keys it does not set from [main]; C{path}, when set, is used instead
of the host and port. The route keys of smtp_forward.ini (C{forwarding_host_pool},
C{enable_tls}, C{tls_verify}, C{tls_ca_file}, C{auth_user}, C{auth_pass},
C{auth_cleartext}, C{connect_timeout}) work here too.

LMTP answers once per recipient after the message. Recipients are grouped by route, one
LMTP transaction each, and the answers combined as queue/smtp_forward does: all
delivered, OK; none, DENYSOFT if any was deferred, else DENY with the server's reply; some
delivered, OK once the deferred ones are in the outbound queue (this plugin's get_mx hook
sends them back to the same LMTP server) and the refused ones have a DSN.

Haraka's queue/lmtp hands every message to its outbound queue (the client's 250 then
means "queued here"); this one delivers at once, and uses the outbound queue only for
what is left over. Its get_mx hook also answers, as Haraka's does, for queued mail whose
notes carry C{using_lmtp}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from haraka_tw.codes import CONT, OK, HookResult
from haraka_tw.interfaces import IGetMxHook, IPluginContext, IQueueHook, IRegistration
from haraka_tw.plugins.queue.forwarding import (
    ROUTE_BOOLEANS,
    ForwardingPlugin,
    Route,
    queue_wants,
    read_routes,
)

__all__ = ["LMTP_INI", "Plugin"]

LMTP_INI = "lmtp.ini"


@implementer(IRegistration, IQueueHook, IGetMxHook)
class Plugin(ForwardingPlugin):
    """queue/lmtp; see the module docstring."""

    name = "queue/lmtp"
    wants = "lmtp"

    def register(self, context: IPluginContext) -> None:
        self.setup(context)
        self.watch(LMTP_INI)
        self.log.info(f"delivering over LMTP to {', '.join(map(str, self.routes.main.hosts))}")

    def load(self) -> None:
        ini = self.config.get_ini(LMTP_INI, booleans=ROUTE_BOOLEANS)
        self.routes = read_routes(ini, default_port=24, lmtp=True, where=LMTP_INI)

    def groups(self, connection: Any) -> list[tuple[Route, list[int]]]:
        return self.routes.groups(connection.transaction)

    def hook_queue(self, connection: Any) -> Deferred[HookResult]:
        return Deferred.fromCoroutine(self.forward(connection))

    def hook_get_mx(self, hmail: Any, domain: str) -> Any:
        """Queued mail for LMTP (queued here, or noted C{using_lmtp}): its route."""
        requeued = self.requeued_route(hmail, self.routes)
        if requeued:
            return OK, requeued
        notes = hmail.notes
        if notes.get("using_lmtp") and queue_wants(notes) in (None, "", self.wants):
            return OK, self.routes.for_domain(domain).mx_hosts()
        return CONT
