"""bounce: check inbound bounces (mail from the null sender, C{<>}) against backscatter.

Haraka's C{bounce}, reading its bounce.ini. A bounce answers mail we sent, so:

  - C{single_recipient} (at DATA): a bounce goes to one address, the sender it answers;
  - C{bad_rcpt} (at RCPT): addresses in C{bounce_bad_rcpt} never send mail, so never get
    bounces (C{noreply@...});
  - C{empty_return_path} (at data_post): a bounce has no Return-Path, or C{<>} (RFC 3834);
  - C{non_local_msgid} (at data_post): the message it returns (a message/rfc822 part, a
    text/rfc822-headers part, or quoted text) has a Message-ID in one of our domains:
    C{host_list}, C{bounce_allowed_msgid_domains}, or the recipient's own;
  - C{bounce_spf} (at data_post): one of the Received fields of the message it returns
    names an address that the recipient's domain's SPF record allows to send for it (the
    message really left from here), checked in order until one passes or the record
    cannot say (none, temperror, permerror);
  - C{reject.all_bounces} (at MAIL): refuse every bounce.

Each check records C{pass}/C{fail}/C{skip} in C{transaction.results["bounce"]}, and
refuses only when its C{[reject]} key is on. Relaying clients' mail is not checked.

Done otherwise than Haraka's plugin: a null sender is recognised (Haraka 2.1's test of it
fails with the current address parser, so no check runs at all); a Return-Path of C{<>}
passes (Haraka compares with the line end and fails it); C{non_local_msgid}, dropped from
Haraka 2.0, is back, reading the returned message's own header as well as its text; the
Received fields of a returned message are read wherever they are, in any case; at most
C{MAX_HOPS} addresses are checked with SPF, within one time limit. Haraka's
C{hash_validation} (an HMAC header on outgoing mail, checked on bounces) is not here.

bounce.ini::

    [check]                       ; run the check (a [reject] key turns its check on)
    single_recipient=true
    empty_return_path=false
    bounce_spf=true
    non_local_msgid=true
    [reject]
    single_recipient=true
    empty_return_path=false
    bounce_spf=false
    non_local_msgid=false
    bad_rcpt=true
    all_bounces=false
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from haraka_tw import spf
from haraka_tw.codes import CONT, DENY, Code
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import (
    IDataHook,
    IDataPostHook,
    IMailHook,
    IPluginContext,
    IRcptOkHook,
    IRegistration,
)
from haraka_tw.message.part import Body, PartKind
from haraka_tw.plugins.rcpt_to.host_list_base import HostList, ascii_form
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection, Transaction
from haraka_tw.smtp.replies import Reply

__all__ = ["MAX_HOPS", "Plugin", "message_ids", "relay_addresses"]

MAX_HOPS = 10  # addresses of a returned message checked with SPF
_CHECK_DEFAULTS = {
    "single_recipient": True,
    "empty_return_path": False,
    "bounce_spf": True,
    "non_local_msgid": True,
}
_REJECT_DEFAULTS = {
    "single_recipient": True,
    "empty_return_path": False,
    "bounce_spf": False,
    "non_local_msgid": False,
    "bad_rcpt": True,
    "all_bounces": False,
}
BOOLEANS = [
    *(f"{'+' if on else '-'}check.{key}" for key, on in _CHECK_DEFAULTS.items()),
    "-check.reject_all",
    *(f"{'+' if on else '-'}reject.{key}" for key, on in _REJECT_DEFAULTS.items()),
]
_FIELD = re.compile(r"^(received|message-id)[ \t]*:", re.IGNORECASE | re.ASCII)
_BRACKETED = re.compile(r"[\[(](?:IPv6:)?([0-9A-Fa-f:.]{7,45})[\])]", re.IGNORECASE)
_MSGID = re.compile(r"<[^<>@\s]+@([^<>@\s]+)>")


def _fields_in_text(text: str) -> Iterator[tuple[str, str]]:
    """(lower-case name, unfolded value) of the Received and Message-ID fields in a
    returned message's text: lines that start a field, and the lines folded under them."""
    name, value = "", ""
    for line in text.splitlines():
        if name and line[:1] in (" ", "\t"):
            value += " " + line.strip()
            continue
        if name:
            yield name, value
            name = ""
        match = _FIELD.match(line)
        if match:
            name = match.group(1).lower()
            value = line[match.end() :].strip()
    if name:
        yield name, value


def _returned_fields(body: Body | None) -> Iterator[tuple[str, str]]:
    """The Received and Message-ID fields of the message a bounce returns, wherever it
    is: the header of an embedded message (message/rfc822), and the text of the parts
    (text/rfc822-headers, or the original quoted in the text)."""
    if body is None:
        return
    for part in body.walk():
        if part.parent is not None and part.parent.kind is PartKind.MESSAGE:
            for name in ("received", "message-id"):
                for value in part.header.get_all(name):
                    yield name, value
        if part.kind is PartKind.TEXT and part.bodytext:
            yield from _fields_in_text(part.bodytext)


def _returned_as_attachment(body: Body | None) -> bool:
    """Whether the bounce carries the returned message as an attachment (not read)."""
    return body is not None and any(
        part.kind is PartKind.ATTACHMENT
        and (part.content_type.startswith("message/") or part.content_type.endswith("-headers"))
        for part in body.walk()
    )


def message_ids(body: Body | None) -> list[str]:
    """The domains of the Message-IDs of the message a bounce returns, in order."""
    found = []
    for name, value in _returned_fields(body):
        if name == "message-id":
            found += [m.group(1).lower().rstrip(".") for m in _MSGID.finditer(value)]
    return list(dict.fromkeys(found))


def relay_addresses(body: Body | None) -> list[str]:
    """The public addresses the returned message's Received fields name (the first
    address in brackets or parentheses of each field), in order, each once."""
    found = []
    for name, value in _returned_fields(body):
        if name != "received":
            continue
        for match in _BRACKETED.finditer(value):
            try:
                address = ipaddress.ip_address(match.group(1))
            except ValueError:
                continue
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if address.is_global:
                found.append(str(address))
            break
    return list(dict.fromkeys(found))


@implementer(IRegistration, IMailHook, IRcptOkHook, IDataHook, IDataPostHook)
class Plugin:
    name = "bounce"

    def __init__(self) -> None:
        self.check: dict[str, bool] = dict(_CHECK_DEFAULTS)
        self.reject: dict[str, bool] = dict(_REJECT_DEFAULTS)
        self.bad_rcpt: frozenset[str] = frozenset()
        self.allowed_domains: frozenset[str] = frozenset()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.clock = context.reactor
        self.resolver = context.resolver
        self.local_domains = HostList(context.config, context.log)
        # before headers, which removes an inbound message's Return-Path (as Haraka's -5)
        context.set_priority("data_post", -5)
        self.load()
        for name in ("bounce.ini", "bounce_bad_rcpt", "bounce_allowed_msgid_domains"):
            context.config.on_change(name, self.load)

    def load(self) -> None:
        """(Re)read bounce.ini and the lists."""
        ini = self.config.get_ini("bounce.ini", booleans=BOOLEANS)
        check, reject = ini["check"], ini["reject"]
        self.reject = {key: bool(reject.get(key, on)) for key, on in _REJECT_DEFAULTS.items()}
        self.reject["all_bounces"] = self.reject["all_bounces"] or bool(check.get("reject_all"))
        self.check = {
            key: bool(check.get(key, on)) or self.reject.get(key, False)
            for key, on in _CHECK_DEFAULTS.items()
        }
        self.bad_rcpt = frozenset(a.lower() for a in self.config.get_list("bounce_bad_rcpt"))
        allowed = self.config.get_list("bounce_allowed_msgid_domains")
        self.allowed_domains = frozenset(ascii_form(d) for d in allowed)

    def _bounce(self, connection: Connection) -> Transaction | None:
        """The transaction, when it is a bounce to check (null sender, not relaying)."""
        txn = connection.transaction
        if txn is None or txn.mail_from is None or connection.relaying:
            return None
        return txn if txn.mail_from.is_null else None

    # -- MAIL, RCPT, DATA ---------------------------------------------------------------

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> Any:
        """Note whether this is a bounce; refuse it with C{reject.all_bounces}."""
        txn = self._bounce(connection)
        if connection.transaction is not None:
            connection.transaction.results.add(self.name, isa="yes" if sender.is_null else "no")
        if txn is None or not self.reject["all_bounces"]:
            return CONT
        txn.results.add(self.name, fail="bounces_accepted", msg="Bounces not accepted here")
        return DENY, Reply(550, "5.7.1", ("Bounces not accepted here",))

    def hook_rcpt_ok(self, connection: Connection, recipient: Address) -> Any:
        """Refuse a bounce to an address that sends no mail (bounce_bad_rcpt)."""
        txn = self._bounce(connection)
        if txn is None or not self.reject["bad_rcpt"] or not self.bad_rcpt:
            return CONT
        if recipient.address.lower() in self.bad_rcpt:
            txn.results.add(self.name, fail="bad_rcpt", msg="rcpt does not accept bounces")
            text = f"{recipient.address} does not accept bounces"
            return DENY, Reply(550, "5.7.1", (text,))
        txn.results.add(self.name, **{"pass": "bad_rcpt"})
        return CONT

    def hook_data(self, connection: Connection) -> Any:
        """A bounce has one recipient; the later checks need the body parsed."""
        txn = self._bounce(connection)
        if txn is None:
            return CONT
        if self.check["bounce_spf"] or self.check["non_local_msgid"]:
            txn.parse_body = True
        if not self.check["single_recipient"]:
            return CONT
        if len(txn.rcpt_to) == 1:
            txn.results.add(self.name, **{"pass": "single_recipient"})
            return CONT
        txn.results.add(self.name, fail="single_recipient", msg="too many recipients")
        if self.reject["single_recipient"]:
            text = "this bounce message has too many recipients"
            return DENY, Reply(554, "5.7.1", (text,))
        return CONT

    # -- the message --------------------------------------------------------------------

    def hook_data_post(self, connection: Connection) -> Any:
        """The Return-Path, the returned message's Message-ID, then SPF of its hops."""
        txn = self._bounce(connection)
        if txn is None:
            return CONT
        for check in (self._empty_return_path, self._non_local_msgid):
            answer = check(txn)
            if answer is not None:
                return answer
        if not self.check["bounce_spf"] or not txn.rcpt_to:
            return CONT
        checked = Deferred.fromCoroutine(self._bounce_spf(txn))

        def timed_out(_: object, timeout: float) -> Code:
            txn.results.add(self.name, skip="bounce_spf(timeout)")
            return CONT

        timeout = under_hook_limit(self.config, self.name, 29.0)
        return checked.addTimeout(timeout, self.clock, onTimeoutCancel=timed_out)

    def _empty_return_path(self, txn: Transaction) -> Any:
        if not self.check["empty_return_path"]:
            return None
        value = txn.header.get("Return-Path").strip()
        if value in ("", "<>"):
            txn.results.add(self.name, **{"pass": "empty_return_path"})
            return None
        txn.results.add(
            self.name, fail="empty_return_path", msg="bounce with non-empty Return-Path"
        )
        if self.reject["empty_return_path"]:
            text = "bounce with non-empty Return-Path (RFC 3834)"
            return DENY, Reply(550, "5.7.1", (text,))
        return None

    def _non_local_msgid(self, txn: Transaction) -> Any:
        if not self.check["non_local_msgid"] or txn.body is None:
            return None
        domains = message_ids(txn.body)
        if not domains and _returned_as_attachment(txn.body):
            txn.results.add(self.name, skip="Message-ID", msg="returned message is an attachment")
            return None
        if not domains:
            txn.results.add(self.name, fail="Message-ID")
            text = "bounce without Message-ID in headers, I didn't send it"
        else:
            own = {ascii_form(r.domain) for r in txn.rcpt_to}
            for domain in domains:
                local = ascii_form(domain)
                if local in self.allowed_domains or local in self.local_domains or local in own:
                    txn.results.add(self.name, **{"pass": "Message-ID valid domain"})
                    return None
            txn.results.add(self.name, fail="Message-ID non-local domain")
            text = "bounce Message-ID with non-local domain, I didn't send it"
        if self.reject["non_local_msgid"]:
            return DENY, Reply(550, "5.7.1", (text,))
        return None

    async def _bounce_spf(self, txn: Transaction) -> Any:
        addresses = relay_addresses(txn.body)
        cut = len(addresses) > MAX_HOPS
        addresses = addresses[:MAX_HOPS]
        if not addresses:
            txn.results.add(self.name, skip="bounce_spf", msg="no IP addresses found in message")
            return CONT
        recipient = txn.rcpt_to[0]
        checker = spf.Checker(self.resolver, clock=self.clock)
        for address in addresses:
            outcome = await checker.check_host(address, recipient.domain, recipient.address)
            if outcome.result == spf.PASS:
                txn.results.add(self.name, **{"pass": "bounce_spf"})
                return CONT
            if outcome.result in (spf.NONE, spf.TEMPERROR, spf.PERMERROR):
                txn.results.add(self.name, skip="bounce_spf", msg=f"SPF returned {outcome.result}")
                return CONT
        if cut:  # (our own hop may be among those not checked)
            txn.results.add(self.name, skip="bounce_spf", msg=f"more than {MAX_HOPS} hops")
            return CONT
        txn.results.add(self.name, fail="bounce_spf", msg="invalid bounce (spoofed sender)")
        if self.reject["bounce_spf"]:
            return DENY, Reply(550, "5.7.1", ("Invalid bounce (spoofed sender)",))
        return CONT
