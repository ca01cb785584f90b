"""uribl: refuse mail that names a domain or an address on a URI block list (Spamhaus
DBL, URIBL, SURBL and the like).

Each zone of uribl.ini says which names it is asked about:

- C{rdns}: the client's reverse names (every PTR name of its address), at connect;
- C{helo}: the name (or address literal) given in HELO or EHLO;
- C{envfrom}: the domain of the MAIL FROM address;
- C{from}, C{replyto}: the domain of every address in the From and Reply-To fields;
- C{msgid}: the domain part of the Message-ID field;
- C{body}: the hosts in the text parts of the body (decoded; HTML entities too): the host
  of every URL (an address in one, however written: C{http://3232235777/} is
  C{192.168.1.1}), every name in the text that ends in a top-level domain, and so the
  domain of every e-mail address.

A name is looked up as an A record of C{<name>.<zone>} (C{<name>.<dqs_key>.<zone>} with a
Spamhaus DQS key): the registered domain of the name for a zone with C{strip_to_domain}
(by the Public Suffix List), the name itself otherwise; an address reversed as the DNS
block lists write it (never for a zone with C{no_ip_lookups}, an IPv6 address never for
one with C{not_ipv6_compatible}, a private address never). Names in C{uribl.excludes}
(and their subdomains) are never looked up, nor names whose top-level domain does not
exist. At most C{max_uris_per_list} names per zone are looked up for one check (a random
choice of them when there are more).

The lookups of a check go out at once; the first answer that counts as a listing refuses
(C{550}, C{554} at connect) with the zone's C{custom_msg} (C{{uri}} and C{{zone}} filled)
or C{<name> blacklisted in <zone>}. An answer counts when the zone's C{validate} regular
expression matches one of its addresses, or, without C{validate}, when an address is in
127.0.0.0/8 but not one of the lists' refusal codes (127.255.255.0/24, 127.0.1.255); with
C{bitmask}, that address's last octet must also share a bit with it. A lookup that fails
is recorded as an error and the mail goes on; a check still waiting after C{timeout}
seconds less two (and under the hook's own limit) goes on as well.

uribl.ini (Haraka's; the shipped file has DBL, URIBL and SURBL)::

    [main]
    timeout=30
    max_uris_per_list=20
    ; the Public Suffix List (Debian's publicsuffix package); without it, a rule of thumb
    suffix_list=/usr/share/publicsuffix/public_suffix_list.dat

    [dbl.spamhaus.org]
    validate=^(?!127\\.0\\.1\\.255|127\\.255\\.255\\.)127\\.
    rdns=1
    helo=1
    envfrom=1
    from=1
    msgid=1
    body=1
    no_ip_lookups=1
    custom_msg={uri} listed in {zone}; see http://www.spamhaus.org/query/dbl?domain={uri}

Results in C{results['uribl']} (the transaction's from MAIL on, else the connection's):
C{fail} C{<check>/<name>/<zone>}, C{pass} (each check with no listing), C{skip} and C{err}.
"""

from __future__ import annotations

import html
import ipaddress
import random
import re
import socket
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, Code
from haraka_tw.config.formats import ini_count, ini_number
from haraka_tw.dns import DNSError, NoAnswer, NXDomain
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import (
    IConnectHook,
    IDataHook,
    IDataPostHook,
    IEhloHook,
    IHeloHook,
    IMailHook,
    IPluginContext,
    IRegistration,
)
from haraka_tw.message.part import Body, PartKind
from haraka_tw.plugins.dns_list import query_name
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection, canonical_address
from haraka_tw.suffixes import DEFAULT_PATH, RuleOfThumb, Suffixes, ascii_name, installed

__all__ = ["Plugin", "Zone", "body_hosts"]

CHECKS = ("rdns", "helo", "envfrom", "from", "replyto", "msgid", "body")
_FLAGS = (*CHECKS, "no_ip_lookups", "not_ipv6_compatible", "strip_to_domain")
_ZONE_KEYS = frozenset({*_FLAGS, "validate", "bitmask", "custom_msg", "dqs_key"})
_ZONE_NAME = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))+$")
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DQS_KEY = re.compile(r"^[A-Za-z0-9-]{1,63}$")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_REFUSALS = ipaddress.ip_network("127.255.255.0/24")
_DBL_NO_IP = ipaddress.ip_address("127.0.1.255")
#: a URL's host: after the scheme and any user part, up to the path, port or a delimiter
_URL = re.compile(
    r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]{1,15}:/+(?:[^\s/?#<>\"'\\]*@)?"
    r"(\[[0-9a-f:.]+\]|[^\s/?#:<>\"'\\|,;()\[\]{}@]+)",
    re.IGNORECASE,
)
#: a name in running text, ending in letters (so a top-level domain, checked later)
_NAME_IN_TEXT = re.compile(
    r"(?<![a-z0-9_.-])((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59}))(?![a-z0-9_-])",
    re.IGNORECASE,
)
_LOOSE_IPV4 = re.compile(r"^(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}$")
_MSGID_DOMAIN = re.compile(r"@([^>\s@]+)>?")
BODY_NAMES_LIMIT = 10_000  # distinct hosts gathered from one body, at most
BODY_TEXT_LIMIT = 1024 * 1024  # characters of a body's text parts scanned, at most

_Subject = ipaddress.IPv4Address | ipaddress.IPv6Address | str
_Answer = Code | tuple[Code, str]


@dataclass(frozen=True)
class Zone:
    """One list, as its uribl.ini section describes it."""

    name: str
    checks: frozenset[str]
    no_ip_lookups: bool = False
    not_ipv6: bool = False
    strip_to_domain: bool = False
    validate: re.Pattern[str] | None = None
    bitmask: int | None = None
    custom_msg: str | None = None
    dqs_key: str | None = None

    def query(self, subject: _Subject, suffixes: Suffixes) -> tuple[str, str] | None:
        """The name to look C{subject} up under in this zone and the name to show for it;
        None when this zone is not asked about it."""
        zone = f"{self.dqs_key}.{self.name}" if self.dqs_key else self.name
        name: str | None
        if isinstance(subject, str):
            shown = suffixes.registered_domain(subject) if self.strip_to_domain else subject
            if not shown:
                return None
            name = f"{shown}.{zone}"
        else:
            if self.no_ip_lookups or not subject.is_global:
                return None
            if isinstance(subject, ipaddress.IPv6Address) and self.not_ipv6:
                return None
            shown = str(subject)
            name = query_name(shown, zone)
        if name is None or len(name) > 253:
            return None
        return name, shown

    def listing(self, addresses: Iterable[str]) -> str | None:
        """The first of C{addresses} that counts as a listing, or None."""
        for address in addresses:
            if self.validate is not None:
                if not self.validate.search(address):
                    continue
            elif not _is_listing_code(address):
                continue
            if self.bitmask is not None:
                last = address.rpartition(".")[2]
                if not last.isdigit() or not int(last) & self.bitmask:
                    continue
            return address
        return None

    def message(self, shown: str) -> str:
        if self.custom_msg:
            return self.custom_msg.replace("{uri}", shown).replace("{zone}", self.name)
        return f"{shown} blacklisted in {self.name}"


def _is_listing_code(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip in _LOOPBACK and ip not in _REFUSALS and ip != _DBL_NO_IP


@dataclass(frozen=True)
class Settings:
    zones: tuple[Zone, ...]
    max_per_list: int
    timeout: float
    excludes: frozenset[str]
    suffixes: Suffixes


def subject_of(host: str, suffixes: Suffixes) -> _Subject | None:
    """C{host} as something to look up: an address (an address literal's brackets and
    C{IPv6:} tag taken off), or a lower-case ASCII name whose top-level domain exists;
    None for anything else."""
    text = host.strip().lower().rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].removeprefix("ipv6:")
    address = canonical_address(text)
    if address is not None:
        return address
    name = ascii_name(text)
    if name is None:
        return None
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return None
    return name if suffixes.is_tld(labels[-1]) and not labels[-1].isdigit() else None


def _url_host(host: str) -> str:
    """A URL's host as a name or a dotted address: the loose forms of an IPv4 address a
    browser takes (C{3232235777}, C{0xc0.0xa8.1.1}, C{0300.0250.1.1}) made plain."""
    host = host.rstrip(".")
    if _LOOSE_IPV4.match(host.lower()) and not _is_dotted_quad(host):
        try:
            return str(ipaddress.IPv4Address(socket.inet_aton(host)))
        except (OSError, ValueError):
            return host
    return host


def _is_dotted_quad(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _text_hosts(text: str) -> Iterator[str]:
    for match in _URL.finditer(text):
        yield _url_host(match.group(1))
    for match in _NAME_IN_TEXT.finditer(text):
        yield match.group(1)


def body_hosts(body: Body | None) -> list[str]:
    """The hosts named in the text parts of C{body}: URL hosts and names in the text (so
    the domains of e-mail addresses), HTML entities decoded in HTML parts, percent-encoding
    undone where there is any; each once, in order, at most L{BODY_NAMES_LIMIT}, from the
    first L{BODY_TEXT_LIMIT} characters scanned."""
    seen: dict[str, None] = {}
    if body is None:
        return []
    budget = BODY_TEXT_LIMIT
    for part in body.walk():
        if part.kind is not PartKind.TEXT or not part.bodytext or budget <= 0:
            continue
        text = part.bodytext[:budget]
        text = html.unescape(text) if part.is_html else text
        texts = [text, unquote(text)] if "%" in text else [text]
        for one in texts:
            one = one[:budget]
            budget -= len(one)
            for host in _text_hosts(one):
                seen[host.lower()] = None
                if len(seen) >= BODY_NAMES_LIMIT:
                    return list(seen)
    return list(seen)


def _address_domains(values: Iterable[str]) -> list[str]:
    """The domains of the addresses in these field values; a value the address parser
    cannot take (comments nested past its recursion) is left out."""
    domains = []
    for value in values:
        try:
            pairs = getaddresses([value])
        except (RecursionError, ValueError, IndexError, TypeError):
            continue
        domains += [address.rpartition("@")[2] for _, address in pairs if "@" in address]
    return domains


@implementer(IRegistration, IConnectHook, IHeloHook, IEhloHook, IMailHook, IDataHook, IDataPostHook)
class Plugin:
    name = "uribl"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.clock = context.reactor
        self.resolver = context.resolver
        self.load()
        for name in ("uribl.ini", "uribl.excludes"):
            context.config.on_change(name, self.load)

    # -- configuration ----------------------------------------------------------------

    def load(self) -> None:
        """(Re)read uribl.ini and uribl.excludes; a bad value raises, naming the file and
        the key, and changes nothing."""
        name = "uribl.ini"
        ini = self.config.get_ini(name, booleans=[f"*.{flag}" for flag in _FLAGS])
        main = ini["main"]
        where = f"{name} [main]"
        timeout = ini_number(main, "timeout", 30, zero_ok=False, where=where)
        max_per_list = ini_count(main, "max_uris_per_list", 20, where, minimum=1)
        path = str(main.get("suffix_list") or "").strip()
        try:
            suffixes: Suffixes | None = installed(path or DEFAULT_PATH)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where} suffix_list: {e}") from None
        if suffixes is None:
            if path:
                raise ValueError(f"{where} suffix_list: {path}: no such file")
            self.log.notice(
                f"no public suffix list at {DEFAULT_PATH} (Debian's publicsuffix package): "
                "registered domains by a rule of thumb"
            )
            suffixes = RuleOfThumb()
        zones = tuple(
            _zone(name, section_name.lower().rstrip("."), section, self.log.warn)
            for section_name, section in ini.items()
            if section_name != "main"
        )
        if not zones:
            self.log.warn(f"{name}: no zones; nothing is looked up")
        excludes = frozenset(
            entry.strip().lower().rstrip(".")
            for entry in self.config.get_list("uribl.excludes")
            if entry.strip()
        )
        budget = max(timeout - 2, 1.0) if timeout > 2 else timeout
        self.settings = Settings(
            zones=zones,
            max_per_list=max_per_list,
            timeout=under_hook_limit(self.config, self.name, budget),
            excludes=excludes,
            suffixes=suffixes,
        )

    def _wanted(self, check: str) -> bool:
        return any(check in zone.checks for zone in self.settings.zones)

    # -- hooks ---------------------------------------------------------------------------

    def hook_connect(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        if not self._wanted("rdns"):
            return CONT
        client = canonical_address(connection.remote.ip)
        if client is None:
            return CONT
        if not client.is_global:
            connection.results.add(self.name, skip="rdns: private client")
            return CONT
        settings = self.settings

        def named(names: list[str]) -> _Answer | Deferred[_Answer]:
            return self._check(connection, settings, [("rdns", names)])

        def unnamed(failure: Failure) -> _Answer:
            if not failure.check(NXDomain, NoAnswer):
                connection.results.add(self.name, err=f"rdns: {failure.getErrorMessage()}")
            else:
                connection.results.add(self.name, skip="rdns (no name)")
            return CONT

        lookup: Deferred[Any] = self.resolver.lookup_ptr(connection.remote.ip)
        return lookup.addCallbacks(named, unnamed)

    def hook_helo(self, connection: Connection, host: str) -> _Answer | Deferred[_Answer]:
        return self._check(connection, self.settings, [("helo", [host])])

    def hook_ehlo(self, connection: Connection, host: str) -> _Answer | Deferred[_Answer]:
        return self._check(connection, self.settings, [("helo", [host])])

    def hook_mail(
        self, connection: Connection, sender: Address, params: Any
    ) -> _Answer | Deferred[_Answer]:
        domain = sender.domain if isinstance(sender, Address) else ""
        return self._check(connection, self.settings, [("envfrom", [domain] if domain else [])])

    def hook_data(self, connection: Connection) -> Code:
        if self._wanted("body") and connection.transaction is not None:
            connection.transaction.parse_body = True
        return CONT

    def hook_data_post(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        txn = connection.transaction
        if txn is None:
            return CONT
        header, settings = txn.header, self.settings
        groups: list[tuple[str, list[str]]] = []
        if self._wanted("from"):
            groups.append(("from", _address_domains(header.get_all("From"))))
        if self._wanted("replyto"):
            groups.append(("replyto", _address_domains(header.get_all("Reply-To"))))
        if self._wanted("msgid"):
            ids = header.get_all("Message-ID")
            groups.append(("msgid", [m.group(1) for v in ids for m in _MSGID_DOMAIN.finditer(v)]))
        if self._wanted("body"):
            groups.append(("body", body_hosts(txn.body)))
        return self._check(connection, settings, groups)

    # -- the check -------------------------------------------------------------------

    def _check(
        self,
        connection: Connection,
        settings: Settings,
        groups: list[tuple[str, list[str]]],
    ) -> _Answer | Deferred[_Answer]:
        """Look up the names of each (check, hosts) group in the zones that want that
        check; DENY on the first listing, else CONT once every answer is in."""
        txn = connection.transaction
        results = txn.results if txn is not None else connection.results
        queries: dict[str, tuple[str, Zone, str]] = {}  # name looked up -> check, zone, shown
        for check, hosts in groups:
            zones = [zone for zone in settings.zones if check in zone.checks]
            if not zones:
                continue
            asked = self._queries(check, hosts, zones, settings, results, connection)
            if not asked:
                results.add(self.name, skip=f"{check} (no queries)")
            for name, (zone, shown) in asked.items():
                queries.setdefault(name, (check, zone, shown))
        if not queries:
            return CONT
        return _Lookups(self, connection, results, queries, settings.timeout).start()

    def _queries(
        self,
        check: str,
        hosts: list[str],
        zones: list[Zone],
        settings: Settings,
        results: Any,
        connection: Connection,
    ) -> dict[str, tuple[Zone, str]]:
        """The lookups for one check: each host as the zones want it, excluded and
        private ones left out, at most max_uris_per_list a zone (chosen at random when
        there are more)."""
        if len(hosts) > settings.max_per_list:
            hosts = random.sample(hosts, len(hosts))
        asked: dict[str, tuple[Zone, str]] = {}
        counts = dict.fromkeys((zone.name for zone in zones), 0)
        full: set[str] = set()
        excluded: list[str] = []
        for host in hosts:
            subject = subject_of(host, settings.suffixes)
            if subject is None:
                continue
            if _excluded(str(subject), settings.excludes):
                excluded.append(str(subject))
                continue
            for zone in zones:
                query = zone.query(subject, settings.suffixes)
                if query is None or query[0] in asked:
                    continue
                if counts[zone.name] >= settings.max_per_list:
                    full.add(zone.name)
                    continue
                counts[zone.name] += 1
                asked[query[0]] = (zone, query[1])
        for name in sorted(set(excluded))[:10]:
            results.add(self.name, skip=f"excluded domain:{name}")
        for zone_name in sorted(full):
            self.log.warn(
                f"{check}: more than {settings.max_per_list} names for {zone_name}; "
                "the rest not looked up",
                connection,
            )
            results.add(self.name, skip=f"max query limit for {zone_name}")
        return asked


def _excluded(name: str, excludes: frozenset[str]) -> bool:
    """Whether C{name} or a domain it is under is in uribl.excludes."""
    if not excludes:
        return False
    labels = name.split(".")
    return any(".".join(labels[i:]) in excludes for i in range(len(labels)))


class _Lookups:
    """The lookups of one check, in flight: the verdict fires with the first listing, with
    CONT when every answer is in, or with CONT at the time limit."""

    def __init__(
        self,
        plugin: Plugin,
        connection: Connection,
        results: Any,
        queries: dict[str, tuple[str, Zone, str]],
        timeout: float,
    ) -> None:
        self.plugin = plugin
        self.connection = connection
        self.results = results
        self.queries = queries
        self.timeout = timeout
        self.pending = len(queries)
        self.waiting = Counter(check for check, _, _ in queries.values())  # lookups per check
        self.failed: dict[tuple[str, str], list[str]] = {}  # (check, zone) -> errors
        self.listed: set[str] = set()  # checks with a listing
        self.verdict: Deferred[_Answer] = Deferred(lambda _: self._stop())
        self.timer: Any = None

    def start(self) -> Deferred[_Answer]:
        plugin = self.plugin
        if self.timeout > 0:
            self.timer = plugin.clock.callLater(self.timeout, self._expired)
        for name, (check, zone, shown) in self.queries.items():
            lookup: Deferred[list[str]] = plugin.resolver.lookup_a(name)
            lookup.addCallbacks(
                self._answered,
                self._failed,
                callbackArgs=(name, check, zone, shown),
                errbackArgs=(check, zone),
            )
        return self.verdict

    def _answered(
        self, addresses: list[str], name: str, check: str, zone: Zone, shown: str
    ) -> None:
        if self.verdict.called:
            return
        listing = zone.listing(addresses)
        if listing is None:
            self.plugin.log.info(
                f"{name}: {', '.join(addresses)} is not a listing; ignored", self.connection
            )
        else:
            self.listed.add(check)
            self.results.add(self.plugin.name, fail=f"{check}/{shown}/{zone.name}")
            self.plugin.log.info(f"found {shown} in {zone.name} ({listing})", self.connection)
            self._decide((DENY, zone.message(shown)))
            return
        self._one_done(check)

    def _failed(self, failure: Failure, check: str, zone: Zone) -> None:
        if self.verdict.called:
            return
        if not failure.check(NXDomain, NoAnswer):
            error = failure.getErrorMessage() if failure.check(DNSError) else repr(failure.value)
            self.failed.setdefault((check, zone.name), []).append(error)
        self._one_done(check)

    def _one_done(self, check: str) -> None:
        self.waiting[check] -= 1
        self.pending -= 1
        if self.pending == 0:
            self._decide(CONT)

    def _expired(self) -> None:
        self.timer = None
        if not self.verdict.called:
            late = ", ".join(check for check, count in self.waiting.items() if count)
            self.results.add(self.plugin.name, err=f"{late}: timeout after {self.timeout:g} s")
            self._decide(CONT)

    def _decide(self, answer: _Answer) -> None:
        self._stop()
        for (check, zone_name), errors in sorted(self.failed.items()):
            count = f"{len(errors)} lookups" if len(errors) > 1 else "a lookup"
            self.results.add(
                self.plugin.name, err=f"{check}: {zone_name}: {count} failed ({errors[0]})"
            )
        if answer is CONT:
            failed = {check for check, _ in self.failed}
            for check in dict.fromkeys(check for check, _, _ in self.queries.values()):
                if check not in self.listed and check not in failed and not self.waiting[check]:
                    self.results.add(self.plugin.name, **{"pass": check})
        self.verdict.callback(answer)

    def _stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


def _zone(where: str, name: str, section: dict[str, Any], warn: Any) -> Zone:
    if not _ZONE_NAME.match(name):
        raise ValueError(f"{where}: [{name}] is not a domain name")
    for key in section:
        if key not in _ZONE_KEYS:
            warn(f"{where} [{name}] {key}: not a setting; ignored")
    validate = None
    raw = section.get("validate")
    if raw not in (None, ""):
        try:
            validate = re.compile(str(raw))
        except re.error as e:
            raise ValueError(
                f"{where} [{name}] validate: {raw!r} is not a regular expression ({e})"
            ) from None
    bitmask = None
    raw = section.get("bitmask")
    if raw not in (None, ""):
        try:
            bitmask = int(str(raw).strip(), 0)
        except ValueError:
            bitmask = 0
        if not 0 < bitmask < 256:
            raise ValueError(f"{where} [{name}] bitmask: {raw!r} is not a number from 1 to 255")
    dqs_key = str(section.get("dqs_key") or "").strip() or None
    if dqs_key is not None and not _DQS_KEY.match(dqs_key):
        raise ValueError(f"{where} [{name}] dqs_key: {dqs_key!r} is not one DNS label")
    custom_msg = section.get("custom_msg")
    return Zone(
        name,
        checks=frozenset(check for check in CHECKS if section.get(check) is True),
        no_ip_lookups=section.get("no_ip_lookups") is True,
        not_ipv6=section.get("not_ipv6_compatible") is True,
        strip_to_domain=section.get("strip_to_domain") is True,
        validate=validate,
        bitmask=bitmask,
        custom_msg=" ".join(str(custom_msg).split())
        if custom_msg not in (None, "", True)
        else None,
        dqs_key=dqs_key,
    )
