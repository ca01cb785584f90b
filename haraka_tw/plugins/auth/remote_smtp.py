"""Checking a username and password by logging in to a remote SMTP server.

The check auth_proxy and auth_bridge share: connect, read the greeting, EHLO, STARTTLS
when the server offers it (then EHLO again), AUTH PLAIN (or LOGIN when PLAIN is not
offered), QUIT. The credentials are good if and only if the server answers 235.

It runs on the outbound client's pieces: L{SMTPLineClient} is its
L{SMTPClientProtocol<haraka_tw.outbound.protocol.SMTPClientProtocol>} with a protocol log,
L{converse} composes the steps of L{haraka_tw.outbound.dialogue} with this policy, and TLS
contexts come from L{haraka_tw.outbound.tls_client}. L{RemoteAuthenticator} connects to one
host and runs the dialogue under a timeout. L{ReplyParser} gives a line-at-a-time view of
the outbound L{ReplyReader<haraka_tw.outbound.wire.ReplyReader>}.

A host that cannot give an answer (refused, timed out, no AUTH, a 4xx to AUTH, nonsense)
raises L{RemoteError}, so the caller may try another; a 5xx to AUTH is a plain "no".
Passwords are never logged: protocol lines carrying credentials are logged as C{****}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from haraka_tw.outbound import delivery, dialogue
from haraka_tw.outbound.delivery import DeliveryError, Phase
from haraka_tw.outbound.endpoint import Endpoint, parse_endpoint, parse_endpoints
from haraka_tw.outbound.protocol import SMTPClientProtocol
from haraka_tw.outbound.tls_client import client_tls
from haraka_tw.outbound.wire import ReplyError, ReplyReader, choose_mechanism
from haraka_tw.smtp.replies import Reply

__all__ = [
    "Endpoint",
    "RemoteAuthenticator",
    "RemoteError",
    "RemoteReply",
    "ReplyParser",
    "SMTPLineClient",
    "TLSPolicy",
    "converse",
    "parse_endpoint",
    "parse_endpoints",
]

#: PLAIN or LOGIN only: the password is passed on as the client gave it.
_MECHANISMS = ("PLAIN", "LOGIN")


class RemoteError(Exception):
    """The remote host gave no usable answer (connection, timeout, protocol)."""


@dataclass(frozen=True)
class RemoteReply:
    """One whole reply: the code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    @property
    def keywords(self) -> dict[str, str]:
        """EHLO keywords (upper case) and their parameters, from the lines after the first."""
        out: dict[str, str] = {}
        for line in self.lines[1:]:
            word, _, rest = line.strip().partition(" ")
            if word:
                out[word.upper()] = rest.strip()
        return out


class ReplyParser:
    """Collects reply lines into replies (the outbound L{ReplyReader}, a line at a time)."""

    def __init__(self) -> None:
        self._reader = ReplyReader(enhanced=False)

    def feed(self, line: bytes) -> RemoteReply | None:
        """Take one line (without its line ending); the reply when this line ends one.

        @raise RemoteError: for a line that is not a reply line, or a code that changes
            inside a multi-line reply.
        """
        if b"\n" in line:
            raise RemoteError(f"not an SMTP reply: {line[:80]!r}")
        try:
            replies = self._reader.feed(line + b"\r\n")
        except ReplyError as e:
            raise RemoteError(str(e)) from None
        if not replies:
            return None
        return RemoteReply(replies[0].code, replies[0].lines)


class SMTPLineClient(SMTPClientProtocol):
    """The outbound client's protocol with a protocol log (C{S:} and C{C:} lines) in which
    credentials show as C{****}. Without a clock it keeps no timers of its own: the caller
    bounds the dialogue (L{RemoteAuthenticator} does)."""

    def __init__(
        self, log: Callable[[str], None] | None = None, clock: IReactorTime | None = None
    ) -> None:
        super().__init__(clock)
        self._log = log

    def command(self, line: bytes, phase: Phase, timeout: float | None) -> Deferred[Reply]:
        if self._log is not None:
            self._log(f"C: {_shown(line, phase)}")
        return super().command(line, phase, timeout)

    def reply(self, phase: Phase, timeout: float | None) -> Deferred[Reply]:
        d = super().reply(phase, timeout)
        if self._log is not None:
            d.addCallback(self._logged)
        return d

    def _logged(self, reply: Reply) -> Reply:
        assert self._log is not None
        for line in str(reply).split("\r\n"):
            self._log(f"S: {line}")
        return reply


def _shown(line: bytes, phase: Phase) -> str:
    """A command line as the log shows it: in the AUTH exchange only C{AUTH <mechanism>}."""
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    if phase != "auth":
        return text
    words = text.split(" ")
    if words[0].upper() != "AUTH":
        return "****"
    return " ".join(words[:2]) + (" ****" if len(words) > 2 else "")


@dataclass(frozen=True)
class TLSPolicy:
    """STARTTLS towards the remote: used when offered (opportunistic) unless C{enabled} is
    False; with C{verify}, the certificate must be valid for the host and STARTTLS must be
    offered."""

    enabled: bool = True
    verify: bool = False

    @property
    def outbound(self) -> delivery.TLSPolicy:
        """The same as the outbound client's policy (what its TLS contexts are built from)."""
        if self.verify:
            return delivery.TLSPolicy(mode="required", verify=True)
        return delivery.TLSPolicy(mode="opportunistic" if self.enabled else "none")


async def converse(
    client: SMTPLineClient,
    username: bytes,
    password: bytes,
    *,
    helo: str,
    tls: TLSPolicy,
    host: str,
    strip_domain: bool = False,
) -> bool:
    """Log in on a connected client: True on 235, False on a 5xx to AUTH.

    With C{strip_domain}, a 5xx to C{user@domain} is tried once more as C{user} (as
    Haraka's auth_proxy does). No step has a timeout of its own: the caller bounds the
    whole (L{RemoteAuthenticator} does).

    @raise RemoteError: when the host gives no usable answer.
    """
    timeout = None  # no timer per step: the caller bounds the whole dialogue
    try:
        await dialogue.read_banner(client, timeout)
        _, caps = await dialogue.hello(client, helo, timeout, helo_fallback=False)
        if tls.enabled and await dialogue.starttls(
            client, caps, lambda: client_tls(tls.outbound, host), timeout, required=tls.verify
        ):
            _, caps = await dialogue.hello(client, helo, timeout, helo_fallback=False)
        elif tls.verify:
            raise RemoteError("STARTTLS required (tls_verify) but not enabled")
        mechanism = choose_mechanism(caps.auth, _MECHANISMS)
        if mechanism is None:
            offered = " ".join(sorted(caps.auth))
            raise RemoteError(f"no AUTH PLAIN or LOGIN offered (AUTH {offered})")
        names = [username]
        local, at, _ = username.rpartition(b"@")
        if strip_domain and at and local:
            names.append(local)
        for name in names:
            answer = await dialogue.sasl(client, mechanism, name, password, timeout)
            if answer.code == 235:
                _quit(client)
                return True
            if answer.code // 100 != 5:
                _quit(client)
                raise RemoteError(f"AUTH answered {answer.code}")
        _quit(client)
        return False
    except DeliveryError as e:
        raise RemoteError(str(e)) from e


def _quit(client: SMTPLineClient) -> None:
    """QUIT and close without waiting for the answer: the check is decided."""
    client.write(b"QUIT\r\n")
    client.close()


class RemoteAuthenticator:
    """Logs in to one remote host at a time, under a timeout."""

    def __init__(
        self,
        reactor: Any,
        *,
        helo: str,
        timeout: float = 10.0,
        tls: TLSPolicy | None = None,
        strip_domain: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.helo = helo
        self.timeout = timeout
        self.tls = tls or TLSPolicy()
        self.strip_domain = strip_domain
        self.log = log

    def check(self, endpoint: Endpoint, username: bytes, password: bytes) -> Deferred[bool]:
        """Whether C{endpoint} accepts the credentials.

        Fails with L{RemoteError} when the host gives no answer within the timeout.
        """
        clients: list[SMTPLineClient] = []

        async def run() -> bool:
            target = HostnameEndpoint(
                self.reactor, endpoint.host, endpoint.port, timeout=self.timeout
            )
            client = SMTPLineClient(self.log)
            clients.append(client)
            await connectProtocol(target, client)
            return await converse(
                client,
                username,
                password,
                helo=self.helo,
                tls=self.tls,
                host=endpoint.host,
                strip_domain=self.strip_domain,
            )

        def problem(failure: Failure) -> Failure:
            for client in clients:
                client.abort()
            if failure.check(RemoteError):
                return failure
            if failure.check(TimeoutError, CancelledError, net_error.ConnectingCancelledError):
                return Failure(RemoteError(f"no answer within {self.timeout:g}s"))
            return Failure(RemoteError(f"{type(failure.value).__name__}: {failure.value}"))

        d = Deferred.fromCoroutine(run())
        d.addTimeout(self.timeout, self.reactor)
        return d.addErrback(problem)
