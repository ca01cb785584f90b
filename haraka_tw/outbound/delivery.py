"""The values an outbound delivery takes and gives back (re-exported by L{client}).

Takes: L{Recipient}, L{TLSPolicy}, L{Timeouts}. Gives: a L{DeliveryReport} with one
L{RcptResult} per recipient, or a L{DeliveryError} when the message as a whole could not be
handed over.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Literal

from haraka_tw.smtp.replies import Reply

__all__ = [
    "DeliveryError",
    "DeliveryReport",
    "Phase",
    "RcptResult",
    "Recipient",
    "TLSPolicy",
    "Timeouts",
]

Phase = Literal[
    "connect", "banner", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot", "rset", "quit"
]
TLSMode = Literal["opportunistic", "required", "none"]


@dataclass(frozen=True)
class TLSPolicy:
    """How the client uses TLS with one destination.

    @ivar mode: C{opportunistic} (STARTTLS when offered; if the handshake fails, connect
        again without TLS), C{required} (no STARTTLS or a failed handshake or verification
        is a temporary failure), C{none} (never STARTTLS).
    @ivar verify: check the server's certificate chain and name (service_identity).
        None (the default) verifies exactly when the mode is C{required}.
    @ivar servername: the name sent as SNI and verified; None uses the host name given
        to L{deliver<haraka_tw.outbound.client.deliver>} (nothing for an IP address).
    @ivar ca_file: PEM file of the trust roots; None uses the platform's.
    @ivar client_cert: PEM file of a certificate (chain) to present; C{client_key} its
        key (None: the key is in C{client_cert}).
    @ivar min_version: the lowest TLS version accepted: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3.
    @ivar implicit: TLS from the first byte (SMTPS, RFC 8314) instead of STARTTLS; a
        failed handshake is then a connection failure.
    """

    mode: TLSMode = "opportunistic"
    verify: bool | None = None
    servername: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    min_version: str = "TLSv1.2"
    implicit: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("opportunistic", "required", "none"):
            raise ValueError(f"unknown TLS mode {self.mode!r}")
        if self.implicit and self.mode == "none":
            raise ValueError("implicit TLS with mode 'none'")

    @property
    def verifying(self) -> bool:
        """Whether the peer's certificate is checked."""
        return self.mode == "required" if self.verify is None else self.verify


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait, per phase (the defaults are RFC 5321 4.5.3.2's).

    C{data} waits for the 354; C{data_block} is the longest the connection may go without
    taking more of the message; C{dot} waits for the reply to the final ".".
    """

    connect: float = 30
    banner: float = 300
    ehlo: float = 300
    starttls: float = 300
    auth: float = 300
    mail: float = 300
    rcpt: float = 300
    data: float = 120
    data_block: float = 180
    dot: float = 600
    rset: float = 300
    quit: float = 10

    @classmethod
    def every(cls, seconds: float) -> Timeouts:
        """The same timeout for every phase (for tests)."""
        return cls(**{f.name: seconds for f in fields(cls)})


@dataclass
class Recipient:
    """One envelope recipient; C{params} are its RCPT parameters (NOTIFY, ORCPT, ...),
    values as they go on the wire (xtext already applied). DSN ones are sent only to a
    server that offers DSN."""

    address: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RcptResult:
    """The reply that decided one recipient: its RCPT reply, or (once RCPT accepted it)
    the DATA reply; for LMTP, its own reply after the message.

    C{enhanced} is the server's enhanced status code; for a refusal without one (or with
    one of the wrong class) it is C{4.0.0} or C{5.0.0}, as Haraka reports them.
    """

    recipient: Recipient
    code: int
    enhanced: str | None
    text: str

    @classmethod
    def of(cls, recipient: Recipient, reply: Reply) -> RcptResult:
        return cls(recipient, reply.code, _enhanced(reply), reply.text)

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500


def _enhanced(reply: Reply) -> str | None:
    """The enhanced code matching the class of the outcome (3xx counts as temporary)."""
    if 200 <= reply.code < 300:
        return reply.enhanced
    cls = "5" if reply.code >= 500 else "4"
    if reply.enhanced is not None and reply.enhanced[0] == cls:
        return reply.enhanced
    return f"{cls}.0.0"


@dataclass
class DeliveryReport:
    """What happened to one message on one connection.

    C{accepted} holds the recipients the server took the message for; C{deferred} those
    refused with 4xx (or an unexpected 3xx), C{bounced} those refused with 5xx. C{response}
    is the text of the final reply to the message (empty if it was never sent). C{ip} is
    the address connected to: for a Unix socket, its path.
    """

    host: str
    ip: str
    port: int
    mode: Literal["SMTP", "LMTP"]
    secured: bool
    tls_version: str | None
    tls_cipher: str | None
    tls_verified: bool
    authenticated: bool
    greeting: str
    accepted: list[RcptResult] = field(default_factory=list)
    deferred: list[RcptResult] = field(default_factory=list)
    bounced: list[RcptResult] = field(default_factory=list)
    response: str = ""
    reused: bool = False

    def add(self, result: RcptResult) -> None:
        """File a result under accepted, deferred or bounced by its code."""
        if result.accepted:
            self.accepted.append(result)
        elif result.permanent:
            self.bounced.append(result)
        else:
            self.deferred.append(result)


class DeliveryError(Exception):
    """The message as a whole failed in C{phase}.

    @ivar code: the server's reply code, or None when there was no reply to blame (the
        connection failed, was lost or timed out, or the client refused on its own).
    @ivar enhanced: the enhanced status code (from the reply, else C{4.0.0}/C{5.0.0}, or
        one the client chose, such as C{5.6.7} for SMTPUTF8 not offered).
    @ivar permanent: True only for a 5xx (or a client decision that retrying cannot fix).
    @ivar settled: recipients whose own reply decided them before the failure: refused at
        RCPT (4xx/5xx), and for LMTP also those answered after the message (a 2xx there
        means delivered). Every other recipient shares this error.
    """

    def __init__(
        self,
        phase: Phase,
        text: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        permanent: bool = False,
        settled: Iterable[RcptResult] = (),
    ) -> None:
        super().__init__(phase, code, text)
        self.phase: Phase = phase
        self.text = text
        self.code = code
        self.permanent = permanent
        self.enhanced = enhanced or ("5.0.0" if permanent else "4.0.0")
        self.settled: list[RcptResult] = list(settled)

    @classmethod
    def from_reply(cls, phase: Phase, reply: Reply, *, soft: bool = False) -> DeliveryError:
        """The error for an unwelcome reply: 5xx permanent unless C{soft}, else temporary."""
        permanent = reply.code >= 500 and not soft
        enhanced = reply.enhanced
        if enhanced is None or enhanced[0] != ("5" if permanent else "4"):
            enhanced = None
        return cls(phase, reply.text, code=reply.code, enhanced=enhanced, permanent=permanent)

    def __str__(self) -> str:
        code = f"{self.code} " if self.code is not None else ""
        kind = "permanent" if self.permanent else "temporary"
        return f"{kind} failure at {self.phase}: {code}{self.enhanced} {self.text}"
