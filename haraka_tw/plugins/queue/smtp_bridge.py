"""queue/smtp_bridge: relay each message through the SMTP server the client logged in to,
as that same user.

auth/auth_bridge checks a login on the server of C{smtp_bridge.ini} and, on success,
keeps C{connection.notes["auth_bridge"]} = C{{host, port, user, password, method}}. This
plugin hands the message to that host and port, logging in there with that user and
password (the client chooses CRAM-MD5, else PLAIN, else LOGIN, as the server offers).
A message from a client without that note is left to the next queue plugin (CONT).

smtp_bridge.ini (Haraka's file, shared with auth/auth_bridge)::

    [main]
    host=smtp.example.com    ; used when the note has no host
    ;port=25
    ;enable_tls=true         ; STARTTLS when offered (the certificate is not checked)
    ;tls_verify=false        ; STARTTLS required and the certificate checked
    ;tls_ca_file=

AUTH is sent even when the server offers no STARTTLS, since auth/auth_bridge already sent
the same password to the same server that way. Haraka's C{auth_type} and C{priority} are
read and ignored.

Hooks: C{queue} and C{queue_outbound} (a client that logged in is relaying, so its mail
comes through C{queue_outbound}). The answer is OK only once the server took the
message; its refusals are the client's (see queue/smtp_forward). Deferred recipients of
a partly delivered message cannot be queued here (that would put the user's password in
the queue file), so such a message is answered 4xx and the client retries it whole.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from haraka_tw.codes import CONT, HookResult
from haraka_tw.interfaces import IPluginContext, IQueueHook, IQueueOutboundHook, IRegistration
from haraka_tw.outbound.endpoint import Endpoint
from haraka_tw.plugins.queue.forwarding import ForwardingPlugin, Route, read_route

__all__ = ["SMTP_BRIDGE_INI", "Plugin"]

SMTP_BRIDGE_INI = "smtp_bridge.ini"
_BOOLEANS = ("+main.enable_tls", "-main.tls_verify")


@implementer(IRegistration, IQueueHook, IQueueOutboundHook)
class Plugin(ForwardingPlugin):
    """queue/smtp_bridge; see the module docstring."""

    name = "queue/smtp_bridge"
    wants = "smtp_bridge"
    requeue = False

    def register(self, context: IPluginContext) -> None:
        self.setup(context)
        self.watch(SMTP_BRIDGE_INI)

    def load(self) -> None:
        main = self.config.get_ini(SMTP_BRIDGE_INI, booleans=_BOOLEANS)["main"]
        self.template = read_route("main", main, main, where=SMTP_BRIDGE_INI)

    def route(self, bridge: dict[str, Any]) -> Route:
        """The route for one bridged login: its server, its credentials."""
        default = self.template.hosts[0]
        host = str(bridge.get("host") or default.host)
        port = int(bridge.get("port") or default.port)
        return Route(
            name="bridge",
            hosts=(Endpoint(host, port),),
            tls=self.template.tls,
            auth=(str(bridge["user"]), str(bridge["password"])),
            allow_cleartext_auth=True,
            timeouts=self.template.timeouts,
        )

    def groups(self, connection: Any) -> list[tuple[Route, list[int]]]:
        bridge = connection.notes.get("auth_bridge")
        txn = connection.transaction
        if not isinstance(bridge, dict) or "user" not in bridge or "password" not in bridge:
            connection.logdebug("no auth_bridge credentials: left to the next plugin", self.name)
            return []
        return [(self.route(bridge), list(range(len(txn.rcpt_to))))]

    def hook_queue(self, connection: Any) -> Deferred[HookResult] | HookResult:
        if connection.transaction is None:
            return HookResult(CONT)
        return Deferred.fromCoroutine(self.forward(connection))

    hook_queue_outbound = hook_queue
