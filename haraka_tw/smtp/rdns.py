"""The core reverse lookup used when no lookup_rdns plugin names the client.

It goes through the project's one resolver (L{haraka_tw.dns.Resolver}, configured by
dns.ini), shared with the outbound side.

It answers from the hosts file first, then a PTR query with a short timeout, and caches
answers (and failures) for a while, so a client never waits long on a slow or unreachable
nameserver. dns.ini's C{[rdns]} section sets both (L{ReverseLookup.from_config}).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from haraka_tw.config import ConfigDirectory, ConfigError
from haraka_tw.config.formats import ini_number

__all__ = ["ReverseLookup", "read_hosts_file"]


def read_hosts_file(path: str = "/etc/hosts") -> dict[str, str]:
    """Map each address in a hosts file to its first name."""
    names: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2:
                    names.setdefault(fields[0], fields[1])
    except OSError:
        pass
    return names


class ReverseLookup:
    """PTR names for client addresses: hosts file, then DNS, cached."""

    def __init__(
        self,
        reactor: IReactorTime,
        timeout: float = 3.0,
        ttl: float = 600.0,
        hosts: dict[str, str] | None = None,
        resolver: Any = None,
        cache_size: int = 10000,
    ) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self.ttl = ttl
        self._hosts = read_hosts_file() if hosts is None else hosts
        self._cache: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self.cache_size = cache_size
        self._resolver = resolver

    @classmethod
    def from_config(
        cls, config: ConfigDirectory, reactor: IReactorTime, resolver: Any = None
    ) -> ReverseLookup:
        """The core reverse lookup as dns.ini C{[rdns]} says: C{timeout} (seconds a client
        waits for its PTR answer, 3 by default) and C{cache_ttl} (seconds a name or a
        failure is kept, 600; 0 keeps nothing).

        @raise ConfigError: naming dns.ini and the key, for a value that is not a number in
            range.
        """
        section = config.get_ini("dns.ini").get("rdns", {})
        where = str(config.path("dns.ini") or "dns.ini")
        try:
            timeout = ini_number(section, "timeout", 3.0, zero_ok=False, where="[rdns]")
            ttl = ini_number(section, "cache_ttl", 600.0, zero_ok=True, where="[rdns]")
        except ValueError as e:
            raise ConfigError(where, None, str(e)) from None
        return cls(reactor, timeout=timeout, ttl=ttl, resolver=resolver)

    def lookup(self, ip: str) -> Deferred[str | None]:
        """The name of C{ip}, or None; never fails."""
        name = self.lookup_now(ip)
        return name if isinstance(name, Deferred) else succeed(name)

    def lookup_now(self, ip: str) -> str | Deferred[str | None] | None:
        """L{lookup}, answering at once (without a Deferred) from the hosts file or the
        cache, and for what is not an address."""
        if ip in self._hosts:
            return self._hosts[ip]
        now = self._reactor.seconds()
        cached = self._cache.get(ip)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return None
        resolver = self._resolver
        if resolver is None:
            from haraka_tw.dns import Resolver

            resolver = self._resolver = Resolver(self._reactor, timeout=self.timeout, attempts=1)
        d: Deferred[Any] = resolver.lookup_ptr(ip)
        d.addTimeout(self.timeout, self._reactor)  # no client waits long on a slow nameserver

        def found(names: list[str]) -> str | None:
            return names[0] if names else None

        def store(host: str | None) -> str | None:
            if self.ttl <= 0:  # (cache_ttl 0: nothing kept)
                return host
            self._cache[ip] = (self._reactor.seconds() + self.ttl, host)
            self._cache.move_to_end(ip)
            while len(self._cache) > self.cache_size:  # bounded, oldest first
                self._cache.popitem(last=False)
            return host

        d.addCallbacks(found, lambda _failure: None)
        d.addCallback(store)
        return d
