"""access: allow and deny lists for clients, HELO names, senders and recipients.

Two modes, both on by default (access.ini C{[check]}), as in Haraka:

- precise, one pair of files per phase, a whitelist checked before its blacklist:
  - connect (C{conn}): C{connect.rdns_access.whitelist} / C{.blacklist} (the client's
    address, a network in CIDR form, or its reverse name) and their C{_regex} files; a
    blacklisted client gets C{554 <name> [<ip>] You are not allowed to connect} and is
    disconnected;
  - HELO (C{helo}, off by default): C{helo.checks.regexps}, a blacklist:
    C{550 <helo> That HELO is not allowed to connect};
  - MAIL (C{mail}): C{mail_from.access.*}: C{550 <address> That sender cannot send mail
    here};
  - RCPT (C{rcpt}): C{rcpt_to.access.*}: C{550 <address> That recipient is not allowed};
    with C{[rcpt] accept=true} a whitelisted recipient is accepted at once.
- any (C{any}): C{access.domains}, domains refused with their subdomains wherever they
  show up (the client's reverse name, HELO, the MAIL and RCPT domains, the From field at
  the end of DATA), and addresses; C{!domain} or C{!user@domain} lines are exceptions,
  which win. A hit gets C{You are not welcome here.} (at connect every later command gets
  the C{554}), or at the end of DATA C{550 Email from that domain is not accepted here.}

A whitelist hit only stops this plugin's own blacklist checks of that phase; it accepts
nothing by itself (but a recipient with C{rcpt.accept}). Plain lists match whole entries in
any case; C{_regex} lists match whole values (each line anchored), in any case. C{#} and
C{;} start a comment, on a line of its own or after a plain entry. C{[deny_msg]} replaces
the text after the address in each phase's refusal.

Differences from Haraka's plugin, on purpose (docs/plugins.md lists them): client lists
take CIDR networks and match IPv4-mapped clients; the address is judged before the reverse
name; a regex that does not compile is an ERROR naming its file and line;
C{access.domains} matches lines as written (not widened to a registered domain), can list
addresses, and its exceptions hold at the end of DATA too; a removed line stops matching
when the file is read again; switching a check on takes effect without a restart.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from email.utils import getaddresses
from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYDISCONNECT, OK, Code
from haraka_tw.interfaces import (
    IConnectHook,
    IDataPostHook,
    IEhloHook,
    IHeloHook,
    IMailHook,
    IPluginContext,
    IRcptHook,
    IRegistration,
)
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection, canonical_address

__all__ = ["AccessList", "Plugin"]

_PHASES = {"conn": "connect.rdns_access", "mail": "mail_from.access", "rcpt": "rcpt_to.access"}
_DENY_MSG = {
    "conn": "You are not allowed to connect",
    "helo": "That HELO is not allowed to connect",
    "mail": "That sender cannot send mail here",
    "rcpt": "That recipient is not allowed",
}
_LEGACY_INI = {
    "conn": "connect.rdns_access.ini",
    "mail": "mail_from.access.ini",
    "rcpt": "rcpt_to.access.ini",
}
_BOOLEANS = (
    "+check.any",
    "+check.conn",
    "-check.helo",
    "+check.mail",
    "+check.rcpt",
    "-rcpt.accept",
)
_NOT_WELCOME = "You are not welcome here."
_DOMAIN_REFUSED = "Email from that domain is not accepted here."
_COMMENT = re.compile(r"\s+[#;].*$")

_Answer = Code | tuple[Code, Any]
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessList:
    """One list: plain entries (and networks), or the patterns of a C{_regex} file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: set[str] = set()
        self.networks: list[_Network] = []
        self.patterns: list[re.Pattern[str]] = []

    def read(
        self, config: Any, log: Any, regex: bool = False, addresses: bool = False
    ) -> AccessList:
        """Fill from the config file of this name; bad lines are logged and left out.
        With C{addresses}, an IP address or a CIDR network is kept as a network."""
        where = str(config.path(self.name) or self.name)
        for number, raw in enumerate(config.get_data(self.name), 1):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if regex:
                try:
                    self.patterns.append(re.compile(line, re.IGNORECASE))
                except re.error as e:
                    log.error(
                        f"{where}:{number}: {line!r} is not a regular expression ({e}); ignored"
                    )
                continue
            entry = _COMMENT.sub("", line).strip().lower()
            if addresses and ("/" in entry or canonical_address(entry) is not None):
                try:
                    self.networks.append(ipaddress.ip_network(_mapped(entry), strict=True))
                except ValueError:
                    log.error(f"{where}:{number}: {entry!r} is not a network; ignored")
                continue
            self.entries.add(entry)
        return self

    def matches(self, value: str) -> bool:
        text = value.lower()
        if text in self.entries or any(p.fullmatch(value) for p in self.patterns):
            return True
        if self.networks:
            address = canonical_address(value)
            return address is not None and any(address in n for n in self.networks)
        return False


def _mapped(entry: str) -> str:
    """An IPv4-mapped address or network as its IPv4 form (clients are matched so)."""
    address, slash, prefix = entry.partition("/")
    parsed = canonical_address(address)
    if parsed is None or parsed.version == 6 or ":" not in address:
        return entry
    return f"{parsed}/{int(prefix) - 96}" if slash and prefix.isdigit() else str(parsed)


@implementer(IRegistration, IConnectHook, IHeloHook, IEhloHook, IMailHook, IRcptHook, IDataPostHook)
class Plugin:
    name = "access"

    def __init__(self) -> None:
        self.check = {"any": True, "conn": True, "helo": False, "mail": True, "rcpt": True}
        self.rcpt_accept = False
        self.deny_msg = dict(_DENY_MSG)
        self.white: dict[str, list[AccessList]] = {}
        self.black: dict[str, list[AccessList]] = {}
        self.domains_black: set[str] = set()
        self.domains_white: set[str] = set()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.load()
        names = ["access.ini", "access.domains", "helo.checks.regexps", *_LEGACY_INI.values()]
        for base in _PHASES.values():
            names += [
                f"{base}.{kind}{suffix}"
                for kind in ("whitelist", "blacklist")
                for suffix in ("", "_regex")
            ]
        for name in names:
            context.config.on_change(name, self.load)

    def load(self) -> None:
        """(Re)read access.ini and every list; bad lines are logged and left out."""
        ini = self.config.get_ini(
            "access.ini",
            booleans=_BOOLEANS,
        )
        deny_msg = dict(_DENY_MSG)
        for phase, text in ini.get("deny_msg", {}).items():
            if phase in deny_msg and text:
                deny_msg[phase] = str(text)
        for phase, legacy in _LEGACY_INI.items():  # read after access.ini, as in Haraka
            text = self.config.get_ini(legacy).get("general", {}).get("deny_msg")
            if text:
                deny_msg[phase] = str(text)
        white: dict[str, list[AccessList]] = {}
        black: dict[str, list[AccessList]] = {}
        for phase, base in _PHASES.items():
            white[phase] = self._lists(f"{base}.whitelist", phase == "conn")
            black[phase] = self._lists(f"{base}.blacklist", phase == "conn")
        black["helo"] = [AccessList("helo.checks.regexps").read(self.config, self.log, True)]
        domains_black: set[str] = set()
        domains_white: set[str] = set()
        for entry in AccessList("access.domains").read(self.config, self.log).entries:
            exception = entry.startswith("!")
            entry = entry.lstrip("!").rstrip(".")
            if entry:
                (domains_white if exception else domains_black).add(entry)
        self.check = {key: bool(ini["check"][key]) for key in self.check}
        self.rcpt_accept = bool(ini["rcpt"]["accept"])
        self.deny_msg = deny_msg
        self.white, self.black = white, black
        self.domains_black, self.domains_white = domains_black, domains_white

    def _lists(self, name: str, addresses: bool) -> list[AccessList]:
        return [
            AccessList(name).read(self.config, self.log, addresses=addresses),
            AccessList(f"{name}_regex").read(self.config, self.log, regex=True),
        ]

    # -- precise ------------------------------------------------------------------------

    def _listed(self, lists: Iterable[AccessList], values: list[str]) -> AccessList | None:
        for access_list in lists:
            if any(access_list.matches(v) for v in values if v):
                return access_list
        return None

    def hook_connect(self, connection: Connection) -> _Answer:
        if self.check["conn"]:
            answer = self._client(connection)
            if answer != CONT:
                return answer
        return self._any(connection, "connect", connection.remote.host)

    def _client(self, connection: Connection) -> _Answer:
        """The client by address, then by reverse name. The address comes first: a
        reverse name is whatever the owner of the address's PTR records says, so a
        whitelisted name must not lift a blacklisted address."""
        remote = connection.remote
        address = canonical_address(remote.ip)
        probes = [str(address) if address is not None else remote.ip]
        probes += [remote.host] if remote.host else []
        for value in probes:
            hit = self._listed(self.white["conn"], [value])
            if hit is not None:
                connection.results.add(self.name, **{"pass": hit.name}, whitelist=True)
                return CONT
            hit = self._listed(self.black["conn"], [value])
            if hit is not None:
                connection.results.add(self.name, fail=hit.name)
                host = remote.host or "unknown"
                return DENYDISCONNECT, f"{host} [{remote.ip}] {self.deny_msg['conn']}"
        self._once(connection.results, "unlisted(conn)")
        return CONT

    def _once(self, results: Any, label: str) -> None:
        """Record C{msg: label} unless it is there already (a session may loop)."""
        if not results.has(self.name, "msg", label):
            results.add(self.name, msg=label)

    def hook_helo(self, connection: Connection, host: str) -> _Answer:
        return self._greeting(connection, host, "helo")

    def hook_ehlo(self, connection: Connection, host: str) -> _Answer:
        return self._greeting(connection, host, "ehlo")

    def _greeting(self, connection: Connection, host: str, hook: str) -> _Answer:
        if self.check["helo"]:
            if self._listed(self.black["helo"], [host]) is not None:
                connection.results.add(self.name, fail="helo.checks.regexps")
                return DENY, f"{host} {self.deny_msg['helo']}"
            self._once(connection.results, "unlisted(helo)")
        literal = host.startswith("[") and host.endswith("]")
        return self._any(connection, hook, None if literal else host)

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> _Answer:
        answer = self._address(connection, sender, "mail")
        if answer != CONT:
            return answer
        return self._any(connection, "mail", sender.domain or None, sender.address)

    def hook_rcpt(
        self, connection: Connection, recipient: Address, params: dict[str, str | None]
    ) -> _Answer:
        answer = self._address(connection, recipient, "rcpt")
        if answer != CONT:
            return answer
        return self._any(connection, "rcpt", recipient.domain or None, recipient.address)

    def _address(self, connection: Connection, address: Address, phase: str) -> _Answer:
        transaction = connection.transaction
        if not self.check[phase] or transaction is None:
            return CONT
        results = transaction.results
        value = address.address
        if not value:
            results.add(self.name, skip=f"null {'sender' if phase == 'mail' else 'rcpt'}")
            return CONT
        hit = self._listed(self.white[phase], [value])
        if hit is not None:
            results.add(self.name, **{"pass": hit.name})
            return OK if phase == "rcpt" and self.rcpt_accept else CONT
        hit = self._listed(self.black[phase], [value])
        if hit is not None:
            results.add(self.name, fail=hit.name)
            return DENY, f"{value} {self.deny_msg[phase]}"
        self._once(results, f"unlisted({phase})")
        return CONT

    # -- any ----------------------------------------------------------------------------

    def _any(
        self, connection: Connection, hook: str, domain: str | None, address: str = ""
    ) -> _Answer:
        if not self.check["any"] or not domain or not (self.domains_black or self.domains_white):
            return CONT
        verdict = self._domain_verdict(domain, address)
        if verdict is None:
            self._once(connection.results, f"unlisted({hook}:any)")
            return CONT
        if verdict == "white":
            connection.results.add(self.name, **{"pass": f"{hook}:access.domains"}, whitelist=True)
            return CONT
        connection.results.add(self.name, fail=f"access.domains({verdict})", blacklist=True)
        return DENY, _NOT_WELCOME

    def _domain_verdict(self, domain: str, address: str = "") -> str | None:
        """ "white" for an exception, the listed entry for a blocked domain (or one of its
        subdomains) or address, None for neither. An IP address is no domain."""
        domain = domain.lower().rstrip(".")
        if canonical_address(domain.strip("[]")) is not None:
            return None
        address = address.lower()
        suffixes = [domain]
        while "." in suffixes[-1]:
            suffixes.append(suffixes[-1].partition(".")[2])
        if address in self.domains_white or any(s in self.domains_white for s in suffixes):
            return "white"
        if address and address in self.domains_black:
            return address
        return next((s for s in suffixes if s in self.domains_black), None)

    def hook_data_post(self, connection: Connection) -> _Answer:
        transaction = connection.transaction
        if transaction is None or not self.check["any"] or not self.domains_black:
            return CONT
        value = transaction.header.get_decoded("From")
        if not value:
            transaction.results.add(self.name, fail="data(missing_from)")
            return CONT
        addresses = [a for _, a in getaddresses([value]) if "@" in a]
        if not addresses:
            transaction.results.add(self.name, fail="data(unparsable_from)")
            return CONT
        address = addresses[0]
        verdict = self._domain_verdict(address.rpartition("@")[2], address)
        if verdict is None:
            self._once(connection.results, "unlisted(any)")
            return CONT
        if verdict == "white":
            connection.results.add(self.name, **{"pass": "access.domains"}, whitelist=True)
            return CONT
        connection.results.add(self.name, fail=f"access.domains({verdict})", blacklist=True)
        return DENY, _DOMAIN_REFUSED
