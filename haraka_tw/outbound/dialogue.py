"""The steps of a client SMTP dialogue before any message, over an L{SMTPClientProtocol}.

Shared by the delivery client (L{haraka_tw.outbound.client}) and the auth plugins' remote
login check (L{haraka_tw.plugins.auth.remote_smtp}); each composes them with its own policy:

- L{read_banner}: the greeting, which must be 220;
- L{hello}: EHLO (LHLO for LMTP), falling back to HELO on a 5xx when asked to;
- L{starttls}: STARTTLS and the handshake, when offered (or a failure when required);
- L{sasl}: one AUTH exchange, answering each 334, to its final reply;
- L{hang_up}: QUIT when the dialogue is in step, then close.

A step raises L{DeliveryError} (naming its phase) for a reply it cannot go on from, a lost
connection or a timeout. A C{timeout} of None sets no timer: the caller bounds the whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from haraka_tw.outbound.delivery import DeliveryError
from haraka_tw.outbound.protocol import SMTPClientProtocol
from haraka_tw.outbound.tls_client import ClientTLS
from haraka_tw.outbound.wire import Capabilities, sasl_answer, sasl_initial
from haraka_tw.smtp.replies import Reply

__all__ = ["hang_up", "hello", "read_banner", "sasl", "starttls"]


async def read_banner(proto: SMTPClientProtocol, timeout: float | None) -> Reply:
    """The server's greeting.

    @raise DeliveryError: for anything but 220 (4xx temporary, 5xx permanent).
    """
    banner = await proto.reply("banner", timeout)
    if banner.code != 220:
        raise DeliveryError.from_reply("banner", banner)
    return banner


async def hello(
    proto: SMTPClientProtocol,
    name: str,
    timeout: float | None,
    *,
    lmtp: bool = False,
    helo_fallback: bool = True,
) -> tuple[Reply, Capabilities]:
    """EHLO (LHLO with C{lmtp}) as ``name``; with C{helo_fallback} a 5xx to EHLO is
    followed by HELO (never for LMTP), which offers no extensions.

    @raise DeliveryError: when the server does not answer 250.
    """
    verb = "LHLO" if lmtp else "EHLO"
    reply = await proto.command(f"{verb} {name}\r\n".encode(), "ehlo", timeout)
    if reply.code == 250:
        return reply, Capabilities.from_reply(reply)
    if reply.code >= 500 and helo_fallback and not lmtp:
        reply = await proto.command(f"HELO {name}\r\n".encode(), "ehlo", timeout)
        if reply.code == 250:
            return reply, Capabilities()
    raise DeliveryError.from_reply("ehlo", reply)


async def starttls(
    proto: SMTPClientProtocol,
    capabilities: Capabilities,
    tls: Callable[[], ClientTLS],
    timeout: float | None,
    *,
    required: bool,
) -> bool:
    """STARTTLS when the server offers it, then the handshake with ``tls()`` (called only
    once the server said 220). True when TLS is up (say EHLO again), False when the server
    does not offer it or refuses (the dialogue goes on in plaintext).

    @raise DeliveryError: when TLS is C{required} and not offered or refused ("TLS
        required: ..."), and L{TLSHandshakeError<haraka_tw.outbound.protocol.TLSHandshakeError>}
        when the handshake or the certificate check fails (the connection is gone).
    """
    if "STARTTLS" not in capabilities:
        if required:
            raise DeliveryError("starttls", "TLS required: the server does not offer STARTTLS")
        return False
    reply = await proto.starttls(timeout)
    if reply.code == 220:
        await proto.start_tls(tls(), timeout)
        return True
    proto.resume_plaintext()
    if required:
        text = f"TLS required: STARTTLS refused: {reply.code} {reply.text}"
        raise DeliveryError("starttls", text, code=reply.code)
    return False


async def sasl(
    proto: SMTPClientProtocol,
    mechanism: str,
    user: str | bytes,
    password: str | bytes,
    timeout: float | None,
) -> Reply:
    """AUTH with ``mechanism``, answering each 334; the server's final reply (235 when the
    credentials were accepted).

    @raise DeliveryError: for a challenge the mechanism cannot answer (the exchange is
        cancelled with C{*} first).
    """
    reply = await proto.command(sasl_initial(mechanism, user, password), "auth", timeout)
    step = 0
    while reply.code == 334:
        try:
            answer = sasl_answer(mechanism, step, reply.text, user, password)
        except ValueError as e:
            await proto.command(b"*\r\n", "auth", timeout)  # cancel the exchange
            raise DeliveryError("auth", f"AUTH {mechanism} failed: {e}") from e
        reply = await proto.command(answer, "auth", timeout)
        step += 1
    return reply


async def hang_up(proto: SMTPClientProtocol, timeout: float | None) -> None:
    """QUIT if the dialogue is in step (the server is owed a goodbye), else drop; returns
    once the connection is gone."""
    if not proto.usable:
        await proto.abort()
        return
    with contextlib.suppress(DeliveryError):
        await proto.command(b"QUIT\r\n", "quit", timeout)
    await proto.close(timeout)
