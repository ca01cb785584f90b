"""Haraka's single-file config: ``smtp.json`` (or, failing that, ``smtp.yaml``).

Each top-level key names another config file and holds its contents, already parsed::

    {"!plugins": ["rcpt_to.in_host_list", "queue/smtp_forward"],
     "!smtp.ini": {"main": {"listen": "[::0]:2525"}},
     "me": "mx.example.com"}

Haraka's syntax prefixes the name with ``!``; the bare name is accepted too (Haraka
ignores bare keys, so honouring them changes no working Haraka setup). Within one config
directory a bundle entry replaces the file of that name; across directories it takes part
in the overlay like the file would (:mod:`haraka_tw.config.overlay`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from haraka_tw.config.formats import decode, parse_json, parse_yaml
from haraka_tw.config.snapshot import SnapshotReader

__all__ = ["BUNDLE_NAMES", "BundleEntry", "BundleReader"]

BUNDLE_NAMES = ("smtp.json", "smtp.yaml")

BundleEntry = tuple[Path, Any]


class BundleReader:
    """Finds bundle entries, parsing each bundle file once per distinct content."""

    def __init__(self) -> None:
        self._parsed: dict[Path, tuple[bytes, dict[str, Any]]] = {}

    def entry(self, directory: Path, name: str, reader: SnapshotReader) -> BundleEntry | None:
        """The bundle's path and a copy of its entry for ``name``, or None if it has none.

        Raises :class:`~haraka_tw.config.errors.ConfigError` if the bundle is malformed.
        """
        if name in BUNDLE_NAMES:
            return None
        for bundle_name in BUNDLE_NAMES:
            path = directory / bundle_name
            content = reader.read(path)
            if content is None:
                continue
            entries = self._entries(path, content)
            for key in ("!" + name, name):
                if key in entries:
                    return path, copy.deepcopy(entries[key])
            return None
        return None

    def _entries(self, path: Path, content: bytes) -> dict[str, Any]:
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == content:
            return cached[1]
        parse = parse_json if path.suffix == ".json" else parse_yaml
        document = parse(decode(content), str(path))
        entries = document if isinstance(document, dict) else {}
        self._parsed[path] = (content, entries)
        return entries
