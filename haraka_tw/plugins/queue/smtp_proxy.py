"""queue/smtp_proxy: open the backend connection at MAIL and proxy the transaction.

Unlike queue/smtp_forward, the backend sees each command as the client sends it and its
replies are the client's: a backend 550 to RCPT is the client's 550 to that RCPT (same
code, enhanced code and text), so the backend's recipient checks work at SMTP time.

- C{mail}: connect (the hosts in order), EHLO, STARTTLS and AUTH as configured, then
  MAIL FROM with the client's SIZE, BODY, SMTPUTF8, RET and ENVID where the backend
  offers them. A 2xx is CONT (the other mail plugins and the core answer); a 4xx/5xx is
  the client's reply. No backend: 451 4.4.1.
- C{rcpt_ok}: RCPT TO (so a recipient must first be accepted by a rcpt plugin, as in
  Haraka; list this plugin last among rcpt_ok plugins, or a later refusal leaves the
  backend with a recipient the client was refused). RCPT parameters are not passed on.
- C{data}: DATA; the backend's 354 lets the core send its own 354.
- C{queue} (and C{queue_outbound} unless C{enable_outbound=false}): the message, as it
  stands after the data_post plugins, streamed dot-stuffed; the reply to "." is the
  answer: 2xx OK, 4xx DENYSOFT, 5xx DENY, with the backend's text.
- C{reset_transaction} and C{disconnect}: the backend connection is closed (QUIT when it
  is in step, else dropped, which makes the backend discard a half-sent message).

A backend that fails part-way (connection lost, timeout) makes every later command of
that transaction 451 4.4.2. One backend connection per transaction; none is reused.

smtp_proxy.ini (Haraka's file)::

    [main]
    host=localhost
    port=25
    ;forwarding_host_pool=10.0.0.1:25, 10.0.0.2:25
    ;enable_tls=false / tls_verify=false / tls_ca_file=
    ;auth_user= / auth_pass= / auth_cleartext=false
    ;connect_timeout=10
    ;enable_outbound=true     ; proxy relayed mail too (Haraka's default)

Relayed mail with C{enable_outbound=false} is not proxied at all: the built-in outbound
queue takes it. Haraka's C{timeout} and C{max_connections} (its connection pool) have no
meaning here and are ignored.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYSOFT, OK, HookResult
from haraka_tw.interfaces import (
    IDataHook,
    IDisconnectHook,
    IMailHook,
    IPluginContext,
    IQueueHook,
    IQueueOutboundHook,
    IRcptOkHook,
    IRegistration,
    IResetTransactionHook,
)
from haraka_tw.outbound.client import ClientSession, Destination, open_session
from haraka_tw.outbound.delivery import DeliveryError, Phase
from haraka_tw.outbound.mx import MXError
from haraka_tw.outbound.wire import mail_command, rcpt_command
from haraka_tw.plugins.queue.forwarding import (
    ROUTE_BOOLEANS,
    ForwardingPlugin,
    Route,
    read_route,
)
from haraka_tw.smtp.replies import Reply

__all__ = ["SMTP_PROXY_INI", "Backend", "Plugin", "refusal"]

SMTP_PROXY_INI = "smtp_proxy.ini"
_BOOLEANS = (*(b for b in ROUTE_BOOLEANS if b != "-main.enable_outbound"), "+main.enable_outbound")

UNAVAILABLE = Reply.of(451, "4.4.1", "Backend unavailable, try again later")
BROKEN = Reply.of(451, "4.4.2", "Lost the backend connection, try again later")


class Backend:
    """One proxied transaction on a greeted backend session."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.in_data = False  # DATA accepted: the next bytes on the wire are the message
        self.broken = False
        self.finished = False

    @property
    def capabilities(self) -> Any:
        return self.session.capabilities

    async def command(self, line: bytes, phase: Phase) -> Reply:
        """Send one command and return the backend's reply.

        @raise DeliveryError: the connection failed (and is marked broken).
        """
        timeouts = self.session.timeouts
        timeout = {"mail": timeouts.mail, "rcpt": timeouts.rcpt, "data": timeouts.data}[phase]
        try:
            reply = await self.session.proto.command(line, phase, timeout)
        except BaseException:
            self.broken = True
            raise
        if phase == "data" and reply.code == 354:
            self.in_data = True
        return reply

    async def message(self, chunks: Iterable[bytes]) -> Reply:
        """Stream the message and return the reply to its final "."."""
        proto, timeouts = self.session.proto, self.session.timeouts
        try:
            try:
                await proto.send_body(chunks, timeouts.data_block)
            except DeliveryError:
                early = proto.take_reply()  # it answered, then closed, mid-message
                if early is None:
                    raise
                self.broken = True
                return early
            reply = await proto.reply("dot", timeouts.dot)
        except BaseException:
            self.broken = True
            raise
        self.in_data = False
        self.finished = True
        return reply

    def close(self) -> Deferred[None]:
        """QUIT when in step, else drop; fires once the connection is gone."""
        if self.in_data or self.broken or not self.session.usable:
            return self.session.abort()
        return Deferred.fromCoroutine(self.session.quit())


def refusal(reply: Reply) -> HookResult:
    """The backend's refusal as the client's: its code class decides DENY or DENYSOFT (a
    421 becomes 451, since this session is not closing)."""
    if reply.code >= 500:
        return HookResult(DENY, reply)
    if reply.code == 421 or reply.code < 400:
        return HookResult(DENYSOFT, Reply(451, reply.enhanced or "4.0.0", reply.lines))
    return HookResult(DENYSOFT, reply)


@implementer(
    IRegistration,
    IMailHook,
    IRcptOkHook,
    IDataHook,
    IQueueHook,
    IQueueOutboundHook,
    IResetTransactionHook,
    IDisconnectHook,
)
class Plugin(ForwardingPlugin):
    """queue/smtp_proxy; see the module docstring."""

    name = "queue/smtp_proxy"
    wants = "smtp_proxy"

    def register(self, context: IPluginContext) -> None:
        self.setup(context)
        self.watch(SMTP_PROXY_INI)
        self._held: weakref.WeakKeyDictionary[Any, Backend] = weakref.WeakKeyDictionary()
        self.log.info(f"proxying to {', '.join(map(str, self.route.hosts))}")

    def load(self) -> None:
        main = self.config.get_ini(SMTP_PROXY_INI, booleans=_BOOLEANS)["main"]
        self.route: Route = read_route("main", main, main, where=SMTP_PROXY_INI)

    async def _open(self, connection: Any) -> ClientSession | None:
        """A greeted session with the first backend host that can be used."""
        route = self.route
        for endpoint in route.hosts:
            try:
                addresses = await self.forwarder.addresses(endpoint)
            except MXError as e:
                connection.logwarn(f"backend {endpoint}: {e}", self.name)
                continue
            for ip in addresses:
                destination = Destination(
                    ip=ip,
                    port=endpoint.port,
                    helo=self.me,
                    host=endpoint.host,
                    tls=route.tls,
                    auth=route.auth,
                    allow_cleartext_auth=route.allow_cleartext_auth,
                )
                try:
                    return await open_session(self.reactor, destination, route.timeouts)
                except DeliveryError as e:
                    connection.logwarn(f"backend {endpoint} [{ip}]: {e}", self.name)
        return None

    def _mail_params(self, params: dict[str, str | None], caps: Any) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        if "SIZE" in params and "SIZE" in caps:
            out["SIZE"] = params["SIZE"]
        if "BODY" in params and "8BITMIME" in caps:
            out["BODY"] = params["BODY"]
        if "SMTPUTF8" in params:
            out["SMTPUTF8"] = None
        for key in ("RET", "ENVID"):
            if key in params and "DSN" in caps:
                out[key] = params[key]
        return out

    # -- hooks ------------------------------------------------------------------------

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Deferred[HookResult]:
        return Deferred.fromCoroutine(self._mail(connection, sender, params))

    async def _mail(self, connection: Any, sender: Any, params: Any) -> HookResult:
        await self._drop(connection)
        if connection.relaying and not self.route.enable_outbound:
            return HookResult(CONT)  # relayed mail is the outbound queue's
        session = await self._open(connection)
        if session is None:
            return HookResult(DENYSOFT, UNAVAILABLE)
        backend = Backend(session)
        try:
            if "SMTPUTF8" in params and "SMTPUTF8" not in session.capabilities:
                await backend.close()
                reply = Reply.of(555, "5.6.7", "SMTPUTF8 is not supported by the backend")
                return HookResult(DENY, reply)
            line = mail_command(sender.address, self._mail_params(params, session.capabilities))
            reply = await backend.command(line, "mail")
        except DeliveryError as e:
            connection.logwarn(f"backend failed at MAIL: {e}", self.name)
            await backend.close()
            return HookResult(DENYSOFT, BROKEN)
        except BaseException:
            await backend.close()  # cancelled (the plugin timed out): do not leave it open
            raise
        if reply.code // 100 != 2:
            await backend.close()
            return refusal(reply)
        self._held[connection] = backend
        return HookResult(CONT)

    def hook_rcpt_ok(self, connection: Any, recipient: Any) -> Any:
        backend = self._held.get(connection)
        if backend is None:
            return CONT
        return Deferred.fromCoroutine(
            self._step(connection, backend, rcpt_command(recipient.address, {}), "rcpt")
        )

    def hook_data(self, connection: Any) -> Any:
        backend = self._held.get(connection)
        if backend is None:
            return CONT
        return Deferred.fromCoroutine(self._step(connection, backend, b"DATA\r\n", "data"))

    async def _step(self, connection: Any, backend: Backend, line: bytes, phase: Phase) -> Any:
        if backend.broken:
            return HookResult(DENYSOFT, BROKEN)
        try:
            reply = await backend.command(line, phase)
        except DeliveryError as e:
            connection.logwarn(f"backend failed at {phase.upper()}: {e}", self.name)
            return HookResult(DENYSOFT, BROKEN)
        if reply.code // 100 == 2 or (phase == "data" and reply.code == 354):
            return HookResult(CONT)
        return refusal(reply)

    def hook_queue(self, connection: Any) -> Any:
        backend = self._held.get(connection)
        if backend is None:
            return CONT
        return Deferred.fromCoroutine(self._queue(connection, backend))

    def hook_queue_outbound(self, connection: Any) -> Any:
        if not self.route.enable_outbound:
            return CONT
        return self.hook_queue(connection)

    async def _queue(self, connection: Any, backend: Backend) -> HookResult:
        if backend.broken or not backend.in_data:
            return HookResult(DENYSOFT, BROKEN)
        try:
            reply = await backend.message(connection.transaction.message_stream.chunks())
        except DeliveryError as e:
            connection.logwarn(f"backend failed during the message: {e}", self.name)
            return HookResult(DENYSOFT, BROKEN)
        connection.loginfo(f"backend answered {reply.code} {reply.text}", self.name)
        if reply.code // 100 == 2:
            return HookResult(OK)
        return refusal(reply)

    def hook_reset_transaction(self, connection: Any) -> Deferred[None]:
        return self._drop(connection)

    def hook_disconnect(self, connection: Any) -> Deferred[None]:
        return self._drop(connection)

    def _drop(self, connection: Any) -> Deferred[None]:
        backend = self._held.pop(connection, None)
        if backend is None:
            return succeed(None)
        return backend.close()
