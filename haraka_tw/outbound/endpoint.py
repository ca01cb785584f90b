"""Where a remote SMTP server is: L{Endpoint} (host and port) and the C{host},
C{host:port}, C{[v6]:port} forms config files name it in (Haraka's), one or a list.

Used by the plugins that talk to a fixed server: the forwarding queue plugins (next hops)
and auth_proxy / auth_bridge (the servers that check a login).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Endpoint", "parse_endpoint", "parse_endpoints"]

_SEPARATORS = re.compile(r"[\s,;]+")
#: a host name (letters, digits, hyphens, underscores, dots), an IPv4 or an IPv6 address
_HOST = re.compile(r"[A-Za-z0-9_.:-]+(?:%[A-Za-z0-9_.-]+)?")


@dataclass(frozen=True)
class Endpoint:
    """A remote SMTP server: at C{host}:C{port}, or on the Unix socket at C{path} (then
    C{host} is only its name)."""

    host: str
    port: int = 25
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(text: str, default_port: int = 25) -> Endpoint:
    """C{host}, C{host:port}, C{[v6]:port} or a bare IPv6 address.

    @raise ValueError: for an empty host, one with characters no host name or address has
        (a space, a C{;} comment Haraka's files do not have), or a bad port.
    """
    text = text.strip()
    port: str | None = None
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {text!r}")
        port = rest[1:] or None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host = text
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not _HOST.fullmatch(host):
        raise ValueError(f"bad host {host!r} (a host name or an IP address)")
    if port is None:
        return Endpoint(host, default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return Endpoint(host, int(port))


def parse_endpoints(value: Any, default_port: int = 25) -> list[Endpoint]:
    """A list of hosts separated by spaces, commas or semicolons (Haraka's auth_proxy)."""
    return [parse_endpoint(p, default_port) for p in _SEPARATORS.split(str(value)) if p]
