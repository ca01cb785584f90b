"""greylist: defer mail from hosts not seen before; let it in when they come back.

Haraka's C{greylist}, reading its greylist.ini and keeping its state in Redis, so every
worker process (C{nodes}) and every server sharing the Redis greylist together.

At rcpt_ok (a recipient another plugin accepted) the client's host is looked up:

  - a host on the white list (C{white:<host>}) passes, and stays listed C{[period] white}
    seconds after each pass;
  - else the tuple host, sender, recipient (C{grey:<host>:<sender>:<recipient>}) is looked
    up: the first time it is recorded and the recipient deferred (C{451 4.7.1}, C{text});
    a retry before C{[period] black} seconds is deferred again; a retry after that, within
    C{[period] grey} seconds of the first try, passes and puts the host on the white list.

The host is the organisational part of the client's reverse name when that name resolves
back to the client's address and does not look dynamic (C{mail.example.com} ->
C{example.com}, so a sender's pool of servers counts as one), else its IPv4 /24 or IPv6
/64 network (a pool of addresses on one network retries from any of them).

Not greylisted: relaying clients, clients on private addresses, clients, senders and
recipients on the C{[ip_whitelist]}, C{[envelope_whitelist]}, C{[recipient_whitelist]}
lists, and clients a DNS allow list passed (C{[skip] dnswlorg}, C{mailspikewl}: the
dns-list plugin's pass for list.dnswl.org, wl.mailspike.net). With Redis away, recipients
are deferred (C{450 4.7.0 Backend failure}) at once, as in Haraka (which waits 30 s first);
C{[main] redis_down=accept} lets them in instead.

greylist.ini::

    text=Greylisted. Please come back later.
    [main]
    redis_down=defer          ; or accept
    [redis]                   ; this plugin's Redis, else redis.ini's
    host=127.0.0.1
    port=6379
    db=11
    [period]
    black=850
    grey=90000
    white=3024000
    [skip]
    dnswlorg=true
    mailspikewl=true
    [ip_whitelist]            ; addresses and networks, one per line
    [envelope_whitelist]      ; sender addresses and domains
    [recipient_whitelist]     ; recipient addresses and domains
    [special_dynamic_domains] ; reverse names under these are dynamic
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from haraka_tw.codes import CONT, DENYSOFT
from haraka_tw.config.formats import ini_number
from haraka_tw.interfaces import IPluginContext, IRcptOkHook, IRegistration, IShutdown
from haraka_tw.logging import Level
from haraka_tw.plugins.helo.checks import is_dynamic, organizational_domain
from haraka_tw.redis import (
    RedisClient,
    RedisError,
    RedisUnavailable,
    plugin_client,
)
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection, canonical_address
from haraka_tw.smtp.replies import Reply

__all__ = ["Plugin", "Settings", "host_id", "white_id"]

BOOLEANS = ["+skip.dnswlorg", "+skip.mailspikewl"]
DEFAULT_TEXT = "Greylisted. Please come back later."
_BACKEND_FAILURE = Reply(450, "4.7.0", ("Backend failure. Please, retry later.",))
_ALLOW_ZONES = {"dnswlorg": "list.dnswl.org", "mailspikewl": "wl.mailspike.net"}
_HOST_NOTE = "greylist_host"  # connection note: the host id, once worked out


@dataclass(frozen=True)
class Settings:
    """greylist.ini, as read."""

    text: str = DEFAULT_TEXT
    black: int = 850
    grey: int = 90000
    white: int = 3024000
    accept_when_down: bool = False
    skip_zones: tuple[str, ...] = tuple(_ALLOW_ZONES.values())
    ip_whitelist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    envelope_whitelist: frozenset[str] = frozenset()
    recipient_whitelist: frozenset[str] = frozenset()
    dynamic_domains: tuple[str, ...] = ()


def _listed(ini: Any, section: str) -> list[str]:
    """The entries of a list section (keys without values, one per line)."""
    return [str(key).strip().lower() for key in ini.get(section, {}) if str(key).strip()]


def read_settings(ini: Any, name: str = "greylist.ini") -> Settings:
    """Settings from greylist.ini; ValueError naming the file and key for a bad value."""
    main, period, skip = ini["main"], ini.get("period", {}), ini.get("skip", {})
    where = f"{name} [period]"
    times = [
        int(ini_number(period, key, default, zero_ok=False, where=where))
        for key, default in (("black", 850), ("grey", 90000), ("white", 3024000))
    ]
    if times[0] >= times[1]:
        raise ValueError(f"{where}: black ({times[0]}) must be shorter than grey ({times[1]})")
    down = str(main.get("redis_down") or "defer").strip().lower()
    if down not in ("defer", "accept"):
        raise ValueError(f"{name} [main] redis_down must be defer or accept, not {down!r}")
    networks = []
    for entry in _listed(ini, "ip_whitelist"):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{name} [ip_whitelist]: {entry!r} is not an address") from None
    return Settings(
        text=str(main.get("text") or DEFAULT_TEXT).strip(),
        black=times[0],
        grey=times[1],
        white=times[2],
        accept_when_down=down == "accept",
        skip_zones=tuple(zone for key, zone in _ALLOW_ZONES.items() if skip.get(key, True)),
        ip_whitelist=tuple(networks),
        envelope_whitelist=frozenset(_listed(ini, "envelope_whitelist")),
        recipient_whitelist=frozenset(_listed(ini, "recipient_whitelist")),
        dynamic_domains=tuple(d.strip(".") for d in _listed(ini, "special_dynamic_domains")),
    )


def host_id(ip: str, confirmed_name: str | None, dynamic_domains: tuple[str, ...] = ()) -> str:
    """The host a client's tries are counted for: from its forward-confirmed reverse name,
    the name without its first label, down to the organisational domain
    (C{mx1.mail.example.com} -> C{mail.example.com}, C{mail.example.com} -> C{example.com}),
    unless the name looks dynamic; else the client's IPv4 /24 or IPv6 /64 (a pool of
    servers may retry from another address)."""
    address = canonical_address(ip)
    if address is None:
        raise ValueError(f"{ip!r} is not an IP address")
    if confirmed_name:
        name = confirmed_name.lower().rstrip(".")
        domain = organizational_domain(name)
        dynamic = is_dynamic(name, str(address)) or any(
            name == d or name.endswith("." + d) for d in dynamic_domains
        )
        if address.version == 4 and str(int(address)) in name:
            dynamic = True  # (the address as one decimal number)
        if domain and not dynamic:
            host_part = name[: -len(domain) - 1] if name != domain else ""
            labels = host_part.split(".")[1:] if host_part else []
            return ".".join([*labels, domain])
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def white_id(ip: str, host: str) -> str:
    """The white list's key for a host: a named host as itself, a network as the one
    address that passed (one server retrying does not white list its neighbours)."""
    if "/" not in host:
        return host
    return str(canonical_address(ip))


def _escape(part: str) -> str:
    """A key part: C{%} and C{:} escaped (an IPv6 network holds colons)."""
    return part.replace("%", "%25").replace(":", "%3a")


@implementer(IRegistration, IRcptOkHook, IShutdown)
class Plugin:
    name = "greylist"

    def __init__(self) -> None:
        self.settings = Settings()
        self.redis: RedisClient | None = None

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.clock = context.reactor
        self.resolver = context.resolver
        self.load()
        own = self.config.get_ini("greylist.ini").get("redis")  # (Haraka ships db=11)
        self.redis, _ = plugin_client(context, own, "greylist.ini [redis]")
        context.config.on_change("greylist.ini", self.load)

    def load(self) -> None:
        """(Re)read greylist.ini; a bad value raises, naming it, and changes nothing."""
        self.settings = read_settings(self.config.get_ini("greylist.ini", booleans=BOOLEANS))

    def shutdown(self) -> None:
        """Close the Redis connection (the sessions have ended)."""
        if self.redis is not None:
            self.redis.close()

    # -- the hook -----------------------------------------------------------------------

    def hook_rcpt_ok(self, connection: Connection, recipient: Address) -> Any:
        """Defer a recipient whose client, sender and recipient are new; pass a retry
        after the black period, and every recipient of a host on the white list."""
        txn = connection.transaction
        if txn is None or txn.mail_from is None:
            return CONT
        skip = self._skip(connection, txn.mail_from, recipient)
        if skip is not None:
            txn.results.add(self.name, skip=skip)
            return CONT
        if txn.results.has(self.name, "pass", "whitelisted"):
            return CONT  # (one pass lets the host's other recipients in too)
        check = Deferred.fromCoroutine(self._check(connection, txn.mail_from, recipient))
        return check.addErrback(self._backend_failed, connection)

    def _skip(self, connection: Connection, sender: Address, recipient: Address) -> str | None:
        settings = self.settings
        if connection.relaying:
            return "relaying"
        ip = canonical_address(connection.remote.ip)
        if ip is None or connection.remote.is_private:
            return "private-ip"
        if any(ip in network for network in settings.ip_whitelist):
            return "config-whitelist(ip)"
        if not sender.is_null and (
            sender.address.lower() in settings.envelope_whitelist
            or sender.domain.lower() in settings.envelope_whitelist
        ):
            return "config-whitelist(envelope)"
        if (
            recipient.address.lower() in settings.recipient_whitelist
            or recipient.domain.lower() in settings.recipient_whitelist
        ):
            return "config-whitelist(recipient)"
        passed = (connection.results.get("dns-list") or {}).get("pass") or ()
        for zone in settings.skip_zones:
            if zone in passed:
                return f"requested({zone})"
        return None

    async def _check(self, connection: Connection, sender: Address, recipient: Address) -> Any:
        assert self.redis is not None
        txn = connection.transaction
        assert txn is not None
        host = await self._host(connection)
        moment = self.clock.seconds()  # (compared as is; stored in whole seconds)
        now = int(moment)
        settings, redis = self.settings, self.redis
        white = f"white:{_escape(white_id(connection.remote.ip, host))}"
        if await redis.execute("EXPIRE", white, settings.white):  # (1: it is there)
            await redis.atomically(["HINCRBY", white, "tried", 1], ["HSET", white, "updated", now])
            txn.results.add(self.name, **{"pass": "whitelisted"}, stage="rcpt", host=host)
            return CONT
        who = sender.address.lower() if not sender.is_null else "<>"
        grey = ":".join(["grey", *(_escape(p) for p in (host, who, recipient.address.lower()))])
        record = _numbers(await redis.execute("HGETALL", grey))
        created = record.get("created")
        if created is not None and created + settings.black < moment <= created + settings.grey:
            await redis.atomically(
                ["HSET", white, "first_connect", created, "whitelisted", now, "updated", now,
                 "lifetime", settings.white, "tried_when_greylisted", record.get("tried", 1),
                 "tried", 1],
                ["EXPIRE", white, settings.white],
            )  # fmt: skip
            txn.results.add(self.name, **{"pass": "whitelisted"}, stage="rcpt", host=host)
            self._log(connection, f"host {host} retried after {now - created} s: white listed")
            return CONT
        if created is None or moment > created + settings.grey:
            await redis.atomically(
                ["HSET", grey, "created", now, "updated", now, "lifetime", settings.grey,
                 "tried", 1],
                ["EXPIRE", grey, settings.grey],
            )  # fmt: skip
        else:
            await redis.atomically(["HINCRBY", grey, "tried", 1], ["HSET", grey, "updated", now])
        txn.results.add(self.name, fail="greylisted", stage="rcpt", host=host)
        return DENYSOFT, Reply(451, "4.7.1", (settings.text,))

    async def _host(self, connection: Connection) -> str:
        """The client's host id, worked out once per connection (a forward lookup of its
        reverse name)."""
        ip, name = connection.remote.ip, connection.remote.host
        known = connection.notes.get(_HOST_NOTE)
        if known and known[0] == ip:  # (XCLIENT may have named another client since)
            return str(known[1])
        confirmed = None
        address = canonical_address(ip)
        if name and "." in name and address is not None:
            lookup = self.resolver.lookup_a if address.version == 4 else self.resolver.lookup_aaaa
            try:
                addresses = await lookup(name)
            except Exception:  # (no forward name, or DNS trouble: fall back to the network)
                addresses = []
            if any(canonical_address(a) == address for a in addresses):
                confirmed = name
        host = host_id(ip, confirmed, self.settings.dynamic_domains)
        connection.notes[_HOST_NOTE] = (ip, host)
        return host

    def _backend_failed(self, failure: Any, connection: Connection) -> Any:
        failure.trap(RedisUnavailable, RedisError)
        txn = connection.transaction
        if txn is not None:
            txn.results.add(self.name, err=str(failure.value))
        connection.log(Level.ERROR, f"Redis: {failure.value}", self.name)
        if self.settings.accept_when_down:
            return CONT
        return DENYSOFT, _BACKEND_FAILURE

    def _log(self, connection: Connection, text: str) -> None:
        connection.log(Level.INFO, text, self.name)


def _numbers(reply: Any) -> dict[str, int]:
    """An HGETALL reply (field, value, ...) as numbers; fields that are not, left out."""
    out: dict[str, int] = {}
    items = list(reply or [])
    for key, value in zip(items[::2], items[1::2], strict=False):
        try:
            out[key.decode()] = int(value)
        except (ValueError, AttributeError, UnicodeDecodeError):
            continue
    return out
