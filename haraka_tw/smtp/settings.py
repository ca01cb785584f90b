"""The per-session limits and options, read once from connection.ini and smtp.ini.

A new L{SessionSettings} is built whenever those files change; each session keeps the one
it started with, so a reload never changes a session half-way.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any

from haraka_tw.config.formats import ini_count, ini_number
from haraka_tw.smtp.data import BareNewline

__all__ = ["CONNECTION_INI_BOOLEANS", "SMTP_INI_BOOLEANS", "SessionSettings"]

CONNECTION_INI_BOOLEANS = (
    "-main.strict_rfc1869",
    "+main.smtputf8",
    "+headers.add_received",
    "+headers.clean_auth_results",
    "+headers.show_version",
    "-haproxy.enabled",
)
SMTP_INI_BOOLEANS = ("-main.ignore_bad_plugins", "+main.graceful_shutdown", "-main.daemonize")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(hosts: Any) -> tuple[IPNetwork, ...]:
    """connection.ini [haproxy] hosts[]: addresses and CIDRs, IPv4 and IPv6."""
    if isinstance(hosts, str):
        hosts = hosts.replace(",", " ").split()
    out = []
    for host in hosts:
        if not str(host).strip():
            continue  # Haraka's shipped file has an empty "hosts[] =", skipped there too
        try:
            out.append(ipaddress.ip_network(str(host).strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"connection.ini [haproxy] hosts: {host!r} is not an address or CIDR"
            ) from None
    return tuple(out)


def _haraka_text(text: Any, prefix: str) -> str | None:
    """connection.ini [message] helo / close: Haraka's meaning, the text after the line's
    start (C{{me}} Hello C{{remote}}, for HELO and EHLO; C{{me}} for QUIT), so that the reply
    begins with the domain RFC 5321 asks for. A text holding a placeholder is the whole
    line, as written."""
    if not text:
        return None
    line = str(text)
    return line if re.search(r"\{(me|remote)\}", line) else prefix + line


def _timeout(section: dict[str, Any], key: str, default: float) -> float:
    """smtp.ini seconds of silence allowed; 0 means the default, as in Haraka."""
    return ini_number(section, key, default, zero_ok=True, where="smtp.ini") or default


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Everything a session needs to know from the config directory."""

    me: str = "localhost"
    max_line_length: int = 512
    max_bytes: int = 26214400
    max_data_line_length: int = 992
    max_recipients: int = 1000
    max_mime_parts: int = 1000
    max_connections: int = 5000
    header_max_lines: int = 1000
    header_max_received: int = 100
    inactivity_timeout: float = 300.0
    data_timeout: float = 300.0
    proxy_hosts: tuple[IPNetwork, ...] = ()
    proxy_timeout: float = 30.0
    spool_dir: str | None = None
    spool_after: int = 1048576
    strict_rfc1869: bool = False
    smtputf8: bool = True
    bare_newline: BareNewline = BareNewline.REJECT
    add_received: bool = True
    clean_auth_results: bool = True
    show_version: bool = True
    greeting: tuple[str, ...] = ()
    helo_message: str | None = None
    close_message: str | None = None
    banner_chars: int = 6

    def trusts_proxy(self, ip: str) -> bool:
        """Whether C{ip} is in connection.ini C{[haproxy] hosts}: its PROXY header is
        believed."""
        if not self.proxy_hosts:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.proxy_hosts)

    @classmethod
    def from_config(cls, config: Any) -> SessionSettings:
        """Read connection.ini, smtp.ini and me.

        @raise ValueError: for a value of the wrong kind, naming the key.
        """
        conn = config.get_ini("connection.ini", booleans=CONNECTION_INI_BOOLEANS)
        smtp = config.get_ini("smtp.ini", booleans=SMTP_INI_BOOLEANS)
        main, mx, headers = conn.get("main", {}), conn.get("max", {}), conn.get("headers", {})
        message, uuid = conn.get("message", {}), conn.get("uuid", {})
        me = str(config.get_value("me", None) or socket.getfqdn() or "localhost")
        greeting = message.get("greeting") or ()
        if isinstance(greeting, str):
            greeting = (greeting,)
        bare = str(main.get("bare_newline", "reject")).lower()
        if bare == "normalize":
            bare = "normalise"
        try:
            bare_newline = BareNewline(bare)
        except ValueError:
            raise ValueError(
                f"connection.ini bare_newline must be reject or normalise, not {bare!r}"
            ) from None
        smtp_main = smtp.get("main", {})
        timeout = _timeout(smtp_main, "inactivity_timeout", 300)
        haproxy = conn.get("haproxy", {})
        data_line_length = ini_count(mx, "data_line_length", 992, "connection.ini [max]")
        if data_line_length == 1:
            raise ValueError("connection.ini [max] data_line_length: 1 is not 0 (off) or 2 or more")
        return cls(
            me=me,
            # (RFC 5321 4.5.3.1.4: a server takes command lines of 512 octets)
            max_line_length=ini_count(mx, "line_length", 512, "connection.ini [max]", 512),
            max_bytes=ini_count(mx, "bytes", 26214400, "connection.ini [max]"),
            max_data_line_length=data_line_length,
            max_recipients=ini_count(mx, "recipients", 1000, "connection.ini [max]", 1),
            max_mime_parts=ini_count(mx, "mime_parts", 1000, "connection.ini [max]"),
            max_connections=ini_count(smtp_main, "max_connections", 5000, "smtp.ini"),
            # (0 means the default, as Haraka reads it)
            header_max_lines=ini_count(headers, "max_lines", 1000, "connection.ini [headers]")
            or 1000,
            header_max_received=ini_count(
                headers, "max_received", 100, "connection.ini [headers]", 1
            ),
            inactivity_timeout=timeout,
            data_timeout=_timeout(smtp_main, "data_timeout", timeout),
            proxy_hosts=_networks(haproxy.get("hosts") or ()),
            proxy_timeout=ini_number(
                haproxy, "timeout", 30, zero_ok=False, where="connection.ini [haproxy]"
            ),
            spool_dir=str(main["spool_dir"]) if main.get("spool_dir") else None,
            spool_after=ini_count(main, "spool_after", 1048576, "connection.ini [main]", -1),
            strict_rfc1869=bool(main.get("strict_rfc1869", False)),
            smtputf8=bool(main.get("smtputf8", True)),
            bare_newline=bare_newline,
            add_received=bool(headers.get("add_received", True)),
            clean_auth_results=bool(headers.get("clean_auth_results", True)),
            show_version=bool(headers.get("show_version", True)),
            greeting=tuple(str(g) for g in greeting),
            helo_message=_haraka_text(message.get("helo"), "{me} Hello {remote}, "),
            close_message=_haraka_text(message.get("close"), "{me} "),
            banner_chars=ini_count(uuid, "banner_chars", 6, "connection.ini [uuid]"),
        )
