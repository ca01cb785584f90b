"""mail_from.is_resolvable: refuse a sender whose domain cannot receive mail.

A bounce to the sender of a message must be deliverable, so at MAIL FROM the sender's
domain is looked up as an MTA would look it up to deliver there (RFC 5321 5.1):

1. its MX records; an MX host counts when it has an A or AAAA record that is not a
   bogus address (C{re_bogus_ip} for IPv4: 0.0.0.0, 255.255.255.255, 127/8; for IPv6
   loopback, unspecified, link-local, unique-local, multicast, IPv4-mapped and the
   documentation prefix). Every MX host is tried, not only the most preferred.
2. with no MX record (NOERROR, no answer), the domain's own A/AAAA records (the implicit
   MX), with the same test. Haraka's plugin documents this but refuses such a domain
   unless C{allow_mx_ip}; here it passes, as RFC 5321 says.
3. a null MX (RFC 7505: one MX record, exchange C{.}) is refused with C{550 5.7.27}.

A domain that does not exist, or has no usable address, is refused with C{550 5.1.8}
(C{[reject] no_mx=deny}, the default), deferred with C{450 4.1.8} (C{defer}), or only
recorded (C{no}). A lookup that fails (timeout, SERVFAIL, REFUSED) is never taken as
"no address": unless another MX host already answered with a good address, the sender
gets C{450 4.4.3 Temp. resolver error}, so a nameserver's bad minute costs a retry, not
a lost message. C{timeout} caps the whole check.

The null sender (C{<>}) and a sender without a domain are not checked (C{skip: null
host}); an address literal (C{user@[192.0.2.1]}) passes when C{allow_mx_ip} is on and
the address is not bogus, and is refused otherwise. Results go in
C{transaction.results} under the plugin's name: C{pass} C{has_fwd_dns} or C{implicit_mx},
C{fail} C{has_fwd_dns} or C{null_mx}, C{err} with the DNS error.

mail_from.is_resolvable.ini (Haraka's old and new layouts both read)::

    [main]
    ; seconds for the whole check (timeout_ms: the same in milliseconds)
    timeout=29
    ; accept an MX record whose exchange is an IP address, and address literals
    allow_mx_ip=false
    ; IPv4 addresses that never count (a regular expression, searched from the start)
    re_bogus_ip=^(?:0\\.0\\.0\\.0|255\\.255\\.255\\.255|127\\.)

    [reject]
    ; deny (550), defer (450) or no (record only); true/false: deny/defer
    no_mx=deny

The lookups go through the server's resolver (dns.ini), whose answers are cached.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import dns.rcode
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYSOFT, Code
from haraka_tw.config.formats import ini_number
from haraka_tw.dns import DNSError, DNSServerError, DNSTimeout, NoAnswer, NXDomain
from haraka_tw.interfaces import IMailHook, IPluginContext, IRegistration
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection
from haraka_tw.smtp.replies import Reply

__all__ = ["DEFAULT_BOGUS_IP", "MAX_MX_HOSTS", "Plugin", "is_bogus"]

#: The most preferred MX hosts looked up (a domain may list thousands: each is two queries).
MAX_MX_HOSTS = 10
DEFAULT_BOGUS_IP = r"^(?:0\.0\.0\.0|255\.255\.255\.255|127\.)"

_NO_MX = "No MX for your FROM address"
_NO_VALID_MX = "No valid MX for your FROM address"
_BOGUS_V6 = (ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("fc00::/7"))
_NO_MX_MODES = {"deny": "deny", "true": "deny", "defer": "defer", "false": "defer", "no": "no"}

_Answer = Code | tuple[Code, Any]


def is_bogus(ip: str, bogus_v4: re.Pattern[str]) -> bool:
    """True when C{ip} is no address to deliver mail to (or is not an address)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return True
    if isinstance(address, ipaddress.IPv4Address):
        return bogus_v4.match(str(address)) is not None
    return (
        address.is_loopback
        or address.is_unspecified
        or address.is_link_local
        or address.is_multicast
        or address.is_site_local
        or address.ipv4_mapped is not None
        or any(address in network for network in _BOGUS_V6)
    )


def _ip_exchange(name: str) -> str | None:
    """The address an MX exchange or a domain names directly (C{1.2.3.4}, C{[1.2.3.4]},
    C{[IPv6:::1]}), or None for a host name."""
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _reason(error: Exception) -> str:
    """A word for why a lookup failed, for the reply: timeout, SERVFAIL, REFUSED, ..."""
    if isinstance(error, DNSTimeout):
        return "timeout"
    if isinstance(error, DNSServerError):
        return dns.rcode.to_text(error.rcode)
    return type(error).__name__


class _Lookups:
    """What the A/AAAA lookups of a set of hosts found: good addresses, and failures."""

    def __init__(self) -> None:
        self.good: list[str] = []
        self.errors: list[DNSError] = []


@implementer(IRegistration, IMailHook)
class Plugin:
    name = "mail_from.is_resolvable"

    def __init__(self) -> None:
        self.timeout = 29.0
        self.allow_mx_ip = False
        self.bogus_v4 = re.compile(DEFAULT_BOGUS_IP)
        self.no_mx = "deny"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.clock = context.reactor
        self.resolver = context.resolver
        self.load()
        context.config.on_change("mail_from.is_resolvable.ini", self.load)

    def load(self) -> None:
        """(Re)read the ini file; a bad value raises, naming it, and changes nothing."""
        name = "mail_from.is_resolvable.ini"
        ini = self.config.get_ini(name, booleans=["-main.allow_mx_ip"])
        main = ini["main"]
        if main.get("timeout_ms", "") != "":
            timeout = ini_number(main, "timeout_ms", 29000, zero_ok=False, where=name) / 1000
        else:
            timeout = ini_number(main, "timeout", 29, zero_ok=False, where=name)
        pattern = str(main.get("re_bogus_ip") or DEFAULT_BOGUS_IP)
        try:
            bogus_v4 = re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"{name} re_bogus_ip: {pattern!r} is not a regular expression: {e}"
            ) from None
        raw = ini.get("reject", {}).get("no_mx", main.get("reject_no_mx", "deny"))
        word = str(raw).strip().lower()
        word = {"1": "true", "0": "false", "yes": "true"}.get(word, word)
        if word not in _NO_MX_MODES:
            raise ValueError(f"{name} [reject] no_mx must be deny, defer or no, not {raw!r}")
        self.timeout = timeout
        self.allow_mx_ip = bool(main["allow_mx_ip"])
        self.bogus_v4 = bogus_v4
        self.no_mx = _NO_MX_MODES[word]

    # -- the hook ---------------------------------------------------------------------

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> _Answer | Deferred[_Answer]:
        transaction = connection.transaction
        if transaction is None:
            return CONT
        domain = sender.domain
        if sender.is_null or not domain:
            transaction.results.add(self.name, skip="null host")
            return CONT
        if domain.startswith("["):
            literal = _ip_exchange(domain)
            if literal is not None and self.allow_mx_ip and not is_bogus(literal, self.bogus_v4):
                transaction.results.add(self.name, **{"pass": "implicit_mx"})
                return CONT
            transaction.results.add(self.name, fail="has_fwd_dns")
            return self._no_mx(_NO_VALID_MX)
        check = Deferred.fromCoroutine(self._check(connection, domain.rstrip(".").lower()))

        def timed_out(result: object, timeout: float) -> _Answer:
            transaction.results.add(self.name, err=f"timeout after {timeout:g} s")
            return DENYSOFT, Reply(450, "4.4.3", ("Temp. resolver error (timeout)",))

        return check.addTimeout(self.timeout, self.clock, onTimeoutCancel=timed_out)

    async def _check(self, connection: Connection, domain: str) -> _Answer:
        results = connection.transaction.results if connection.transaction else None
        try:
            exchanges = await self.resolver.lookup_mx(domain)
        except NXDomain:
            return self._failed(results, "has_fwd_dns", _NO_MX)
        except NoAnswer:
            found = await self._addresses([domain])
            if found.good:
                self._record(results, **{"pass": "implicit_mx"})
                return CONT
            if found.errors:
                return self._temporary(results, found.errors[0])
            return self._failed(results, "has_fwd_dns", _NO_MX)
        except DNSError as e:
            return self._temporary(results, e)
        if len(exchanges) == 1 and exchanges[0][1] == ".":
            self._record(results, fail="null_mx")
            if self.no_mx == "no":
                return CONT
            text = f"Null MX: {domain} does not send mail"
            return DENY, Reply(550, "5.7.27", (text,))
        hosts: list[str] = []
        for _, exchange in sorted(exchanges)[:MAX_MX_HOSTS]:
            ip = _ip_exchange(exchange)
            if ip is None:
                if exchange != ".":
                    hosts.append(exchange)
            elif self.allow_mx_ip and not is_bogus(ip, self.bogus_v4):
                self._record(results, **{"pass": "implicit_mx"})
                return CONT
        found = await self._addresses(hosts)
        if found.good:
            self._record(results, **{"pass": "has_fwd_dns"})
            return CONT
        if found.errors:
            return self._temporary(results, found.errors[0])
        return self._failed(results, "has_fwd_dns", _NO_VALID_MX)

    async def _addresses(self, hosts: list[str]) -> _Lookups:
        """Look up A and AAAA of every host at once."""
        found = _Lookups()
        if not hosts:
            return found
        resolver = self.resolver
        lookups = [
            lookup(host) for host in hosts for lookup in (resolver.lookup_a, resolver.lookup_aaaa)
        ]
        outcomes = await DeferredList(lookups, consumeErrors=True)
        for ok, value in outcomes:
            if ok:
                found.good.extend(ip for ip in value if not is_bogus(ip, self.bogus_v4))
            elif value.check(CancelledError):
                value.raiseException()  # the check timed out: no verdict from what is left
            elif value.check(NXDomain, NoAnswer) is None:
                found.errors.append(value.value)
        return found

    # -- outcomes ---------------------------------------------------------------------

    def _record(self, results: Any, **fields: str) -> None:
        if results is not None:
            results.add(self.name, **fields)

    def _failed(self, results: Any, label: str, text: str) -> _Answer:
        self._record(results, fail=label)
        return self._no_mx(text)

    def _no_mx(self, text: str) -> _Answer:
        if self.no_mx == "deny":
            return DENY, Reply(550, "5.1.8", (text,))
        if self.no_mx == "defer":
            return DENYSOFT, Reply(450, "4.1.8", (text,))
        return CONT

    def _temporary(self, results: Any, error: Exception) -> _Answer:
        self._record(results, err=str(error))
        return DENYSOFT, Reply(450, "4.4.3", (f"Temp. resolver error ({_reason(error)})",))
