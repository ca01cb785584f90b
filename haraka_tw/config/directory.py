"""The overlaid config directory readers ask for files: cache, reload and change callbacks.

Every result is cached per (name, kind, booleans) together with snapshots of each file
looked at to produce it, in every directory (missing ones too). :meth:`reload` checks
those snapshots, re-reads what changed, and tells the readers registered for a name when
its value changed. A file that fails to parse on reload is logged and its last good
value stays in force; on a first read the :class:`ConfigError` goes to the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar, overload

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from haraka_tw.config.bundle import BundleReader
from haraka_tw.config.errors import ConfigError
from haraka_tw.config.ini import IniData
from haraka_tw.config.overlay import Kind, Request, read_layered
from haraka_tw.config.snapshot import FileSnapshot, SnapshotReader, check_snapshot, stat_signature
from haraka_tw.config.watch import ConfigWatcher

__all__ = ["ConfigDirectory"]

T = TypeVar("T")

_logger = Logger(namespace="haraka_tw.config")


def _log_to_twisted(message: str) -> None:
    _logger.warn("{message}", message=message)


_UNSEEN = object()


@dataclass
class _Entry:
    found: bool
    value: Any
    snapshots: dict[Path, FileSnapshot]


class ConfigDirectory:
    """Haraka-style config files read through ``directories``, lowest precedence first.

    Typically ``[shipped_defaults, operator_config]``. A directory that does not exist is
    simply empty. Names are relative paths and may have subdirectories
    (``"tls/example.com.pem"``). Results are copies: changing one does not change the
    cache. ``log`` receives reload errors (``path:line: message``), notices, and warnings
    about files that parse but are suspect (a key set twice in an ini section, bytes that
    are not UTF-8), once per version of the file; it defaults to the Twisted logger.
    """

    def __init__(
        self,
        directories: Sequence[str | Path],
        *,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.directories: list[Path] = [Path(directory) for directory in directories]
        self._log = log or _log_to_twisted
        self._entries: dict[Request, _Entry] = {}
        self._callbacks: dict[str, list[Callable[[], None]]] = {}
        self._bundles = BundleReader()
        self._warned: dict[str, FileSnapshot | None] = {}
        self._watcher: ConfigWatcher | None = None

    # -- readers -----------------------------------------------------------------------

    @overload
    def get_value(self, name: str) -> str | int | None: ...
    @overload
    def get_value(self, name: str, default: T) -> str | int | T: ...
    def get_value(self, name: str, default: object = None) -> object:
        """The first non-blank, non-comment line, stripped; all digits become an int.

        ``default`` if no directory has the file or the file has no such line.
        """
        value = self._get(Request(name, Kind.VALUE)).value
        return default if value is None else value

    def get_list(self, name: str, default: Iterable[str] = ()) -> list[str]:
        """Every line stripped, blank and ``#``/``;`` comment lines skipped."""
        entry = self._get(Request(name, Kind.LIST))
        return list(entry.value) if entry.found else list(default)

    def get_data(self, name: str, default: Iterable[str] = ()) -> list[str]:
        """Every line as written, without its line break."""
        entry = self._get(Request(name, Kind.DATA))
        return list(entry.value) if entry.found else list(default)

    def get_ini(self, name: str, *, booleans: Sequence[str] = ()) -> IniData:
        """An INI file as ``{section: {key: value}}``, merged key by key across directories.

        Always has ``main``. ``booleans`` declares boolean keys (``"+main.enabled"``
        defaults to True, ``"-main.foo"`` or ``"main.foo"`` to False, ``"*.foo"`` in
        every section); see :mod:`haraka_tw.config.ini`.
        """
        entry = self._get(Request(name, Kind.INI, tuple(booleans)))
        result: IniData = copy.deepcopy(entry.value)
        return result

    def get_json(self, name: str, default: Any = None) -> Any:
        """A JSON document, objects merged key by key across directories.

        Like Haraka, ``x.json`` falls back to ``x.yaml`` in a directory without it.
        """
        entry = self._get(Request(name, Kind.JSON))
        return copy.deepcopy(entry.value) if entry.found else default

    def get_yaml(self, name: str, default: Any = None) -> Any:
        """A YAML document (needs PyYAML), mappings merged key by key across directories."""
        entry = self._get(Request(name, Kind.YAML))
        return copy.deepcopy(entry.value) if entry.found else default

    def get_binary(self, name: str) -> bytes | None:
        """The raw bytes of the highest-precedence file of that name, or None."""
        entry = self._get(Request(name, Kind.BINARY))
        result: bytes | None = entry.value
        return result

    def path(self, name: str) -> Path | None:
        """The highest-precedence existing file of that name, or None."""
        _check_name(name)
        for directory in reversed(self.directories):
            candidate = directory / name
            if stat_signature(candidate) is not None:
                return candidate
        return None

    # -- changes -----------------------------------------------------------------------

    def on_change(self, name: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time a reload finds a new value for ``name``.

        Only files that have been read are watched; a callback is not called when the
        new contents failed to parse.
        """
        self._callbacks.setdefault(name, []).append(callback)

    def reload(self) -> list[str]:
        """Re-check every file read so far, re-read the changed ones, run callbacks.

        Returns the names whose value changed, in the order they were first read. A
        file that no longer parses is logged and keeps its last good value.
        """
        changed: list[str] = []
        reported: set[str] = set()
        for request, entry in list(self._entries.items()):
            current = _current_snapshots(entry.snapshots)
            if current is not None:
                entry.snapshots = current
                continue
            reader = SnapshotReader()
            try:
                fresh = self._load(request, reader)
            except ConfigError as error:
                entry.snapshots = {**entry.snapshots, **reader.snapshots}
                if str(error) not in reported:
                    reported.add(str(error))
                    self._log(f"{error} (keeping the last good {request.name})")
                continue
            self._entries[request] = fresh
            differs = (fresh.found, fresh.value) != (entry.found, entry.value)
            if differs and request.name not in changed:
                changed.append(request.name)
        for name in changed:
            self._log(f"config: reloaded {name}")
            self._notify(name)
        return changed

    def start_watching(self, reactor: IReactorTime, interval: float = 1.0) -> None:
        """Poll every ``interval`` seconds and :meth:`reload` once a change has settled.

        A change is picked up one to two intervals after it is made.
        """
        self.stop_watching()
        self._watcher = ConfigWatcher(reactor, interval, self._pending, self.reload, self._log)
        self._watcher.start()

    def stop_watching(self) -> None:
        """Stop the polling :meth:`start_watching` began; a no-op if not watching."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    # -- internals ---------------------------------------------------------------------

    def _get(self, request: Request) -> _Entry:
        entry = self._entries.get(request)
        if entry is None:
            _check_name(request.name)
            entry = self._entries[request] = self._load(request, SnapshotReader())
        return entry

    def _load(self, request: Request, reader: SnapshotReader) -> _Entry:
        found, value = read_layered(self.directories, request, reader, self._bundles)
        for path, warning in reader.warnings:
            # (once per version of the file, however many readers parse it)
            snapshot = reader.snapshots.get(path)
            if self._warned.get(warning, _UNSEEN) != snapshot:
                self._warned[warning] = snapshot
                self._log(warning)
        return _Entry(found, value, reader.snapshots)

    def _pending(self) -> Hashable | None:
        """Which tracked files differ from their snapshots, and how; None if none do."""
        stale = set()
        checked: set[tuple[Path, FileSnapshot]] = set()
        for entry in list(self._entries.values()):
            for path, snapshot in entry.snapshots.items():
                if (path, snapshot) in checked:
                    continue
                checked.add((path, snapshot))
                if check_snapshot(path, snapshot) is None:
                    stale.add((path, stat_signature(path)))
        return frozenset(stale) or None

    def _notify(self, name: str) -> None:
        for callback in list(self._callbacks.get(name, ())):
            try:
                callback()
            except Exception as error:
                self._log(f"config: on_change callback for {name} failed: {error!r}")


def _current_snapshots(snapshots: dict[Path, FileSnapshot]) -> dict[Path, FileSnapshot] | None:
    """The snapshots refreshed, or None if any file changed."""
    current: dict[Path, FileSnapshot] = {}
    for path, snapshot in snapshots.items():
        checked = check_snapshot(path, snapshot)
        if checked is None:
            return None
        current[path] = checked
    return current


def _check_name(name: str) -> None:
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"config name must be a relative path inside the directory: {name!r}")
