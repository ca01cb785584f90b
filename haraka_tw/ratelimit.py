"""Rate limits counted in Redis, for the limit plugin: the rate sections of Haraka's
limit.ini read, and the two ways of counting them.

A rate is C{N/period}: at most N events a period, the period in seconds or with a unit
(C{5m}, C{1h}, C{1d}); C{N} alone is N a minute, and 0 is no limit. Each section maps
lookup keys to rates, with C{default} for the rest:

- a client (L{RateTable.for_client}): its address, the network (C{192.0.2.0/24}) or the
  leading octets (C{192.0.2}, Haraka's form) holding it, its reverse name or a domain above
  it, the client's history as a scoring plugin (karma) recorded it (C{[<section>_history]}
  C{good}, C{bad}, C{none}), then C{default};
- an address (L{RateTable.for_address}): the address, its domain or a domain above it,
  then C{default}.

A key matched by a network, a prefix or a domain is one count shared by every client or
address it covers; C{default} and history count each client address (an IPv6 client by
its /64, which one host commonly holds whole) or each address on its own.

L{fixed_window} counts in a key that is made with its expiry and counted in one MULTI/EXEC
(Haraka set the expiry apart, so a lost EXPIRE left a count that never ended);
L{sliding_window} keeps each event in a sorted set by its time, drops those older than the
period and counts the rest, in one MULTI/EXEC (Haraka's hash of every event, read whole at
each connection, cost more the more a client was refused).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from haraka_tw.redis import RedisClient
from haraka_tw.smtp.connection import canonical_address

__all__ = ["Rate", "RateTable", "fixed_window", "sliding_window"]

_RATE = re.compile(r"(\d+)(?:/(\d+)([smhd]?))?", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_HISTORY = ("good", "bad", "none")
#: the longest period (ten years): Redis refuses expiries past what it can count
MAX_PERIOD = 3650 * 86400
#: the sections whose keys are clients (addresses, networks, names); the others' are mail
#: addresses and domains
CLIENT_SECTIONS = frozenset({"rate_conn", "rate_rcpt_host"})
_MAPPED_V6 = ipaddress.IPv6Network("::ffff:0:0/96")
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rate:
    """At most C{limit} events each C{period} seconds; a limit of 0 is no limit."""

    limit: int
    period: int = 60

    @classmethod
    def parse(cls, value: Any, where: str) -> Rate:
        """C{N}, C{N/P} or C{N/P<unit>}; ValueError naming C{where} for anything else."""
        text = str(value).strip()
        match = _RATE.fullmatch(text) if not isinstance(value, bool) else None
        if match is None:
            raise ValueError(
                f"{where}: {value!r} is not a rate (N, or N/period with s, m, h or d: 5/10m)"
            )
        period = int(match[2]) * _UNITS[match[3].lower()] if match[2] is not None else 60
        if not 0 < period <= MAX_PERIOD:
            raise ValueError(f"{where}: {value!r} needs a period of 1 s to 3650 days")
        return cls(int(match[1]), period)


@dataclass(frozen=True)
class RateTable:
    """One rate section of limit.ini: its lookup keys, default and history rates."""

    name: str
    rates: Mapping[str, Rate] = field(default_factory=dict)
    networks: tuple[tuple[_Network, str, Rate], ...] = ()
    default: Rate | None = None
    history_plugin: str = "karma"
    history: Mapping[str, Rate] = field(default_factory=dict)

    @classmethod
    def from_ini(cls, ini: Mapping[str, Mapping[str, Any]], name: str) -> RateTable:
        """Section C{name} (and C{<name>_history}, when enabled) of limit.ini."""
        rates: dict[str, Rate] = {}
        networks: list[tuple[_Network, str, Rate]] = []
        default = None
        for key, value in ini.get(name, {}).items():
            if key == "enabled":
                continue
            where = f"limit.ini [{name}] {key}"
            rate = Rate.parse(value, where)
            if key == "default":
                default = rate
            elif "/" in key and name in CLIENT_SECTIONS:
                networks.append((_network(key, where), key, rate))
            else:
                rates[_host_key(key)] = rate
        networks.sort(key=lambda entry: -entry[0].prefixlen)  # the narrowest first
        history: dict[str, Rate] = {}
        plugin = "karma"
        section = ini.get(f"{name}_history", {})
        if section.get("enabled"):
            plugin = str(section.get("plugin") or plugin)
            for key in _HISTORY:
                if key in section:
                    history[key] = Rate.parse(section[key], f"limit.ini [{name}_history] {key}")
        return cls(name, rates, tuple(networks), default, plugin, history)

    def for_client(self, ip: str, host: str | None, results: Any = None) -> tuple[str, Rate] | None:
        """The count and rate for a client: (the Redis key, the rate), or None when no
        limit applies."""
        found = self._client_rate(ip, host, results)
        if found is None or not found[1].limit:
            return None
        return f"{self.name}:{found[0]}", found[1]

    def _client_rate(self, ip: str, host: str | None, results: Any) -> tuple[str, Rate] | None:
        parsed = canonical_address(ip)  # (a client of a [::] listener as IPv4)
        address = parsed.compressed if parsed is not None else ip.strip().lower()
        if address in self.rates:
            return address, self.rates[address]
        own = address  # (the count of a client of its own: an IPv6 one by its /64)
        if parsed is not None and parsed.version == 6:
            own = ipaddress.ip_network(f"{parsed}/64", strict=False).compressed
        if parsed is not None:
            for network, key, rate in self.networks:
                if parsed in network:
                    return key, rate
            if parsed.version == 4:
                octets = address.split(".")
                for cut in range(3, 0, -1):
                    prefix = ".".join(octets[:cut])
                    if prefix in self.rates:
                        return prefix, self.rates[prefix]
        if host:
            labels = host.lower().rstrip(".").split(".")
            for start in range(len(labels)):
                name = ".".join(labels[start:])
                if name in self.rates:
                    return name, self.rates[name]
        if self.history and results is not None:
            entry = results.get(self.history_plugin) or {}
            history = entry.get("history")
            if isinstance(history, int | float) and not isinstance(history, bool):
                kind = "good" if history > 0 else "bad" if history < 0 else "none"
                if kind in self.history:
                    return own, self.history[kind]
        if self.default is not None:
            return own, self.default
        return None

    def for_address(self, address: str) -> tuple[str, Rate] | None:
        """The count and rate for a mail address (C{user@domain}): (the Redis key, the
        rate), or None when no limit applies."""
        address = address.lower()
        found: tuple[str, Rate] | None = None
        if address in self.rates:
            found = address, self.rates[address]
        else:
            labels = address.rpartition("@")[2].rstrip(".").split(".")
            for start in range(len(labels)):
                name = ".".join(labels[start:])
                if name and name in self.rates:
                    found = name, self.rates[name]
                    break
            else:
                if self.default is not None:
                    found = address, self.default
        if found is None or not found[1].limit:
            return None
        return f"{self.name}:{found[0]}", found[1]


def _host_key(key: str) -> str:
    """A lookup key as it is compared: lower case, an IP address in its short form (an
    IPv4-mapped one as IPv4, as clients are looked up)."""
    key = key.strip().lower()
    address = canonical_address(key)
    return address.compressed if address is not None else key


def _network(key: str, where: str) -> _Network:
    """A network key (an IPv4-mapped IPv6 network as the IPv4 one)."""
    try:
        network = ipaddress.ip_network(key, strict=False)
    except ValueError:
        raise ValueError(f"{where}: {key!r} is not a network") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_V6):
        first = network.network_address.ipv4_mapped
        assert first is not None
        return ipaddress.ip_network(f"{first}/{network.prefixlen - 96}", strict=False)
    return network


async def fixed_window(redis: RedisClient, key: str, period: int) -> int:
    """Count one event in C{key}, a window of C{period} seconds from its first event; the
    count so far, this one included."""
    replies = await redis.atomically(["SET", key, 0, "EX", period, "NX"], ["INCR", key])
    return int(replies[-1])


async def sliding_window(redis: RedisClient, key: str, period: int, now_ms: int, event: str) -> int:
    """Count one event (C{event}: unique, say a connection's uuid) at C{now_ms} in the
    sorted set C{key}; the events of the last C{period} seconds, this one included."""
    replies = await redis.atomically(
        ["ZREMRANGEBYSCORE", key, "-inf", now_ms - period * 1000],
        ["ZADD", key, now_ms, f"{now_ms}:{event}"],
        ["ZCARD", key],
        ["EXPIRE", key, period],
    )
    return int(replies[2])
