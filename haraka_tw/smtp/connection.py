"""The connection and transaction objects every hook receives.

These hold state only; the protocol (L{haraka_tw.smtp.protocol}) drives them. Names follow
Haraka's (remote.ip, hello.host, transaction.mail_from, notes, results, relaying, ...), so a
plugin port reads the same.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload

from twisted.internet.defer import Deferred, fail

from haraka_tw.ids import new_uuid
from haraka_tw.logging import HarakaLog, Level
from haraka_tw.message.body import AttachmentHook, Banner, Body, BodyFilter
from haraka_tw.message.header import Header
from haraka_tw.message.stream import MessageStream
from haraka_tw.smtp.state import Notes, Results

if TYPE_CHECKING:
    from haraka_tw.smtp.address import Address
    from haraka_tw.smtp.command import Command

__all__ = [
    "Connection",
    "Counts",
    "Hello",
    "Local",
    "Remote",
    "SessionControl",
    "State",
    "TLSInfo",
    "Transaction",
    "forget_auth",
]


_T = TypeVar("_T")


class _MadeOnFirstUse(Generic[_T]):
    """An attribute made when first read, then an ordinary instance attribute.

    Most connections are never asked for their notes, results, counters or TLS details
    while they sit idle; making those on first use keeps an idle connection small. It can
    be assigned like any attribute (it is a non-data descriptor: the instance's own value,
    once there, is found first).
    """

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _MadeOnFirstUse[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> _MadeOnFirstUse[_T] | _T:
        if obj is None:
            return self
        value = self._make()
        # setattr, not obj.__dict__[...]: reading __dict__ would give the instance a dict
        # of its own instead of the values its class's instances share the keys of.
        setattr(obj, self._name, value)
        return value


class SessionControl(Protocol):
    """What a plugin may ask of the session, through its Connection."""

    def respond(self, code: int, text: Any, enhanced: str | None) -> None: ...

    def disconnect(self) -> None: ...

    def read_line(self) -> Deferred[bytes]: ...

    def unread_input(self) -> int: ...

    def start_tls(self, context_factory: Any) -> Deferred[None]: ...

    def restart(
        self, remote_ip: str | None, remote_port: int | None, remote_host: str | None
    ) -> Deferred[None]: ...


AUTH_NOTES = ("auth_user", "auth_passwd", "auth_method", "auth_fails", "auth_bridge")


def forget_auth(connection: Connection) -> None:
    """Drop what SMTP AUTH established (after STARTTLS, or when XCLIENT names a new client):
    every one of its notes, the connection's C{auth=} Authentication-Results, and the
    relaying it granted, to the connection and to a transaction still open (which a reset
    may not have ended yet). Relaying is taken back only when an AUTH note was there: a
    plugin that grants relaying on other grounds (the client's address) and keeps no AUTH
    note keeps it."""
    dropped = [connection.notes.pop(key, None) for key in AUTH_NOTES]
    if not any(value is not None for value in dropped):
        return
    results = connection.auth_results_list
    results[:] = [r for r in results if not r.startswith("auth=")]
    connection._relaying = False
    if connection.transaction is not None:
        connection.transaction._relaying = None  # (the connection's, now False)


class State(enum.Enum):
    """Where the session is (Haraka's connection states)."""

    PROXY = "proxy"  # waiting for a PROXY protocol header; no banner yet
    CONNECTING = "connecting"  # connect hooks running; no banner yet
    CMD = "cmd"
    DATA = "data"
    LOOP = "loop"  # denied: every command but QUIT gets the same reply
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def canonical_address(text: str) -> IPAddress | None:
    """C{text} as an IP address, an IPv4-mapped one (a client of a dual-stack listener,
    C{::ffff:192.0.2.1}) as IPv4; None when it is no address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_private(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return addr.is_private or addr.is_loopback or addr.is_link_local


def _is_local(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class Remote:
    """The client: address, port, name (from lookup_rdns) and whether it has gone."""

    ip: str = ""
    port: int = 0
    host: str | None = None
    info: str | None = None
    closed: bool = False

    @property
    def is_private(self) -> bool:
        return _is_private(self.ip)

    @property
    def is_local(self) -> bool:
        return _is_local(self.ip)


@dataclass(slots=True)
class Local:
    """This end of the connection."""

    ip: str = ""
    port: int = 0
    host: str = ""


@dataclass(slots=True)
class Hello:
    """What the client said in HELO/EHLO."""

    verb: str | None = None
    host: str | None = None


@dataclass(slots=True)
class TLSInfo:
    """TLS state of the connection (filled by the tls plugin)."""

    enabled: bool = False
    advertised: bool = False
    verified: bool = False
    verify_error: int | None = None  # OpenSSL's verify result for the client certificate
    cipher: str | None = None
    version: str | None = None
    peer_certificate: Any = None


@dataclass(slots=True)
class Counts:
    """accept / tempfail / reject counters (rcpt_count, msg_count)."""

    accept: int = 0
    tempfail: int = 0
    reject: int = 0

    def __str__(self) -> str:
        return f"{self.accept}/{self.tempfail}/{self.reject}"


class Transaction:
    """One message: from MAIL to the end of DATA (or RSET)."""

    def __init__(self, uuid: str, spool_dir: str | None = None, spool_after: int = -1) -> None:
        self.uuid = uuid
        self.mail_from: Address | None = None
        self.mail_params: dict[str, str | None] = {}
        self.rcpt_to: list[Address] = []
        self.rcpt_params: list[dict[str, str | None]] = []
        self.notes = Notes()
        self.results = Results()
        self.message_stream = MessageStream(Header(), spool_dir, spool_after)
        self.data_bytes = 0
        self.mime_part_count = 0
        self.msg_status: str | None = None
        self.encoding = "utf-8"
        self.discard_data = False
        self.parse_body = False  # set by a plugin (at or before DATA) to get .body
        self.body: Body | None = None  # the MIME tree, after DATA, when parse_body was set
        self.attachment_hook_list: list[AttachmentHook] = []
        self.body_filters: list[BodyFilter] = []
        self.banner: Banner | None = None
        self.start_time = time.time()
        self._relaying: bool | None = None
        self.auth_results_list: list[str] = []

    @property
    def header(self) -> Header:
        """The message header (empty until DATA has received it)."""
        return self.message_stream.header

    @header.setter
    def header(self, header: Header) -> None:
        self.message_stream.header = header

    def attachment_hooks(self, hook: AttachmentHook) -> None:
        """Call C{hook(info)} for each attachment as it arrives; it may return a sink whose
        C{data(bytes)} gets the decoded content and C{end(info)} the final size. Turns on
        body parsing."""
        self.attachment_hook_list.append(hook)
        self.parse_body = True

    def add_body_filter(self, content_type: str | re.Pattern[str], fn: Any) -> None:
        """Rewrite text parts whose type matches: C{fn(content_type, charset, text) -> text}."""
        self.body_filters.append(BodyFilter(content_type, fn))
        self.parse_body = True

    def set_banner(self, text: str, html: str | None = None) -> None:
        """Append a banner to the text (and HTML) parts of the message."""
        self.banner = Banner(text, html)
        self.parse_body = True

    def auth_results(self, result: str) -> None:
        """Add a method result (e.g. "spf=pass smtp.mailfrom=example.com") to this message's
        Authentication-Results header, added by the core at the end of DATA."""
        self.auth_results_list.append(result)

    def add_header(self, name: str, value: str) -> None:
        """Add a header field at the end (Haraka's add_header)."""
        self.header.add_end(name, value)

    def add_leading_header(self, name: str, value: str) -> None:
        """Add a header field at the top."""
        self.header.add(name, value)

    def remove_header(self, name: str) -> None:
        """Remove every field named C{name}."""
        self.header.remove(name)

    def close(self) -> None:
        """Release the message body (and its spool file)."""
        self.message_stream.close()


def _proxy_notes() -> Notes:
    return Notes(allowed=False, ip=None, type=None)


class Connection:
    """One client session: what every hook gets as its first argument.

    The attributes an idle connection seldom needs (hello, tls, proxy, notes, results,
    capabilities, the counters) are made on first use; to a plugin they are ordinary
    attributes.
    """

    hello = _MadeOnFirstUse(Hello)
    tls = _MadeOnFirstUse(TLSInfo)
    proxy = _MadeOnFirstUse(_proxy_notes)
    notes = _MadeOnFirstUse(Notes)
    results = _MadeOnFirstUse(Results)
    capabilities: _MadeOnFirstUse[list[str]] = _MadeOnFirstUse(list)
    rcpt_count = _MadeOnFirstUse(Counts)
    msg_count = _MadeOnFirstUse(Counts)
    auth_results_list: _MadeOnFirstUse[list[str]] = _MadeOnFirstUse(list)

    def __init__(
        self,
        remote: Remote,
        local: Local,
        *,
        server_notes: dict[str, Any] | None = None,
        log: HarakaLog | None = None,
        session: SessionControl | None = None,
    ) -> None:
        self.uuid = new_uuid()
        self.remote = remote
        self.local = local
        self.server_notes = server_notes if server_notes is not None else {}
        self.transaction: Transaction | None = None
        self.esmtp = False
        self.pipelining = False
        self.early_talker = False
        self.tran_count = 0
        self.errors = 0
        self.last_reply: bytes = b""  # the last reply as written
        self.state = State.CONNECTING
        self.current_command: Command | None = None
        self.start_time = time.time()
        self.bytes_in = 0
        self._relaying = False
        self._log = log
        self._session = session

    @property
    def last_response(self) -> str:
        """The last reply sent, as text (continuation lines joined)."""
        return self.last_reply.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", " ")

    # -- relaying is scoped to the transaction while one is open ------------------------

    @property
    def relaying(self) -> bool:
        """Whether this client may relay (for the open transaction, when there is one)."""
        txn = self.transaction
        if txn is not None and txn._relaying is not None:
            return txn._relaying
        return self._relaying

    @relaying.setter
    def relaying(self, value: bool) -> None:
        if self.transaction is not None:
            self.transaction._relaying = bool(value)
        else:
            self._relaying = bool(value)

    def auth_results(self, result: str) -> None:
        """Add a result (e.g. "auth=pass (plain) smtp.auth=alice") to the
        Authentication-Results header of every message of this connection."""
        self.auth_results_list.append(result)

    # -- actions a plugin may take --------------------------------------------------------

    def respond(self, code: int, text: Any, enhanced: str | None = None) -> None:
        """Send a reply now, even while the calling hook is still pending (for plugins that
        answer a command themselves, and for multi-step exchanges such as AUTH)."""
        if self._session is not None:
            self._session.respond(code, text, enhanced)

    def disconnect(self) -> None:
        """Close the connection after pending replies are written."""
        if self._session is not None:
            self._session.disconnect()

    def read_line(self) -> Deferred[bytes]:
        """The client's next line (without its line ending), taken before command parsing.

        Fails with the connection-lost reason if the client goes first, and with
        ConnectionError once the session has ended.
        """
        if self._session is None:
            return fail(ConnectionError("connection closed"))
        return self._session.read_line()

    @property
    def unread_input(self) -> int:
        """Bytes the client has sent that the session has not read yet: after a command,
        what it sent without waiting for the reply (0 once the session has ended)."""
        return 0 if self._session is None else self._session.unread_input()

    def start_tls(self, context_factory: Any) -> Deferred[None]:
        """Discard pipelined plaintext, start TLS, reset the session; fires after the
        handshake with C{self.tls} filled. The caller sends its 220 first. RuntimeError
        once the session has ended."""
        return self._control().start_tls(context_factory)

    def restart(
        self,
        remote_ip: str | None = None,
        remote_port: int | None = None,
        remote_host: str | None = None,
    ) -> Deferred[None]:
        """Begin again as a new client (XCLIENT): new uuid, relaying off, the address
        replaced, connect_init/lookup_rdns/connect run again and a new banner sent.
        RuntimeError once the session has ended."""
        return self._control().restart(remote_ip, remote_port, remote_host)

    def _control(self) -> SessionControl:
        if self._session is None:
            raise RuntimeError(
                "this connection has no session to control (none was given, or it has ended)"
            )
        return self._session

    # -- the session's end (not for plugins) -------------------------------------------------

    def detach(self) -> None:
        """Called by the session once it has ended (its disconnect hooks have run): let go
        of it. Not for plugins.

        The session and this connection point at each other; cutting the link lets reference
        counting free both at once, instead of leaving some forty objects per connection to
        the cycle collector. Later actions on this connection do nothing, or fail.
        """
        self._session = None

    # -- logging with this connection's uuid --------------------------------------------------

    def log(self, level: Level, message: str, origin: Any = None, **fields: Any) -> None:
        """Log a line tagged with the transaction's uuid (or the connection's)."""
        self.log_fields(level, message, fields, origin)

    def log_fields(
        self, level: Level, message: str, fields: Mapping[str, Any], origin: Any = None
    ) -> None:
        """L{log} with the fields as a mapping (see L{HarakaLog.log_fields})."""
        log = self._log
        if log is None or level > log.level:
            return
        name = origin if isinstance(origin, str) else getattr(origin, "name", None)
        txn = self.transaction
        log.log_fields(
            level, message, fields, txn.uuid if txn is not None else self.uuid, name or "core", self
        )

    def logdebug(self, message: str, origin: Any = None, **fields: Any) -> None:
        self.log(Level.DEBUG, message, origin, **fields)

    def loginfo(self, message: str, origin: Any = None, **fields: Any) -> None:
        self.log(Level.INFO, message, origin, **fields)

    def lognotice(self, message: str, origin: Any = None, **fields: Any) -> None:
        self.log(Level.NOTICE, message, origin, **fields)

    def logwarn(self, message: str, origin: Any = None, **fields: Any) -> None:
        self.log(Level.WARN, message, origin, **fields)

    def logerror(self, message: str, origin: Any = None, **fields: Any) -> None:
        self.log(Level.ERROR, message, origin, **fields)

    def logcrit(self, message: str, origin: Any = None, **fields: Any) -> None:
        self.log(Level.CRIT, message, origin, **fields)

    # -- summary --------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The fields of the one structured line logged at disconnect."""
        return {
            "ip": self.remote.ip,
            "rdns": self.remote.host or "",
            "helo": self.hello.host or "",
            "relay": "Y" if self.relaying else "N",
            "early": "Y" if self.early_talker else "N",
            "esmtp": "Y" if self.esmtp else "N",
            "tls": "Y" if self.tls.enabled else "N",
            "pipe": "Y" if self.pipelining else "N",
            "errors": self.errors,
            "txns": self.tran_count,
            "rcpts": str(self.rcpt_count),
            "msgs": str(self.msg_count),
            "bytes": self.bytes_in,
            "lr": self.last_response,
            "time": f"{time.time() - self.start_time:.3f}",
        }
