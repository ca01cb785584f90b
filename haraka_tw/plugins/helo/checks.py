"""helo.checks: judge the name a client gives in HELO/EHLO.

Each check records C{pass}/C{fail}/C{skip} under C{connection.results['helo.checks']}, with
Haraka's labels; a failing check refuses the greeting (C{550}, Haraka's texts) only when its
C{[reject]} key is on (all off by default: the results are for scoring plugins). The
checks, in order:

- C{match_re}: the name matches a pattern of C{helo.checks.regexps} (whole name, any case);
- C{bare_ip}: an address without brackets (C{1.2.3.4} instead of C{[1.2.3.4]});
- C{dynamic}: the name holds the client's address (C{c-1-2-3-4.isp.example},
  C{host-0102030400.example}): two octets of the address as numbers among the name's
  host part, or its hex form;
- C{big_company}: the name is a C{[bigco]} key (C{yahoo.com}) but the client's reverse name
  is not within one of the domains listed for it;
- C{valid_hostname}: the name has a dot, labels of letters, digits and hyphens, and a
  top-level domain of letters (or C{xn--}); C{localhost}, C{localdomain}, C{invalid},
  C{test}, C{example} fail; C{local}, C{lan}, C{corp} and the C{helo.checks.allow}
  suffixes are let by without a result (as in Haraka). haraka_tw ships no public suffix
  list: a name under a top-level domain that does not exist but looks like one passes;
- C{rdns_match}: the name is the client's reverse name, or in the same domain;
- C{forward_dns}: the name's A/AAAA records include the client's address (or it is in the
  same domain as a matching reverse name). A nameserver failure is a C{450} when
  C{reject.forward_dns} is on, never a C{550};
- C{host_mismatch}: a second HELO/EHLO in the session names another host;
- C{proto_mismatch}: a second greeting switches between HELO and EHLO;
- C{literal_mismatch}: an address literal (C{[1.2.3.4]}) is not the client's address
  (C{[check] literal_mismatch}: 1 the same address, 2 (default) the same /24 or IPv6 /64,
  3 that or any private address).

Unlike Haraka's plugin, every check runs at every greeting: Haraka marks each as done for
the connection, so a client refused at EHLO gets 250 by sending EHLO again, and
host_mismatch and proto_mismatch can never fail.

Clients on private addresses and relaying clients are not checked (C{[skip]}).

helo.checks.ini::

    [check]        ; each check on (true) or off
    match_re=true
    ...
    literal_mismatch=2

    [reject]       ; refuse the greeting when the check fails
    dynamic=false
    ...

    [skip]
    private_ip=true
    relaying=true

    [bigco]        ; HELO name = the domains its reverse name must be in
    yahoo.com=yahoo.com,yahoo.net
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYSOFT, Code
from haraka_tw.dns import NoAnswer, NXDomain
from haraka_tw.interfaces import IEhloHook, IHeloHook, IPluginContext, IRegistration
from haraka_tw.smtp.connection import Connection, canonical_address
from haraka_tw.smtp.replies import Reply

__all__ = ["CHECKS", "Plugin", "has_top_level_domain", "is_dynamic", "organizational_domain"]

CHECKS = (
    "match_re",
    "bare_ip",
    "dynamic",
    "big_company",
    "valid_hostname",
    "rdns_match",
    "forward_dns",
    "host_mismatch",
    "proto_mismatch",
    "literal_mismatch",
)
_BOOLEAN_CHECKS = [c for c in CHECKS if c != "literal_mismatch"]

_TEXTS = {
    "match_re": "That HELO not allowed here",
    "bare_ip": "Invalid address format in HELO",
    "dynamic": "HELO is dynamic",
    "big_company": "You are not who you say you are",
    "valid_hostname": "HELO host name invalid",
    "rdns_match": "HELO host does not match rDNS",
    "forward_dns": "HELO host has no forward DNS match",
}
_NO_DOT = "HELO host must be a FQDN or address literal (RFC 5321 2.3.5)"
_BIGCO_NO_RDNS = "Big company w/o rDNS? Unlikely."
_INVALID_FOR_DNS = "Invalid HELO host cannot achieve forward DNS match"

_LITERAL = re.compile(r"^\[(?:IPv6:)?([^\]]+)\]$", re.I)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_TLD = re.compile(r"^(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})$")
_LOCAL_TLDS = frozenset({"local", "lan", "corp"})
_RESERVED_TLDS = frozenset({"localhost", "localdomain", "invalid", "test", "example"})
# Second-level labels under which country domains register names (example.co.uk).
_COUNTRY_SECOND_LEVELS = frozenset(
    {"ac", "co", "com", "edu", "gov", "gv", "ltd", "me", "mil", "ne", "net", "or", "org", "plc"}
)

_Answer = Code | tuple[Code, Any]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _literal_ip(helo: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    m = _LITERAL.match(helo)
    return _ip(m[1]) if m else None


def has_top_level_domain(name: str) -> bool:
    """Whether C{name} has two labels or more and ends in a top-level domain of letters
    (or C{xn--}); no public suffix list is read."""
    labels = name.lower().rstrip(".").split(".")
    return len(labels) > 1 and all(labels) and _TLD.match(labels[-1]) is not None


def organizational_domain(name: str | None) -> str | None:
    """The registered domain of C{name} (C{mail.example.co.uk} -> C{example.co.uk}), by
    a rule of thumb rather than a public suffix list; None for no name or a bare label."""
    if not name:
        return None
    labels = name.lower().rstrip(".").split(".")
    if len(labels) < 2 or not all(labels):
        return None
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _COUNTRY_SECOND_LEVELS:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def is_dynamic(helo: str, ip: str) -> bool:
    """True when C{helo}'s host part (the name without its registered domain) holds the
    IPv4 address C{ip}: two adjacent octets as numbers, or its 8-digit hex form."""
    address = canonical_address(ip)
    if not isinstance(address, ipaddress.IPv4Address):
        return False
    domain = organizational_domain(helo) or ""
    host_part = helo.lower()[: -len(domain) - 1] if domain else helo.lower()
    if not host_part:
        return False
    octets = [int(o) for o in str(address).split(".")]
    numbers = [int(n) for n in re.findall(r"\d+", host_part) if len(n) <= 3]
    for pair in ((octets[2], octets[3]), (octets[0], octets[1])):
        if _pair_in(pair, numbers):
            return True
    return f"{int(address):08x}" in host_part


def _pair_in(pair: tuple[int, int], numbers: list[int]) -> bool:
    """Both of C{pair} among C{numbers}, next to each other in either order."""
    for first, second in itertools.pairwise(numbers):
        if (first, second) in (pair, pair[::-1]):
            return True
    return False


@implementer(IRegistration, IHeloHook, IEhloHook)
class Plugin:
    name = "helo.checks"

    def __init__(self) -> None:
        self.check = dict.fromkeys(CHECKS, True)
        self.reject = dict.fromkeys(CHECKS, False)
        self.literal_mode = 2
        self.skip_private = True
        self.skip_relaying = True
        self.bigco: dict[str, list[str]] = {}
        self.patterns: list[re.Pattern[str]] = []
        self.allow: list[str] = []

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.resolver = context.resolver
        self.load()
        for name in ("helo.checks.ini", "helo.checks.regexps", "helo.checks.allow"):
            context.config.on_change(name, self.load)

    def load(self) -> None:
        """(Re)read the files; a bad value raises, naming the file, and changes nothing."""
        name = "helo.checks.ini"
        ini = self.config.get_ini(
            name,
            booleans=[f"+check.{c}" for c in _BOOLEAN_CHECKS]
            + [f"-reject.{c}" for c in CHECKS]
            + ["+skip.private_ip", "+skip.relaying", "-reject.mismatch"],
        )
        mode = ini["check"].get("literal_mismatch", 2)
        if str(mode).strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            mode = 2 if str(mode).strip().lower() in ("true", "yes", "on") else 0
        try:
            literal_mode = int(mode)
        except (TypeError, ValueError):
            literal_mode = -1
        if literal_mode not in (0, 1, 2, 3):
            raise ValueError(f"{name} [check] literal_mismatch must be 0 to 3, not {mode!r}")
        patterns = []
        for line in self.config.get_list("helo.checks.regexps"):
            try:
                patterns.append(re.compile(line, re.I))
            except re.error as e:
                where = self.config.path("helo.checks.regexps") or "helo.checks.regexps"
                raise ValueError(f"{where}: {line!r} is not a regular expression: {e}") from None
        bigco = {
            key.lower(): [d.strip().lower().lstrip(".") for d in str(value).split(",") if d.strip()]
            for key, value in ini.get("bigco", {}).items()
        }
        self.check = {c: bool(ini["check"].get(c, True)) for c in _BOOLEAN_CHECKS}
        self.check["literal_mismatch"] = literal_mode != 0
        self.reject = {c: bool(ini["reject"].get(c, False)) for c in CHECKS}
        if ini["reject"].get("mismatch"):  # Haraka's older name
            self.reject["host_mismatch"] = True
        self.literal_mode = literal_mode
        self.skip_private = bool(ini["skip"]["private_ip"])
        self.skip_relaying = bool(ini["skip"]["relaying"])
        self.bigco = bigco
        self.patterns = patterns
        self.allow = [a.lower().lstrip(".") for a in self.config.get_list("helo.checks.allow")]

    # -- the hooks ----------------------------------------------------------------------

    def hook_helo(self, connection: Connection, host: str) -> _Answer | Deferred[_Answer]:
        return self._greeting(connection, host, "smtp")

    def hook_ehlo(self, connection: Connection, host: str) -> _Answer | Deferred[_Answer]:
        return self._greeting(connection, host, "esmtp")

    def _greeting(
        self, connection: Connection, helo: str, proto: str
    ) -> _Answer | Deferred[_Answer]:
        results = connection.results
        entry = results.get(self.name) or {}
        previous = (entry.get("helo_host"), entry.get("proto"))
        if self.skip_relaying and connection.relaying:
            results.add(self.name, skip="relaying")
        elif self.skip_private and connection.remote.is_private:
            results.add(self.name, skip="private")
        else:
            outcome = _Run(self, connection, helo, proto, previous).start()
            if isinstance(outcome, Deferred):
                return outcome.addCallback(self._greeted, connection, helo, proto)
            return self._greeted(outcome, connection, helo, proto)
        return self._greeted(CONT, connection, helo, proto)

    def _greeted(self, outcome: _Answer, connection: Connection, helo: str, proto: str) -> _Answer:
        """Remember a greeting let by (for host_mismatch and proto_mismatch next time)."""
        if outcome == CONT:
            connection.results.add(self.name, helo_host=helo, proto=proto)
        return outcome


class _Run:
    """The checks of one greeting, in order, until one refuses it."""

    def __init__(
        self,
        plugin: Plugin,
        connection: Connection,
        helo: str,
        proto: str,
        previous: tuple[str | None, str | None],
    ) -> None:
        self.plugin = plugin
        self.connection = connection
        self.helo = helo
        self.proto = proto
        self.previous = previous
        self.literal = _literal_ip(helo)
        self.rdns = (connection.remote.host or "").lower().rstrip(".") or None
        self.valid: bool | None = None  # valid_hostname passed, failed, or did not judge
        self.rdns_matched = False

    def record(self, **fields: Any) -> None:
        self.connection.results.add(self.plugin.name, **fields)

    def passed(self, label: str) -> None:
        self.record(**{"pass": label})

    def failed(self, check: str, label: str, text: str | None = None) -> _Answer:
        self.record(fail=label)
        if not self.plugin.reject[check]:
            return CONT
        return DENY, text or _TEXTS[check]

    def start(self, first: int = 0) -> _Answer | Deferred[_Answer]:
        """Run the checks from C{CHECKS[first]} on, until one refuses the greeting."""
        for index in range(first, len(CHECKS)):
            check = CHECKS[index]
            if not self.plugin.check[check]:
                continue
            outcome: _Answer | Deferred[_Answer] = getattr(self, check)()
            if isinstance(outcome, Deferred):
                return outcome.addCallback(self._go_on, index + 1)
            if outcome != CONT:
                return outcome
        return CONT

    def _go_on(self, outcome: _Answer, index: int) -> _Answer | Deferred[_Answer]:
        return outcome if outcome != CONT else self.start(index)

    # -- the checks ---------------------------------------------------------------------

    def match_re(self) -> _Answer:
        if any(p.fullmatch(self.helo) for p in self.plugin.patterns):
            return self.failed("match_re", "match_re")
        self.passed("match_re")
        return CONT

    def bare_ip(self) -> _Answer:
        bare = self.helo[5:] if self.helo[:5].lower() == "ipv6:" else self.helo
        if _ip(bare) is not None:
            return self.failed("bare_ip", "bare_ip(invalid literal)")
        self.passed("bare_ip")
        return CONT

    def dynamic(self) -> _Answer:
        if self.literal is not None or _ip(self.helo) is not None:
            self.record(skip="dynamic(literal)")
        elif "." not in self.helo:
            self.record(skip="dynamic(no dots)")
        elif is_dynamic(self.helo, self.connection.remote.ip):
            return self.failed("dynamic", "dynamic")
        else:
            self.passed("dynamic")
        return CONT

    def big_company(self) -> _Answer:
        if self.literal is not None:
            self.record(skip="big_co(literal)")
            return CONT
        domains = self.plugin.bigco.get(self.helo.lower())
        if domains is None:
            self.passed("big_co(not)")
            return CONT
        if self.rdns is None:
            return self.failed("big_company", "big_co(rDNS)", _BIGCO_NO_RDNS)
        rdns = self.rdns
        if any(rdns == d or rdns.endswith("." + d) for d in domains):
            self.passed("big_co")
            return CONT
        return self.failed("big_company", "big_co")

    def valid_hostname(self) -> _Answer:
        if self.literal is not None:
            self.record(skip="valid_hostname(literal)")
            return CONT
        name = self.helo.lower()
        if "." not in name:
            self.valid = False
            return self.failed("valid_hostname", "valid_hostname(no_dot)", _NO_DOT)
        labels = name.split(".")
        tld = labels[-1]
        if tld in _LOCAL_TLDS or any(
            name == a or name.endswith("." + a) for a in self.plugin.allow
        ):
            return CONT  # a private name the operator expects: no result, as in Haraka
        if (
            not all(_LABEL.match(label) for label in labels)
            or not _TLD.match(tld)
            or tld in _RESERVED_TLDS
        ):
            self.valid = False
            return self.failed("valid_hostname", "valid_hostname")
        self.valid = True
        self.passed("valid_hostname")
        return CONT

    def rdns_match(self) -> _Answer:
        if self.literal is not None:
            self.record(fail="rdns_match(literal)")  # never refused: a literal has no name
            return CONT
        helo = self.helo.lower().rstrip(".")
        if self.rdns is not None and helo == self.rdns:
            self.rdns_matched = True
            self.passed("rdns_match")
            return CONT
        domain = organizational_domain(helo)
        if domain is not None and domain == organizational_domain(self.rdns):
            self.rdns_matched = True
            self.passed("rdns_match(org_dom)")
            return CONT
        return self.failed("rdns_match", "rdns_match")

    def forward_dns(self) -> _Answer | Deferred[_Answer]:
        if self.literal is not None:
            self.record(skip="forward_dns(literal)")
            return CONT
        if self.valid is None:  # valid_hostname is off, or let a private name by
            self.record(skip="forward_dns(not judged by valid_hostname)")
            return CONT
        if not self.valid:
            return self.failed("forward_dns", "forward_dns(invalid_hostname)", _INVALID_FOR_DNS)
        resolver = self.plugin.resolver
        lookups = [resolver.lookup_a(self.helo), resolver.lookup_aaaa(self.helo)]
        return DeferredList(lookups, consumeErrors=True).addCallback(self._addresses)

    def _addresses(self, outcomes: list[tuple[bool, Any]]) -> _Answer:
        addresses: set[Any] = set()
        errors: list[Failure] = []
        for ok, value in outcomes:
            if ok:
                addresses.update(_ip(a) for a in value)
            elif value.check(CancelledError):
                value.raiseException()  # the hook timed out: no verdict
            elif value.check(NXDomain, NoAnswer) is None:
                errors.append(value)
        self.record(ips=sorted(str(a) for a in addresses if a is not None))
        client = canonical_address(self.connection.remote.ip)
        if client is not None and client in addresses:
            self.passed("forward_dns")
            return CONT
        if self.rdns_matched and organizational_domain(self.helo) == organizational_domain(
            self.rdns
        ):
            self.passed("forward_dns(domain)")
            return CONT
        if errors and not addresses:
            self.record(err=f"forward_dns({errors[0].value})")
            if not self.plugin.reject["forward_dns"]:
                return CONT
            text = "Temporary DNS error resolving your HELO hostname"
            return DENYSOFT, Reply(450, "4.4.3", (text,))
        return self.failed("forward_dns", "forward_dns(no IP match)")

    def host_mismatch(self) -> _Answer:
        before = self.previous[0]
        if before is None:
            self.record(skip="host_mismatch(1st)")
            return CONT
        if before.lower() == self.helo.lower():
            self.passed("host_mismatch")
            return CONT
        label = f"host_mismatch({before[:64]} / {self.helo[:64]})"  # a reply line stays short
        return self.failed("host_mismatch", label, f"HELO host {label}")

    def proto_mismatch(self) -> _Answer:
        before = self.previous[1]
        if before is None or before == self.proto:
            return CONT
        text = "EHLO protocol mismatch" if self.proto == "esmtp" else "HELO protocol mismatch"
        return self.failed("proto_mismatch", f"proto_mismatch({self.proto})", text)

    def literal_mismatch(self) -> _Answer:
        literal = self.literal
        if literal is None:
            self.passed("literal_mismatch")
            return CONT
        client = canonical_address(self.connection.remote.ip)
        mode = self.plugin.literal_mode
        if mode == 3 and (literal.is_private or literal.is_loopback):
            self.passed("literal_mismatch(private)")
            return CONT
        if client is not None and literal.version == client.version:
            if literal == client:
                self.passed("literal_mismatch")
                return CONT
            if mode >= 2:
                prefix = 24 if literal.version == 4 else 64
                network = ipaddress.ip_network(f"{client}/{prefix}", strict=False)
                if literal in network:
                    self.passed("literal_mismatch")
                    return CONT
        if mode >= 2:
            text = "HELO IP literal not in the same network as your IP address"
        else:
            text = "HELO IP literal does not match your IP address"
        return self.failed("literal_mismatch", "literal_mismatch", text)
