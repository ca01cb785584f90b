"""Haraka's INI dialect, and the boolean declarations a reader passes with it.

The grammar, one logical line at a time:

- keys before any ``[section]`` go to the implicit ``main`` section;
- ``key=value``, whitespace around key and value trimmed; a value of all digits
  (optionally ``-``) becomes an int and a plain decimal (``0.5``) a float, as in Haraka;
  anything else stays a string, quotes and trailing ``; text`` included (Haraka strips
  neither; comments are whole-line only);
- ``key[]=value`` appends to the list ``key``;
- a bare ``key`` (no ``=``) is a flag and reads as ``True`` (Haraka stores ``undefined``,
  which code can only test for presence);
- lines whose first non-blank character is ``;`` or ``#`` are comments;
- a line ending in ``\\`` (then optional spaces or tabs) continues on the next line;
- a key is made of ASCII letters, digits and ``_ @ : . + - /``, as in Haraka.

Any other line is a :class:`ConfigError` naming the line (Haraka logs and skips it).

A declared boolean (see :class:`BooleanRules`) is ``True`` when its value is one of
``true, yes, ok, enabled, on, 1`` (any case) and ``False`` otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from haraka_tw.config.errors import ConfigError
from haraka_tw.config.formats import is_comment_or_blank, split_lines, to_number

__all__ = ["TRUTHY", "BooleanRules", "IniData", "is_truthy", "parse_ini"]

IniData = dict[str, dict[str, Any]]

TRUTHY = frozenset({"true", "yes", "ok", "enabled", "on", "1"})

_SECTION = re.compile(r"\s*\[([^\]]*)\]\s*")
_PARAM = re.compile(r"\s*([A-Za-z0-9_@:.+\-/]+(?:\[\])?)\s*(?:=\s*(.*?)\s*)?")
_CONTINUATION = re.compile(r"\\[ \t]*\Z")


def is_truthy(value: object) -> bool:
    """Haraka's truth test for a declared boolean."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    return text.isascii() and text.lower() in TRUTHY


@dataclass(frozen=True)
class BooleanRules:
    """The keys a reader declares boolean, and the default each takes when absent.

    A declaration is ``[+|-][section.]key``: ``+`` defaults the key to ``True``, ``-`` or
    no sign to ``False``; without a section the key is in ``main``; section ``*`` means
    the key in every section (converted where present, never defaulted).
    """

    defaults: dict[tuple[str, str], bool] = field(default_factory=dict)
    everywhere: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, declarations: Iterable[str]) -> BooleanRules:
        """Read declarations such as ``"+main.enabled"``, ``"-reject"``, ``"*.enabled"``."""
        defaults: dict[tuple[str, str], bool] = {}
        everywhere: set[str] = set()
        for declaration in declarations:
            text = declaration.strip()
            default = text.startswith("+")
            text = text.lstrip("+-")
            section, dot, key = text.partition(".")
            if not dot:
                section, key = "main", section
            if key[:1] in ("+", "-"):
                default = default or key.startswith("+")
                key = key[1:]
            if not section or not key:
                raise ValueError(f"bad boolean declaration {declaration!r}")
            if section == "*":
                everywhere.add(key)
            else:
                defaults[(section, key)] = default
        return cls(defaults, frozenset(everywhere))

    def declares(self, section: str, key: str) -> bool:
        """True if ``section.key`` is a declared boolean."""
        return key in self.everywhere or (section, key) in self.defaults

    def apply(self, data: IniData) -> IniData:
        """Convert declared keys already in ``data`` and add the absent ones with defaults."""
        for section_name, section in data.items():
            for key, value in section.items():
                if self.declares(section_name, key) and not isinstance(value, list):
                    section[key] = is_truthy(value)
        for (section_name, key), default in self.defaults.items():
            data.setdefault(section_name, {}).setdefault(key, default)
        data.setdefault("main", {})
        return data


def parse_ini(
    text: str,
    path: str,
    booleans: BooleanRules | None = None,
    warn: Callable[[str], None] | None = None,
) -> IniData:
    """Parse Haraka INI text into ``{section: {key: value}}``; ``main`` is always present.

    Declared booleans are converted where they appear but not defaulted here: defaults go
    in after layers are merged (:meth:`BooleanRules.apply`), so an operator file that
    omits a key does not reset the value a lower layer set. A key given twice in a
    section keeps the later value, as in Haraka, and is told to ``warn`` (``path:line:``).
    """
    rules = booleans or BooleanRules()
    data: IniData = {"main": {}}
    section_name, section = "main", data["main"]
    first_seen: dict[tuple[str, str], int] = {}
    pending, pending_start = "", 0
    for number, line in enumerate(split_lines(text), 1):
        if is_comment_or_blank(line):
            continue
        header = _SECTION.fullmatch(line)
        if header:
            section_name = header[1].strip()
            section = data.setdefault(section_name, {})
            continue
        if _CONTINUATION.search(line):
            pending_start = pending_start or number
            pending += _CONTINUATION.sub("", line)
            continue
        key = _store(section, section_name, pending + line, path, pending_start or number, rules)
        _note_repeat(first_seen, section_name, key, pending_start or number, path, warn)
        pending, pending_start = "", 0
    if pending_start:
        key = _store(section, section_name, pending, path, pending_start, rules)
        _note_repeat(first_seen, section_name, key, pending_start, path, warn)
    return data


def _note_repeat(
    first_seen: dict[tuple[str, str], int],
    section: str,
    key: str | None,
    number: int,
    path: str,
    warn: Callable[[str], None] | None,
) -> None:
    """Remember where ``key`` was first set in ``section``; tell ``warn`` of a repeat."""
    if key is None:
        return
    first = first_seen.setdefault((section, key), number)
    if first != number and warn is not None:
        warn(
            f"{path}:{number}: [{section}] {key} is set again (first on line {first});"
            " the later value is used"
        )


def _store(
    section: dict[str, Any],
    section_name: str,
    line: str,
    path: str,
    number: int,
    rules: BooleanRules,
) -> str | None:
    """Store one ``key=value`` line; the key, or None for a ``key[]=`` list item."""
    param = _PARAM.fullmatch(line)
    if param is None:
        raise ConfigError(path, number, _complaint(line))
    key, raw = param[1], param[2]
    if key.endswith("[]"):
        key = key[:-2]
        items = section.get(key)
        if not isinstance(items, list):
            items = section[key] = []
        items.append(True if raw is None else to_number(raw))
        return None
    if rules.declares(section_name, key):
        section[key] = raw is None or is_truthy(raw)
    else:
        section[key] = True if raw is None else to_number(raw)
    return key


def _complaint(line: str) -> str:
    shown = line.strip()
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if shown.startswith("["):
        return f"section header without a closing ']': {shown!r}"
    return f"not a [section], key=value, bare key or comment: {shown!r}"
