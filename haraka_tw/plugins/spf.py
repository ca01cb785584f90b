"""spf: check the client against the sender domain's SPF record (RFC 7208).

Haraka's C{spf} plugin, reading its spf.ini; the check itself is L{haraka_tw.spf}.

At HELO/EHLO the greeting name is checked (the HELO identity, as C{postmaster@name}) in
the background, so the greeting is answered at once; at MAIL FROM the sender's domain is
checked (the MAIL FROM identity). For the null sender C{<>} the HELO result stands for the
MAIL FROM identity, as RFC 7208 2.4 defines it. Each result is recorded:

  - a C{Received-SPF} field (RFC 7208 9.1) for each identity checked, above the
    Received field, with the client address, envelope sender, HELO name, this host's
    name, the identity, the mechanism that matched or the problem found;
  - an Authentication-Results entry: C{spf=pass smtp.mailfrom=example.com}, or for
    C{<>} C{spf=none smtp.helo=mail.example.net};
  - C{connection.results["spf"]} (the HELO identity: scope, result, domain, C{pass}) and
    C{transaction.results["spf"]} (the sender's), with Haraka's result names (C{Pass},
    C{SoftFail}, C{TempError}, ...);
  - C{connection.notes["spf_helo"]} and C{transaction.notes["spf"]}: the
    L{haraka_tw.spf.Outcome}s, for policy plugins; C{transaction.notes["spf_mail_result"]}
    Haraka's result name.

Nothing is refused unless spf.ini says so (as in Haraka): C{[deny] mfrom_fail=true}
refuses a sender whose domain's record fails the client (C{550 5.7.23}, with the domain's
explanation when it gives one), C{[defer] mfrom_temperror=true} defers on a DNS failure
(C{451 4.7.24}), and so on; C{helo_*} keys judge the null sender by its HELO result.
Relaying clients are judged by C{[deny_relay]}/C{[defer_relay]} instead.

Not checked: clients on private addresses (unless relaying with C{[relay]
context=myself}), relaying or authenticated clients with C{[skip] relaying} or C{auth}, a
greeting that is an address literal. With C{context=myself}, a relaying client that does
not pass is checked again as this server (C{smtp.ini [main] public_ip}), as the mail will
leave from there.

Where Haraka's plugin falls short, this one does not: the checker passes every case of the
RFC 7208 test suite (Haraka's misses the void-lookup limit, sums no lookups across
includes, ignores an include's qualifier, reads C{%{d2}} from the wrong end, has no
C{exp=}); a lookup past C{lookup_timeout} is a temperror, not a silent pass; the
Received-SPF field is well formed; the HELO check does not hold up the greeting.

spf.ini::

    [main]
    lookup_timeout=29       ; seconds for one check (kept under the hook's limit)

    [relay]
    context=sender          ; or myself

    [skip]
    relaying=false
    auth=false

    [deny]                  ; refuse on these results (mfrom_: the sender's domain,
    mfrom_fail=false        ; helo_: the greeting's, for the null sender)
    mfrom_softfail=false
    mfrom_none=false
    mfrom_permerror=false
    helo_fail=false
    helo_softfail=false
    helo_none=false
    helo_permerror=false
    openspf_text=false      ; refuse with a link explaining SPF instead of a text

    [defer]
    mfrom_temperror=false
    helo_temperror=false

    [deny_relay] and [defer_relay]: the same keys, for relaying clients
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw import spf
from haraka_tw.codes import CONT, DENY, DENYSOFT, Code
from haraka_tw.config.formats import ini_number
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import (
    IDisconnectHook,
    IEhloHook,
    IHeloHook,
    IMailHook,
    IPluginContext,
    IRegistration,
)
from haraka_tw.logging import Level
from haraka_tw.message.header import auth_results_value, comment_text
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection
from haraka_tw.smtp.replies import Reply

__all__ = ["HARAKA_NAMES", "Plugin", "received_spf"]

#: RFC 7208's result words as Haraka's results and notes spell them
HARAKA_NAMES = {
    spf.PASS: "Pass",
    spf.FAIL: "Fail",
    spf.SOFTFAIL: "SoftFail",
    spf.NEUTRAL: "Neutral",
    spf.NONE: "None",
    spf.TEMPERROR: "TempError",
    spf.PERMERROR: "PermError",
}
_DENIABLE = (spf.NONE, spf.SOFTFAIL, spf.FAIL, spf.PERMERROR)
_SCOPES = ("helo", "mfrom")
BOOLEANS = [
    "-skip.relaying",
    "-skip.auth",
    *(
        f"-{section}.{scope}_{result}"
        for section in ("deny", "deny_relay")
        for scope in _SCOPES
        for result in _DENIABLE
    ),
    *(f"-{section}.{scope}_temperror" for section in ("defer", "defer_relay") for scope in _SCOPES),
    "-deny.openspf_text",
    "-deny_relay.openspf_text",
]
_LITERAL = re.compile(r"^\[[^\]]*\]$")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+\Z")  # an RFC 2045 token
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*\Z")
_REPLY_UNSAFE = re.compile(r"[^ -~]")
_EXPLANATION_MOST = 200
_WHY = "http://www.open-spf.org/Why"


@dataclass
class _HeloCheck:
    """The check of the name a client greeted with: under way, then its outcome."""

    host: str
    running: Deferred[spf.Outcome]
    outcome: spf.Outcome | None = None


_HELO_CHECK = "spf_helo_check"  # connection note: the _HeloCheck


@dataclass(frozen=True)
class Policy:
    """What to refuse (C{"mfrom_fail"}, ...) and defer (C{"helo_temperror"}, ...)."""

    deny: frozenset[str] = frozenset()
    defer: frozenset[str] = frozenset()
    openspf_text: bool = False


@dataclass(frozen=True)
class Settings:
    """spf.ini (and smtp.ini public_ip), as read."""

    lookup_timeout: float = 29.0
    context: str = "sender"
    skip_relaying: bool = False
    skip_auth: bool = False
    policy: Policy = Policy()
    relay_policy: Policy = Policy()
    public_ip: str | None = None


def _policy(ini: Any, deny: str, defer: str) -> Policy:
    denied = ini.get(deny, {})
    deferred = ini.get(defer, {})
    return Policy(
        deny=frozenset(f"{s}_{r}" for s in _SCOPES for r in _DENIABLE if denied.get(f"{s}_{r}")),
        defer=frozenset(f"{s}_temperror" for s in _SCOPES if deferred.get(f"{s}_temperror")),
        openspf_text=bool(denied.get("openspf_text")),
    )


def _value(text: str) -> str:
    """A Received-SPF value: a dot-atom as it is, anything else a quoted-string."""
    if _DOT_ATOM.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(outcome: spf.Outcome, receiver: str, identity: str, ip: str) -> str:
    who = f"domain of {identity}"
    text = {
        spf.PASS: f"{who} designates {ip} as permitted sender",
        spf.FAIL: f"{who} does not designate {ip} as permitted sender",
        spf.SOFTFAIL: f"transitioning {who} does not designate {ip} as permitted sender",
        spf.NEUTRAL: f"{ip} is neither permitted nor denied by {who}",
        spf.NONE: f"{who} does not designate permitted sender hosts",
        spf.TEMPERROR: f"error in processing during lookup of {who}",
        spf.PERMERROR: f"permanent error in processing {who}",
    }[outcome.result]
    return comment_text(f"{receiver}: {text}")


def received_spf(
    outcome: spf.Outcome,
    *,
    scope: str,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
) -> str:
    """The value of a Received-SPF field (RFC 7208 9.1) for one identity's outcome.

    C{scope} is C{helo} or C{mailfrom}; C{sender} the envelope sender (empty for <>).
    Every value a client or a DNS record chose is quoted or stripped to fit."""
    identity = sender if scope == "mailfrom" and sender else f"postmaster@{outcome.domain}"
    pairs = [
        f"client-ip={_value(ip)}",  # (an IPv6 address is quoted)
        f"envelope-from={_value(sender)}",
        f"helo={_value(helo)}",
        f"receiver={_value(receiver)}",
        f"identity={scope}",
    ]
    if outcome.mechanism and outcome.mechanism != "default":
        pairs.append(f"mechanism={_value(_REPLY_UNSAFE.sub('', outcome.mechanism))}")
    if outcome.problem and outcome.result in (spf.TEMPERROR, spf.PERMERROR):
        pairs.append(f"problem={_value(_REPLY_UNSAFE.sub('', outcome.problem))}")
    comment = _comment(outcome, receiver, identity, ip)
    return f"{outcome.result} ({comment})\n\t" + ";\n\t".join(pairs) + ";"


@implementer(IRegistration, IHeloHook, IEhloHook, IMailHook, IDisconnectHook)
class Plugin:
    name = "spf"

    def __init__(self) -> None:
        self.settings = Settings()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.clock = context.reactor
        self.resolver = context.resolver
        self.load()
        context.config.on_change("spf.ini", self.load)
        context.config.on_change("smtp.ini", self.load)

    def load(self) -> None:
        """(Re)read spf.ini; a bad value raises, naming it, and changes nothing."""
        name = "spf.ini"
        ini = self.config.get_ini(name, booleans=BOOLEANS)
        main = ini["main"]
        timeout = ini_number(main, "lookup_timeout", 29, zero_ok=False, where=f"{name} [main]")
        context = str(ini.get("relay", {}).get("context") or "sender").strip().lower()
        if context not in ("sender", "myself"):
            raise ValueError(f"{name} [relay] context must be sender or myself, not {context!r}")
        public_ip = str(self.config.get_ini("smtp.ini")["main"].get("public_ip") or "").strip()
        if public_ip:
            try:
                public_ip = str(ipaddress.ip_address(public_ip))
            except ValueError:
                raise ValueError(
                    f"smtp.ini [main] public_ip: {public_ip!r} is no address"
                ) from None
        self.settings = Settings(
            lookup_timeout=float(timeout),
            context=context,
            skip_relaying=bool(ini["skip"]["relaying"]),
            skip_auth=bool(ini["skip"]["auth"]),
            policy=_policy(ini, "deny", "defer"),
            relay_policy=_policy(ini, "deny_relay", "defer_relay"),
            public_ip=public_ip or None,
        )

    def _checker(self, connection: Connection) -> spf.Checker:
        return spf.Checker(self.resolver, receiver=self._receiver(connection), clock=self.clock)

    @staticmethod
    def _receiver(connection: Connection) -> str:
        return connection.local.host or "unknown"

    def _skip(self, connection: Connection, *, helo: bool = False) -> str | None:
        """Why this client is not checked, or None. A relaying client on a private
        address is checked at MAIL with C{context=myself}, as this server."""
        settings = self.settings
        if not connection.remote.ip:  # (a unix socket listener)
            return "no_ip"
        if settings.skip_relaying and connection.relaying:
            return "relay"
        if settings.skip_auth and connection.notes.get("auth_user"):
            return "auth"
        if connection.remote.is_private and (
            helo or not (connection.relaying and settings.context == "myself")
        ):
            return "private_ip"
        return None

    def _deadline(self) -> float:
        """Seconds for one identity's check: lookup_timeout, under the hook's limit."""
        return under_hook_limit(self.config, self.name, self.settings.lookup_timeout)

    # -- HELO ---------------------------------------------------------------------------

    def hook_helo(self, connection: Connection, host: str) -> Code:
        """Start checking the HELO identity; the greeting is answered at once."""
        return self._greeted(connection, host)

    def hook_ehlo(self, connection: Connection, host: str) -> Code:
        """Start checking the HELO identity; the greeting is answered at once."""
        return self._greeted(connection, host)

    def hook_disconnect(self, connection: Connection) -> Code:
        """Stop a HELO check still under way: nobody will read it."""
        self._forget_helo(connection)
        return CONT

    def _greeted(self, connection: Connection, host: str) -> Code:
        """Check the HELO identity in the background (MAIL FROM waits for it if it
        must). An EHLO repeating the name (after STARTTLS) keeps the check made; another
        name stops it and starts another: one check at a time per connection."""
        previous = connection.notes.get(_HELO_CHECK)
        if previous is not None and previous.host == host:
            return CONT
        self._forget_helo(connection)
        skip = self._skip(connection, helo=True)
        if skip is not None:
            connection.results.add(self.name, skip=f"helo({skip})")
            return CONT
        if _LITERAL.match(host):
            connection.results.add(self.name, skip="helo(ip_literal)")
            return CONT
        check = self._checker(connection).check_host(connection.remote.ip, host, "", host)

        def timed_out(_: object, timeout: float) -> spf.Outcome:
            return spf.Outcome(spf.TEMPERROR, host, problem=f"lookups took over {timeout:g} s")

        def checked(outcome: spf.Outcome) -> spf.Outcome:
            helo.outcome = outcome
            connection.notes["spf_helo"] = outcome
            connection.results.add(
                self.name, scope="helo", result=HARAKA_NAMES[outcome.result], domain=host
            )
            if outcome.result == spf.PASS:
                connection.results.add(self.name, **{"pass": host})
            self._log(connection, "helo", outcome, f"postmaster@{host}")
            return outcome

        helo = _HeloCheck(host, check)
        connection.notes[_HELO_CHECK] = helo
        check.addTimeout(self._deadline(), self.clock, onTimeoutCancel=timed_out)
        check.addCallback(checked).addErrback(self._crashed, connection)
        return CONT

    @staticmethod
    def _forget_helo(connection: Connection) -> None:
        """Cancel the HELO check (if still under way) and forget its outcome."""
        previous = connection.notes.pop(_HELO_CHECK, None)
        connection.notes.pop("spf_helo", None)
        if previous is not None:
            previous.running.cancel()

    def _helo_outcome(self, connection: Connection) -> Deferred[spf.Outcome | None] | None:
        """The HELO identity's outcome, when the name greeted with is being checked
        (waiting for it if still under way); None when it is not."""
        helo = connection.notes.get(_HELO_CHECK)
        if helo is None or helo.host != connection.hello.host:
            return None
        done: Deferred[spf.Outcome | None] = Deferred()

        def finished(result: object) -> object:
            done.callback(helo.outcome)
            return result

        helo.running.addBoth(finished)
        return done

    # -- MAIL ---------------------------------------------------------------------------

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> Code | Deferred[Any]:
        """Check the sender's domain (for <>, take the HELO name's outcome); record,
        and refuse or defer as spf.ini says."""
        txn = connection.transaction
        if txn is None:
            return CONT
        skip = self._skip(connection)
        if skip is not None:
            txn.results.add(self.name, skip=f"host({skip})")
            return CONT
        if sender.is_null:
            helo = self._helo_outcome(connection)
            if helo is None:
                txn.results.add(self.name, skip="host(no_helo)")
                return CONT
            return helo.addCallback(self._judge_null_sender, connection)
        domain, address = sender.domain, sender.address
        check = self._check_sender(connection, domain, address)
        helo = self._helo_outcome(connection)
        if helo is not None:  # (its Received-SPF goes in too: wait for it, if still out)
            check.addCallback(lambda checked: helo.addCallback(lambda _: checked))
        return check.addCallback(self._judge_sender, connection, address)

    def _check_sender(self, connection: Connection, domain: str, address: str) -> Deferred[Any]:
        """The MAIL FROM identity's outcome and the address checked, within one
        lookup_timeout (a second check as this server included)."""
        helo = connection.hello.host or ""
        ip = connection.remote.ip
        public_ip = self.settings.public_ip
        as_myself = connection.relaying and self.settings.context == "myself"
        checker = self._checker(connection)

        async def check() -> tuple[spf.Outcome, str]:
            outcome = await checker.check_host(ip, domain, address, helo)
            if not as_myself or outcome.result not in (spf.FAIL, spf.SOFTFAIL, spf.NEUTRAL):
                return outcome, ip
            if public_ip is None:
                self.log.warn("[relay] context=myself, but smtp.ini [main] public_ip is unset")
                return outcome, ip
            return await checker.check_host(public_ip, domain, address, helo), public_ip

        def timed_out(_: object, timeout: float) -> tuple[spf.Outcome, str]:
            problem = f"lookups took over {timeout:g} s"
            return spf.Outcome(spf.TEMPERROR, domain, problem=problem), ip

        checking = Deferred.fromCoroutine(check())
        return checking.addTimeout(self._deadline(), self.clock, onTimeoutCancel=timed_out)

    def _judge_sender(self, checked: Any, connection: Connection, address: str) -> Any:
        outcome, ip = checked
        txn = connection.transaction
        if txn is None:
            return CONT
        txn.notes["spf"] = outcome
        txn.notes["spf_mail_result"] = HARAKA_NAMES[outcome.result]
        txn.results.add(
            self.name, scope="mfrom", result=HARAKA_NAMES[outcome.result], domain=outcome.domain
        )
        if outcome.result == spf.PASS:
            txn.results.add(self.name, **{"pass": outcome.domain})
        self._add_fields(connection, address, (outcome, ip))
        txn.auth_results(f"spf={outcome.result} smtp.mailfrom={auth_results_value(outcome.domain)}")
        self._log(connection, "mfrom", outcome, address)
        return self._answer(connection, "mfrom", outcome, f"sender <{address}>", address)

    def _judge_null_sender(self, outcome: spf.Outcome | None, connection: Connection) -> Any:
        txn = connection.transaction
        if txn is None:
            return CONT
        if outcome is None:
            txn.results.add(self.name, skip="host(no_helo)")
            return CONT
        helo = connection.hello.host or ""
        txn.notes["spf"] = outcome
        txn.notes["spf_mail_result"] = HARAKA_NAMES[outcome.result]
        self._add_fields(connection, "", None)
        txn.auth_results(f"spf={outcome.result} smtp.helo={auth_results_value(helo)}")
        return self._answer(connection, "helo", outcome, f"sender <> via {helo}", helo)

    def _add_fields(
        self, connection: Connection, sender: str, mailfrom: tuple[spf.Outcome, str] | None
    ) -> None:
        """Received-SPF for the HELO identity (when checked), then for MAIL FROM (its
        outcome and the address checked) above it."""
        txn = connection.transaction
        assert txn is not None
        helo = connection.hello.host or ""
        receiver = self._receiver(connection)
        checked = connection.notes.get(_HELO_CHECK)
        if checked is not None and checked.host == helo and checked.outcome is not None:
            value = received_spf(
                checked.outcome,
                scope="helo",
                ip=connection.remote.ip,
                sender=sender,
                helo=helo,
                receiver=receiver,
            )
            txn.add_leading_header("Received-SPF", value)
        if mailfrom is not None:
            outcome, ip = mailfrom
            value = received_spf(
                outcome, scope="mailfrom", ip=ip, sender=sender, helo=helo, receiver=receiver
            )
            txn.add_leading_header("Received-SPF", value)

    def _answer(
        self, connection: Connection, scope: str, outcome: spf.Outcome, who: str, identity: str
    ) -> Any:
        """Refuse or defer as the policy says for this scope and result; else CONT."""
        policy = self.settings.relay_policy if connection.relaying else self.settings.policy
        key = f"{scope}_{outcome.result}"
        if outcome.result == spf.TEMPERROR:
            if key in policy.defer:
                return DENYSOFT, Reply(451, "4.7.24", (f"{who} SPF Temporary Error",))
            return CONT
        if key not in policy.deny:
            return CONT
        if outcome.result == spf.PERMERROR:
            return DENY, Reply(550, "5.7.24", (f"{who} SPF Permanent Error",))
        if policy.openspf_text:
            why = (
                f"{_WHY}?s={scope}&id={quote(identity, safe='@')}"
                f"&ip={quote(connection.remote.ip, safe='')}"
            )
            return DENY, Reply(550, "5.7.23", (why,))
        words = {spf.NONE: "SPF record not found", spf.SOFTFAIL: "SPF SoftFail"}
        lines = [f"{who} {words.get(outcome.result, 'SPF Fail')}"]
        explanation = _REPLY_UNSAFE.sub("", outcome.explanation)[:_EXPLANATION_MOST].strip()
        if explanation:
            lines.append(explanation)
        return DENY, Reply(550, "5.7.23", tuple(lines))

    def _log(self, connection: Connection, scope: str, outcome: spf.Outcome, who: str) -> None:
        problem = f" problem={outcome.problem!r}" if outcome.problem else ""
        connection.log(
            Level.INFO,
            f"identity={scope} ip={connection.remote.ip} domain={outcome.domain!r} "
            f"mfrom=<{who}> result={HARAKA_NAMES[outcome.result]}{problem}",
            origin=self.name,
        )

    def _crashed(self, failure: Failure, connection: Connection) -> None:
        if failure.check(CancelledError):  # (a new greeting, or the client gone)
            return
        connection.log(Level.ERROR, f"HELO check failed: {failure.value!r}", origin=self.name)
