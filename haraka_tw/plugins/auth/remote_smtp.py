"""Checking a username and password by logging in to a remote SMTP server.

The client auth_proxy and auth_bridge share: connect, read the greeting, EHLO, STARTTLS
when the server offers it (then EHLO again), AUTH PLAIN (or LOGIN when PLAIN is not
offered), QUIT. The credentials are good if and only if the server answers 235.

- L{ReplyParser} turns reply lines into L{RemoteReply} values (no I/O);
- L{SMTPLineClient} is the protocol: it sends lines and hands out whole replies as
  Deferreds;
- L{converse} is the dialogue on a connected client, L{RemoteAuthenticator} connects to
  one host and runs it under a timeout.

A host that cannot give an answer (refused, timed out, no AUTH, a 4xx to AUTH, nonsense)
raises L{RemoteError}, so the caller may try another; a 5xx to AUTH is a plain "no".
Passwords are never logged: protocol lines carrying credentials are logged as C{****}.
"""

from __future__ import annotations

import binascii
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import error as net_error
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

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

_REPLY_LINE = re.compile(rb"([2-5][0-9]{2})(?:([ -])(.*))?")
_SEPARATORS = re.compile(r"[\s,;]+")


class RemoteError(Exception):
    """The remote host gave no usable answer (connection, timeout, protocol)."""


@dataclass(frozen=True)
class Endpoint:
    """A remote SMTP server."""

    host: str
    port: int = 25

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(text: str, default_port: int = 25) -> Endpoint:
    """C{host}, C{host:port}, C{[v6]:port} or a bare IPv6 address.

    @raise ValueError: for an empty host or a bad port.
    """
    text = text.strip()
    port: str | None = None
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {text!r}")
        port = rest[1:] or None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host = text
    if not host:
        raise ValueError(f"no host in {text!r}")
    if port is None:
        return Endpoint(host, default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return Endpoint(host, int(port))


def parse_endpoints(value: Any, default_port: int = 25) -> list[Endpoint]:
    """A list of hosts separated by spaces, commas or semicolons (Haraka's auth_proxy)."""
    return [parse_endpoint(p, default_port) for p in _SEPARATORS.split(str(value)) if p]


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
    """Collects reply lines into replies."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._code: int | None = None

    def feed(self, line: bytes) -> RemoteReply | None:
        """Take one line (without its line ending); the reply when this line ends one.

        @raise RemoteError: for a line that is not a reply line, or a code that changes
            inside a multi-line reply.
        """
        m = _REPLY_LINE.fullmatch(line)
        if m is None:
            raise RemoteError(f"not an SMTP reply: {line[:80]!r}")
        code = int(m.group(1))
        if self._code is not None and code != self._code:
            raise RemoteError(f"reply code changed from {self._code} to {code}")
        self._code = code
        self._lines.append((m.group(3) or b"").decode("utf-8", "replace"))
        if m.group(2) == b"-":
            return None
        reply = RemoteReply(code, tuple(self._lines))
        self._lines, self._code = [], None
        return reply


class SMTPLineClient(LineReceiver):
    """Sends command lines; L{reply} gives the next whole reply."""

    delimiter = b"\n"
    MAX_LENGTH = 8192
    transport: Any  # a TCP transport (abortConnection, startTLS)

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self._parser = ReplyParser()
        self._replies: deque[RemoteReply] = deque()
        self._waiter: Deferred[RemoteReply] | None = None
        self._problem: RemoteError | None = None
        self._log = log

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if self._log is not None:
            self._log(f"S: {line.decode('utf-8', 'replace')}")
        try:
            reply = self._parser.feed(line)
        except RemoteError as e:
            self._stop(e)
            return
        if reply is None:
            return
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._stop(RemoteError("reply line too long"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._problem is None:
            self._problem = RemoteError(f"connection lost: {reason.getErrorMessage()}")
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.errback(self._problem)

    def _stop(self, problem: RemoteError) -> None:
        self._problem = problem
        if self.transport is not None:
            self.transport.abortConnection()

    def reply(self) -> Deferred[RemoteReply]:
        """The next whole reply.

        Fails with L{RemoteError} if the connection ends first; cancelling it aborts the
        connection.
        """
        if self._replies:
            return succeed(self._replies.popleft())
        if self._problem is not None:
            return fail(self._problem)
        if self._waiter is not None:
            raise RuntimeError("reply() while another reply() is pending")

        def cancel(_: Deferred[RemoteReply]) -> None:
            self._waiter = None
            if self.transport is not None:
                self.transport.abortConnection()

        self._waiter = Deferred(cancel)
        return self._waiter

    def command(self, line: bytes, shown: str | None = None) -> Deferred[RemoteReply]:
        """Send one line; its reply. C{shown} is what the log says was sent."""
        if self._log is not None:
            self._log(f"C: {shown if shown is not None else line.decode('utf-8', 'replace')}")
        self.sendLine(line)
        return self.reply()

    def sendLine(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.write(line + b"\r\n")

    def close(self) -> None:
        """Close the connection (after what was written)."""
        if self.transport is not None:
            self.transport.loseConnection()


@dataclass(frozen=True)
class TLSPolicy:
    """STARTTLS towards the remote: used when offered (opportunistic) unless C{enabled} is
    False; with C{verify}, the certificate must be valid for the host and STARTTLS must be
    offered."""

    enabled: bool = True
    verify: bool = False

    def options(self, host: str) -> Any:
        if self.verify:
            return ssl.optionsForClientTLS(host)
        return ssl.CertificateOptions(verify=False)


def _b64(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False)


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
    Haraka's auth_proxy does).

    @raise RemoteError: when the host gives no usable answer.
    """
    greeting = await client.reply()
    if greeting.code != 220:
        raise RemoteError(f"greeting {greeting.code}")
    ehlo = await _ehlo(client, helo)
    secure = False
    if tls.enabled and "STARTTLS" in ehlo.keywords:
        answer = await client.command(b"STARTTLS")
        if answer.code == 220:
            client.transport.startTLS(tls.options(host))
            secure = True
            ehlo = await _ehlo(client, helo)
    if tls.verify and not secure:
        raise RemoteError("STARTTLS required (tls_verify) but not offered or refused")
    mechanisms = ehlo.keywords.get("AUTH", "").upper().split()
    if "PLAIN" in mechanisms:
        mechanism = "PLAIN"
    elif "LOGIN" in mechanisms:
        mechanism = "LOGIN"
    else:
        raise RemoteError(f"no AUTH PLAIN or LOGIN offered (AUTH {' '.join(mechanisms)})")
    names = [username]
    local, at, _ = username.rpartition(b"@")
    if strip_domain and at and local:
        names.append(local)
    for name in names:
        answer = await _login(client, mechanism, name, password)
        if answer.code == 235:
            _quit(client)
            return True
        if answer.code // 100 != 5:
            _quit(client)
            raise RemoteError(f"AUTH answered {answer.code}")
    _quit(client)
    return False


async def _ehlo(client: SMTPLineClient, helo: str) -> RemoteReply:
    reply = await client.command(f"EHLO {helo}".encode())
    if reply.code != 250:
        raise RemoteError(f"EHLO answered {reply.code}")
    return reply


async def _login(
    client: SMTPLineClient, mechanism: str, username: bytes, password: bytes
) -> RemoteReply:
    if mechanism == "PLAIN":
        token = _b64(b"\x00" + username + b"\x00" + password)
        return await client.command(b"AUTH PLAIN " + token, "AUTH PLAIN ****")
    answer = await client.command(b"AUTH LOGIN")
    if answer.code != 334:
        return answer
    answer = await client.command(_b64(username), "****")
    if answer.code != 334:
        return answer
    return await client.command(_b64(password), "****")


def _quit(client: SMTPLineClient) -> None:
    client.sendLine(b"QUIT")
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
                if client.transport is not None:
                    client.transport.abortConnection()
            if failure.check(RemoteError):
                return failure
            if failure.check(TimeoutError, CancelledError, net_error.ConnectingCancelledError):
                return Failure(RemoteError(f"no answer within {self.timeout:g}s"))
            return Failure(RemoteError(f"{type(failure.value).__name__}: {failure.value}"))

        d = Deferred.fromCoroutine(run())
        d.addTimeout(self.timeout, self.reactor)
        return d.addErrback(problem)
