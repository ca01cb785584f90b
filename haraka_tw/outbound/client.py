"""The outbound SMTP/LMTP client: hand one message to one server address.

L{deliver} is the entry point. It opens a L{ClientSession} (or, with a
L{ConnectionPool<haraka_tw.outbound.pool.ConnectionPool>}, takes one of the destination's
sessions, waiting while all of them are busy, and sends RSET before the envelope), runs one
transaction and reports per recipient. The dialogue, in the order RFC 5321 and its
extensions ask for (the steps up to AUTH are L{haraka_tw.outbound.dialogue}'s, composed here
with this policy):

1. Connect (from C{bind} if given); with L{TLSPolicy.implicit} TLS starts at once.
2. The banner must be 220 (4xx: temporary, 5xx: permanent failure).
3. EHLO (LHLO for LMTP); a 5xx to EHLO falls back to HELO (not for LMTP).
4. STARTTLS when offered and the policy allows, then EHLO again. Opportunistic: a refused
   STARTTLS goes on in plaintext; a failed handshake connects again without TLS.
   Required: no STARTTLS, a refusal, or a failed handshake or verification is a temporary
   failure "TLS required".
5. AUTH when credentials are given: CRAM-MD5, else PLAIN, else LOGIN; only over TLS unless
   C{allow_cleartext_auth}. A refusal is temporary (a wrong password should not bounce
   the queue; Postfix's soft bounce).
6. MAIL FROM with SIZE (offered), BODY (8BITMIME offered; 8-bit bodies are detected when
   the caller does not say), SMTPUTF8 (needed: a non-ASCII address or the caller's
   SMTPUTF8; not offered: permanent 5.6.7), RET/ENVID (DSN offered); then RCPT per
   recipient (NOTIFY/ORCPT when DSN is offered), then DATA. With PIPELINING all of these
   go in one write and the replies are read in order.
7. The message, dot-stuffed as it streams; the reply after "." decides every accepted
   recipient (SMTP), or each recipient has its own reply (LMTP).

Per-recipient outcomes go in the L{DeliveryReport}; a failure of the whole message (no
connection, banner/EHLO/TLS/AUTH/MAIL refused, a lost connection or a timeout at any
point) is a L{DeliveryError} naming the phase. 2xx accepted, 5xx permanent, anything else
(4xx, and 3xx where 2xx was due) temporary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from OpenSSL import SSL
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint

from haraka_tw.outbound import dialogue
from haraka_tw.outbound.delivery import (
    DeliveryError,
    DeliveryReport,
    Phase,
    RcptResult,
    Recipient,
    Timeouts,
    TLSPolicy,
)
from haraka_tw.outbound.protocol import SMTPClientProtocol, TLSHandshakeError
from haraka_tw.outbound.tls_client import ClientTLS, client_tls
from haraka_tw.outbound.wire import (
    Capabilities,
    choose_mechanism,
    mail_command,
    needs_smtputf8,
    rcpt_command,
)
from haraka_tw.smtp.replies import Reply

if TYPE_CHECKING:
    from haraka_tw.outbound.pool import ConnectionPool, Lease

__all__ = [
    "ClientSession",
    "DeliveryError",
    "DeliveryReport",
    "Destination",
    "Envelope",
    "RcptResult",
    "Recipient",
    "TLSPolicy",
    "Timeouts",
    "deliver",
    "open_session",
]

Message = Callable[[], Iterable[bytes]]
DEFAULT_TLS = TLSPolicy()
DEFAULT_TIMEOUTS = Timeouts()
_DSN_MAIL = frozenset({"RET", "ENVID"})
_DSN_RCPT = frozenset({"NOTIFY", "ORCPT"})


@dataclass(frozen=True)
class Destination:
    """Where and how to connect; also the key under which a pool keeps idle sessions."""

    ip: str
    port: int
    helo: str
    host: str = ""  # the server's name (an MX name): reports, and what TLS verifies
    lmtp: bool = False
    tls: TLSPolicy = DEFAULT_TLS
    auth: tuple[str, str] | None = None
    allow_cleartext_auth: bool = False
    bind: str | None = None
    path: str | None = None  # a Unix socket to connect to instead of ip and port

    @property
    def name(self) -> str:
        return self.host or self.ip

    @property
    def address(self) -> str:
        """What is connected to: the socket's path, or C{ip:port}."""
        return self.path or f"{self.ip}:{self.port}"

    @property
    def servername(self) -> str:
        return self.tls.servername or self.name


@dataclass
class Envelope:
    """One message's envelope and how to read it."""

    mail_from: str
    recipients: list[Recipient]
    message: Message
    size: int | None = None
    mail_params: Mapping[str, str | None] = field(default_factory=dict)


def deliver(
    reactor: Any,
    *,
    ip: str,
    port: int,
    helo: str,
    mail_from: str,
    recipients: list[Recipient],
    message: Message,
    size: int | None = None,
    lmtp: bool = False,
    tls: TLSPolicy = DEFAULT_TLS,
    auth: tuple[str, str] | None = None,
    allow_cleartext_auth: bool = False,
    bind: str | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    mail_params: Mapping[str, str | None] | None = None,
    pool: ConnectionPool | None = None,
    host: str = "",
    path: str | None = None,
) -> Deferred[DeliveryReport]:
    """Deliver one message to the server at ``ip``:``port`` (or on the Unix socket at
    ``path``, when given: ``ip`` and ``port`` are then ignored).

    @param reactor: provides IReactorTCP and IReactorTime.
    @param helo: the name sent in EHLO/LHLO/HELO.
    @param mail_from: the reverse path, without angle brackets ("" for the null sender).
    @param message: called (once, or twice when the client must look for 8-bit bytes)
        for an iterable of the message in CRLF form, in chunks, not dot-stuffed.
    @param size: the message size in bytes, for SIZE.
    @param mail_params: MAIL parameters the caller asks for: RET, ENVID (sent only if DSN is
        offered), SMTPUTF8, BODY (7BIT or 8BITMIME, sent only if 8BITMIME is offered);
        others go as they are. SIZE is the client's own.
    @param pool: keep the connection for the next message to the same L{Destination}.
    @param host: the server's host name (the MX name): in the report, and the name TLS
        verifies unless C{tls.servername} says otherwise.
    @return: fires with the L{DeliveryReport}, or fails with L{DeliveryError} (or
        C{CancelledError} once cancelled; the connection is closed first either way).
    """
    if not recipients:
        raise ValueError("deliver() needs at least one recipient")
    destination = Destination(
        ip=ip,
        port=port,
        helo=helo,
        host=host,
        lmtp=lmtp,
        tls=tls,
        auth=auth,
        allow_cleartext_auth=allow_cleartext_auth,
        bind=bind,
        path=path,
    )
    envelope = Envelope(mail_from, list(recipients), message, size, dict(mail_params or {}))
    return Deferred.fromCoroutine(_deliver(reactor, destination, timeouts, envelope, pool))


async def _deliver(
    reactor: Any,
    destination: Destination,
    timeouts: Timeouts,
    envelope: Envelope,
    pool: ConnectionPool | None,
) -> DeliveryReport:
    if pool is None:
        return await _carry(await open_session(reactor, destination, timeouts), envelope)
    lease = await pool.lease(destination)  # may wait while every session is busy
    try:
        session = lease.session
        if session is not None:
            session.timeouts = timeouts
            session.reused = True
            try:
                return await _carry(session, envelope, pool, lease, reset=True)
            except _StaleSession:
                pass  # closed or refused RSET while idle: a new connection in its place
        session = await open_session(reactor, destination, timeouts)
        return await _carry(session, envelope, pool, lease)
    finally:
        pool.end(lease)  # a no-op once the session went back to the pool


async def _carry(
    session: ClientSession,
    envelope: Envelope,
    pool: ConnectionPool | None = None,
    lease: Lease | None = None,
    *,
    reset: bool = False,
) -> DeliveryReport:
    """One transaction on C{session}, then the session back to the pool or closed."""
    try:
        report = await session.transaction(envelope, reset=reset)
    except DeliveryError:
        await _release(session, pool, lease)
        raise
    except BaseException:  # _StaleSession among them
        await session.abort()
        raise
    await _release(session, pool, lease)
    return report


async def _release(
    session: ClientSession, pool: ConnectionPool | None, lease: Lease | None
) -> None:
    if pool is not None and lease is not None and pool.keep(lease, session):
        return
    await session.quit()


async def open_session(reactor: Any, destination: Destination, timeouts: Timeouts) -> ClientSession:
    """Connect, greet, and do TLS and AUTH as the destination says.

    @raise DeliveryError: when the server cannot be used; the connection is closed.
    """
    policy = destination.tls
    starttls = policy.mode != "none" and not policy.implicit
    try:
        return await _establish(reactor, destination, timeouts, starttls)
    except TLSHandshakeError as e:
        if policy.mode == "required":
            raise DeliveryError("starttls", f"TLS required: {e.text}") from e
    return await _establish(reactor, destination, timeouts, starttls=False)


async def _establish(
    reactor: Any, destination: Destination, timeouts: Timeouts, starttls: bool
) -> ClientSession:
    implicit = _tls(destination, "connect") if destination.tls.implicit else None
    proto = SMTPClientProtocol(reactor, implicit)
    await _connect(reactor, destination, timeouts, proto, implicit)
    try:
        return await _greet(proto, destination, timeouts, starttls)
    except DeliveryError:
        await dialogue.hang_up(proto, timeouts.quit)
        raise
    except BaseException:
        await proto.abort()
        raise


async def _connect(
    reactor: Any,
    destination: Destination,
    timeouts: Timeouts,
    proto: SMTPClientProtocol,
    implicit: ClientTLS | None,
) -> None:
    endpoint: IStreamClientEndpoint
    if destination.path is not None:
        endpoint = UNIXClientEndpoint(reactor, destination.path, timeout=timeouts.connect)
    else:
        bind = (destination.bind, 0) if destination.bind else None
        kind = TCP6ClientEndpoint if isIPv6Address(destination.ip) else TCP4ClientEndpoint
        endpoint = kind(
            reactor, destination.ip, destination.port, timeout=timeouts.connect, bindAddress=bind
        )
    if implicit is not None:
        endpoint = wrapClientTLS(implicit, endpoint)
    try:
        await connectProtocol(endpoint, proto)
    except CancelledError:
        raise
    except Exception as e:
        raise DeliveryError("connect", f"cannot connect to {destination.address}: {e}") from e


def _tls(destination: Destination, phase: Phase) -> ClientTLS:
    try:
        return client_tls(destination.tls, destination.servername)
    except (OSError, ValueError, SSL.Error) as e:
        raise DeliveryError(phase, f"TLS settings unusable: {e}") from e


async def _greet(
    proto: SMTPClientProtocol, destination: Destination, timeouts: Timeouts, starttls: bool
) -> ClientSession:
    name, lmtp = destination.helo, destination.lmtp
    banner = await dialogue.read_banner(proto, timeouts.banner)
    hello, caps = await dialogue.hello(proto, name, timeouts.ehlo, lmtp=lmtp)
    if starttls and await dialogue.starttls(
        proto,
        caps,
        lambda: _tls(destination, "starttls"),
        timeouts.starttls,
        required=destination.tls.mode == "required",
    ):
        hello, caps = await dialogue.hello(proto, name, timeouts.ehlo, lmtp=lmtp)
    if destination.auth is not None:
        await _authenticate(proto, destination, caps, timeouts)
    return ClientSession(proto, destination, timeouts, banner, hello, caps)


async def _authenticate(
    proto: SMTPClientProtocol, destination: Destination, caps: Capabilities, timeouts: Timeouts
) -> None:
    assert destination.auth is not None
    user, password = destination.auth
    if not proto.secured and not destination.allow_cleartext_auth:
        raise DeliveryError("auth", "refusing to send credentials without TLS")
    mechanism = choose_mechanism(caps.auth)
    if mechanism is None:
        offered = " ".join(sorted(caps.auth)) or "nothing"
        raise DeliveryError("auth", f"no usable AUTH mechanism (offered: {offered})")
    reply = await dialogue.sasl(proto, mechanism, user, password, timeouts.auth)
    if reply.code != 235:
        raise DeliveryError.from_reply("auth", reply, soft=True)


class ClientSession:
    """One greeted connection (TLS and AUTH done as asked) that carries transactions."""

    def __init__(
        self,
        proto: SMTPClientProtocol,
        destination: Destination,
        timeouts: Timeouts,
        banner: Reply,
        hello: Reply,
        capabilities: Capabilities,
    ) -> None:
        self.proto = proto
        self.destination = destination
        self.timeouts = timeouts
        self.banner = banner
        self.hello = hello
        self.capabilities = capabilities
        self.authenticated = destination.auth is not None
        self.transactions = 0
        self.reused = False
        self._in_step = True  # every command's reply read: the next command may go

    @property
    def usable(self) -> bool:
        """The connection is up and in step with the server."""
        return self._in_step and self.proto.usable

    def report(self) -> DeliveryReport:
        """An empty report carrying this session's facts."""
        destination = self.destination
        proto = self.proto
        mode: Literal["SMTP", "LMTP"] = "LMTP" if destination.lmtp else "SMTP"
        return DeliveryReport(
            host=destination.name,
            ip=destination.path or destination.ip,
            port=destination.port,
            mode=mode,
            secured=proto.secured,
            tls_version=proto.tls_version,
            tls_cipher=proto.tls_cipher,
            tls_verified=proto.secured and destination.tls.verifying,
            authenticated=self.authenticated,
            greeting=self.banner.text,
            reused=self.reused,
        )

    async def transaction(self, envelope: Envelope, *, reset: bool = False) -> DeliveryReport:
        """MAIL, RCPT, DATA and the message; see the module docstring. With C{reset} (a
        reused session) RSET goes first, in the envelope's write under PIPELINING.

        @raise DeliveryError: with C{settled} holding the recipients already decided.
        @raise _StaleSession: C{reset} and RSET failed: nothing of the message was taken.
        """
        report = self.report()
        settled: list[RcptResult] = []
        try:
            await self._transaction(envelope, report, settled, reset)
        except DeliveryError as e:
            e.settled = list(settled)
            raise
        return report

    async def _transaction(
        self,
        envelope: Envelope,
        report: DeliveryReport,
        settled: list[RcptResult],
        reset: bool,
    ) -> None:
        proto, timeouts = self.proto, self.timeouts
        pipelining = "PIPELINING" in self.capabilities
        if reset and not pipelining and not await self.reset():
            raise _StaleSession()
        try:
            mail_line = mail_command(envelope.mail_from, self._mail_params(envelope))
        except ValueError as e:  # a sender or parameter that would break the command line
            raise DeliveryError("mail", str(e), enhanced="5.5.4", permanent=True) from e
        lines: list[tuple[Recipient, bytes]] = []
        for recipient in envelope.recipients:
            try:
                lines.append((recipient, rcpt_command(recipient.address, self._rcpt(recipient))))
            except ValueError as e:  # never sent, for the same reason
                result = RcptResult(recipient, 553, "5.1.3", str(e))
                settled.append(result)
                report.add(result)
        accepted: list[Recipient] = []

        def take(recipient: Recipient, reply: Reply) -> None:
            result = RcptResult.of(recipient, reply)
            if result.accepted:
                accepted.append(recipient)
            else:
                settled.append(result)
                report.add(result)

        if not lines:
            if reset and pipelining and not await self.reset():
                raise _StaleSession()
            return
        self.transactions += 1
        self._in_step = False
        data: Reply | None = None
        if pipelining:
            envelope_lines = mail_line + b"".join(line for _, line in lines) + b"DATA\r\n"
            if reset:
                proto.write(b"RSET\r\n" + envelope_lines)
                await self._reset_reply()
            else:
                proto.write(envelope_lines)
            mail = await proto.reply("mail", timeouts.mail)
            for recipient, _ in lines:
                reply = await proto.reply("rcpt", timeouts.rcpt)
                if mail.code // 100 == 2:  # else every RCPT was refused for want of MAIL
                    take(recipient, reply)
            data = await proto.reply("data", timeouts.data)
            if mail.code // 100 != 2:
                await self._end_empty(data)
                raise DeliveryError.from_reply("mail", mail)
        else:
            mail = await proto.command(mail_line, "mail", timeouts.mail)
            if mail.code // 100 != 2:
                self._in_step = True
                raise DeliveryError.from_reply("mail", mail)
            for recipient, line in lines:
                take(recipient, await proto.command(line, "rcpt", timeouts.rcpt))

        if not accepted:
            await self._end_empty(data)
            return
        if data is None:
            data = await proto.command(b"DATA\r\n", "data", timeouts.data)
        if data.code != 354:
            if data.code // 100 == 2:  # a server out of step with us: do not go on
                raise DeliveryError("data", f"unexpected reply to DATA: {data.code} {data.text}")
            self._in_step = True
            for recipient in accepted:
                report.add(RcptResult.of(recipient, data))
            report.response = data.text
            return
        await self._send_message(envelope, accepted, report, settled)

    async def _send_message(
        self,
        envelope: Envelope,
        accepted: list[Recipient],
        report: DeliveryReport,
        settled: list[RcptResult],
    ) -> None:
        proto, timeouts = self.proto, self.timeouts
        try:
            await proto.send_body(envelope.message(), timeouts.data_block)
        except DeliveryError:
            early = proto.take_reply()  # the server answered, then closed, mid-message
            if early is None:
                raise
        except Exception as e:  # message() itself failed
            await proto.abort()
            raise DeliveryError("data", f"reading the message failed: {e!r}") from e
        else:
            # (send_body fires as the ending dot is written: a reply already here came
            # before the server could have read the whole message)
            early = proto.take_reply()
        if early is not None and early.code // 100 == 2:
            # Accepting a message it has not seen the end of: not a delivery. Temporary,
            # and the connection is dropped (its replies are out of step).
            await proto.abort()
            raise DeliveryError(
                "data",
                f"the server replied {early.code} {early.text} before the end of the message",
            )
        if self.destination.lmtp and early is None:
            for recipient in accepted:
                reply = await proto.reply("dot", timeouts.dot)
                result = RcptResult.of(recipient, reply)
                settled.append(result)
                report.add(result)
                report.response = reply.text
        else:
            reply = early or await proto.reply("dot", timeouts.dot)
            for recipient in accepted:
                report.add(RcptResult.of(recipient, reply))
            report.response = reply.text
        self._in_step = early is None

    async def _end_empty(self, data: Reply | None) -> None:
        """No transaction to finish: end a DATA the server opened anyway with a bare "."."""
        if data is not None and data.code == 354:
            await self.proto.command(b".\r\n", "dot", self.timeouts.dot)
        self._in_step = True

    def _mail_params(self, envelope: Envelope) -> dict[str, str | None]:
        caps = self.capabilities
        requested = {key.upper(): value for key, value in envelope.mail_params.items()}
        params: dict[str, str | None] = {}
        limit = caps.size_limit
        if envelope.size is not None and "SIZE" in caps:
            if limit is not None and envelope.size > limit:
                text = f"message of {envelope.size} bytes exceeds the server's limit of {limit}"
                raise DeliveryError("mail", text, enhanced="5.3.4", permanent=True)
            params["SIZE"] = str(envelope.size)
        if "8BITMIME" in caps:
            body = (requested.get("BODY") or "").upper()
            if body == "7BIT":
                params["BODY"] = "7BIT"
            elif body or _eight_bit(envelope.message):
                params["BODY"] = "8BITMIME"
        addresses = [envelope.mail_from] + [r.address for r in envelope.recipients]
        if "SMTPUTF8" in requested or needs_smtputf8(*addresses):
            if "SMTPUTF8" not in caps:
                text = "the message needs SMTPUTF8 but the server does not offer it"
                raise DeliveryError("mail", text, enhanced="5.6.7", permanent=True)
            params["SMTPUTF8"] = None
        for key, value in requested.items():
            if key in ("SIZE", "BODY", "SMTPUTF8") or (key in _DSN_MAIL and "DSN" not in caps):
                continue
            params[key] = value
        return params

    def _rcpt(self, recipient: Recipient) -> dict[str, str | None]:
        dsn = "DSN" in self.capabilities
        return {
            key.upper(): value
            for key, value in recipient.params.items()
            if dsn or key.upper() not in _DSN_RCPT
        }

    async def reset(self) -> bool:
        """RSET: True if the server answered 250 (the session can carry a message)."""
        if not self.usable:
            return False
        try:
            reply = await self.proto.command(b"RSET\r\n", "rset", self.timeouts.rset)
        except DeliveryError:
            return False
        return reply.code == 250

    async def _reset_reply(self) -> None:
        """The reply to a RSET sent ahead of the envelope: anything but 250 (or no reply)
        means the session went stale while idle; the connection is then dropped, so the
        server's answers to the envelope never count."""
        try:
            reply = await self.proto.reply("rset", self.timeouts.rset)
        except DeliveryError:
            raise _StaleSession() from None
        if reply.code != 250:
            raise _StaleSession()

    async def quit(self) -> None:
        """QUIT (when in step) and close; returns once the connection is gone."""
        if self.usable:
            await dialogue.hang_up(self.proto, self.timeouts.quit)
        else:
            await self.proto.abort()

    def abort(self) -> Deferred[None]:
        """Drop the connection; fires once it is gone."""
        return self.proto.abort()


class _StaleSession(Exception):
    """A reused session failed its RSET: the message goes over a new connection."""


def _eight_bit(message: Message) -> bool:
    try:
        return any(not chunk.isascii() for chunk in message())
    except Exception as e:
        raise DeliveryError("mail", f"reading the message failed: {e!r}") from e
