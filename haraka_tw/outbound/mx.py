"""Where mail for a domain goes: its MX hosts, then their addresses, as Haraka finds them.

:meth:`MXResolver.resolve` turns a destination domain into :class:`MXHost` values, best
first; :meth:`MXResolver.addresses` turns those into :class:`MXAddress` values, in the
order the client should try them. Every failure is an :class:`MXError` that says whether
it is permanent (bounce) or temporary (try later) and carries an RFC 3463 status.

The rules, and where they differ from Haraka's:

- MX records, sorted by preference; equal preferences in random order (``rng``).
- No MX records (NOERROR, no data): the implicit MX (RFC 5321 5.1), the domain itself at
  preference 0, when it has an A or AAAA record; else permanent 5.1.2.
- NXDOMAIN: permanent 5.1.2 ("domain does not exist"), as Haraka.
- Null MX (RFC 7505: one MX whose exchange is ``.``): permanent **5.1.10**, the code RFC
  7505 section 4.2 assigns (Haraka says 5.1.2). A ``.`` among other MX records is dropped
  and the others are used.
- Any other DNS failure (SERVFAIL, REFUSED, timeout): temporary **4.4.3** (RFC 3463
  "directory server failure", Postfix's code; Haraka says 4.1.0).
- An address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) is that address, port
  ``mx_port``, ``from_dns=False``; a malformed one is permanent 5.1.2.
- Addresses: A and AAAA of every MX, looked up at once, listed MX by MX (an exchange
  that is an IP address, from a get_mx plugin or a sloppy MX record, is used as is);
  ``inet_prefer`` ``v4`` (and ``default``) lists each MX's IPv4 addresses first, ``v6``
  its IPv6 ones. An address already listed for a better MX is not listed again.
- Loopback, private, link-local, unspecified and multicast addresses are skipped (and
  logged) unless ``local_mx_ok``. Hosts a get_mx plugin names are the operator's choice
  (a smart host on a private address) and are not skipped, as in Haraka.
- An MX whose lookups fail is skipped when another has addresses. With no address left:
  permanent **5.4.4** when every MX name is NXDOMAIN, else temporary (4.4.3 if a lookup
  failed, 4.4.4 when the names have no usable address).
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger

from haraka_tw.config.errors import ConfigError
from haraka_tw.dns import DNSError, NoAnswer, NXDomain, Resolver

if TYPE_CHECKING:
    from haraka_tw.config import ConfigDirectory

__all__ = ["INET_PREFER", "OUTBOUND_INI_BOOLEANS", "MXAddress", "MXError", "MXHost", "MXResolver"]

INET_PREFER = ("default", "v4", "v6")
OUTBOUND_INI_BOOLEANS = ("-main.local_mx_ok",)

_logger = Logger(namespace="haraka_tw.outbound.mx")


def _log_to_twisted(message: str) -> None:
    _logger.info("{message}", message=message)


@dataclass(frozen=True)
class MXHost:
    """One host to deliver to: from DNS, an address literal, or a get_mx plugin.

    ``exchange`` is a host name or an IP address. The fields after ``port`` are for
    get_mx plugins (Haraka's HarakaMx): source address, HELO name, AUTH, LMTP,
    ``implicit_tls`` for a host that speaks TLS from the first byte (SMTPS, port 465), and
    ``path``, a Unix socket to connect to instead (an LMTP server's, as Dovecot's), for
    which ``exchange`` is only the server's name and nothing is looked up.
    """

    exchange: str
    priority: int
    port: int = 25
    bind: str | None = None
    bind_helo: str | None = None
    auth_user: str | None = None
    auth_pass: str | None = None
    using_lmtp: bool = False
    from_dns: bool = True
    implicit_tls: bool = False
    from_plugin: bool = False  # named by a get_mx plugin: the operator's choice, never skipped
    path: str | None = None


@dataclass(frozen=True)
class MXAddress:
    """One address to connect to, and the MX it belongs to ("" for a Unix socket's)."""

    mx: MXHost
    ip: str


class MXError(Exception):
    """No host to deliver to: ``permanent`` (bounce) or not (retry), with its status."""

    def __init__(self, permanent: bool, enhanced: str, message: str) -> None:
        super().__init__(permanent, enhanced, message)
        self.permanent = permanent
        self.enhanced = enhanced
        self.message = message

    def __str__(self) -> str:
        return f"{self.enhanced} {self.message}"


Lookup = list[str] | DNSError  # addresses, or why there are none


class MXResolver:
    """MX hosts and addresses of destination domains, through one :class:`Resolver`."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        port: int = 25,
        inet_prefer: str = "default",
        local_mx_ok: bool = False,
        rng: random.Random | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if inet_prefer not in INET_PREFER:
            raise ValueError(f"inet_prefer must be one of {', '.join(INET_PREFER)}")
        self.resolver = resolver
        self.port = port
        self.inet_prefer = inet_prefer
        self.local_mx_ok = local_mx_ok
        self._rng = rng or random.Random()
        self._log = log or _log_to_twisted

    @classmethod
    def from_config(
        cls,
        config: ConfigDirectory,
        resolver: Resolver,
        *,
        rng: random.Random | None = None,
        log: Callable[[str], None] | None = None,
    ) -> MXResolver:
        """outbound.ini [main] ``mx_port`` (25), ``inet_prefer`` (default), ``local_mx_ok``.

        A bad value raises :class:`ConfigError` naming the file and key.
        """
        main = config.get_ini("outbound.ini", booleans=OUTBOUND_INI_BOOLEANS)["main"]
        where = str(config.path("outbound.ini") or "outbound.ini")
        port = main.get("mx_port", 25)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(where, None, f"[main] mx_port: {port!r} is not a port number")
        prefer = str(main.get("inet_prefer", "default")).strip().lower() or "default"
        if prefer not in INET_PREFER:
            raise ConfigError(
                where, None, f"[main] inet_prefer: {prefer!r} is not {', '.join(INET_PREFER)}"
            )
        return cls(
            resolver,
            port=port,
            inet_prefer=prefer,
            local_mx_ok=bool(main["local_mx_ok"]),
            rng=rng,
            log=log,
        )

    # -- MX hosts ---------------------------------------------------------------------

    def resolve(self, domain: str) -> Deferred[list[MXHost]]:
        """The MX hosts of ``domain``, best first; fails with :class:`MXError`.

        Answered at once (no coroutine, no query) when the resolver's cache holds what
        it takes: the usual case, for every message to a domain after the first.
        """
        domain = domain.strip().rstrip(".").lower()
        try:
            known = self._known_hosts(domain)
        except MXError as e:
            return fail(e)
        if known is not None:
            return succeed(known)
        return Deferred.fromCoroutine(self._resolve(domain))

    def _known_hosts(self, domain: str) -> list[MXHost] | None:
        if domain.startswith("["):
            return [self._literal(domain)]
        records = self.resolver.known(domain, "MX")
        if records is None:
            return None
        implicit = None
        if isinstance(records, NoAnswer):
            found = self._known_lookups([domain])
            if found is None:
                return None
            implicit = found[domain]
        return self._hosts(domain, records, implicit)

    async def _resolve(self, domain: str) -> list[MXHost]:
        if domain.startswith("["):
            return [self._literal(domain)]
        records: list[tuple[int, str]] | DNSError
        try:
            records = await self.resolver.lookup_mx(domain)
        except DNSError as e:
            records = e
        implicit = None
        if isinstance(records, NoAnswer):
            implicit = (await self._lookup([domain]))[domain]
        return self._hosts(domain, records, implicit)

    def _hosts(
        self,
        domain: str,
        records: list[tuple[int, str]] | DNSError,
        implicit: tuple[Lookup, Lookup] | None,
    ) -> list[MXHost]:
        """The MX answer (and, with none, the domain's own A and AAAA) -> the hosts."""
        if isinstance(records, NXDomain):
            raise MXError(True, "5.1.2", f"domain {domain} does not exist")
        if isinstance(records, NoAnswer):
            assert implicit is not None
            return self._implicit(domain, implicit)
        if isinstance(records, DNSError):
            raise MXError(False, "4.4.3", f"DNS temporary failure: {records}")
        hosts = [(priority, exchange) for priority, exchange in records if exchange != "."]
        if not hosts:
            raise MXError(True, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        best: dict[str, int] = {}
        for priority, exchange in hosts:
            best[exchange] = min(priority, best.get(exchange, priority))
        ordered = sorted(best.items())  # from a known order, so a seeded rng repeats
        self._rng.shuffle(ordered)
        ordered.sort(key=lambda item: item[1])  # stable: equal priorities stay shuffled
        return [MXHost(exchange, priority, port=self.port) for exchange, priority in ordered]

    def _literal(self, domain: str) -> MXHost:
        text = domain[1:-1] if domain.endswith("]") else ""
        try:
            if text.startswith("ipv6:"):
                ip = str(ipaddress.IPv6Address(text[5:]))
            else:
                ip = str(ipaddress.IPv4Address(text))
        except ValueError:
            raise MXError(True, "5.1.2", f"{domain} is not a valid address literal") from None
        return MXHost(ip, 0, port=self.port, from_dns=False)

    def _implicit(self, domain: str, found: tuple[Lookup, Lookup]) -> list[MXHost]:
        """No MX records: the domain itself, if it has an address (RFC 5321 5.1)."""
        if any(isinstance(result, list) and result for result in found):
            return [MXHost(domain, 0, port=self.port)]
        temporary = [r for r in found if isinstance(r, DNSError) and not _is_final(r)]
        if temporary:
            raise MXError(False, "4.4.3", f"DNS temporary failure: {temporary[0]}")
        raise MXError(True, "5.1.2", f"domain {domain} has no MX, A or AAAA records")

    # -- addresses --------------------------------------------------------------------

    def addresses(self, hosts: list[MXHost]) -> Deferred[list[MXAddress]]:
        """The addresses of ``hosts``, in the order to try; fails with :class:`MXError`.

        Answered at once when the resolver's cache holds every A and AAAA needed.
        """
        names = [h.exchange for h in hosts if h.path is None and _ip(h.exchange) is None]
        known = self._known_lookups(names)
        if known is None:
            return self._lookup(names).addCallback(lambda found: self._choose(hosts, found))
        try:
            return succeed(self._choose(hosts, known))
        except MXError as e:
            return fail(e)

    def _choose(
        self, hosts: list[MXHost], lookups: dict[str, tuple[Lookup, Lookup]]
    ) -> list[MXAddress]:
        found: list[MXAddress] = []
        seen: set[str] = set()
        skipped: list[str] = []
        failures: list[DNSError] = []
        for host in hosts:
            if host.path is not None:
                if host.path not in seen:
                    seen.add(host.path)
                    found.append(MXAddress(host, ""))
                continue
            literal = _ip(host.exchange)
            if literal is not None:
                candidates = [literal]
            else:
                results = lookups[host.exchange]
                failures += [result for result in results if isinstance(result, DNSError)]
                v4, v6 = (_listed(result) for result in results)
                candidates = v6 + v4 if self.inet_prefer == "v6" else v4 + v6
            for ip in candidates:
                if ip in seen:
                    continue
                seen.add(ip)
                if not host.from_plugin and not self.local_mx_ok and _is_local(ip):
                    skipped.append(f"{ip} ({host.exchange})")
                else:
                    found.append(MXAddress(host, ip))
        if skipped:
            self._log(f"skipped local MX addresses (local_mx_ok is off): {', '.join(skipped)}")
        if found:
            return found
        raise self._no_address(hosts, failures, skipped)

    def _no_address(
        self, hosts: list[MXHost], failures: list[DNSError], skipped: list[str]
    ) -> MXError:
        names = ", ".join(host.exchange for host in hosts)
        nxdomain = {f.name for f in failures if isinstance(f, NXDomain)}
        if hosts and all(host.exchange in nxdomain for host in hosts):
            return MXError(True, "5.4.4", f"MX host(s) {names} do not exist")
        temporary = [f for f in failures if not _is_final(f)]
        if temporary:
            return MXError(False, "4.4.3", f"DNS temporary failure: {temporary[0]}")
        if skipped:
            return MXError(
                False, "4.4.4", f"every address of {names} is local, and local_mx_ok is off"
            )
        return MXError(False, "4.4.4", f"no address for MX host(s) {names}")

    def _known_lookups(self, names: list[str]) -> dict[str, tuple[Lookup, Lookup]] | None:
        """A and AAAA of every name from the resolver's cache; None if any is not kept."""
        known: dict[str, tuple[Lookup, Lookup]] = {}
        for name in names:
            a = self.resolver.known(name, "A")
            aaaa = self.resolver.known(name, "AAAA") if a is not None else None
            if a is None or aaaa is None:
                return None
            known[name] = (a, aaaa)
        return known

    def _lookup(self, names: list[str]) -> Deferred[dict[str, tuple[Lookup, Lookup]]]:
        """A and AAAA of every name at once: {name: (A result, AAAA result)}.

        One DeferredList holds every lookup, so cancelling it cancels them all.
        """
        unique = list(dict.fromkeys(names))
        lookups: list[Deferred[list[str]]] = []
        for name in unique:
            lookups += [self.resolver.lookup_a(name), self.resolver.lookup_aaaa(name)]

        def collect(results: list[tuple[bool, Any]]) -> dict[str, tuple[Lookup, Lookup]]:
            settled: list[Lookup] = []
            for ok, value in results:
                if ok:
                    settled.append(value)
                elif value.check(DNSError):
                    settled.append(value.value)
                else:
                    value.raiseException()  # a bug, or the lookups were cancelled
            return {name: (settled[2 * i], settled[2 * i + 1]) for i, name in enumerate(unique)}

        return DeferredList(lookups, consumeErrors=True).addCallback(collect)


def _listed(result: Lookup) -> list[str]:
    return result if isinstance(result, list) else []


def _is_final(error: DNSError) -> bool:
    """An answer that will not change on a retry: the name or its records do not exist."""
    return isinstance(error, NXDomain | NoAnswer)


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> str | None:
    """``text`` as a canonical IP address, or None when it is a host name."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_local(text: str) -> bool:
    """Loopback, private, link-local, unspecified or multicast (IPv4-mapped too).

    "Private" is :mod:`ipaddress`'s: RFC 1918, ULA ``fc00::/7``, and the documentation
    ranges (192.0.2.0/24, 2001:db8::/32, ...) as well.
    """
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_unspecified
        or (ip.is_multicast)
    )
