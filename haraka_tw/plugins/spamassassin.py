"""spamassassin: score each message with SpamAssassin's spamd at data_post.

Haraka's C{spamassassin}, reading its spamassassin.ini. The message (with
C{X-Envelope-From}, C{X-Haraka-UUID} and, for a relaying client, C{X-Haraka-Relay: true}
put on top, as Haraka sends it) goes to spamd as a C{HEADERS} request
(L{haraka_tw.spamd}); from the header spamd sends back, the C{X-Spam-*} fields are added
to the message, below its own. Then:

  - a score at or above C{reject_threshold} is refused (C{550 5.7.1 spam score exceeded
    threshold}), and a relaying client's at or above C{relay_reject_threshold} too;
  - else a score at or above C{munge_subject_threshold} puts C{subject_prefix} before the
    Subject;
  - spam (by spamd's own threshold) gets C{Precedence: junk}.

The verdict is in C{transaction.results["spamassassin"]} (score, required, reject, tests,
flag, time, human) and spamd's fields in C{transaction.notes.spamassassin}.

Not scanned: a message over C{max_size} bytes, and, as C{[check]} says, clients that
authenticated, relay, or are on a loopback or private address (each reason goes into
the results as C{skip}). When spamd cannot be asked (refused, too slow, an answer that is
not one), the message goes on unscored with the error in the results as C{err}, unless
C{[defer]} says to answer 450 4.7.1 (C{error}, C{connect_timeout}, C{scan_timeout}).

Done otherwise than Haraka's plugin, where it was wrong:

  - spamd's status is read: an error status (C{SPAMD/1.0 76 Bad header line}) or a
    reply cut short is an error, as C{[defer] error} says; Haraka passed it as clean, and
    put the subject prefix on the unscored message;
  - the request has a C{Content-length} (SPAMC/1.5); the reply is read to at most
    256 KB, within one time limit, which is kept a second under the hook's timeout (so
    C{[defer]} decides, not the runner's "plugin timeout");
  - every C{X-Spam-*} field the client sent is renamed (C{old_headers_action=rename}) or
    dropped, not only those spamd sends back, and also when the message is not scanned
    or spamd fails: a forged C{X-Spam-Flag} never passes for a verdict; each field is
    renamed in its place, one by one;
  - C{modern_status_syntax} is a boolean (Haraka took C{false} for on); C{User} is sent
    only when it is printable ASCII without spaces, else C{default};
  - C{spamd_user=all-recipients}, which Haraka never implemented (it then passed the
    message unscanned), and a bad C{spamd_socket} stop start-up with a message.

spamassassin.ini::

    spamd_socket=127.0.0.1:783     ; host:port, [IPv6]:port, or /path/to/spamd.sock
    ;spamd_user=first-recipient    ; a name, or the first recipient's address
    max_size=500000                ; bytes; larger messages are not scanned
    ;reject_threshold=10
    ;relay_reject_threshold=7
    ;munge_subject_threshold=5
    subject_prefix=*** SPAM ***
    old_headers_action=rename      ; rename (to X-Old-Spam-*), drop, keep
    modern_status_syntax=1         ; score= in X-Spam-Status (off: hits=, as spamc 2.x)
    ;add_headers=true
    ;spamc_auth_header=X-Haraka-Relay
    ;connect_timeout=30
    ;results_timeout=300
    [check]                        ; false: do not scan these clients
    authenticated=true
    private_ip=true
    local_ip=true
    relay=true
    [defer]                        ; true: 450 instead of passing the message unscored
    error=false
    connect_timeout=false
    scan_timeout=false

A zero or empty C{max_size} or threshold means its default (Haraka's reading): no
threshold is set unless given.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw import spamd
from haraka_tw.codes import CONT, DENY, DENYSOFT
from haraka_tw.config.formats import ini_number
from haraka_tw.config.ini import is_truthy
from haraka_tw.exchange import Address, chained
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import IDataPostHook, IPluginContext, IRegistration
from haraka_tw.plugins.content_scan import CHECK_BOOLEANS, client_skips
from haraka_tw.smtp.connection import Connection, Transaction
from haraka_tw.smtp.replies import Reply

__all__ = ["BOOLEANS", "INI", "Plugin", "Settings", "read_settings", "tests_of"]

INI = "spamassassin.ini"
BOOLEANS = [
    "+main.add_headers",
    *CHECK_BOOLEANS,
    "-defer.error",
    "-defer.connect_timeout",
    "-defer.scan_timeout",
]
_USER = re.compile(r"^[\x21-\x7e]{1,256}$")
_TESTS = re.compile(r"\btests=((?:(?!autolearn)\S)*)")
_OLD_ACTIONS = ("rename", "drop", "keep")
_LOCAL_SPAMD = spamd.parse_address("127.0.0.1")


@dataclass(frozen=True)
class Settings:
    address: Address = _LOCAL_SPAMD
    user: str = "default"
    max_size: int = 500_000
    reject_threshold: float | None = None
    relay_reject_threshold: float | None = None
    munge_subject_threshold: float | None = None
    subject_prefix: str = "*** SPAM ***"
    old_headers_action: str = "rename"
    modern_status_syntax: bool = False
    add_headers: bool = True
    auth_header: str = "X-Haraka-Relay"
    connect_timeout: float = 30.0
    results_timeout: float = 300.0
    check: dict[str, bool] = field(default_factory=dict)
    defer: dict[str, bool] = field(default_factory=dict)


def _threshold(main: dict[str, Any], key: str) -> float | None:
    """An optional score: missing, empty or 0 is none (as Haraka reads it)."""
    value = main.get(key)
    if value in (None, "", 0, "0"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{INI} [main] {key}: {value!r} is not a number")
    return number or None


def read_settings(ini: dict[str, dict[str, Any]]) -> Settings:
    """spamassassin.ini's settings; ValueError naming the file and key for a bad value."""
    main = ini["main"]
    socket = str(main.get("spamd_socket") or "127.0.0.1:783")
    try:
        address = spamd.parse_address(socket)
    except ValueError as e:
        raise ValueError(f"{INI} [main] spamd_socket: {e}") from None
    user = str(main.get("spamd_user") or "default").strip()
    if user == "all-recipients":
        raise ValueError(
            f"{INI} [main] spamd_user: all-recipients is not supported (a name, or first-recipient)"
        )
    action = str(main.get("old_headers_action") or "rename").strip().lower()
    if action not in _OLD_ACTIONS:
        raise ValueError(f"{INI} [main] old_headers_action must be rename, drop or keep")
    auth_header = str(main.get("spamc_auth_header") or "X-Haraka-Relay").strip()
    if not re.fullmatch(r"[!-9;-~]+", auth_header):
        raise ValueError(f"{INI} [main] spamc_auth_header: {auth_header!r} is no field name")
    where = f"{INI} [main]"
    return Settings(
        address=address,
        user=user,
        max_size=int(ini_number(main, "max_size", 500_000, zero_ok=True, where=where)) or 500_000,
        reject_threshold=_threshold(main, "reject_threshold"),
        relay_reject_threshold=_threshold(main, "relay_reject_threshold"),
        munge_subject_threshold=_threshold(main, "munge_subject_threshold"),
        subject_prefix=str(main.get("subject_prefix") or "*** SPAM ***"),
        old_headers_action=action,
        modern_status_syntax=is_truthy(main.get("modern_status_syntax", False)),
        add_headers=bool(main.get("add_headers", True)),
        auth_header=auth_header,
        connect_timeout=ini_number(main, "connect_timeout", 30, zero_ok=True, where=where) or 30,
        results_timeout=ini_number(main, "results_timeout", 300, zero_ok=True, where=where) or 300,
        check={key: bool(value) for key, value in ini.get("check", {}).items()},
        defer={key: bool(value) for key, value in ini.get("defer", {}).items()},
    )


def tests_of(fields: dict[str, str]) -> str | None:
    """The names of the tests that hit, comma-separated: from X-Spam-Tests, else from the
    C{tests=} of X-Spam-Status (cut before C{autolearn}, which SpamAssassin may fold onto
    the same word). C{fields} are spamd's values by lower-case name, folds as newlines."""
    if "tests" in fields:
        return re.sub(r"\s+", "", fields["tests"])
    status = fields.get("status")
    if status is None:
        return None
    match = _TESTS.search(re.sub(r"\s*\n\s*", "", status))
    return match.group(1) if match else None


@implementer(IRegistration, IDataPostHook)
class Plugin:
    name = "spamassassin"

    def __init__(self) -> None:
        self.settings = Settings()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.reactor = context.reactor
        self.load()
        context.config.on_change(INI, self.load)

    def load(self) -> None:
        """(Re)read spamassassin.ini; a bad value raises, naming it, and changes nothing."""
        self.settings = read_settings(self.config.get_ini(INI, booleans=BOOLEANS))

    # -- the hook ------------------------------------------------------------------------

    def hook_data_post(self, connection: Connection) -> Any:
        txn = connection.transaction
        if txn is None:
            return CONT
        settings = self.settings  # (this message's, whatever a reload does meanwhile)
        # The client's own X-Spam-* fields go first, whether the message is scanned or
        # not: a forged "X-Spam-Flag: NO" must not pass for our verdict.
        _old_headers(txn, settings.old_headers_action)
        if self._skipped(connection, txn, settings):
            return CONT
        # a client's own relay marker would tell SpamAssassin it is one of ours
        txn.remove_header(settings.auth_header)
        prefix = self._prefix(connection, txn, settings).encode("utf-8")
        stream = txn.message_stream
        timeout = under_hook_limit(self.config, self.name, settings.results_timeout)
        started = self.reactor.seconds()
        asked = spamd.check(
            self.reactor,
            settings.address,
            chained(prefix, stream.chunks()),
            len(prefix) + stream.size,
            command="HEADERS",
            user=self._user(txn, settings),
            timeout=timeout,
            connect_timeout=min(settings.connect_timeout, timeout),
            # a HEADERS reply holds the whole header, which the client chose the size of
            limit=len(stream.header.to_bytes()) + spamd.MAX_REPLY,
        )
        answered: Deferred[Any] = asked.addCallbacks(
            lambda reply: self._judge(connection, txn, settings, reply, started),
            lambda failure: self._failed(connection, txn, settings, failure),
        )
        return answered

    def _skipped(self, connection: Connection, txn: Transaction, settings: Settings) -> bool:
        """Record every reason not to scan; whether there is one."""
        reasons = []
        if txn.data_bytes > settings.max_size:
            reasons.append(f"size {txn.data_bytes} exceeds max: {settings.max_size}")
        reasons += client_skips(connection, settings.check)
        for reason in reasons:
            txn.results.add(self.name, skip=reason)
        return bool(reasons)

    @staticmethod
    def _prefix(connection: Connection, txn: Transaction, settings: Settings) -> str:
        """The fields put on top of the message for SpamAssassin's rules."""
        sender = txn.mail_from.address if txn.mail_from is not None else ""
        lines = [f"X-Envelope-From: {sender}", f"X-Haraka-UUID: {txn.uuid}"]
        if connection.relaying:
            lines.append(f"{settings.auth_header}: true")
        return "".join(line + "\r\n" for line in lines)

    def _user(self, txn: Transaction, settings: Settings) -> str:
        """spamd's User: a plugin's C{spamd_user} note, else the setting."""
        user = str(txn.notes.get("spamd_user") or settings.user)
        if user == "first-recipient":
            user = txn.rcpt_to[0].address if txn.rcpt_to else "default"
        if not _USER.match(user):
            self.log.warn(f"spamd user {user!r} is not printable ASCII: sending 'default'")
            return "default"
        return user

    def _failed(
        self, connection: Connection, txn: Transaction, settings: Settings, failure: Failure
    ) -> Any:
        error = failure.value
        if not isinstance(error, spamd.SpamdError):
            return failure  # cancelled by the runner, or a bug: the runner answers
        txn.results.add(self.name, err=str(error))
        connection.logwarn(f"message not scored: {error}", self)
        if isinstance(error, spamd.SpamdTimeout):
            key, text = (
                ("connect_timeout", "spamd connect timeout")
                if error.connecting
                else ("scan_timeout", "spamd scan timeout")
            )
        else:
            key, text = "error", "spamd scan error"
        if settings.defer.get(key, False):
            return DENYSOFT, text
        return CONT

    def _judge(
        self,
        connection: Connection,
        txn: Transaction,
        settings: Settings,
        reply: spamd.SpamdReply,
        started: float,
    ) -> Any:
        if connection.remote.closed or connection.transaction is not txn:
            return CONT  # the client has gone: nothing is queued
        fields = [
            (name[len("X-Spam-") :], value)
            for name, value in reply.header_fields()
            if name.lower().startswith("x-spam-") and len(name) > len("X-Spam-")
        ]
        tests = tests_of({name.lower(): value for name, value in fields})
        reject = settings.reject_threshold
        if connection.relaying and settings.relay_reject_threshold is not None:
            reject = settings.relay_reject_threshold
        status = "Yes" if reply.is_spam else "No"
        took = round(self.reactor.seconds() - started, 3)
        txn.notes.spamassassin = {
            "flag": reply.is_spam,
            "score": reply.score,
            "reqd": reply.threshold,
            "tests": tests,
            "headers": {name: " ".join(value.split()) for name, value in fields},
        }
        connection.results.add(self.name, time=took, flag=reply.is_spam)
        txn.results.add(
            self.name,
            flag=reply.is_spam,
            score=reply.score,
            required=reply.threshold,
            reject=reject,
            tests=tests,
            time=took,
            human=(
                f"status={status}, score={reply.score}, required={reply.threshold},"
                f' reject={reject}, tests="{tests or ""}"'
            ),
        )
        if reply.is_spam:
            txn.remove_header("Precedence")
            txn.add_header("Precedence", "junk")
        if settings.add_headers:
            for name, value in fields:
                if name.lower() == "status" and not settings.modern_status_syntax:
                    value = value.replace(" score=", " hits=", 1)
                elif not value.strip():
                    continue  # (X-Spam-Level under a score of 1)
                txn.add_header(f"X-Spam-{name}", value)
        connection.loginfo(
            f"status={status} score={reply.score} required={reply.threshold} tests={tests or '-'}",
            self,
        )
        refusal = _refusal(settings, connection.relaying, reply.score)
        if refusal is not None:
            return DENY, Reply(550, "5.7.1", (refusal,))
        munge = settings.munge_subject_threshold
        if munge is not None and reply.score >= munge:
            _munge_subject(txn, settings.subject_prefix)
        return CONT


def _refusal(settings: Settings, relaying: bool, score: float) -> str | None:
    """Why a message of C{score} is refused, or None: a relaying client's by
    relay_reject_threshold first, then everyone's by reject_threshold (as Haraka)."""
    relay = settings.relay_reject_threshold
    if relaying and relay is not None and score >= relay:
        return "spam score exceeded relay threshold"
    if settings.reject_threshold is not None and score >= settings.reject_threshold:
        return "spam score exceeded threshold"
    return None


def _old_headers(txn: Transaction, action: str) -> None:
    """The client's own X-Spam-* fields: renamed to X-Old-Spam-*, dropped, or kept."""
    if action == "keep":
        return
    header = txn.header
    for name in dict.fromkeys(n for n in header.names() if n.lower().startswith("x-spam-")):
        if action == "drop":
            header.remove(name)
        else:
            header.rename(name, "X-Old-Spam-" + name[len("X-Spam-") :])


def _munge_subject(txn: Transaction, prefix: str) -> None:
    subject = txn.header.get_all("Subject")
    if subject and subject[0].startswith(prefix):
        return
    txn.header.replace_first("Subject", f"{prefix} {subject[0]}" if subject else prefix)
