"""The Public Suffix List: which top-level domains exist, and which part of a name is the
part someone registered (C{www.example.co.uk} -> C{example.co.uk}).

L{SuffixList} reads the list's text format (https://publicsuffix.org/list/): one rule a
line, C{//} comments, C{*.} wildcard rules and C{!} exceptions, names in Unicode (kept
here in their ASCII form, as DNS carries them). Debian's C{publicsuffix} package installs
it as L{DEFAULT_PATH}; L{installed} reads it once per change of the file. Where it is not
installed, L{RuleOfThumb} answers the same questions from a short list of generic
top-level domains (every two-letter one taken as a country) and a few country second
levels, as Haraka's libraries fall back to.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Protocol

from haraka_tw.plugins.helo.checks import organizational_domain

__all__ = ["DEFAULT_PATH", "RuleOfThumb", "SuffixList", "Suffixes", "ascii_name", "installed"]

DEFAULT_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"

_GENERIC = frozenset(
    [
        "aero",
        "arpa",
        "asia",
        "biz",
        "cat",
        "com",
        "coop",
        "edu",
        "gov",
        "info",
        "int",
        "jobs",
        "mil",
        "mobi",
        "museum",
        "name",
        "net",
        "org",
        "pro",
        "tel",
        "travel",
        "xxx",
    ]
)
_LETTERS = re.compile(r"^[a-z]{2}$")


class Suffixes(Protocol):
    """What the plugins ask of a suffix list."""

    def is_tld(self, label: str) -> bool: ...

    def registered_domain(self, name: str) -> str | None: ...


def ascii_name(name: str) -> str | None:
    """C{name} lower-case, without a final dot, in its ASCII (IDNA) form; None when it has
    no such form or is longer than DNS allows."""
    name = name.strip().lower().rstrip(".")
    if len(name) > 253 or any(len(label) > 63 for label in name.split(".")):
        return None  # (no DNS name; and the IDNA codec is slow on long text)
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return None


class SuffixList:
    """The rules of a public suffix list."""

    def __init__(self, rules: Iterable[str]) -> None:
        self._exact: set[str] = set()
        self._wildcard: set[str] = set()  # "*.ck" kept as "ck"
        self._exception: set[str] = set()  # "!www.ck" kept as "www.ck"
        self._tlds: set[str] = set()
        for rule in rules:
            kind = self._exact
            if rule.startswith("!"):
                kind, rule = self._exception, rule[1:]
            elif rule.startswith("*."):
                kind, rule = self._wildcard, rule[2:]
            name = ascii_name(rule)
            if not name or "*" in name:
                continue  # (no rule of the list is either; a line that is cannot match)
            kind.add(name)
            self._tlds.add(name.rpartition(".")[2])

    @classmethod
    def read(cls, path: str) -> SuffixList:
        """The list in the file at C{path}.

        @raise OSError: the file cannot be read.
        @raise ValueError: it holds no rule, or is not UTF-8 (naming the file).
        """
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
        rules = []
        for line in text.splitlines():
            rule = line.split(None, 1)[0] if line.strip() else ""
            if rule and not rule.startswith("//"):
                rules.append(rule)
        suffixes = cls(rules)
        if not suffixes._tlds:
            raise ValueError(f"{path}: no public suffix rules in it")
        return suffixes

    def is_tld(self, label: str) -> bool:
        """Whether C{label} (ASCII, any case) is a top-level domain the list names."""
        return label.lower() in self._tlds

    def public_suffix(self, name: str) -> str | None:
        """The public suffix of C{name} by the list's algorithm (the longest matching rule,
        an exception first, C{*} when none matches); None for an empty label or no ASCII
        form."""
        return self._suffix(ascii_name(name))

    def _suffix(self, plain: str | None) -> str | None:
        if not plain:
            return None
        labels = plain.split(".")
        if not all(labels):
            return None
        for i in range(len(labels)):
            if ".".join(labels[i:]) in self._exception:
                return ".".join(labels[i + 1 :])
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            if suffix in self._exact or ".".join(labels[i + 1 :]) in self._wildcard:
                return suffix
        return labels[-1]

    def registered_domain(self, name: str) -> str | None:
        """The public suffix of C{name} and one label more; None when C{name} is a public
        suffix itself (or no name)."""
        plain = ascii_name(name)
        suffix = self._suffix(plain)
        if suffix is None or plain is None or plain == suffix:
            return None
        return plain[: -len(suffix) - 1].rpartition(".")[2] + "." + suffix


class RuleOfThumb:
    """The answers without a list: the generic top-level domains, any two letters as a
    country, C{xn--} labels; the registered domain by L{organizational_domain}."""

    def is_tld(self, label: str) -> bool:
        label = label.lower()
        return label in _GENERIC or bool(_LETTERS.match(label)) or label.startswith("xn--")

    def registered_domain(self, name: str) -> str | None:
        plain = ascii_name(name)
        return organizational_domain(plain) if plain else None


_read: dict[str, tuple[tuple[int, int], SuffixList]] = {}


def installed(path: str = DEFAULT_PATH) -> SuffixList | None:
    """The list at C{path}, read again only when the file changes; None when there is no
    file there.

    @raise OSError: the file is there but cannot be read.
    @raise ValueError: it is not a suffix list (naming the file).
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    stamp = (status.st_mtime_ns, status.st_size)
    known = _read.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    suffixes = SuffixList.read(path)
    _read[path] = (stamp, suffixes)
    return suffixes
