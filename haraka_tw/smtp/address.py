"""RFC 5321 reverse-/forward-paths and ESMTP parameters (RFC 5321 4.1.2, RFC 1869, RFC 6531).

Pure functions over ``str`` (command arguments as :mod:`haraka_tw.smtp.command` decodes them):
no reactor, no I/O. Every syntax problem raises :class:`AddressError`, whose text is a short
reason fit for a 501 reply.

Lenient mode (the default, as in Haraka) also accepts a path without angle brackets, ``MAIL
FROM:`` with nothing after the colon as the null sender, and dot-atom local parts with
leading, trailing or doubled dots (seen in the wild); strict mode wants RFC 5321 to the letter.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Address",
    "AddressError",
    "ParameterError",
    "parse_esmtp_params",
    "parse_mail_argument",
    "parse_path",
    "parse_rcpt_argument",
]

MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_PATH_OCTETS = 256  # including the angle brackets
_MAX_LABEL_OCTETS = 63

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = "\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*")
_LOOSE_DOT_STRING = re.compile(rf"[{_ATEXT}.]+")
_LOOSE_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}.{_UTF8}]+")
_NEEDS_QUOTING = re.compile(rf"[^{_ATEXT}.{_UTF8}]")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# The usual domain in one check: LDH labels of at most 63 characters (ASCII: octets).
_LDH_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# The usual path, <dot-atom@LDH-domain>, parsed in one match (see _parse_argument).
_SIMPLE_PATH = re.compile(rf"<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@({_LDH_DOMAIN.pattern})>")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# esmtp-value: %d33-60 / %d62-126, widened by RFC 6531 to any UTF-8 non-ASCII character.
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\ud7ff\ue000-\U0010ffff]+")
_SURROGATES = re.compile("[\ud800-\udfff]")


class AddressError(ValueError):
    """A path or ESMTP parameter is not acceptable; ``str()`` is a short human reason."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox from MAIL FROM or RCPT TO.

    ``local`` is the local part with any quoting removed; ``domain`` is kept as the client
    wrote it (an address literal keeps its brackets). The null sender has both empty; a bare
    ``<postmaster>`` has an empty domain.
    """

    local: str
    domain: str
    original: str = ""

    @property
    def is_null(self) -> bool:
        return self.local == "" and self.domain == ""

    @property
    def user(self) -> str:
        """Haraka's name for :attr:`local`."""
        return self.local

    @property
    def host(self) -> str:
        """Haraka's name for :attr:`domain`."""
        return self.domain

    @property
    def domain_lower(self) -> str:
        return self.domain.lower()

    @property
    def is_utf8(self) -> bool:
        """True when the local part or domain holds non-ASCII characters (needs SMTPUTF8)."""
        return not (self.local.isascii() and self.domain.isascii())

    @property
    def address(self) -> str:
        """``local@domain`` unquoted; ``local`` when there is no domain; ``""`` for null."""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    def format(self) -> str:
        """The path as it goes on the wire: ``<local@domain>``, ``<>``, quoting as needed."""
        if self.is_null:
            return "<>"
        local = self.local
        if local == "" or _NEEDS_QUOTING.search(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"<{local}@{self.domain}>" if self.domain else f"<{local}>"

    def __str__(self) -> str:
        return self.format()


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _check_characters(text: str, allow_utf8: bool) -> None:
    if text.isascii():
        return
    if not allow_utf8:
        raise AddressError("UTF-8 address requires SMTPUTF8")
    if _SURROGATES.search(text):
        raise AddressError("Invalid UTF-8 in address")


def _check_domain(domain: str, allow_utf8: bool) -> None:
    if not domain:
        raise AddressError("Missing domain")
    if _octets(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("Domain too long")
    if domain.startswith("["):
        _check_address_literal(domain)
        return
    if _LDH_DOMAIN.fullmatch(domain):  # (what the loop below would accept, in one match)
        return
    for label in domain.split("."):
        if _octets(label) > _MAX_LABEL_OCTETS:
            raise AddressError("Domain label too long")
        if _LDH_LABEL.fullmatch(label):
            continue
        if allow_utf8 and not label.isascii() and _is_u_label(label):
            continue
        raise AddressError("Invalid domain")


def _is_u_label(label: str) -> bool:
    if not label or label.startswith("-") or label.endswith("-"):
        return False
    return all(
        ch == "-" or (ch.isascii() and ch.isalnum()) or unicodedata.category(ch)[0] in "LMN"
        for ch in label
    )


def _check_address_literal(literal: str) -> None:
    if not literal.endswith("]"):
        raise AddressError("Invalid address literal")
    body = literal[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            if "%" in body:
                raise ValueError(body)
            ipaddress.IPv6Address(body[5:])
        elif ":" in body:
            if not _GENERAL_LITERAL.fullmatch(body):
                raise ValueError(body)
        else:
            ipaddress.IPv4Address(body)
    except ValueError:
        raise AddressError("Invalid address literal") from None


def _skip_source_route(inner: str, allow_utf8: bool) -> str:
    """Drop an RFC 5321 A-d-l (``@a,@b:``), checking its domains; return the mailbox."""
    pos = 0
    while True:
        if inner[pos : pos + 1] != "@":
            raise AddressError("Invalid source route")
        pos += 1
        if inner[pos : pos + 1] == "[":
            end = inner.find("]", pos)
            end = -1 if end < 0 else end + 1
        else:
            end = min(
                (i for i in (inner.find(",", pos), inner.find(":", pos)) if i >= 0), default=-1
            )
        if end < 0:
            raise AddressError("Invalid source route")
        _check_domain(inner[pos:end], allow_utf8)
        separator = inner[end : end + 1]
        pos = end + 1
        if separator == ":":
            return inner[pos:]
        if separator != ",":
            raise AddressError("Invalid source route")


def _unquote_local(inner: str, allow_utf8: bool) -> tuple[str, str]:
    """Parse a leading quoted-string; return (its unescaped value, the text after it)."""
    chars: list[str] = []
    pos = 1
    while pos < len(inner):
        ch = inner[pos]
        if ch == '"':
            return "".join(chars), inner[pos + 1 :]
        if ch == "\\":
            pos += 1
            ch = inner[pos : pos + 1]
            if not ch or not (" " <= ch <= "~" or (allow_utf8 and ch > "\x7f")):
                raise AddressError("Invalid quoted local part")
        elif not (" " <= ch <= "~" or (allow_utf8 and ch > "\x7f")):
            raise AddressError("Invalid quoted local part")
        chars.append(ch)
        pos += 1
    raise AddressError("Unterminated quoted local part")


def _parse_mailbox(
    inner: str, strict: bool, allow_utf8: bool, allow_postmaster: bool
) -> tuple[str, str]:
    """The local part and domain of a mailbox (the path's caller makes the Address)."""
    if inner.startswith("@"):
        inner = _skip_source_route(inner, allow_utf8)
    if inner.startswith('"'):
        local, after = _unquote_local(inner, allow_utf8)
        local_text = inner[: len(inner) - len(after)]
        if not after.startswith("@"):
            raise AddressError("Missing domain")
        domain = after[1:]
    else:
        local_text, at, domain = inner.partition("@")
        if not at:
            if allow_postmaster and inner.lower() == "postmaster":
                return inner, ""
            if " " in inner:
                raise AddressError("Space in address")
            raise AddressError("Missing domain")
        if strict:
            pattern = _DOT_STRING_UTF8 if allow_utf8 else _DOT_STRING
        else:
            pattern = _LOOSE_DOT_STRING_UTF8 if allow_utf8 else _LOOSE_DOT_STRING
        if not pattern.fullmatch(local_text):
            raise AddressError("Space in address" if " " in local_text else "Invalid local part")
        local = local_text
    if _octets(local_text) > MAX_LOCAL_OCTETS:
        raise AddressError("Local part too long")
    if " " in domain:
        raise AddressError("Space in address")
    _check_domain(domain, allow_utf8)
    return local, domain


def parse_path(
    text: str,
    *,
    strict: bool = False,
    allow_null: bool = False,
    allow_utf8: bool = False,
    allow_postmaster: bool = False,
) -> Address:
    """Parse one path: ``<local@domain>``, ``<>`` (with ``allow_null``), a source-routed
    ``<@a,@b:local@domain>`` (route dropped), or bare ``<postmaster>`` (with
    ``allow_postmaster``). Lenient mode also takes the path without brackets and an empty
    string as the null sender (with ``allow_null``).
    """
    _check_characters(text, allow_utf8)
    if text.startswith("<"):
        if not text.endswith(">") or len(text) < 2:
            raise AddressError("Unterminated path")
        inner = text[1:-1]
        path_octets = _octets(text)
    elif strict:
        raise AddressError("Path must be enclosed in <>")
    else:
        inner = text
        path_octets = _octets(text) + 2
    if inner == "":
        if not allow_null:
            raise AddressError("Null path not allowed here" if text else "Missing address")
        if strict and not text:
            raise AddressError("Path must be enclosed in <>")
        return Address("", "", text)
    local, domain = _parse_mailbox(inner, strict, allow_utf8, allow_postmaster)
    if path_octets > MAX_PATH_OCTETS:
        raise AddressError("Path too long")
    return Address(local, domain, text)


class ParameterError(AddressError):
    """The path was fine; an ESMTP parameter after it is not (5.5.4, not an address code)."""


def parse_esmtp_params(words: Sequence[str]) -> dict[str, str | None]:
    """Parse ``KEY=VALUE`` / ``KEY`` words; keys are upper-cased, values kept as given.

    @raise ParameterError: for a malformed keyword or value, or a keyword given twice.
    """
    params: dict[str, str | None] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key):
            raise ParameterError(f"Invalid parameter {key[:32]!r}")
        if eq and not _ESMTP_VALUE.fullmatch(value):
            raise ParameterError(f"Invalid value for parameter {key.upper()}")
        key = key.upper()
        if key in params:
            raise ParameterError(f"Duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def _path_end(text: str) -> int:
    """Index just past the path token at the start of ``text``.

    A bracketed path ends at the first ``>`` outside a quoted string; an unbracketed one at the
    first space outside a quoted string.
    """
    closer = ">" if text.startswith("<") else " "
    if '"' not in text:  # no quoted string: the first closer ends it
        found = text.find(closer)
        if found >= 0:
            return found + 1 if closer == ">" else found
    in_quotes = False
    pos = 0
    while pos < len(text):
        ch = text[pos]
        if in_quotes:
            if ch == "\\":
                pos += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == closer:
            return pos + 1 if closer == ">" else pos
        pos += 1
    if closer == ">":
        raise AddressError("Space in address" if " " in text else "Unterminated path")
    return len(text)


def _parse_argument(
    arg: str,
    prefix: str,
    *,
    strict: bool,
    allow_null: bool,
    allow_utf8: bool,
    allow_postmaster: bool,
) -> tuple[Address, dict[str, str | None]]:
    arg = arg.lstrip(" ")
    head = arg[: len(prefix)]
    if not (head.isascii() and head.upper() == prefix):
        raise AddressError(f"Syntax: {prefix}<address>")
    rest = arg[len(prefix) :].lstrip(" ")
    simple = _SIMPLE_PATH.match(rest)
    if simple is not None:
        # What parse_path would find, without its checks one by one: ASCII, a dot-atom
        # (strict and lenient alike) and an LDH domain; only the lengths are left to check.
        path, tail = simple[0], rest[simple.end() :]
        if (
            len(simple[1]) <= MAX_LOCAL_OCTETS
            and len(path) <= MAX_PATH_OCTETS
            and (not tail or tail[0] == " ")
        ):
            params = parse_esmtp_params([word for word in tail.split(" ") if word]) if tail else {}
            return Address(simple[1], simple[2], path), params
    end = _path_end(rest)
    path, tail = rest[:end], rest[end:]
    if tail and not tail.startswith(" "):
        raise AddressError("Junk after path")
    address = parse_path(
        path,
        strict=strict,
        allow_null=allow_null,
        allow_utf8=allow_utf8,
        allow_postmaster=allow_postmaster,
    )
    return address, parse_esmtp_params([word for word in tail.split(" ") if word])


def parse_mail_argument(
    arg: str, *, strict: bool = False, allow_utf8: bool = False
) -> tuple[Address, dict[str, str | None]]:
    """Parse what follows ``MAIL``: ``FROM:<path> [params]``; ``<>`` is the null sender."""
    return _parse_argument(
        arg, "FROM:", strict=strict, allow_null=True, allow_utf8=allow_utf8, allow_postmaster=False
    )


def parse_rcpt_argument(
    arg: str, *, strict: bool = False, allow_utf8: bool = False
) -> tuple[Address, dict[str, str | None]]:
    """Parse what follows ``RCPT``: ``TO:<path> [params]``; bare ``<postmaster>`` allowed."""
    return _parse_argument(
        arg, "TO:", strict=strict, allow_null=False, allow_utf8=allow_utf8, allow_postmaster=True
    )
