"""dns-list: DNS block lists (DNSBL) and allow lists (DNSWL) for connecting clients.

At connect, the client's address is looked up in every active zone at once (RFC 5782): the
octets of an IPv4 address reversed (C{4.3.2.1.zone}), an IPv6 address as 32 reversed
nibbles, an IPv4-mapped IPv6 address as its IPv4 address. An A record in 127.0.0.0/8 means
listed; NXDOMAIN (or no A record) means not listed.

- C{type=block} (the default): listed zones with C{reject} (the default) refuse the client
  with C{554 host [ip] is listed on zone1, zone2}; every later command but QUIT gets the
  same (Haraka's behaviour; put C{delay_deny} first to move the refusal to RCPT).
- C{type=allow}: a hit sets C{connection.notes.dnswl} and answers OK at connect, which
  greets the client and skips the later connect plugins. An allow hit beats any block hit.
- C{type=karma} (hostkarma): 127.0.0.1 is a pass, 127.0.0.2 a block hit, anything else a
  note.

C{search=all} (the default) waits for every zone and names all listing zones; C{first}
decides on the first rejecting or allowing answer. Private and loopback clients are not
checked.

A zone is used only once it has passed its self-test (RFC 5782 section 5): 127.0.0.2 must
be listed and 127.0.0.1 must not (C{loopback_is_rejected} skips the second). The tests run
at start-up (a connection arriving meanwhile waits for them), when the file changes, and
every C{periodic_checks} minutes; a zone that fails is set aside with a WARN until it
passes again. C{periodic_checks=0} runs no test and uses every zone.

What Haraka's plugin gets wrong and this one does not: a lookup that times out or fails
(SERVFAIL) is recorded as an error, not as "not listed"; a zone that stops listing
127.0.0.2 is set aside; connections during the start-up tests are checked, not waved
through; a config change runs the tests again at once. Like Haraka, an answer outside
127/8 (a resolver that rewrites NXDOMAIN) and the refusal codes of Spamhaus
(127.255.255.252-255) and dnswl.org (127.0.0.255) set the zone aside until its next test.

dns-list.ini::

    [main]
    zones=zen.spamhaus.org, bl.spamcop.net, list.dnswl.org
    search=all
    periodic_checks=30
    ; seconds the connect check may take; zones that have not answered are left out
    timeout=10

    [zen.spamhaus.org]
    ipv6=false
    127.0.0.2=SBL
    127.0.0.4=XBL

    [list.dnswl.org]
    type=allow
    ; answer OK at HELO/EHLO and at MAIL for an allow-listed client (skips later plugins)
    ok_helo=false
    ok_mail=false

    [ips.backscatterer.org]
    ; at MAIL FROM:<> or <postmaster@...>, refuse a client listed there (550)
    enable=false

Haraka's older C{dnsbl.zones} and C{dnswl.zones} files add block and allow zones. Results
are in C{connection.results['dns-list']}: C{pass} (zones not listing the client, allow and
karma passes), C{fail} (listing zones), C{msg} (the labels of the codes returned),
C{skip}, C{err}.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, OK, Code
from haraka_tw.config.formats import ini_number
from haraka_tw.dns import DNSError, NoAnswer, NXDomain
from haraka_tw.interfaces import (
    IConnectHook,
    IEhloHook,
    IHeloHook,
    IMailHook,
    IPluginContext,
    IRegistration,
    IShutdown,
)
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection, canonical_address

__all__ = ["Plugin", "Zone", "query_name"]

_TYPES = ("block", "allow", "karma")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_SPAMHAUS_REFUSALS = frozenset(
    {"127.255.255.252", "127.255.255.253", "127.255.255.254", "127.255.255.255"}
)
_DNSWL_REFUSAL = "127.0.0.255"
_BACKSCATTERER = "ips.backscatterer.org"
_BOOLEAN_KEYS = ("reject", "ipv6", "loopback_is_rejected", "ok_helo", "ok_mail", "enable")
_ZONE_KEYS = frozenset({"type", *_BOOLEAN_KEYS})
_NAME = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))+$")

_Answer = Code | tuple[Code, Any]


def query_name(ip: str, zone: str) -> str | None:
    """The name to look C{ip} up under in C{zone}, or None if C{ip} is no address."""
    address = canonical_address(ip)
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split("."))) + "." + zone
    return ".".join(reversed(address.exploded.replace(":", ""))) + "." + zone


@dataclass
class Zone:
    """One list, as dns-list.ini describes it."""

    name: str
    type: str = "block"
    reject: bool = True
    ipv6: bool = True
    loopback_is_rejected: bool = False
    ok_helo: bool = False
    ok_mail: bool = False
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class _Lookup:
    """What one zone said of one client: listed (the addresses), not listed, or an error."""

    zone: Zone
    addresses: list[str] | None = None
    error: str | None = None


class _Verdict:
    """The connect check of one client: each zone's answer as it comes, the outcome once
    it is decided (the first rejecting or allowing answer with C{search=first}, all of
    them otherwise)."""

    def __init__(self, plugin: Plugin, connection: Connection, zones: list[Zone]) -> None:
        self.plugin = plugin
        self.connection = connection
        self.waiting = len(zones)
        self.listed_by: list[Zone] = []
        self.allowed_by: Zone | None = None
        self.pending: list[Deferred[None]] = []
        self.done: Deferred[_Answer] = Deferred()

    def add(self, lookup: _Lookup) -> None:
        if self.done.called:
            return
        self.waiting -= 1
        decided = self.plugin.record(self.connection, lookup, self)
        if decided or self.waiting == 0:
            self.done.callback(self.outcome())
            for pending in self.pending:  # the answers still to come change nothing
                pending.cancel()

    def outcome(self) -> _Answer:
        if self.allowed_by is not None:
            self.connection.notes["dnswl"] = True
            self.connection.notes["dnswl_zone"] = self.allowed_by.name
            self.connection.loginfo(
                f"host [{self.connection.remote.ip}] is listed on {self.allowed_by.name}",
                self.plugin.name,
            )
            return OK
        rejecting = [zone.name for zone in self.listed_by if zone.reject]
        if rejecting:
            text = f"host [{self.connection.remote.ip}] is listed on {', '.join(rejecting)}"
            return DENY, text
        return CONT


@implementer(IRegistration, IConnectHook, IHeloHook, IEhloHook, IMailHook, IShutdown)
class Plugin:
    name = "dns-list"

    def __init__(self) -> None:
        self.zones: list[Zone] = []
        self.active: set[str] = set()
        self.search_first = False
        self.periodic = 30.0
        self.timeout = 10.0
        self.backscatterer: Zone | None = None
        self._checks: LoopingCall | None = None
        self._generation = 0  # counts (re)loads: a self-test of an older one is void
        self._checking = False  # the first self-tests since (re)loading are running
        self._waiting: list[Deferred[None]] = []  # connections waiting for them

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.clock = context.reactor
        self.resolver = context.resolver
        self.load()
        for name in ("dns-list.ini", "dnsbl.zones", "dnswl.zones"):
            context.config.on_change(name, self.load)

    # -- configuration ----------------------------------------------------------------

    def load(self) -> None:
        """(Re)read dns-list.ini and run the zones' self-tests; a bad value raises,
        naming the file, and changes nothing."""
        name = "dns-list.ini"
        ini = self.config.get_ini(
            name,
            booleans=[f"*.{key}" for key in _BOOLEAN_KEYS],
        )
        main = ini["main"]
        search = str(main.get("search", "all")).strip().lower() or "all"
        if search not in ("all", "first"):
            raise ValueError(f"{name} [main] search must be all or first, not {search!r}")
        periodic = ini_number(main, "periodic_checks", 30, zero_ok=True, where=f"{name} [main]")
        timeout = ini_number(main, "timeout", 10, zero_ok=False, where=f"{name} [main]")
        named = {z: f"{name} [main] zones" for z in _zone_names(main.get("zones", ""))}
        for legacy in ("dnsbl.zones", "dnswl.zones"):
            for zone_name in self.config.get_list(legacy):
                named.setdefault(zone_name.lower().rstrip("."), legacy)
        allow_legacy = {z.lower().rstrip(".") for z in self.config.get_list("dnswl.zones")}
        zones = []
        for zone_name, source in named.items():
            if not _NAME.match(zone_name):
                raise ValueError(f"{source}: {zone_name!r} is not a domain name")
            section = ini.get(zone_name, {})
            default_type = "allow" if zone_name in allow_legacy else "block"
            zones.append(_zone(name, zone_name, section, default_type, self.log.warn))
        backscatterer = None
        section = ini.get(_BACKSCATTERER, {})
        if section.get("enable") is True:
            backscatterer = _zone(name, _BACKSCATTERER, section, "block", self.log.warn)
        if ini.get("stats", {}).get("enable") is True:
            self.log.warn(f"{name} [stats]: keeping statistics in Redis is not supported; ignored")
        self.zones = zones
        self.backscatterer = backscatterer
        self.search_first = search == "first"
        self.periodic = periodic
        self.timeout = timeout
        self._start_checks()

    def _start_checks(self) -> None:
        if self._checks is not None and self._checks.running:
            self._checks.stop()
        self._checks = None
        self._generation += 1
        if not self.periodic:
            self.active = {zone.name for zone in self.zones}
            if self.backscatterer is not None:
                self.active.add(self.backscatterer.name)
            self._ready()
            return
        self.active = set()
        self._checking = True
        self._checks = LoopingCall(self.check_zones)
        self._checks.clock = self.clock
        first = self._checks.start(self.periodic * 60, now=True)
        first.addErrback(lambda f: self.log.error(f"zone self-tests stopped: {f.value}"))

    def shutdown(self) -> None:
        if self._checks is not None and self._checks.running:
            self._checks.stop()

    # -- self-tests ---------------------------------------------------------------------

    def check_zones(self) -> Deferred[None]:
        """Test every zone; the zones that pass are the active ones."""
        zones = list(self.zones)
        if self.backscatterer is not None:
            zones.append(self.backscatterer)
        generation = self._generation
        tests = [self._self_test(zone, generation) for zone in zones]
        return DeferredList(tests, consumeErrors=True).addBoth(self._ready, generation)

    def _ready(self, result: object = None, generation: int | None = None) -> None:
        """The zones are tested: let the connections that waited for it go on."""
        if generation is not None and generation != self._generation:
            return  # tests of a configuration since replaced
        self._checking = False
        waiting, self._waiting = self._waiting, []
        for waited in waiting:
            waited.callback(None)

    def _self_test(self, zone: Zone, generation: int) -> Deferred[None]:
        listed = self._lookup(zone, "127.0.0.2")
        unlisted = (
            succeed(_Lookup(zone)) if zone.loopback_is_rejected else self._lookup(zone, "127.0.0.1")
        )

        def judge(outcomes: list[tuple[bool, Any]]) -> None:
            if generation != self._generation:
                return
            (_, positive), (_, negative) = outcomes
            if positive.error is not None:
                problem = f"127.0.0.2 could not be looked up ({positive.error})"
            elif positive.addresses is None:
                problem = "127.0.0.2, which every list must list, is not listed"
            elif negative.error is not None:
                problem = f"127.0.0.1 could not be looked up ({negative.error})"
            elif negative.addresses is not None:
                problem = "127.0.0.1, which no list may list, is listed (it lists everyone?)"
            else:
                problem = None
            if problem is None:
                if zone.name not in self.active:
                    self.active.add(zone.name)
                    self.log.info(f"zone {zone.name} passed its self-test; in use")
            else:
                self._set_aside(zone, problem)

        return DeferredList([listed, unlisted]).addCallback(judge)

    def _set_aside(self, zone: Zone, why: str) -> None:
        was = zone.name in self.active
        self.active.discard(zone.name)
        if was or self.periodic:
            if self.periodic:
                until = f"it passes a self-test (every {self.periodic:g} min)"
            else:
                until = "dns-list.ini changes (periodic_checks=0: no self-tests)"
            self.log.warn(f"zone {zone.name}: {why}; not used until {until}")

    # -- lookups ------------------------------------------------------------------------

    def _lookup(self, zone: Zone, ip: str) -> Deferred[_Lookup]:
        """Look C{ip} up in C{zone}; never fails."""
        name = query_name(ip, zone.name)
        if name is None:
            return succeed(_Lookup(zone, error=f"{ip!r} is not an address"))

        def found(addresses: list[str]) -> _Lookup:
            return self._read(zone, addresses)

        def missing(failure: Failure) -> _Lookup:
            if failure.check(NXDomain, NoAnswer):
                return _Lookup(zone)
            error = failure.value
            if isinstance(error, DNSError):
                return _Lookup(zone, error=error.message)
            return _Lookup(zone, error=f"{type(error).__name__}: {error}")

        lookup: Deferred[list[str]] = self.resolver.lookup_a(name)
        return lookup.addCallbacks(found, missing)

    def _read(self, zone: Zone, addresses: list[str]) -> _Lookup:
        """Listed, unless the answer is one no list gives (then the zone is set aside)."""
        outside = [a for a in addresses if ipaddress.ip_address(a) not in _LOOPBACK]
        if outside:
            self._set_aside(
                zone,
                f"answered {', '.join(outside)}, outside 127/8 (a resolver rewriting NXDOMAIN?)",
            )
            return _Lookup(zone, error="answer outside 127/8")
        refused = set(addresses) & _SPAMHAUS_REFUSALS if "spamhaus" in zone.name else set()
        if zone.name == "list.dnswl.org" and _DNSWL_REFUSAL in addresses:
            refused.add(_DNSWL_REFUSAL)
        if refused:
            self._set_aside(
                zone, f"refused the query ({', '.join(sorted(refused))}: over its usage limit?)"
            )
            return _Lookup(zone, error="query refused")
        return _Lookup(zone, addresses=addresses)

    # -- hooks ----------------------------------------------------------------------------

    def hook_connect(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        if connection.remote.is_private:
            connection.results.add(self.name, skip=f"private: {connection.remote.ip}")
            return CONT
        if not self._checking:
            return self._check(connection)
        waited: Deferred[None] = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(waited)

        def still_testing(result: object, timeout: float) -> None:
            connection.results.add(self.name, err="self-tests still running")

        waited.addTimeout(self.timeout, self.clock, onTimeoutCancel=still_testing)
        return waited.addCallback(lambda _: self._check(connection))

    def _check(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        ip = connection.remote.ip
        zones = [zone for zone in self.zones if zone.name in self.active]
        if not zones:
            connection.results.add(self.name, err="no zones")
            return CONT
        if _is_ipv6(ip):
            for zone in zones:
                if not zone.ipv6:
                    connection.results.add(self.name, skip=f"{zone.name}: ipv6 disabled")
            zones = [zone for zone in zones if zone.ipv6]
            if not zones:
                return CONT
        verdict = _Verdict(self, connection, zones)
        for zone in zones:
            if verdict.done.called:
                break
            verdict.pending.append(self._lookup(zone, ip).addCallback(verdict.add))
        if verdict.done.called:
            return verdict.done

        def give_up(result: object, timeout: float) -> _Answer:
            for lookup in verdict.pending:
                lookup.cancel()
            connection.results.add(self.name, err=f"timeout after {timeout:g} s")
            return verdict.outcome()

        return verdict.done.addTimeout(self.timeout, self.clock, onTimeoutCancel=give_up)

    def record(self, connection: Connection, lookup: _Lookup, verdict: _Verdict) -> bool:
        """Record one zone's answer; True when it decides the verdict at once."""
        zone = lookup.zone
        results = connection.results
        if lookup.error is not None:
            results.add(self.name, err=f"{zone.name}: {lookup.error}")
            return False
        if lookup.addresses is None:
            if zone.type == "block":
                results.add(self.name, **{"pass": zone.name})
            return False
        for address in lookup.addresses:
            if address in zone.labels:
                results.add(self.name, msg=zone.labels[address])
        if zone.type == "allow":
            results.add(self.name, **{"pass": zone.name})
            verdict.allowed_by = zone
            return True
        if zone.type == "karma" and "127.0.0.2" not in lookup.addresses:
            if "127.0.0.1" in lookup.addresses:
                results.add(self.name, **{"pass": zone.name})
            else:
                results.add(self.name, msg=zone.name)
            return False
        results.add(self.name, fail=zone.name)
        verdict.listed_by.append(zone)
        return zone.reject and self.search_first

    def hook_helo(self, connection: Connection, host: str) -> _Answer:
        return self._allowed(connection, "ok_helo")

    def hook_ehlo(self, connection: Connection, host: str) -> _Answer:
        return self._allowed(connection, "ok_helo")

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> _Answer | Deferred[_Answer]:
        if self._allowed(connection, "ok_mail") == OK:
            return OK
        zone = self.backscatterer
        if zone is None or zone.name not in self.active:
            return CONT
        if not (sender.is_null or sender.local.lower() == "postmaster"):
            return CONT
        if _is_ipv6(connection.remote.ip) and not zone.ipv6:
            return CONT

        def judged(lookup: _Lookup) -> _Answer:
            if lookup.error is not None:
                connection.results.add(self.name, err=f"{zone.name}: {lookup.error}")
            if lookup.addresses is None:
                return CONT
            connection.results.add(self.name, fail=zone.name)
            host = connection.remote.host or "unknown"
            return DENY, f"Host {host} [{connection.remote.ip}] is listed by {zone.name}"

        return self._lookup(zone, connection.remote.ip).addCallback(judged)

    def _allowed(self, connection: Connection, key: str) -> _Answer:
        """OK for an allow-listed client when an allow zone says C{key}."""
        allowing = connection.notes.get("dnswl_zone")
        if allowing is None:
            return CONT
        if any(zone.name == allowing and getattr(zone, key) for zone in self.zones):
            return OK
        return CONT


def _is_ipv6(ip: str) -> bool:
    """True for an IPv6 address that is not an IPv4-mapped one."""
    address = canonical_address(ip)
    return address is not None and address.version == 6


def _zone_names(raw: object) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    names: list[str] = []
    for item in items:
        for name in re.split(r"[\s,;]+", str(item)):
            name = name.strip().lower().rstrip(".")
            if name and name not in names:
                names.append(name)
    return names


def _zone(where: str, name: str, section: dict[str, Any], default_type: str, warn: Any) -> Zone:
    kind = str(section.get("type", default_type)).strip().lower()
    if kind not in _TYPES:
        raise ValueError(f"{where} [{name}] type must be block, allow or karma, not {kind!r}")
    labels = {}
    for key, value in section.items():
        if key in _ZONE_KEYS:
            continue
        try:
            if ipaddress.ip_address(key) in _LOOPBACK:
                labels[key] = str(value)
                continue
        except ValueError:
            pass
        warn(f"{where} [{name}] {key}: neither a setting nor a 127.x.x.x code; ignored")
    return Zone(
        name,
        type=kind,
        reject=section.get("reject", True) is not False,
        ipv6=section.get("ipv6", True) is not False,
        loopback_is_rejected=section.get("loopback_is_rejected") is True,
        ok_helo=section.get("ok_helo") is True,
        ok_mail=section.get("ok_mail") is True,
        labels=labels,
    )
