"""One config name read through a stack of directories, lowest precedence first.

Per directory, the file's contents come from its bundle entry (``smtp.json``) if there is
one, else from the file itself (for ``x.json``, from ``x.yaml`` when ``x.json`` is absent,
as Haraka does). Across directories, ``ini``, ``json`` and ``yaml`` merge key by key,
recursively, the higher directory winning; every other kind is replaced whole by the
highest directory that has it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from haraka_tw.config.bundle import BundleReader
from haraka_tw.config.errors import ConfigError
from haraka_tw.config.formats import (
    decode,
    first_non_utf8_line,
    parse_data,
    parse_json,
    parse_list,
    parse_value,
    parse_yaml,
)
from haraka_tw.config.ini import BooleanRules, IniData, parse_ini
from haraka_tw.config.snapshot import SnapshotReader

__all__ = ["Kind", "Request", "merge", "read_layered"]


class Kind(enum.Enum):
    """How a config file is parsed."""

    VALUE = "value"
    LIST = "list"
    DATA = "data"
    INI = "ini"
    JSON = "json"
    YAML = "yaml"
    BINARY = "binary"


_MERGED = frozenset({Kind.INI, Kind.JSON, Kind.YAML})


@dataclass(frozen=True)
class Request:
    """What a reader asked for; also the cache key."""

    name: str
    kind: Kind
    booleans: tuple[str, ...] = ()


def merge(lower: Any, higher: Any) -> Any:
    """Merge two parsed documents: dicts key by key, recursively; otherwise ``higher``."""
    if isinstance(lower, dict) and isinstance(higher, dict):
        merged = dict(lower)
        for key, value in higher.items():
            merged[key] = merge(lower[key], value) if key in lower else value
        return merged
    return higher


def read_layered(
    directories: Sequence[Path],
    request: Request,
    reader: SnapshotReader,
    bundles: BundleReader,
) -> tuple[bool, Any]:
    """``(found, value)`` for ``request`` over ``directories``.

    ``found`` is False when no directory has the file; the value is then None, except for
    ``ini``, which is always a dict with ``main`` and the declared boolean defaults.
    Raises :class:`ConfigError` for the first malformed file met.
    """
    rules = BooleanRules.parse(request.booleans) if request.kind is Kind.INI else None
    found, result = False, None
    for directory in directories:
        present, value = _read_layer(directory, request, rules, reader, bundles)
        if not present:
            continue
        result = merge(result, value) if found and request.kind in _MERGED else value
        found = True
    if rules is not None:
        result = rules.apply(result if isinstance(result, dict) else {"main": {}})
    return found, result


def _read_layer(
    directory: Path,
    request: Request,
    rules: BooleanRules | None,
    reader: SnapshotReader,
    bundles: BundleReader,
) -> tuple[bool, Any]:
    entry = bundles.entry(directory, request.name, reader)
    if entry is not None:
        path, raw = entry
        return True, _from_bundle(request, raw, path)
    for path, kind in _candidates(directory, request):
        content = reader.read(path)
        if content is not None:
            return True, _parse(kind, content, path, rules, reader)
    return False, None


def _candidates(directory: Path, request: Request) -> list[tuple[Path, Kind]]:
    path = directory / request.name
    if request.kind is Kind.JSON and request.name.endswith(".json"):
        return [(path, Kind.JSON), (path.with_name(path.stem + ".yaml"), Kind.YAML)]
    return [(path, request.kind)]


def _parse(
    kind: Kind, content: bytes, path: Path, rules: BooleanRules | None, reader: SnapshotReader
) -> Any:
    if kind is Kind.BINARY:
        return content

    def warn(message: str) -> None:
        reader.warnings.append((path, message))

    bad_line = first_non_utf8_line(content)
    if bad_line is not None:
        warn(f"{path}:{bad_line}: not valid UTF-8; the invalid bytes are read as U+FFFD")
    return _parse_text(kind, decode(content), str(path), rules, warn)


def _parse_text(
    kind: Kind,
    text: str,
    where: str,
    rules: BooleanRules | None,
    warn: Callable[[str], None] | None = None,
) -> Any:
    if kind is Kind.VALUE:
        return parse_value(text)
    if kind is Kind.LIST:
        return parse_list(text)
    if kind is Kind.DATA:
        return parse_data(text)
    if kind is Kind.INI:
        return parse_ini(text, where, rules, warn)
    if kind is Kind.JSON:
        return parse_json(text, where)
    return parse_yaml(text, where)


_BUNDLE_SHAPES = {
    Kind.VALUE: "a string or number",
    Kind.LIST: "a list of strings, or a string",
    Kind.DATA: "a list of strings, or a string",
    Kind.INI: "an object of sections",
    Kind.BINARY: "a string",
}


def _from_bundle(request: Request, raw: Any, path: Path) -> Any:
    """Check and shape a bundle entry as the file it stands for would have parsed."""
    kind = request.kind
    if kind in (Kind.JSON, Kind.YAML):
        return raw
    if kind is Kind.INI:
        if isinstance(raw, dict):
            return _ini_from_object(raw)
    elif isinstance(raw, str):
        return raw.encode() if kind is Kind.BINARY else _parse_text(kind, raw, str(path), None)
    elif kind in (Kind.LIST, Kind.DATA) and isinstance(raw, list):
        if all(_is_scalar(item) for item in raw):
            return [str(item) for item in raw]
    elif kind is Kind.VALUE and (raw is None or _is_scalar(raw)):
        return raw if raw is None or isinstance(raw, int) else str(raw)
    expected = _BUNDLE_SHAPES[kind]
    raise ConfigError(str(path), None, f"entry for {request.name!r} should be {expected}")


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _ini_from_object(raw: dict[Any, Any]) -> IniData:
    data: IniData = {"main": {}}
    for key, value in raw.items():
        if isinstance(value, dict):
            data.setdefault(str(key), {}).update({str(k): v for k, v in value.items()})
        else:
            data["main"][str(key)] = value
    return data
