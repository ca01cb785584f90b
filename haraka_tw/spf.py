"""SPF (RFC 7208): is this client address allowed to send mail for that domain?

L{Checker.check_host} is the RFC's check_host() over any resolver with C{lookup_txt},
C{lookup_a}, C{lookup_aaaa}, C{lookup_mx} and C{lookup_ptr} (the server's
L{haraka_tw.dns.Resolver}). The record is parsed whole before anything is evaluated, so
a syntax error anywhere is C{permerror}, as section 4.6 says, whatever term would have
matched first. What the RFC leaves to the checker is taken on the strict side:

  - at most 10 terms that cause DNS lookups (include, a, mx, ptr, exists, redirect) and
    at most 2 of them answered by "no such name" or "no records" (4.6.4), then permerror;
  - at most 10 MX hosts per C{mx} (more is permerror) and 10 names per C{ptr};
  - a DNS failure (timeout, SERVFAIL) is temperror, except in C{ptr} and C{%{p}}, where
    the RFC says it only fails to match;
  - an IPv4-mapped IPv6 client (C{::ffff:192.0.2.1}) is checked as the IPv4 address;
  - a domain that is no host name (one label, an empty or 64-character label, an address
    literal) gives C{none} (4.3);
  - C{exp=} explanations come only from the record whose directive failed the client,
    or from a redirect's target, never from an include (6.2).

Nothing here does I/O of its own or reads the clock, but the C{%{t}} macro of an
explanation, which reads the checker's C{clock}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from haraka_tw.dns import DNSError, NoAnswer, NXDomain

__all__ = [
    "FAIL",
    "NEUTRAL",
    "NONE",
    "PASS",
    "PERMERROR",
    "RESULTS",
    "SOFTFAIL",
    "TEMPERROR",
    "Checker",
    "Outcome",
    "PermError",
    "Record",
    "TempError",
    "is_host_name",
    "parse_record",
]

PASS, FAIL, SOFTFAIL, NEUTRAL = "pass", "fail", "softfail", "neutral"
NONE, TEMPERROR, PERMERROR = "none", "temperror", "permerror"
RESULTS = (PASS, FAIL, SOFTFAIL, NEUTRAL, NONE, TEMPERROR, PERMERROR)

LOOKUP_LIMIT = 10
VOID_LIMIT = 2
MX_LIMIT = 10
PTR_LIMIT = 10
MAX_NAME = 253

_QUALIFIERS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL, "": PASS}
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)\Z", re.S)
_DIRECTIVE = re.compile(r"([-+~?]?)([A-Za-z][A-Za-z0-9_.-]*)(.*)\Z", re.S)
_DOMAIN_CIDR = re.compile(r"(?::(?P<domain>.+?))?(?P<v4>/[0-9]+)?(?P<v6>//[0-9]+)?\Z", re.S)
_CIDR = re.compile(r"/(0|[1-9][0-9]*)\Z")
_MACRO = re.compile(r"%(?:\{([slodiphcrtvSLODIPHCRTV])([0-9]*)(r?)([-.+,/_=]*)\}|([%_-]))")
_LITERAL = re.compile(r"[!-$&-~]+")  # visible characters but "%"
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_HOST_LABEL = re.compile(r"[!-\-/-~]{1,63}\Z")  # a checked domain's: visible ASCII but the dot
_LABEL = re.compile(r"[^.]{1,63}\Z")  # a name looked up (a macro may put a space in it)
_EXPLANATION_TEXT = re.compile(r"[ !-$&-~]+")  # an explanation's literal text: spaces too
MAX_RECORD = 4096
_EXPLANATION_ONLY = frozenset("crt")


class PermError(Exception):
    """The record cannot be used: bad syntax, too many lookups, a missing include."""


class TempError(Exception):
    """A lookup failed (timeout, SERVFAIL): the answer may differ later."""


class Lookups(Protocol):
    """What the checker needs of a resolver (L{haraka_tw.dns.Resolver} has it)."""

    def lookup_txt(self, name: str) -> Deferred[list[str]]: ...
    def lookup_a(self, name: str) -> Deferred[list[str]]: ...
    def lookup_aaaa(self, name: str) -> Deferred[list[str]]: ...
    def lookup_mx(self, name: str) -> Deferred[list[tuple[int, str]]]: ...
    def lookup_ptr(self, ip: str) -> Deferred[list[str]]: ...


@dataclass(frozen=True)
class Outcome:
    """What check_host() found for one identity."""

    result: str  # one of RESULTS
    domain: str  # the domain checked (the one the identity names)
    mechanism: str = ""  # the directive that matched, "default" when none did
    explanation: str = ""  # why a fail failed, from exp= (empty without one)
    problem: str = ""  # for none, temperror and permerror: what was wrong
    lookups: int = 0  # DNS-querying terms evaluated


# -- parsing -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Macro:
    letter: str  # lower case
    keep: int  # rightmost parts kept, 0 for all
    reverse: bool
    delimiters: str
    escape: bool  # the letter was upper case: URL-escape the value


_Token = str | _Macro


@dataclass(frozen=True)
class MacroString:
    """A macro-string, parsed: literal text and macros, in order."""

    tokens: tuple[_Token, ...]
    text: str
    ends_in_macro: bool = False  # the last item is a macro (or %%, %_, %-), not literal text


@dataclass(frozen=True)
class Mechanism:
    """One directive of a record: what a match gives, and what it matches."""

    result: str  # what a match gives: pass, fail, softfail or neutral
    kind: str  # all, include, a, mx, ptr, ip4, ip6, exists
    target: MacroString | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128
    text: str = ""


@dataclass(frozen=True)
class Record:
    """A parsed record: its directives in order, and its redirect= and exp= targets."""

    mechanisms: tuple[Mechanism, ...]
    redirect: MacroString | None = None
    explanation: MacroString | None = None


def parse_macro_string(text: str, *, explanation: bool = False) -> MacroString:
    """The tokens of a macro-string (section 7.1); PermError on bad syntax. C{%{c}},
    C{%{r}} and C{%{t}} are allowed only in an explanation."""
    tokens: list[_Token] = []
    at = 0
    ends_in_macro = False
    literals = _EXPLANATION_TEXT if explanation else _LITERAL
    while at < len(text):
        literal = literals.match(text, at)
        if literal:
            tokens.append(literal.group())
            at = literal.end()
            ends_in_macro = False
            continue
        macro = _MACRO.match(text, at)
        if macro is None:
            raise PermError(f"bad macro or character at {text[at : at + 8]!r} in {text!r}")
        letter, digits, reverse, delimiters, escape = macro.groups()
        if escape is not None:
            tokens.append({"%": "%", "_": " ", "-": "%20"}[escape])
        else:
            lower = letter.lower()
            if lower in _EXPLANATION_ONLY and not explanation:
                raise PermError(f"%{{{letter}}} is only allowed in an explanation")
            if digits and int(digits) == 0:
                raise PermError(f"a macro keeps at least one part: {macro.group()!r}")
            keep = int(digits) if digits else 0
            tokens.append(_Macro(lower, keep, bool(reverse), delimiters or ".", letter.isupper()))
        at = macro.end()
        ends_in_macro = True
    return MacroString(tuple(tokens), text, ends_in_macro)


def _ends_in_toplabel(text: str) -> bool:
    """Whether C{text} ends in C{"." toplabel ["."]} (7.1): a label of letters, digits
    and inner hyphens, not all digits. (Checked by hand: a regular expression for it
    backtracks for seconds over a long label that fails.)"""
    text = text[:-1] if text.endswith(".") else text
    _, dot, label = text.rpartition(".")
    if not dot or not label or not set(label) <= _ALNUM | {"-"}:
        return False
    if "-" in label:
        return label[0] != "-" and label[-1] != "-"
    return not label.isdigit()


def parse_domain_spec(text: str) -> MacroString:
    """A domain-spec: a macro-string ending in a macro or in a top label (7.1)."""
    spec = parse_macro_string(text)
    if not spec.tokens:
        raise PermError("empty domain")
    if not spec.ends_in_macro and not _ends_in_toplabel(text):
        raise PermError(f"{text!r} does not end in a top-level domain name")
    return spec


def _cidr(text: str | None, most: int, term: str) -> int:
    """A prefix length (C{/24}), at most C{most}, no leading zeros; C{most} when absent."""
    if not text:
        return most
    match = _CIDR.match(text)
    if match is None or int(match.group(1)) > most:
        raise PermError(f"bad prefix length in {term!r}")
    return int(match.group(1))


def _mechanism(term: str) -> Mechanism:
    match = _DIRECTIVE.match(term)
    if match is None:
        raise PermError(f"unknown term {term!r}")
    qualifier, name, rest = match.groups()
    kind = name.lower()
    result = _QUALIFIERS[qualifier]
    if kind == "all":
        if rest:
            raise PermError(f"bad term {term!r}")
        return Mechanism(result, kind, text=term)
    if kind in ("include", "exists"):
        if not rest.startswith(":"):
            raise PermError(f"{kind} needs a domain: {term!r}")
        return Mechanism(result, kind, parse_domain_spec(rest[1:]), text=term)
    if kind in ("a", "mx", "ptr"):
        parts = _DOMAIN_CIDR.match(rest)
        if parts is None or (kind == "ptr" and (parts["v4"] or parts["v6"])):
            raise PermError(f"bad term {term!r}")
        target = parse_domain_spec(parts["domain"]) if parts["domain"] is not None else None
        if rest.startswith(":") and parts["domain"] is None:
            raise PermError(f"empty domain in {term!r}")
        cidr4 = _cidr(parts["v4"], 32, term)
        cidr6 = _cidr(parts["v6"] and parts["v6"][1:], 128, term)
        return Mechanism(result, kind, target, cidr4=cidr4, cidr6=cidr6, text=term)
    if kind in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise PermError(f"{kind} needs an address: {term!r}")
        address, slash, length = rest[1:].partition("/")
        most = 32 if kind == "ip4" else 128
        prefix = _cidr("/" + length if slash else None, most, term)
        try:
            if "%" in address:  # (Python takes an IPv6 zone; the RFC's grammar does not)
                raise ValueError(address)
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise PermError(f"bad address in {term!r}") from None
        if ip.version != (4 if kind == "ip4" else 6):
            raise PermError(f"bad address in {term!r}")
        network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        return Mechanism(result, kind, network=network, text=term)
    raise PermError(f"unknown mechanism {term!r}")


def parse_record(text: str) -> Record:
    """A record that starts with C{v=spf1}, parsed; PermError on any syntax error, and
    on a record longer than C{MAX_RECORD} characters (a TXT record may be 64 KB)."""
    if len(text) > MAX_RECORD:
        raise PermError(f"record longer than {MAX_RECORD} characters")
    terms = text.split(" ")
    if terms[0].lower() != "v=spf1":
        raise PermError("not an SPF record")
    mechanisms: list[Mechanism] = []
    modifiers: dict[str, MacroString] = {}
    for term in terms[1:]:
        if not term:
            continue
        modifier = _MODIFIER.match(term)
        if modifier is None:
            mechanisms.append(_mechanism(term))
            continue
        name, value = modifier.group(1).lower(), modifier.group(2)
        if name in ("redirect", "exp"):
            if name in modifiers:
                raise PermError(f"more than one {name}= modifier")
            modifiers[name] = parse_domain_spec(value)
        else:
            parse_macro_string(value)  # unknown modifiers are ignored, if well formed
    return Record(tuple(mechanisms), modifiers.get("redirect"), modifiers.get("exp"))


def is_spf_record(text: str) -> bool:
    """Does this TXT record claim to be SPF (C{v=spf1} alone or followed by a space)?"""
    return text[:6].lower() == "v=spf1" and text[6:7] in ("", " ")


def is_host_name(domain: str) -> bool:
    """A domain SPF can check (4.3): two labels at least, each of 1-63 visible ASCII
    characters, at most 253 characters without the final dot."""
    name = domain[:-1] if domain.endswith(".") else domain
    labels = name.split(".")
    return (
        len(labels) > 1
        and len(name) <= MAX_NAME
        and all(_HOST_LABEL.match(label) for label in labels)
        and not name.startswith("[")
    )


# -- evaluating ----------------------------------------------------------------------


class _Query:
    """One check_host() call and everything its recursion shares: the identity and the
    lookup budget."""

    def __init__(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, sender: str, helo: str):
        self.ip = ip
        local, _, domain = sender.rpartition("@")
        self.local = local or "postmaster"
        self.sender_domain = domain
        self.sender = f"{self.local}@{domain}"
        self.helo = helo
        self.lookups = 0
        self.voids = 0
        self.validated: list[str] | None = None  # the client's validated names (%{p})

    def count_lookup(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > LOOKUP_LIMIT:
            raise PermError(f"more than {LOOKUP_LIMIT} DNS lookups (at {term!r})")

    def count_void(self, name: str) -> None:
        self.voids += 1
        if self.voids > VOID_LIMIT:
            raise PermError(f"more than {VOID_LIMIT} lookups found nothing (at {name})")


def _client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Checker:
    """check_host() over C{resolver}. C{receiver} names this host in explanations
    (C{%{r}}); C{clock} gives C{%{t}}."""

    def __init__(
        self,
        resolver: Lookups,
        *,
        receiver: str = "unknown",
        clock: IReactorTime | None = None,
    ) -> None:
        self.resolver = resolver
        self.receiver = receiver
        self.clock = clock

    def check_host(
        self, ip: str, domain: str, sender: str = "", helo: str = ""
    ) -> Deferred[Outcome]:
        """check_host(C{ip}, C{domain}, C{sender}): what C{domain}'s record says of C{ip}.

        C{sender} is the MAIL FROM address (empty for the HELO identity: then
        C{postmaster@domain}); C{helo} the name the client greeted with (C{%{h}}). Never
        fails: problems are the C{temperror} or C{permerror} results. ValueError if
        C{ip} is not an address.
        """
        query = _Query(_client_ip(ip), sender or f"postmaster@{domain}", helo)
        return Deferred.fromCoroutine(self._check_host(query, domain))

    async def _check_host(self, query: _Query, domain: str) -> Outcome:
        domain = domain.lower()
        domain = domain[:-1] if domain.endswith(".") else domain
        if not domain.isascii():  # an internationalised name is checked as A-labels
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                return Outcome(NONE, domain, problem="not a host name")
        if not is_host_name(domain):
            return Outcome(NONE, domain, problem="not a host name")
        try:
            outcome = await self._evaluate(query, domain, top=True)
        except PermError as e:
            return Outcome(PERMERROR, domain, problem=str(e), lookups=query.lookups)
        except TempError as e:
            return Outcome(TEMPERROR, domain, problem=str(e), lookups=query.lookups)
        if outcome is None:
            return Outcome(NONE, domain, problem="no SPF record")
        return outcome

    async def _record(self, domain: str) -> Record | None:
        """The domain's SPF record, parsed; None without one (4.5)."""
        try:
            texts = await self.resolver.lookup_txt(domain)
        except (NXDomain, NoAnswer):
            return None
        except DNSError as e:
            raise TempError(f"{domain}: {e}") from None
        records = [text for text in texts if is_spf_record(text)]
        if not records:
            return None
        if len(records) > 1:
            raise PermError(f"{domain} has {len(records)} SPF records")
        return parse_record(records[0])

    async def _evaluate(self, query: _Query, domain: str, *, top: bool) -> Outcome | None:
        """The outcome of C{domain}'s record, None when it has none. C{top}: this record
        may supply the explanation (not inside an include)."""
        record = await self._record(domain)
        if record is None:
            return None
        for mechanism in record.mechanisms:
            if await self._matches(query, mechanism, domain):
                explanation = ""
                if mechanism.result == FAIL and top and record.explanation is not None:
                    explanation = await self._explain(query, record.explanation, domain)
                return Outcome(
                    mechanism.result, domain, mechanism.text, explanation, lookups=query.lookups
                )
        if record.redirect is None:
            return Outcome(NEUTRAL, domain, "default", lookups=query.lookups)
        query.count_lookup(f"redirect={record.redirect.text}")
        target = await self._target(query, record.redirect, domain)
        outcome = await self._evaluate(query, target, top=top)
        if outcome is None:
            raise PermError(f"redirect to {target}, which has no SPF record")
        return outcome

    async def _matches(self, query: _Query, mechanism: Mechanism, domain: str) -> bool:
        kind, ip = mechanism.kind, query.ip
        if kind == "all":
            return True
        if kind in ("ip4", "ip6"):
            return mechanism.network is not None and ip in mechanism.network
        query.count_lookup(mechanism.text)
        target = domain
        if mechanism.target is not None:
            target = await self._target(query, mechanism.target, domain)
        if kind == "include":
            outcome = await self._evaluate(query, target, top=False)
            if outcome is None:
                raise PermError(f"include of {target}, which has no SPF record")
            return outcome.result == PASS
        if kind == "a":
            addresses = await self._addresses(query, target, ip.version, void=True)
            return _matches_cidr(query.ip, addresses, mechanism)
        if kind == "mx":
            return await self._mx_matches(query, target, mechanism)
        if kind == "exists":
            return bool(await self._addresses(query, target, 4, void=True))
        return target in await self._validated_names(query, target, count_void=True)

    async def _mx_matches(self, query: _Query, target: str, mechanism: Mechanism) -> bool:
        exchanges = await self._ask(self.resolver.lookup_mx, target)
        if not exchanges:
            query.count_void(target)
            return False
        if len(exchanges) > MX_LIMIT:
            raise PermError(f"{target} has more than {MX_LIMIT} MX records")
        for _, host in sorted(exchanges):
            if host == "." or not is_lookup_name(host):
                continue
            addresses = await self._addresses(query, host, query.ip.version, void=False)
            if _matches_cidr(query.ip, addresses, mechanism):
                return True
        return False

    async def _addresses(self, query: _Query, name: str, version: int, *, void: bool) -> list[str]:
        """A or AAAA records of C{name}; a void answer counts when C{void}."""
        lookup = self.resolver.lookup_a if version == 4 else self.resolver.lookup_aaaa
        found = await self._ask(lookup, name) if is_lookup_name(name) else []
        if not found and void:
            query.count_void(name)
        return found

    async def _ask(self, lookup: Callable[[str], Deferred[Any]], name: str) -> list[Any]:
        try:
            return list(await lookup(name))
        except (NXDomain, NoAnswer):
            return []
        except DNSError as e:
            raise TempError(f"{name}: {e}") from None

    async def _validated_names(
        self, query: _Query, target: str | None, *, count_void: bool
    ) -> list[str]:
        """The client's names that resolve back to it (5.5), as the C{ptr} mechanism
        needs them: each name, and each of its parent domains up to C{target}."""
        try:
            names = await self.resolver.lookup_ptr(str(query.ip))
        except (NXDomain, NoAnswer):
            names = []
        except DNSError:
            return []
        if not names:
            if count_void:
                query.count_void(f"PTR of {query.ip}")
            return []
        validated = []
        for name in names[:PTR_LIMIT]:
            if not is_lookup_name(name):
                continue
            try:
                addresses = await self._addresses(query, name, query.ip.version, void=False)
            except TempError:
                continue
            if any(ipaddress.ip_address(a) == query.ip for a in addresses):
                validated.append(name.lower())
        if target is None:
            return validated
        return [target for name in validated if name == target or name.endswith("." + target)]

    async def _target(self, query: _Query, spec: MacroString, domain: str) -> str:
        """A domain-spec expanded into the name to look up (too long: cut from the left)."""
        name = await self._expand(query, spec, domain)
        name = name[:-1] if name.endswith(".") else name
        while len(name) > MAX_NAME and "." in name:
            name = name.split(".", 1)[1]
        return name.lower()

    async def _expand(
        self, query: _Query, spec: MacroString, domain: str, *, explanation: bool = False
    ) -> str:
        out = []
        for token in spec.tokens:
            if isinstance(token, str):
                out.append(token)
                continue
            value = await self._macro_value(query, token.letter, domain)
            parts = re.split("[" + re.escape(token.delimiters) + "]", value)
            if token.reverse:
                parts.reverse()
            if token.keep:
                parts = parts[-token.keep :]
            value = ".".join(parts)
            out.append(quote(value, safe="") if token.escape else value)
        return "".join(out)

    async def _macro_value(self, query: _Query, letter: str, domain: str) -> str:
        ip = query.ip
        if letter == "s":
            return query.sender
        if letter == "l":
            return query.local
        if letter == "o":
            return query.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if ip.version == 4:
                return str(ip)
            return ".".join(ip.exploded.replace(":", "").upper())  # as RFC 7208 7.4 shows
        if letter == "v":
            return "in-addr" if ip.version == 4 else "ip6"
        if letter == "h":
            return query.helo
        if letter == "c":
            return str(ip)
        if letter == "r":
            return self.receiver
        if letter == "t":
            return str(int(self.clock.seconds())) if self.clock is not None else "0"
        return await self._p_macro(query, domain)

    async def _p_macro(self, query: _Query, domain: str) -> str:
        """The client's validated name (C{%{p}}): one equal to C{domain}, else one under
        it, else any; "unknown" without one."""
        if query.validated is None:
            query.validated = await self._validated_names(query, None, count_void=False)
        names = query.validated
        chosen = next((n for n in names if n == domain), None)
        chosen = chosen or next((n for n in names if n.endswith("." + domain)), None)
        return chosen or (names[0] if names else "unknown")

    async def _explain(self, query: _Query, spec: MacroString, domain: str) -> str:
        """The text an exp= modifier points to, expanded; empty when it cannot be had."""
        try:
            name = await self._target(query, spec, domain)
            texts = await self._ask(self.resolver.lookup_txt, name) if is_lookup_name(name) else []
            if len(texts) != 1 or not texts[0].isascii():
                return ""
            text = parse_macro_string(texts[0], explanation=True)
            return await self._expand(query, text, domain, explanation=True)
        except (PermError, TempError):
            return ""


def is_lookup_name(name: str) -> bool:
    """Can C{name} be asked for (labels of 1-63 characters, 253 in all)?"""
    name = name[:-1] if name.endswith(".") else name
    return bool(name) and len(name) <= MAX_NAME and all(_LABEL.match(p) for p in name.split("."))


def _matches_cidr(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, addresses: list[str], mechanism: Mechanism
) -> bool:
    prefix = mechanism.cidr4 if ip.version == 4 else mechanism.cidr6
    for address in addresses:
        try:
            network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        except ValueError:
            continue
        if network.version == ip.version and ip in network:
            return True
    return False
