"""headers: check a message's header once it is in (data_post).

Each check records C{pass}/C{fail}/C{msg} under C{transaction.results['headers']} with
Haraka's labels; the ones that can refuse do so with C{550} only when their C{[reject]}
key is on (only C{delivered_to} is on by default). In order:

- C{duplicate_singular}: a field of C{singular} appears more than once;
- C{missing_required}: a field of C{required} is missing;
- C{invalid_return_path}: a relaying client's message has a Return-Path (RFC 5321 4.4:
  the final delivery adds it); on inbound mail any Return-Path is removed instead;
- C{invalid_date}: the Date is more than C{date_future_days} ahead or C{date_past_days}
  behind, or is no date at all (Haraka lets an unparsable Date pass);
- C{user_agent}: records the mail program (User-Agent, X-Mailer, ...); never refuses;
- C{direct_to_mx}: fewer than two Received fields (this server's own included) from a
  client that did not log in; never refuses;
- C{from_match}: the envelope sender against the From address; never refuses;
- C{delivered_to}: a Delivered-To field names one of the recipients (a mail loop);
- C{mailing_list}: records the mailing list software; never refuses;
- C{from_phish}: the From field names a brand of C{[phish_targets]} (look-alike digits
  read as letters) but is not from its domain, no DKIM signature of that domain passed
  (the dkim plugin, listed above this one) and the envelope sender is not of that domain
  with an SPF pass (the spf plugin).

headers.ini::

    required=From,Date
    singular=Date,From,Sender,Reply-To,To,Cc,Bcc,Message-Id,In-Reply-To,References,Subject
    date_future_days=2
    date_past_days=15

    [check]
    ; each check on (true) or off
    [reject]
    ; refuse the message when the check fails
    [phish_targets]
    ; brand=its domain, e.g. paypal=paypal.com
"""

from __future__ import annotations

import re
import time
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, Code
from haraka_tw.config.formats import ini_number
from haraka_tw.interfaces import IDataPostHook, IPluginContext, IRegistration
from haraka_tw.plugins.helo.checks import organizational_domain
from haraka_tw.smtp.connection import Connection, Transaction

__all__ = ["CHECKS", "Plugin"]

CHECKS = (
    "duplicate_singular",
    "missing_required",
    "invalid_return_path",
    "invalid_date",
    "user_agent",
    "direct_to_mx",
    "from_match",
    "delivered_to",
    "mailing_list",
    "from_phish",
)
_REJECTING = (
    "duplicate_singular",
    "missing_required",
    "invalid_return_path",
    "invalid_date",
    "delivered_to",
    "from_phish",
)
_SINGULAR = "Date,From,Sender,Reply-To,To,Cc,Bcc,Message-Id,In-Reply-To,References,Subject"
_AGENTS = ("User-Agent", "X-Mailer", "X-MUA", "X-Yahoo-Newman-Property", "X-MS-Has-Attach")
# Digits and signs that stand in for letters; 1 and | pass for either i or l.
_LOOKALIKES = (str.maketrans("013457$8)|", "oieastsbgi"), str.maketrans("013457$8)|", "oleastsbgl"))
_DAY = 24 * 3600

_Answer = Code | tuple[Code, Any]


def _names(raw: object) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    return [n.strip() for item in items for n in str(item).split(",") if n.strip()]


def _first_address(value: str) -> str | None:
    for _, address in getaddresses([value]):
        if "@" in address:
            return address
    return None


@implementer(IRegistration, IDataPostHook)
class Plugin:
    name = "headers"

    def __init__(self) -> None:
        self.check = dict.fromkeys(CHECKS, True)
        self.reject = {c: c == "delivered_to" for c in CHECKS}
        self.required = ["From", "Date"]
        self.singular = _names(_SINGULAR)
        self.future_days = 2.0
        self.past_days = 15.0
        self.phish: list[tuple[str, re.Pattern[str], str]] = []

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.load()
        context.config.on_change("headers.ini", self.load)

    def load(self) -> None:
        """(Re)read headers.ini; a bad number raises, naming the file, and changes nothing."""
        name = "headers.ini"
        ini = self.config.get_ini(
            name,
            booleans=[f"+check.{c}" for c in CHECKS]
            + [f"{'+' if c == 'delivered_to' else '-'}reject.{c}" for c in _REJECTING],
        )
        main = ini["main"]
        where = f"{name} [main]"
        future = ini_number(main, "date_future_days", 2, zero_ok=True, where=where)
        past = ini_number(main, "date_past_days", 15, zero_ok=True, where=where)
        phish = []
        for brand, domain in ini.get("phish_targets", {}).items():
            word = brand.lower().translate(_LOOKALIKES[1])
            pattern = re.compile(rf"\b{re.escape(word)}\b")
            phish.append((brand.lower(), pattern, str(domain).strip().lower()))
        self.check = {c: bool(ini["check"][c]) for c in CHECKS}
        self.reject = {c: bool(ini["reject"].get(c, False)) for c in CHECKS}
        self.required = _names(main.get("required", "From,Date"))
        self.singular = _names(main.get("singular", _SINGULAR))
        self.future_days = future
        self.past_days = past
        self.phish = phish

    def hook_data_post(self, connection: Connection) -> _Answer:
        transaction = connection.transaction
        if transaction is None:
            return CONT
        for check in CHECKS:
            if self.check[check]:
                outcome: _Answer = getattr(self, check)(connection, transaction)
                if outcome != CONT:
                    return outcome
        return CONT

    # -- helpers ------------------------------------------------------------------------

    def _passed(self, transaction: Transaction, label: str) -> _Answer:
        transaction.results.add(self.name, **{"pass": label})
        return CONT

    def _failed(self, transaction: Transaction, check: str, label: str, text: str) -> _Answer:
        transaction.results.add(self.name, fail=label)
        if self.reject[check]:
            return DENY, text
        return CONT

    # -- the checks ---------------------------------------------------------------------

    def duplicate_singular(self, connection: Connection, transaction: Transaction) -> _Answer:
        repeated = [n for n in self.singular if transaction.header.count(n) > 1]
        if not repeated:
            return self._passed(transaction, "duplicate")
        for name in repeated[1:]:
            transaction.results.add(self.name, fail=f"duplicate:{name}")
        text = f"Only one {repeated[0]} header allowed. See RFC 5322, Section 3.6"
        return self._failed(transaction, "duplicate_singular", f"duplicate:{repeated[0]}", text)

    def missing_required(self, connection: Connection, transaction: Transaction) -> _Answer:
        missing = [n for n in self.required if transaction.header.count(n) == 0]
        if not missing:
            return self._passed(transaction, "missing")
        for name in missing[1:]:
            transaction.results.add(self.name, fail=f"missing:{name}")
        text = f"Required header '{missing[0]}' missing"
        return self._failed(transaction, "missing_required", f"missing:{missing[0]}", text)

    def invalid_return_path(self, connection: Connection, transaction: Transaction) -> _Answer:
        if transaction.header.count("Return-Path") == 0:
            return self._passed(transaction, "Return-Path")
        if connection.relaying:
            text = "outgoing mail must not have a Return-Path header (RFC 5321)"
            return self._failed(transaction, "invalid_return_path", "Return-Path", text)
        transaction.remove_header("Return-Path")  # the final delivery adds its own
        return self._passed(transaction, "Return-Path")

    def invalid_date(self, connection: Connection, transaction: Transaction) -> _Answer:
        values = transaction.header.get_all("Date")
        if not values:
            return CONT  # missing_required's business
        try:
            when = parsedate_to_datetime(values[0].strip()).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            text = "The Date header is not a valid date"
            return self._failed(transaction, "invalid_date", "invalid_date(unparsable)", text)
        now = time.time()
        if self.future_days > 0 and when > now + self.future_days * _DAY:
            text = "The Date header is too far in the future"
            return self._failed(transaction, "invalid_date", "invalid_date(future)", text)
        if self.past_days > 0 and when < now - self.past_days * _DAY:
            text = "The Date header is too old"
            return self._failed(transaction, "invalid_date", "invalid_date(past)", text)
        return self._passed(transaction, "invalid_date")

    def user_agent(self, connection: Connection, transaction: Transaction) -> _Answer:
        found = False
        for name in _AGENTS:
            for value in transaction.header.get_all(name):
                transaction.results.add(self.name, **{"pass": f"UA({value.strip()[:12]})"})
                found = True
        if not found:
            transaction.results.add(self.name, fail="UA")
        return CONT

    def direct_to_mx(self, connection: Connection, transaction: Transaction) -> _Answer:
        if connection.notes.get("auth_user"):
            transaction.results.add(self.name, skip="direct-to-mx(auth)")
            return CONT
        count = transaction.header.count("Received")
        if count < 2:
            transaction.results.add(self.name, fail=f"direct-to-mx(too few Received({count}))")
        else:
            transaction.results.add(self.name, **{"pass": f"direct-to-mx({count})"})
        return CONT

    def from_match(self, connection: Connection, transaction: Transaction) -> _Answer:
        value = transaction.header.get_decoded("From")
        if not value:
            transaction.results.add(self.name, fail="from_match(missing)")
            return CONT
        header_address = _first_address(value)
        if header_address is None:
            transaction.results.add(self.name, fail="from_match(unparsable)")
            return CONT
        sender = transaction.mail_from
        envelope = sender.address if sender is not None and not sender.is_null else ""
        if envelope and envelope.lower() == header_address.lower():
            return self._passed(transaction, "from_match")
        envelope_domain = organizational_domain(envelope.rpartition("@")[2]) or "null"
        header_domain = organizational_domain(header_address.rpartition("@")[2]) or "null"
        if envelope and envelope_domain == header_domain:
            return self._passed(transaction, "from_match(domain)")
        transaction.results.add(self.name, fail=f"from_match({envelope_domain} / {header_domain})")
        return CONT

    def delivered_to(self, connection: Connection, transaction: Transaction) -> _Answer:
        values = transaction.header.get_all("Delivered-To")
        if not values:
            return CONT
        named = {a.lower() for _, a in getaddresses(values) if a}
        if not any(r.address.lower() in named for r in transaction.rcpt_to):
            return CONT
        return self._failed(
            transaction, "delivered_to", "delivered_to", "Invalid Delivered-To header content"
        )

    def mailing_list(self, connection: Connection, transaction: Transaction) -> _Answer:
        header = transaction.header
        found = []
        software = header.get("Mailing-List").lower()
        found += [n for n in ("ezmlm", "yahoogroups", "googlegroups") if n in software]
        sender = header.get("Sender")
        if (_first_address(sender) or sender).strip().lower().startswith("owner-"):
            found.append("majordomo")
        if header.count("X-Mailman-Version"):
            found.append("mailman")
        if header.count("X-Majordomo-Version"):
            found.append("majordomo")
        if header.count("X-Google-Loop"):
            found.append("googlegroups")
        for name in dict.fromkeys(found):
            transaction.results.add(self.name, **{"pass": f"MLM({name})"})
        if not found:
            transaction.results.add(self.name, msg="not MLM")
        return CONT

    def from_phish(self, connection: Connection, transaction: Transaction) -> _Answer:
        value = transaction.header.get_decoded("From")
        if not value:
            transaction.results.add(self.name, skip="from_phish(missing)")
            return CONT
        address = _first_address(value)
        from_domain = (address or "").rpartition("@")[2].lower().rstrip(".")
        seen = [value.lower().translate(table) for table in _LOOKALIKES]
        for brand, pattern, domain in self.phish:
            if not any(pattern.search(text) for text in seen):
                continue
            if from_domain == domain or from_domain.endswith("." + domain):
                continue
            if _dkim_passed(transaction, domain) or _spf_passed(transaction, domain):
                continue
            transaction.results.add(
                self.name,
                msg=f"'{brand}' found when domain is '{from_domain}' instead of '{domain}'",
            )
            text = f"Phishing message appears to impersonate {domain}"
            return self._failed(transaction, "from_phish", f"from_phish({brand})", text)
        return self._passed(transaction, "from_phish")


def _spf_passed(transaction: Transaction, domain: str) -> bool:
    """Whether the envelope sender's domain is C{domain} (or under it) and passed SPF:
    the mail came from a host the brand names as its own. From the spf plugin's notes."""
    if transaction.mail_from is None or transaction.mail_from.is_null:
        return False  # (for <>, the outcome is the HELO name's)
    outcome = transaction.notes.get("spf")
    signer = str(getattr(outcome, "domain", ""))
    return getattr(outcome, "result", None) == "pass" and (
        signer == domain or signer.endswith("." + domain)
    )


def _dkim_passed(transaction: Transaction, domain: str) -> bool:
    """Whether a DKIM signature of C{domain} or a subdomain passed and vouches for the
    From field: every From signed (one added above a genuine signed message is not),
    the whole body signed (no l=), the key not in testing mode. From the dkim plugin's
    notes, there when it ran before this plugin at data_post."""
    for result in transaction.notes.get("dkim_results") or ():
        signer = str(result.get("domain", ""))
        if signer != domain and not signer.endswith("." + domain):
            continue
        trusted = result.get("from_signed") and result.get("length") is None
        if result.get("result") == "pass" and trusted and not result.get("testing"):
            return True
    return False
