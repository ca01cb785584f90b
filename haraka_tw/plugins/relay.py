"""relay: who may relay, which domains are relayed for, and where their mail goes.

Four parts, each switched in relay.ini C{[relay]} (read again when it changes):

- C{acl} (on): a client whose address is in C{relay_acl_allow} (addresses and CIDR
  networks, one per line) may relay for the whole connection, as one that logged in may
  (connect_init: after a PROXY header or XCLIENT, for the address they give). Its connect
  hook then answers OK, which skips the later connect plugins (dns-list, say): the
  operator's own hosts are not screened.
- C{dest_domains} (off): recipients in the domains of C{relay_dest_domains.ini} with
  C{"action": "accept"} or C{"continue"} are taken for relaying (a backup MX, or a filter
  in front of Exchange); C{"deny"} and unlisted domains get C{550 5.7.1 You are not
  allowed to relay}. This rcpt hook runs after the other plugins' (priority 100): a local
  domain accepted by rcpt_to.in_host_list, or a recipient another plugin refuses, never
  reaches it. A client that may relay already (acl, AUTH) is not checked. The client is
  not made a relaying one for the rest of the transaction, which would let it add any
  recipient (Haraka's plugin does); only at DATA is the message marked for the outbound
  queue (and so for C{force_routing}).
- C{force_routing} (on): outbound mail for a domain of C{relay_dest_domains.ini} with a
  C{"nexthop"} goes there (C{host}, C{host:port}, C{[v6]:port}, C{smtp://...},
  C{lmtp://...}) instead of the domain's MX; the C{any} key routes every other domain.
- C{all} (off): every recipient is accepted and relayed: an open relay, for spam traps and
  tests only (a WARN says so at start-up).

relay_dest_domains.ini::

    [domains]
    example.com = { "action": "accept", "nexthop": "exchange.internal:25" }
    example.net = { "action": "continue" }
    any = { "nexthop": "smarthost.example:587" }

Differences from Haraka's plugin, on purpose: an address without a prefix is that one
address (Haraka makes an IPv6 one a /32, a network of 2^96 addresses), and a bad entry is
an error naming its line, never a match (a bad prefix matches every address in
Haraka's); a recipient accepted by C{dest_domains} does not open the transaction to other
domains (in Haraka, every later recipient is accepted); domain keys match in any case;
a domain listed without a nexthop falls back to C{any}; switching a part on takes effect
without a restart; a bad C{relay_dest_domains.ini} on reload keeps the previous domains
without holding back a change to the other two files; C{continue} is C{accept}, as the
check runs after the other rcpt plugins anyway. Haraka's older names C{relay_acl},
C{relay_force_routing} and C{relay_all} are not loaded: C{relay_all} no longer relays
everything in Haraka either.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, OK, Code
from haraka_tw.interfaces import (
    IConnectHook,
    IConnectInitHook,
    IDataHook,
    IGetMxHook,
    IPluginContext,
    IRcptHook,
    IRegistration,
)
from haraka_tw.outbound.endpoint import parse_endpoint
from haraka_tw.outbound.mx import MXHost
from haraka_tw.plugins.queue.forwarding import mx_from_url
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection, canonical_address

__all__ = ["Plugin", "parse_acl"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Answer = Code | tuple[Code, Any]
_NOT_ALLOWED = "You are not allowed to relay"
_ACTIONS = ("accept", "continue", "deny")
_TRANSACTION_NOTE = "relay_dest_domains"  # relaying granted by dest_domains, this transaction


def parse_acl(lines: list[str], where: str) -> tuple[list[_Network], list[str]]:
    """The networks of a relay_acl_allow file's lines; also a message for each bad line.

    Comments (C{#} or C{;}, whole-line or after an entry) and blank lines are skipped.
    """
    networks: list[_Network] = []
    problems: list[str] = []
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not text:
            continue
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            problems.append(f"{where}:{number}: {text!r} is not an address or network; ignored")
            continue
        if network.prefixlen == 0:
            problems.append(f"{where}:{number}: {text!r} is every address; ignored (see all=)")
        elif "/" in text and network.network_address != ipaddress.ip_address(text.split("/")[0]):
            problems.append(
                f"{where}:{number}: {text!r} has host bits set (a typo?); ignored,"
                f" write {network} if that is meant"
            )
        else:
            networks.append(network)
    return networks, problems


@implementer(IRegistration, IConnectInitHook, IConnectHook, IRcptHook, IDataHook, IGetMxHook)
class Plugin:
    name = "relay"

    def __init__(self) -> None:
        self.acl_on = True
        self.force_routing = True
        self.dest_domains_on = False
        self.all = False
        self.acl: list[_Network] = []
        self.domains: dict[str, dict[str, Any]] = {}

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        context.set_priority("rcpt", 100)  # after the plugins that know the recipients
        self.load()
        for name in ("relay.ini", "relay_acl_allow", "relay_dest_domains.ini"):
            context.config.on_change(name, self.load)

    def load(self) -> None:
        """(Re)read the three files. relay.ini and the ACL are applied first; a bad route
        then raises, naming the file and domain, and the previous routes stay."""
        ini = self.config.get_ini(
            "relay.ini",
            booleans=["+relay.acl", "+relay.force_routing", "-relay.dest_domains", "-relay.all"],
        )
        where = str(self.config.path("relay_acl_allow") or "relay_acl_allow")
        acl, problems = parse_acl(self.config.get_data("relay_acl_allow"), where)
        for problem in problems:
            self.log.error(problem)
        relay = ini["relay"]
        if relay["all"] and not self.all:
            self.log.warn("relay.ini [relay] all=true: every recipient is relayed (an open relay)")
        self.acl_on = bool(relay["acl"])
        self.force_routing = bool(relay["force_routing"])
        self.dest_domains_on = bool(relay["dest_domains"])
        self.all = bool(relay["all"])
        self.acl = acl
        self.domains = self._read_domains()

    def _read_domains(self) -> dict[str, dict[str, Any]]:
        name = "relay_dest_domains.ini"
        where = str(self.config.path(name) or name)
        section = self.config.get_ini(name).get("domains", {})
        domains: dict[str, dict[str, Any]] = {}
        for domain, raw in section.items():
            try:
                value = json.loads(raw) if isinstance(raw, str) else None
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} [domains] {domain}: not JSON ({e})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{where} [domains] {domain}: not a JSON object: {raw!r}")
            action = value.get("action")
            if action is not None and action not in _ACTIONS:
                raise ValueError(
                    f"{where} [domains] {domain}: action must be accept, continue or deny,"
                    f" not {action!r}"
                )
            nexthop = value.get("nexthop")
            if nexthop is not None:
                try:
                    value["mx"] = _next_hop(str(nexthop))
                except ValueError as e:
                    raise ValueError(f"{where} [domains] {domain}: nexthop: {e}") from None
            domains[domain.lower().rstrip(".")] = value
        return domains

    # -- acl --------------------------------------------------------------------------

    def hook_connect_init(self, connection: Connection) -> None:
        if not self.acl_on:
            return
        address = canonical_address(connection.remote.ip)
        if address is not None and any(address in network for network in self.acl):
            connection.relaying = True
            connection.results.add(self.name, **{"pass": "acl"})
        else:
            connection.results.add(self.name, skip="acl(unlisted)")

    def hook_connect(self, connection: Connection) -> _Answer:
        return OK if self.acl_on and connection.relaying else CONT

    # -- dest_domains and all ---------------------------------------------------------

    def hook_rcpt(
        self, connection: Connection, recipient: Address, params: dict[str, str | None]
    ) -> _Answer:
        transaction = connection.transaction
        if transaction is None:
            return CONT
        if self.dest_domains_on:
            answer = self._dest_domain(connection, recipient)
            if answer != CONT or not self.all:
                return answer
        if self.all:
            connection.loginfo(f"relaying for {recipient.format()} (relay.ini all=true)", self.name)
            connection.relaying = True
            return OK
        return CONT

    def _dest_domain(self, connection: Connection, recipient: Address) -> _Answer:
        transaction = connection.transaction
        assert transaction is not None
        results = transaction.results
        if connection.relaying:
            results.add(self.name, skip="relay_dest_domain(relay)")
            return CONT
        if not recipient.domain:  # <postmaster>: the core's (RFC 5321 4.5.1)
            return CONT
        route = self.domains.get(recipient.domain.lower().rstrip("."))
        action = route.get("action") if route is not None else None
        if action not in ("accept", "continue"):
            results.add(self.name, fail="relay_dest_domain")
            return DENY, _NOT_ALLOWED
        results.add(self.name, **{"pass": "relay_dest_domain"})
        transaction.notes[_TRANSACTION_NOTE] = True  # relayed from DATA on (hook_data)
        return OK

    def hook_data(self, connection: Connection) -> _Answer:
        """A message with recipients taken by dest_domains goes to the outbound queue.

        Set only now, when no more recipients can come: relaying set at RCPT would let
        the client add any recipient after one of a listed domain.
        """
        transaction = connection.transaction
        if transaction is not None and transaction.notes.get(_TRANSACTION_NOTE):
            connection.relaying = True
        return CONT

    # -- force_routing ----------------------------------------------------------------

    def hook_get_mx(self, hmail: Any, domain: str) -> _Answer:
        if not self.force_routing:
            return CONT
        route = self.domains.get(domain.lower().rstrip("."))
        if route is None or "mx" not in route:
            route = self.domains.get("any")
        if route is None or "mx" not in route:
            return CONT
        return OK, [route["mx"]]


def _next_hop(text: str) -> MXHost:
    """An MX host from a nexthop: C{smtp://...}, C{lmtp://...}, or C{host[:port]}."""
    if "://" in text:
        if not text.startswith(("smtp://", "lmtp://")):
            raise ValueError(f"{text!r}: only smtp:// and lmtp:// URLs")
        if not urlsplit(text).hostname:
            raise ValueError(f"{text!r}: no host")
        return mx_from_url(text)
    endpoint = parse_endpoint(text)
    return MXHost(endpoint.host, 0, port=endpoint.port, from_dns=False)
