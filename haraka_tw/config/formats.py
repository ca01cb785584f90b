"""Pure parsers for Haraka's flat and structured config formats: text in, values out.

Nothing here touches the file system; ``path`` arguments only name the file in errors.

Flat files (``value``, ``list``, ``data``) follow Haraka: lines split on CRLF, CR or LF;
``list`` and ``value`` skip blank lines and whole-line comments starting with ``#`` or ``;``
(Haraka's flat reader skips both, though its docs only mention ``#``).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from haraka_tw.config.errors import ConfigError

__all__ = [
    "decode",
    "first_non_utf8_line",
    "ini_count",
    "ini_number",
    "is_comment_or_blank",
    "parse_data",
    "parse_json",
    "parse_list",
    "parse_value",
    "parse_yaml",
    "split_lines",
    "to_int",
    "to_number",
]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_COMMENT_OR_BLANK = re.compile(r"\s*(?:[;#].*)?", re.DOTALL)
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?[0-9]+\.[0-9]+")


def decode(content: bytes) -> str:
    """Decode a config file as Node does: UTF-8, bad bytes replaced, a leading BOM dropped."""
    return content.decode("utf-8-sig", errors="replace")


def first_non_utf8_line(content: bytes) -> int | None:
    """The number of the first line holding bytes that are not UTF-8, or None."""
    try:
        content.decode("utf-8")  # (a leading BOM is UTF-8 too)
    except UnicodeDecodeError as e:
        return len(split_lines(content[: e.start].decode("latin-1")))
    return None


def split_lines(text: str) -> list[str]:
    """Split on CRLF, CR or LF only (not on the other characters ``str.splitlines`` uses)."""
    return _LINE_BREAK.split(text)


def is_comment_or_blank(line: str) -> bool:
    """True for a blank line or a whole-line ``#`` / ``;`` comment."""
    return _COMMENT_OR_BLANK.fullmatch(line) is not None


def to_int(text: str) -> str | int:
    """Turn an all-digit string (optionally with a leading ``-``) into an int; else keep it."""
    if _INTEGER.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # longer than Python's int-from-string digit limit
            return text
    return text


def to_number(text: str) -> str | int | float:
    """Like :func:`to_int`, and also turn a plain decimal (``-12.5``) into a float.

    Only ``digits.digits`` counts as a decimal; ``1e3``, ``.5``, ``5.`` and ``inf`` stay
    strings, as in Haraka.
    """
    number = to_int(text)
    if isinstance(number, int) or not _DECIMAL.fullmatch(text):
        return number
    decimal = float(text)
    return decimal if math.isfinite(decimal) else text


def ini_number(
    section: Mapping[str, Any], key: str, default: float, zero_ok: bool, where: str = "[main]"
) -> float:
    """An ini value that must be a finite number above 0 (or at least 0, with C{zero_ok});
    an empty or missing value is C{default}.

    @param where: what the message names before the key (the file and section).
    @raise ValueError: naming C{where key} and the value, for anything else (a word, a
        negative number, a bare key, which an ini file reads as True).
    """
    value = section.get(key, default)
    if value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (0 <= number < math.inf) or (number == 0 and not zero_ok):
        wanted = "a number of 0 or more" if zero_ok else "a positive number"
        raise ValueError(f"{where} {key}: {value!r} is not {wanted}".lstrip())
    return number


def ini_count(
    section: Mapping[str, Any], key: str, default: int, where: str, minimum: int = 0
) -> int:
    """An ini value that must be a whole number of at least C{minimum}; an empty or missing
    value is C{default}.

    @raise ValueError: naming C{where key} and the value, for anything else (a word, a
        fraction, a number below C{minimum}, a bare key).
    """
    value = section.get(key, default)
    if value == "" or value is None:
        return default
    number: int | None = None
    if not isinstance(value, bool):
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if isinstance(value, float) and value != number:
            number = None
    if number is None or number < minimum:
        raise ValueError(f"{where} {key}: {value!r} is not a whole number of {minimum} or more")
    return number


def parse_list(text: str) -> list[str]:
    """The ``list`` format: every line stripped, blank and comment lines skipped."""
    return [line.strip() for line in split_lines(text) if not is_comment_or_blank(line)]


def parse_value(text: str) -> str | int | None:
    """The ``value`` format: the first line :func:`parse_list` keeps, or None if none.

    An all-digit value becomes an int; a decimal such as ``1.5`` stays a string here (the
    ``value`` type is ``str | int``).
    """
    lines = parse_list(text)
    return to_int(lines[0]) if lines else None


def parse_data(text: str) -> list[str]:
    """The ``data`` format: every line kept as written, line breaks dropped."""
    lines = split_lines(text)
    if lines[-1] == "":
        lines.pop()
    return lines


def parse_json(text: str, path: str) -> Any:
    """Parse a JSON document; a syntax error becomes a :class:`ConfigError` with its line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(path, error.lineno, error.msg) from None
    except RecursionError:
        raise ConfigError(path, None, "JSON nested too deeply") from None


def _yaml() -> ModuleType | None:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        return None


def parse_yaml(text: str, path: str) -> Any:
    """Parse a YAML document with PyYAML's safe loader.

    PyYAML is optional: without it a YAML file is a :class:`ConfigError` naming the file.
    A syntax error becomes a :class:`ConfigError` with the line PyYAML points at.
    """
    yaml = _yaml()
    if yaml is None:
        raise ConfigError(path, None, "cannot read YAML: PyYAML is not installed")
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = None if mark is None else mark.line + 1
        message = error.problem or error.context or "invalid YAML"
        raise ConfigError(path, line, str(message)) from None
    except yaml.YAMLError as error:
        raise ConfigError(path, None, str(error) or "invalid YAML") from None
    except RecursionError:
        raise ConfigError(path, None, "YAML nested too deeply") from None
