"""early_talker: refuse clients that talk before it is their turn.

SMTP clients must wait for the banner before their first command, and for the 354 after
DATA before the message. Spam software often does not. The core sets
C{connection.early_talker} when a client sends anything before the banner; this plugin
turns that into a refusal:

- C{connect}: after an optional pause before the banner (C{pause}), so that impatient
  clients reveal themselves, an early talker gets DENYDISCONNECT "You talk too soon"
  (C{554 You talk too soon}, and the connection closes);
- C{helo}, C{ehlo}, C{mail}: an early talker gets the same (C{550}, and close);
- C{data}: with a pause, the 354 waits that long; a client that sends anything meanwhile is
  an early talker too, and gets C{554} (BDAT, whose chunk follows the command by design,
  is not paused).

Results go in C{connection.results} under the plugin's name: C{pass}/C{fail} C{early}, or
C{skip} with the reason a client is not checked.

early_talker.ini::

    [main]
    ; seconds to wait before the banner and before the 354 (0: no pause)
    pause=0
    ; refuse early talkers (false: only record them in the results)
    reject=true
    ; also check clients on loopback and private addresses (Haraka skips them)
    check_private=false

    [ip_whitelist]
    ; addresses or networks never checked, one per line
    192.0.2.0/24

Clients that have authenticated (C{connection.notes.auth_user}) or may relay are never
checked. The file is re-read when it changes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from haraka_tw.codes import CONT, DENYDISCONNECT, Code
from haraka_tw.interfaces import (
    IConnectHook,
    IDataHook,
    IEhloHook,
    IHeloHook,
    IMailHook,
    IPluginContext,
    IRegistration,
)
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection

__all__ = ["MESSAGE", "Plugin", "parse_networks"]

MESSAGE = "You talk too soon"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Answer = Code | tuple[Code, str]


def parse_networks(entries: Iterable[str]) -> tuple[tuple[_Network, ...], list[str]]:
    """Networks from addresses and CIDR ranges; also the entries that are neither."""
    networks: list[_Network] = []
    bad: list[str] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            bad.append(entry)
    return tuple(networks), bad


def _in_networks(ip: str, networks: tuple[_Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(a in n for a in candidates for n in networks if a.version == n.version)


@implementer(IRegistration, IConnectHook, IHeloHook, IEhloHook, IMailHook, IDataHook)
class Plugin:
    name = "early_talker"

    def __init__(self, clock: IReactorTime | None = None) -> None:
        # The plugin loader calls the factory with no arguments; a test passes a Clock.
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock = clock
        self.pause = 0.0
        self.reject = True
        self.check_private = False
        self.whitelist: tuple[_Network, ...] = ()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.load()
        context.config.on_change("early_talker.ini", self.load)

    def load(self) -> None:
        """(Re)read early_talker.ini; a bad pause raises and changes nothing."""
        ini = self.config.get_ini(
            "early_talker.ini", booleans=["+main.reject", "-main.check_private"]
        )
        main = ini["main"]
        try:
            pause = float(main.get("pause", 0))
        except (TypeError, ValueError):
            raise ValueError(
                f"early_talker.ini pause must be seconds, not {main.get('pause')!r}"
            ) from None
        if pause < 0:
            raise ValueError(f"early_talker.ini pause must not be negative, not {pause}")
        whitelist, bad = parse_networks(ini.get("ip_whitelist", {}))
        for entry in bad:
            self.log.warn(f"ip_whitelist: {entry!r} is not an address or network; ignored")
        self.pause = pause
        self.reject = bool(main["reject"])
        self.check_private = bool(main["check_private"])
        self.whitelist = whitelist

    def skip_reason(self, connection: Connection) -> str | None:
        """Why this client is not checked, or None if it is."""
        if connection.notes.get("auth_user"):
            return "authed"
        if connection.relaying:
            return "relay"
        if _in_networks(connection.remote.ip, self.whitelist):
            return "whitelist"
        if not self.check_private:
            if connection.remote.is_local:
                return "local_ip"
            if connection.remote.is_private:
                return "private_ip"
        return None

    def verdict(self, connection: Connection, record: bool = False) -> _Answer:
        """Refuse an early talker (if C{reject}); C{record} the outcome in the results."""
        if not connection.early_talker:
            if record:
                connection.results.add(self.name, **{"pass": "early"})
            return CONT
        if record:
            connection.results.add(self.name, fail="early")
        if not self.reject:
            return CONT
        connection.loginfo("early talker refused", self.name)
        return DENYDISCONNECT, MESSAGE

    def hook_connect(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        reason = self.skip_reason(connection)
        if reason is not None:
            connection.results.add(self.name, skip=reason)
            return CONT
        if not self.pause:
            return self.verdict(connection, record=True)
        return deferLater(self.clock, self.pause, self.verdict, connection, True)

    def _checked(self, connection: Connection) -> _Answer:
        return CONT if self.skip_reason(connection) is not None else self.verdict(connection)

    def hook_helo(self, connection: Connection, host: str) -> _Answer:
        return self._checked(connection)

    def hook_ehlo(self, connection: Connection, host: str) -> _Answer:
        return self._checked(connection)

    def hook_mail(
        self, connection: Connection, sender: Address, params: dict[str, str | None]
    ) -> _Answer:
        return self._checked(connection)

    def hook_data(self, connection: Connection) -> _Answer | Deferred[_Answer]:
        if self.skip_reason(connection) is not None:
            return CONT
        command = connection.current_command
        if not self.pause or (command is not None and command.verb == "BDAT"):
            return self.verdict(connection)
        if connection.unread_input:  # the message came with the DATA line: not waited for
            connection.early_talker = True
            return self.verdict(connection, record=True)
        received = connection.bytes_in

        def after_pause() -> _Answer:
            if connection.bytes_in > received:  # it sent something before our 354
                connection.early_talker = True
            return self.verdict(connection, record=True)

        return deferLater(self.clock, self.pause, after_pause)
