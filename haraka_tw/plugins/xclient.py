"""xclient: Postfix's XCLIENT, for trusted front ends that hand on the real client.

Only hosts listed in C{xclient.hosts} (addresses or CIDRs, one per line) see XCLIENT in the
EHLO reply and may use it. C{XCLIENT ADDR=203.0.113.7 NAME=mail.example.org PORT=4321} then
makes the session begin again as that client: a new uuid, relaying off, connect_init,
lookup_rdns (NAME, when given, is the answer) and connect run again, and a new 220 banner
is sent; the client must greet again.

Replies: 550 from a host not allowed; 503 inside a mail transaction; 501 without ADDR or
with a malformed attribute. Attribute values are xtext (RFC 3461); NAME=[UNAVAILABLE] and
[TEMPUNAVAIL] mean no name. HELO, PROTO and LOGIN are kept in C{connection.notes.xclient}.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, OK, Code
from haraka_tw.interfaces import (
    ICapabilitiesHook,
    IPluginContext,
    IRegistration,
    IUnrecognizedCommandHook,
)
from haraka_tw.smtp.dsn import DSNError, xtext_decode

__all__ = ["Plugin", "parse_attributes"]

_ATTRIBUTES = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT"})
_UNAVAILABLE = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_attributes(argument: str) -> dict[str, str]:
    """XCLIENT's C{NAME=value} words, decoded.

    @raise ValueError: for an unknown attribute, a missing '=' or bad xtext.
    """
    out: dict[str, str] = {}
    for word in argument.split():
        name, sep, value = word.partition("=")
        name = name.upper()
        if not sep or name not in _ATTRIBUTES:
            raise ValueError(f"bad XCLIENT attribute {word!r}")
        try:
            decoded = xtext_decode(value)
        except DSNError as e:
            raise ValueError(f"bad XCLIENT value for {name}: {e}") from None
        if _CONTROL.search(decoded):  # (they would reach Received and the log as they are)
            raise ValueError(f"bad XCLIENT value for {name}: control characters")
        out[name] = decoded
    return out


def _address(text: str) -> str:
    """ADDR as an address: IPv4, or IPv6 with Postfix's IPV6: prefix.

    @raise ValueError: if it is neither.
    """
    if text.upper().startswith("IPV6:"):
        text = text[5:]
    return str(ipaddress.ip_address(text))


@implementer(IRegistration, ICapabilitiesHook, IUnrecognizedCommandHook)
class Plugin:
    name = "xclient"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.log = context.log
        self.config = context.config
        self.load()
        context.config.on_change("xclient.hosts", self.load)

    def load(self) -> None:
        networks = []
        for entry in self.config.get_list("xclient.hosts"):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.log.error(f"xclient.hosts: {entry!r} is not an address or CIDR")
        self.networks = tuple(networks)

    def allowed(self, connection: Any) -> bool:
        try:
            addr = ipaddress.ip_address(connection.remote.ip)
        except ValueError:
            return False
        return any(addr in net for net in self.networks)

    def hook_capabilities(self, connection: Any) -> None:
        if self.allowed(connection):
            connection.capabilities.append("XCLIENT NAME ADDR PORT PROTO HELO LOGIN")

    def hook_unrecognized_command(self, connection: Any, verb: str, argument: str) -> Any:
        if verb != "XCLIENT":
            return CONT
        if not self.allowed(connection):
            connection.respond(550, "You are not allowed to use XCLIENT", "5.7.1")
            return OK
        if connection.transaction is not None:
            connection.respond(503, "XCLIENT not permitted during a mail transaction", "5.5.1")
            return OK
        try:
            attrs = parse_attributes(argument)
            if "ADDR" not in attrs:
                raise ValueError("ADDR is required")
            ip = _address(attrs["ADDR"])
            port = int(attrs["PORT"]) if attrs.get("PORT", "").isdigit() else None
        except ValueError as e:
            connection.respond(501, f"XCLIENT syntax error: {e}", "5.5.4")
            return OK
        name = attrs.get("NAME")
        host = None if name is None or name.upper() in _UNAVAILABLE else name
        connection.notes["xclient"] = {k: v for k, v in attrs.items() if k != "ADDR"}
        self.log.info(f"XCLIENT from {connection.remote.ip}: client is now {ip}", connection)
        if host is not None:
            connection.notes["xclient_name"] = host
        return connection.restart(ip, port, host).addCallback(lambda _: self._done())

    def _done(self) -> Code:
        return OK
