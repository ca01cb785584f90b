"""rspamd: scan each message with rspamd at data_post, and do as its verdict says.

Haraka's C{rspamd} plugin, reading its rspamd.ini. The message, as it will be queued, goes
to rspamd's normal worker (L{haraka_tw.rspamd}: C{POST /checkv2}) with the envelope in the
request headers rspamd reads (C{IP}, C{Hostname}, C{Helo}, C{From}, C{Rcpt}, C{User},
C{Queue-Id}, C{SPF}, C{TLS-Cipher}, ...). rspamd's action then decides:

  - C{reject}: C{550 5.7.1} with rspamd's C{smtp_message} (else C{[reject] message}),
    unless C{[reject] spam} is off (or, for a client that authenticated,
    C{[reject] authenticated} is);
  - C{soft reject}: C{451 4.7.1} with rspamd's C{smtp_message} (else
    C{[soft_reject] message}), unless C{[soft_reject] enabled} is off;
  - C{rewrite subject}: the Subject becomes rspamd's C{subject} (else C{subject} with the
    old Subject in place of its C{%s});
  - for a message that goes on: rspamd's C{milter} header edits (C{remove_headers}, then
    C{add_headers}), its C{dkim-signature} on top, and the C{[header]} fields (bar,
    report, score) as C{add_headers} says.

The verdict is in C{transaction.results["rspamd"]} (action, score, required_score,
is_skipped, symbols, urls, emails, messages, time). Not scanned, by default as in Haraka:
mail from clients that authenticated, relay, or are on loopback or private addresses
(C{[check]}; each reason goes in the results as C{skip}). When rspamd cannot be asked or
gives no verdict, the message goes on unscanned with C{err} in the results, unless
C{[defer]} says to answer C{450 4.7.1} (C{error}, C{timeout}).

Done otherwise than Haraka's plugin, where it was wrong:

  - rspamd's answer is checked: a status other than 200, a body that is not a JSON object,
    or rspamd's own error answer (C{error} with C{error_domain}) is an error, as
    C{[defer] error} says; Haraka took rspamd's error answer for a clean scan;
  - C{SPF} is sent as the JSON rspamd reads (Haraka sent C{[object Object]}), and not at
    all for a temporary error, so rspamd checks for itself;
  - the scan ends a second under the hook's own timeout (C{[main] timeout} shorter if
    set), so C{[defer]} decides, not the runner's "plugin timeout";
  - milter edits are made as a milter counts them: C{remove_headers} removes the field
    its index names (0: all), C{add_headers} puts a field with an C{order} at that place;
    the removals come before rspamd's DKIM signature is added (Haraka's could delete it);
  - C{add_headers=sometimes} also marks spam whose reject or soft reject is turned off;
    C{always_add_headers=true} and a top-level C{subject} work; the old Subject is put
    into the template as it is (Haraka's expanded C{$&} in it);
  - every value rspamd gives is made safe before it is used: a header value has no line
    that could end the header, a non-ASCII one is RFC 2047 encoded, a field name that is
    not one is skipped, and a reply's text is printable ASCII; a verdict asking for more
    (a value over L{MAX_VALUE}, a word no header line holds, over L{MAX_ADDED} fields)
    is not followed at all: every edit is worked out before the message is touched;
  - a request header of a name is sent once ([request_headers] over [auth] over the
    rest), as rspamd reads only the first;
  - the replies carry enhanced status codes (5.7.1, 4.7.1), also for C{[defer]}.

The keys, with their defaults, are in docs/plugins.md and the shipped etc/rspamd.ini.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.header import Header as EncodedHeader
from typing import Any, TypeGuard

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw import rspamd
from haraka_tw.codes import CONT, DENY, DENYSOFT
from haraka_tw.config.formats import ini_number
from haraka_tw.exchange import Address, ServiceError, ServiceTimeout, parse_address
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import IDataPostHook, IPluginContext, IRegistration
from haraka_tw.message.header import Header
from haraka_tw.outbound.delivery import TLSPolicy
from haraka_tw.outbound.tls_client import ClientTLS, client_context
from haraka_tw.plugins.content_scan import client_skips
from haraka_tw.smtp.connection import Connection, Transaction
from haraka_tw.smtp.replies import Reply

__all__ = [
    "BOOLEANS",
    "FLAGS",
    "INI",
    "MAX_ADDED",
    "MAX_VALUE",
    "Plugin",
    "Settings",
    "read_settings",
    "spambar",
]

INI = "rspamd.ini"
#: [request] booleans that each add their name to the Flags header, in this order
FLAGS = (
    "body_block",
    "ext_urls",
    "groups",
    "milter",
    "no_log",
    "profile",
    "skip",
    "skip_process",
    "zstd",
)
BOOLEANS = [
    "-main.always_add_headers",
    "-check.authenticated",
    "-check.private_ip",
    "-check.local_ip",
    "-check.relay",
    "+dkim.enabled",
    "+reject.spam",
    "-reject.authenticated",
    "+soft_reject.enabled",
    "+rewrite_subject.enabled",
    "+rmilter_headers.enabled",
    "+smtp_message.enabled",
    "-defer.error",
    "-defer.timeout",
    "+tls.reject_unauthorized",
    "-request.pass_all",
    "-request.raw",
    *(f"-request.{flag}" for flag in FLAGS),
]
_ADD_HEADERS = ("always", "never", "sometimes")
#: the actions of a message that goes on though rspamd judged it spam
_SPAM_ACTIONS = frozenset({"add header", "rewrite subject", "reject", "soft reject"})
#: our spf results -> what rspamd's http_headers rule reads (none for a temporary error)
_SPF = {
    "pass": "pass",
    "fail": "fail",
    "softfail": "softfail",
    "neutral": "neutral",
    "none": "na",
    "permerror": "permfail",
}
_FIELD_NAME = re.compile(r"^[!-9;-~]{1,200}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NOT_PRINTABLE = re.compile(r"[^ -~]")
_LOCAL_RSPAMD = Address("localhost", 11333)
_MAX_BAR = 100  # (a score of thousands would make a field no line could hold)
#: the most characters of one value rspamd may give for a field, and fields it may add
MAX_VALUE = 16 * 1024
MAX_ADDED = 100


@dataclass(frozen=True)
class Settings:
    address: Address = _LOCAL_RSPAMD
    tls: IOpenSSLClientConnectionCreator | None = None
    path: str = "/checkv2"
    timeout: float = 29.0
    add_headers: str = "sometimes"
    subject: str = "[SPAM] %s"
    #: request headers before the envelope's ([request]) and after them ([auth],
    #: [request_headers], which take the place of an envelope header of the same name)
    leading: tuple[tuple[str, str], ...] = ()
    trailing: tuple[tuple[str, str], ...] = ()
    dkim: bool = True
    reject_spam: bool = True
    reject_authenticated: bool = False
    reject_message: str = "Detected as spam"
    soft_reject: bool = True
    soft_reject_message: str = "Deferred by policy"
    rewrite_subject: bool = True
    milter: bool = True
    smtp_message: bool = True
    defer_error: bool = False
    defer_timeout: bool = False
    fields: dict[str, str] = field(default_factory=dict)  # bar / report / score -> name
    spambar: tuple[str, str, str] = ("+", "-", "/")
    check: dict[str, bool] = field(default_factory=dict)


def _text(section: dict[str, Any], key: str, default: str = "") -> str:
    value = section.get(key)
    return default if value is None or value == "" else str(value).strip()


def _tls(ini: dict[str, dict[str, Any]], host: str) -> IOpenSSLClientConnectionCreator:
    """The TLS of an https rspamd, as [tls] says: the certificate checked against
    C{ca_file} (else the system's roots) and the name (C{servername}, else the host)
    during the handshake, unless C{reject_unauthorized} is off."""
    section = ini.get("tls", {})
    files = {key: _text(section, key) or None for key in ("ca_file", "cert_file", "key_file")}
    for key, path in files.items():
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{INI} [tls] {key}: cannot read {path}")
    policy = TLSPolicy(
        mode="required",
        verify=bool(section.get("reject_unauthorized", True)),
        ca_file=files["ca_file"],
        client_cert=files["cert_file"],
        client_key=files["key_file"],
    )
    try:
        # (made anew, not the outbound side's cached one: a reload reads the files again)
        tls = ClientTLS(
            client_context(policy), _text(section, "servername", host), policy.verifying
        )
        return tls.in_handshake()
    except Exception as e:  # (OpenSSL's errors for a file that is no certificate or key)
        raise ValueError(f"{INI} [tls]: the certificates or key cannot be used: {e}") from None


def _request_headers(ini: dict[str, dict[str, Any]]) -> tuple[list[tuple[str, str]], ...]:
    """The headers sent before the envelope's, and after them."""
    request = ini.get("request", {})
    leading = [
        ("Settings-ID", _text(request, "settings_id")),
        ("Settings", _text(request, "settings")),
        ("Pass", "all" if request.get("pass_all") else ""),
        ("Raw", "yes" if request.get("raw") else ""),
    ]
    flags = [f.strip() for f in _text(request, "flags").split(",") if f.strip()]
    flags += [flag for flag in FLAGS if request.get(flag)]
    leading.append(("Flags", ",".join(dict.fromkeys(flags))))
    leading.append(("URL-Format", _text(request, "url_format")))
    trailing = []
    auth = ini.get("auth", {})
    user = _text(auth, "basic_user")
    if user:
        secret = f"{user}:{_text(auth, 'basic_pass')}".encode()
        trailing.append(("Authorization", "Basic " + base64.b64encode(secret).decode()))
    name = _text(auth, "header")
    if name:
        env = _text(auth, "value_env")
        trailing.append((name, (os.environ.get(env, "") if env else "") or _text(auth, "value")))
    extra = ini.get("request_headers", {})
    trailing += [(key, _text(extra, key)) for key in extra]
    for key, _ in leading + trailing:
        if not rspamd.is_header_name(key):
            raise ValueError(f"{INI}: {key!r} is not an HTTP header name")
    # (rspamd would compress its answer, which there is nothing here to read)
    if "zstd" in (flag.lower() for flag in flags):
        raise ValueError(f"{INI} [request]: the zstd flag is not supported")
    # One header of each name (rspamd reads the first): [request_headers] over [auth],
    # both over [request].
    last = {key.lower(): (key, value) for key, value in trailing if value}
    return [h for h in leading if h[1] and h[0].lower() not in last], list(last.values())


def read_settings(ini: dict[str, dict[str, Any]]) -> Settings:
    """rspamd.ini's settings; ValueError naming the file and key for a bad value."""
    main = ini["main"]
    where = f"{INI} [main]"
    host = _text(main, "host", "localhost")
    port = ini_number(main, "port", 11333, zero_ok=False, where=where)
    if port != int(port) or not 0 < port < 65536:
        raise ValueError(f"{where} port must be 1-65535")
    socket = _text(main, "unix_socket")
    https = _text(main, "scheme", "http").lower() == "https" and not socket
    try:
        address = Address(path=socket) if socket else parse_address(host, int(port))
    except ValueError as e:
        raise ValueError(f"{where} host: {e}") from None
    path = _text(main, "path", "/checkv2")
    if not re.fullmatch(r"/[!-~]*", path):
        raise ValueError(f"{where} path must start with / and hold no spaces: {path!r}")
    add_headers = _text(main, "add_headers", "sometimes").lower()
    if main.get("always_add_headers") and "add_headers" not in main:
        add_headers = "always"
    if add_headers not in _ADD_HEADERS:
        raise ValueError(f"{where} add_headers must be always, never or sometimes")
    subject = _text(main, "subject", "[SPAM] %s")
    leading, trailing = _request_headers(ini)
    headers = ini.get("header", {})
    bar = ini.get("spambar", {})
    fields = {key: _text(headers, key) for key in ("bar", "report", "score") if _text(headers, key)}
    for key, name in fields.items():
        if not _FIELD_NAME.match(name):
            raise ValueError(f"{INI} [header] {key}: {name!r} is not a header field name")
    section = ini.get
    return Settings(
        address=address,
        tls=_tls(ini, address.host) if https else None,
        path=path,
        timeout=ini_number(main, "timeout", 29, zero_ok=True, where=where) or 29.0,
        add_headers=add_headers,
        subject=subject,
        leading=tuple(leading),
        trailing=tuple(trailing),
        dkim=bool(section("dkim", {}).get("enabled", True)),
        reject_spam=bool(section("reject", {}).get("spam", True)),
        reject_authenticated=bool(section("reject", {}).get("authenticated", False)),
        reject_message=_text(section("reject", {}), "message", "Detected as spam"),
        soft_reject=bool(section("soft_reject", {}).get("enabled", True)),
        soft_reject_message=_text(section("soft_reject", {}), "message", "Deferred by policy"),
        rewrite_subject=bool(section("rewrite_subject", {}).get("enabled", True)),
        milter=bool(section("rmilter_headers", {}).get("enabled", True)),
        smtp_message=bool(section("smtp_message", {}).get("enabled", True)),
        defer_error=bool(section("defer", {}).get("error", False)),
        defer_timeout=bool(section("defer", {}).get("timeout", False)),
        fields=fields,
        spambar=(
            _text(bar, "positive", "+"),
            _text(bar, "negative", "-"),
            _text(bar, "neutral", "/"),
        ),
        check={key: bool(value) for key, value in section("check", {}).items()},
    )


def spambar(score: Any, bar: tuple[str, str, str]) -> str:
    """The score as a bar: C{positive} once per whole point at or above 1, C{negative}
    once per whole point at or below -1, else C{neutral} (so -2.7 gives C{--})."""
    positive, negative, neutral = bar
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        return neutral
    if score >= 1:
        return (positive * min(int(score), _MAX_BAR))[:_MAX_BAR]
    if score <= -1:
        return (negative * min(int(-score), _MAX_BAR))[:_MAX_BAR]
    return neutral


def _number(value: Any) -> str:
    """A score as rspamd (and Haraka's header) writes it: C{7.3}, C{-0.1}, C{15}."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _field_value(name: str, value: Any) -> str:
    """rspamd's C{value} fit to be the field C{name}'s: no control characters, no line of
    white space alone (which would end the header), a non-ASCII value RFC 2047 encoded;
    rspamd's own folding kept where the lines are short enough.

    @raise ValueError: for a value over L{MAX_VALUE} characters, or one with a word too
        long for a line of a header (998 characters)."""
    text = str(value)
    if len(text) > MAX_VALUE:
        raise ValueError(f"a value of {len(text)} characters for {name}")
    # (a value read from the message holds its 8-bit bytes as surrogates)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [line for line in text.split("\n") if line.strip()]
    if not (text.isascii() and all(len(line) < 900 for line in lines)):
        unfolded = " ".join(" ".join(lines).split())
        charset = "us-ascii" if unfolded.isascii() else "utf-8"
        encoded = EncodedHeader(unfolded, charset, header_name=name).encode(linesep="\n")
        lines = encoded.split("\n")
    if any(len(line) > 990 - len(name) for line in lines):
        raise ValueError(f"a word of the value for {name} is too long for a header line")
    return "\n".join(lines)


def _reply_text(text: Any) -> str:
    """rspamd's message fit for an SMTP reply: printable ASCII, one line, 400 at most."""
    return _NOT_PRINTABLE.sub("?", " ".join(str(text).split()))[:400]


@implementer(IRegistration, IDataPostHook)
class Plugin:
    name = "rspamd"

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
        """(Re)read rspamd.ini; a bad value raises, naming it, and changes nothing."""
        self.settings = read_settings(self.config.get_ini(INI, booleans=BOOLEANS))

    # -- the hook ------------------------------------------------------------------------

    def hook_data_post(self, connection: Connection) -> Any:
        txn = connection.transaction
        if txn is None:
            return CONT
        settings = self.settings  # (this message's, whatever a reload does meanwhile)
        reasons = client_skips(connection, settings.check)
        for reason in reasons:
            txn.results.add(self.name, skip=reason)
        if reasons:
            return CONT
        stream = txn.message_stream
        started = self.reactor.seconds()
        asked = rspamd.check(
            self.reactor,
            settings.address,
            stream.chunks(),
            stream.size,
            path=settings.path,
            headers=self._headers(connection, txn, settings),
            tls=settings.tls,
            timeout=under_hook_limit(self.config, self.name, settings.timeout),
        )
        answered: Deferred[Any] = asked.addCallbacks(
            lambda verdict: self._judge(connection, txn, settings, verdict, started),
            lambda failure: self._failed(connection, txn, settings, failure),
        )
        return answered

    @staticmethod
    def _headers(
        connection: Connection, txn: Transaction, settings: Settings
    ) -> list[tuple[str, str]]:
        """The request headers: [request]'s, the envelope's, then [auth] and
        [request_headers] (which take the place of an envelope header of their name)."""
        envelope = [("User", str(connection.notes.get("auth_user") or ""))]
        envelope.append(("IP", connection.remote.ip))
        fcrdns = (connection.results.get("fcrdns") or {}).get("fcrdns") or []
        envelope.append(("Hostname", str(fcrdns[0]) if fcrdns else connection.remote.host or ""))
        envelope.append(("Helo", connection.hello.host or ""))
        spf = txn.results.get("spf") or connection.results.get("spf") or {}
        result = _SPF.get(str(spf.get("result", "")).lower())
        if result:
            envelope.append(("SPF", json.dumps({"result": result})))
        if txn.mail_from is not None:
            envelope.append(("From", txn.mail_from.address))
        envelope += [("Rcpt", rcpt.address) for rcpt in txn.rcpt_to]
        if len(txn.rcpt_to) == 1:
            envelope.append(("Deliver-To", txn.rcpt_to[0].address))
        envelope.append(("Queue-Id", txn.uuid))
        tls = connection.tls
        if tls.enabled:
            envelope += [("TLS-Cipher", tls.cipher or ""), ("TLS-Version", tls.version or "")]
        overridden = {name.lower() for name, _ in settings.trailing}
        envelope = [(n, v) for n, v in envelope if n.lower() not in overridden]
        return [*settings.leading, *envelope, *settings.trailing]

    def _failed(
        self, connection: Connection, txn: Transaction, settings: Settings, failure: Failure
    ) -> Any:
        error = failure.value
        if not isinstance(error, ServiceError):
            return failure  # cancelled by the runner, or a bug: the runner answers
        txn.results.add(self.name, err=str(error))
        connection.logwarn(f"message not scanned: {error}", self)
        if isinstance(error, ServiceTimeout):
            if settings.defer_timeout:
                return DENYSOFT, Reply(450, "4.7.1", ("Rspamd scan timeout",))
        elif settings.defer_error:
            return DENYSOFT, Reply(450, "4.7.1", ("Rspamd scan error",))
        return CONT

    def _judge(
        self,
        connection: Connection,
        txn: Transaction,
        settings: Settings,
        verdict: dict[str, Any],
        started: float,
    ) -> Any:
        if connection.remote.closed or connection.transaction is not txn:
            return CONT  # the client has gone: nothing is queued
        try:
            # Everything is worked out before the message is touched: a verdict that
            # cannot be followed leaves it as it was, and is an error like any other.
            answer, edits = self._follow(connection, txn, settings, verdict)
        except Exception as e:
            return self._failed(
                connection, txn, settings, Failure(ServiceError(f"unusable verdict: {e!r}"))
            )
        self._record(txn, verdict, round(self.reactor.seconds() - started, 3))
        for edit in edits:
            edit(txn.header)
        return answer

    def _follow(
        self,
        connection: Connection,
        txn: Transaction,
        settings: Settings,
        verdict: dict[str, Any],
    ) -> tuple[Any, list[Callable[[Header], None]]]:
        """The answer to give and the edits to make, as rspamd's C{verdict} says."""
        action = verdict.get("action")
        action = action if isinstance(action, str) else None
        messages = verdict.get("messages")
        said = messages.get("smtp_message") if isinstance(messages, dict) else None
        said = _reply_text(said) if said and settings.smtp_message else ""
        connection.loginfo(
            f"action={_reply_text(action)} score={_reply_text(_number(verdict.get('score')))}"
            f" required={_reply_text(_number(verdict.get('required_score')))}",
            self,
        )
        edits: list[Callable[[Header], None]] = []
        if action == "rewrite subject" and settings.rewrite_subject:
            edits += _new_subject(txn, settings, verdict.get("subject"))
        if action == "soft reject" and settings.soft_reject:
            return (DENYSOFT, Reply(451, "4.7.1", (said or settings.soft_reject_message,))), []
        if action == "reject":
            authed = bool(connection.notes.get("auth_user"))
            if settings.reject_authenticated if authed else settings.reject_spam:
                return (DENY, Reply(550, "5.7.1", (said or settings.reject_message,))), []
        milter = verdict.get("milter")
        milter = milter if settings.milter and isinstance(milter, dict) else {}
        edits += self._removals(milter.get("remove_headers"))
        signature = verdict.get("dkim-signature")
        if settings.dkim and signature:
            for value in reversed(signature if isinstance(signature, list) else [signature]):
                edits.append(_add("DKIM-Signature", _field_value("DKIM-Signature", value), 0))
        edits += self._additions(milter.get("add_headers"))
        if settings.add_headers == "always" or (
            settings.add_headers == "sometimes" and action in _SPAM_ACTIONS
        ):
            edits += _our_fields(settings, verdict)
        return CONT, edits

    def _record(self, txn: Transaction, verdict: dict[str, Any], took: float) -> None:
        """The verdict in the results, with Haraka's keys."""
        found: dict[str, Any] = {"emit": True, "time": took}
        for key in ("action", "is_skipped", "required_score", "score"):
            value = verdict.get(key)
            if isinstance(value, (bool, int, float, str)):
                found[key] = value
        for key in ("urls", "emails", "messages"):
            value = verdict.get(key)
            if isinstance(value, list):
                found[key] = ",".join(map(str, value))
            elif isinstance(value, dict):
                found[key] = ",".join(f"{k} : {v}" for k, v in value.items())
        symbols = verdict.get("symbols")
        found["symbols"] = symbols if isinstance(symbols, dict) else {}
        txn.results.add(self.name, **found)

    def _removals(self, removals: Any) -> list[Callable[[Header], None]]:
        """rspamd's C{remove_headers}: {name: which}, C{which} as a milter counts (0 every
        field of the name, 1 the first, -1 the last) or a list of such; any other
        C{which} removes nothing."""
        edits: list[Callable[[Header], None]] = []
        for name, which in removals.items() if isinstance(removals, dict) else ():
            whiches = which if isinstance(which, list) else [which]
            if not _FIELD_NAME.match(str(name)) or not all(map(_is_int, whiches)):
                self.log.warn(f"milter remove_headers: {str(name)[:100]!r}: {which!r} ignored")
                continue
            edits.append(functools.partial(Header.remove, name=str(name), which=whiches))
        return edits

    def _additions(self, additions: Any) -> list[Callable[[Header], None]]:
        """rspamd's C{add_headers}: {name: value, or {value, order}, or a list of them};
        a field with an C{order} goes at that place (0: the top), others at the end. At
        most L{MAX_ADDED} fields."""
        edits: list[Callable[[Header], None]] = []
        for name, given in additions.items() if isinstance(additions, dict) else ():
            if not _FIELD_NAME.match(str(name)):
                self.log.warn(f"milter add_headers: {str(name)[:100]!r} is not a field name")
                continue
            for entry in given if isinstance(given, list) else [given]:
                order = None
                if isinstance(entry, dict):
                    order = entry.get("order")
                    entry = entry.get("value")
                if entry is None:
                    continue
                if len(edits) == MAX_ADDED:
                    raise ValueError(f"more than {MAX_ADDED} fields to add")
                where = order if _is_int(order) and order >= 0 else None
                edits.append(_add(str(name), _field_value(str(name), entry), where))
        return edits


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _add(name: str, value: str, where: int | None) -> Callable[[Header], None]:
    """An edit adding the field C{name} at C{where} (0: the top), or at the end (None)."""
    if where is None:
        return functools.partial(Header.add_end, name=name, value=value)
    return lambda header: header.insert(min(where, len(header)), name, value)


def _new_subject(
    txn: Transaction, settings: Settings, given: Any
) -> list[Callable[[Header], None]]:
    """The edits that make the Subject as rspamd wrote it, else C{subject} around the old
    one (as it is: nothing in it is read as a pattern)."""
    if isinstance(given, str) and given.strip():
        subject = given
    else:
        old = txn.header.get_all("Subject")
        subject = settings.subject.replace("%s", old[0] if old else "", 1)
    value = _field_value("Subject", subject)
    return [functools.partial(Header.remove, name="Subject"), _add("Subject", value, None)]


def _our_fields(settings: Settings, verdict: dict[str, Any]) -> list[Callable[[Header], None]]:
    """The edits that put the [header] fields: the bar, the report of the symbols that
    scored, the score; each in place of the message's own field of its name."""
    score = verdict.get("score")
    symbols = verdict.get("symbols")
    report = " ".join(
        f"{name}({_number(symbol.get('score'))})"
        for name, symbol in (symbols.items() if isinstance(symbols, dict) else ())
        if isinstance(symbol, dict) and symbol.get("score")
    )
    values = {
        "bar": spambar(score, settings.spambar),
        "report": report,
        "score": _number(score) if score is not None else "",
    }
    edits: list[Callable[[Header], None]] = []
    for key, name in settings.fields.items():
        edits.append(functools.partial(Header.remove, name=name))
        edits.append(_add(name, _field_value(name, values[key]), None))
    return edits
