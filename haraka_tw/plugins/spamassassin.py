"""spamassassin: score each message with SpamAssassin's spamd at data_post.

Haraka's C{spamassassin}, reading its spamassassin.ini. The message (with
C{X-Envelope-From}, C{X-Haraka-UUID} and, for a relaying client, C{X-Haraka-Relay: true}
put on top, as Haraka sends it) goes to spamd as a C{HEADERS} request
(L{haraka_tw.spamd}); from the header spamd sends back, the C{X-Spam-*} fields are added
to the message, below its own. Then:

  - a score at or above C{reject_threshold} (C{relay_reject_threshold} for a relaying
    client, when set) is refused: C{550 5.7.1 spam score exceeded threshold};
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
    dropped, not only those spamd sends back: a forged C{X-Spam-Flag: YES} on ham no
    longer survives; each field is renamed in its place, one by one;
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

import itertools
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw import spamd
from haraka_tw.codes import CONT, DENY, DENYSOFT
from haraka_tw.config.formats import ini_number
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import IDataPostHook, IPluginContext, IRegistration
from haraka_tw.smtp.connection import Connection, Transaction
from haraka_tw.smtp.replies import Reply

__all__ = ["BOOLEANS", "INI", "Plugin", "Settings", "read_settings", "tests_of"]

INI = "spamassassin.ini"
BOOLEANS = [
    "+main.add_headers",
    "+check.authenticated",
    "+check.private_ip",
    "+check.local_ip",
    "+check.relay",
    "-defer.error",
    "-defer.connect_timeout",
    "-defer.scan_timeout",
]
_USER = re.compile(r"^[\x21-\x7e]{1,256}$")
_TESTS = re.compile(r"\btests=((?:(?!autolearn)\S)*)")
_OLD_ACTIONS = ("rename", "drop", "keep")
_LOCAL_SPAMD = spamd.SpamdAddress("127.0.0.1")


@dataclass(frozen=True)
class Settings:
    address: spamd.SpamdAddress = _LOCAL_SPAMD
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
    check: tuple[tuple[str, bool], ...] = ()
    defer: tuple[tuple[str, bool], ...] = ()

    def checks(self, key: str) -> bool:
        return dict(self.check).get(key, True)

    def defers(self, key: str) -> bool:
        return dict(self.defer).get(key, False)


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


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on", "ok", "enabled")


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
        modern_status_syntax=_flag(main.get("modern_status_syntax", False)),
        add_headers=bool(main.get("add_headers", True)),
        auth_header=auth_header,
        connect_timeout=ini_number(main, "connect_timeout", 30, zero_ok=False, where=where),
        results_timeout=ini_number(main, "results_timeout", 300, zero_ok=False, where=where),
        check=tuple((k, bool(v)) for k, v in ini.get("check", {}).items()),
        defer=tuple((k, bool(v)) for k, v in ini.get("defer", {}).items()),
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
        if txn is None or self._skipped(connection, txn):
            return CONT
        settings = self.settings
        # a client's own relay marker would tell SpamAssassin it is one of ours
        txn.remove_header(settings.auth_header)
        prefix = self._prefix(connection, txn).encode("utf-8")
        stream = txn.message_stream
        timeout = under_hook_limit(self.config, self.name, settings.results_timeout)
        started = time.monotonic()
        asked = spamd.check(
            self.reactor,
            settings.address,
            itertools.chain((prefix,), stream.chunks()),
            len(prefix) + stream.size,
            command="HEADERS",
            user=self._user(txn),
            timeout=timeout,
            connect_timeout=min(settings.connect_timeout, timeout),
        )
        answered: Deferred[Any] = asked.addCallbacks(
            lambda reply: self._judge(connection, txn, reply, started),
            lambda failure: self._failed(connection, txn, failure),
        )
        return answered

    def _skipped(self, connection: Connection, txn: Transaction) -> bool:
        """Record every reason not to scan; whether there is one."""
        settings = self.settings
        reasons = []
        if txn.data_bytes > settings.max_size:
            reasons.append(f"size {txn.data_bytes} exceeds max: {settings.max_size}")
        if not settings.checks("authenticated") and connection.notes.get("auth_user"):
            reasons.append("authed")
        if not settings.checks("relay") and connection.relaying:
            reasons.append("relay")
        remote = connection.remote
        if not settings.checks("local_ip") and remote.is_local:
            reasons.append("local_ip")
        if (
            not settings.checks("private_ip")
            and remote.is_private
            and not (settings.checks("local_ip") and remote.is_local)
        ):
            reasons.append("private_ip")
        for reason in reasons:
            txn.results.add(self.name, skip=reason)
        return bool(reasons)

    def _prefix(self, connection: Connection, txn: Transaction) -> str:
        """The fields put on top of the message for SpamAssassin's rules."""
        sender = txn.mail_from.address if txn.mail_from is not None else ""
        lines = [f"X-Envelope-From: {sender}", f"X-Haraka-UUID: {txn.uuid}"]
        if connection.relaying:
            lines.append(f"{self.settings.auth_header}: true")
        return "".join(line + "\r\n" for line in lines)

    def _user(self, txn: Transaction) -> str:
        """spamd's User: a plugin's C{spamd_user} note, else the setting."""
        user = str(txn.notes.get("spamd_user") or self.settings.user)
        if user == "first-recipient":
            user = txn.rcpt_to[0].address if txn.rcpt_to else "default"
        if not _USER.match(user):
            self.log.warn(f"spamd user {user!r} is not printable ASCII: sending 'default'")
            return "default"
        return user

    def _failed(self, connection: Connection, txn: Transaction, failure: Failure) -> Any:
        error = failure.value
        if not isinstance(error, spamd.SpamdError):
            return failure  # a bug: the runner logs it
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
        if self.settings.defers(key):
            return DENYSOFT, text
        return CONT

    def _judge(
        self, connection: Connection, txn: Transaction, reply: spamd.SpamdReply, started: float
    ) -> Any:
        if connection.transaction is not txn:
            return CONT  # the client has gone
        settings = self.settings
        fields = [
            (name[len("X-Spam-") :], value)
            for name, value in reply.header_fields()
            if name.lower().startswith("x-spam-") and len(name) > len("X-Spam-")
        ]
        tests = tests_of({name.lower(): value for name, value in fields})
        by_name = {name.lower(): " ".join(value.split()) for name, value in fields}
        reject = settings.reject_threshold
        if connection.relaying and settings.relay_reject_threshold is not None:
            reject = settings.relay_reject_threshold
        status = "Yes" if reply.is_spam else "No"
        txn.notes.spamassassin = {
            "flag": reply.is_spam,
            "score": reply.score,
            "reqd": reply.threshold,
            "tests": tests,
            "headers": by_name,
        }
        txn.results.add(
            self.name,
            flag=reply.is_spam,
            score=reply.score,
            required=reply.threshold,
            reject=reject,
            tests=tests,
            time=round(time.monotonic() - started, 3),
            human=(
                f"status={status}, score={reply.score}, required={reply.threshold},"
                f' reject={reject}, tests="{tests or ""}"'
            ),
        )
        self._old_headers(txn)
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
        if reject is not None and reply.score >= reject:
            which = "relay threshold" if reject is not settings.reject_threshold else "threshold"
            return DENY, Reply(550, "5.7.1", (f"spam score exceeded {which}",))
        munge = settings.munge_subject_threshold
        if munge is not None and reply.score >= munge:
            self._munge_subject(txn)
        return CONT

    def _old_headers(self, txn: Transaction) -> None:
        """The client's own X-Spam-* fields: renamed to X-Old-Spam-*, dropped, or kept."""
        action = self.settings.old_headers_action
        if action == "keep":
            return
        header = txn.header
        for name in dict.fromkeys(n for n in header.names() if n.lower().startswith("x-spam-")):
            if action == "drop":
                header.remove(name)
            else:
                header.rename(name, "X-Old-Spam-" + name[len("X-Spam-") :])

    def _munge_subject(self, txn: Transaction) -> None:
        prefix = self.settings.subject_prefix
        subject = txn.header.get_all("Subject")
        if subject and subject[0].startswith(prefix):
            return
        txn.header.replace_first("Subject", f"{prefix} {subject[0]}" if subject else prefix)
