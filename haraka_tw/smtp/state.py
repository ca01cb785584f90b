"""Notes and results: the per-connection and per-transaction scratch space of plugins."""

from __future__ import annotations

from typing import Any

__all__ = ["Notes", "Results"]

_MISSING = object()


class Notes(dict[str, Any]):
    """A dict that plugins also use with attributes and dotted paths.

    C{notes.foo = 1}, C{notes["foo"]} and C{notes.get_path("a.b.c")} all work.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def get_path(self, path: str, default: Any = None) -> Any:
        """The value at a dotted path, or C{default}."""
        node: Any = self
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def set_path(self, path: str, value: Any) -> None:
        """Set the value at a dotted path, creating the dicts on the way."""
        parts = path.split(".")
        node: dict[str, Any] = self
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = Notes()
                node[part] = child
            node = child
        node[parts[-1]] = value


class Results:
    """Per-plugin results (Haraka's haraka-results): pass, fail, skip, err lists and values."""

    LISTS = ("pass", "fail", "skip", "err", "msg")

    def __init__(self) -> None:
        self._by_plugin: dict[str, dict[str, Any]] = {}

    def _entry(self, plugin: str) -> dict[str, Any]:
        entry = self._by_plugin.get(plugin)  # (setdefault would build the lists every time)
        if entry is None:
            entry = self._by_plugin[plugin] = {k: [] for k in self.LISTS}
        return entry

    def add(self, plugin: str, **fields: Any) -> None:
        """Record results: list keys (pass, fail, ...) append, other keys are set."""
        entry = self._entry(plugin)
        for key, value in fields.items():
            if key in self.LISTS:
                entry[key].append(value)
            else:
                entry[key] = value

    def push(self, plugin: str, **fields: Any) -> None:
        """Append to a list key, creating it."""
        entry = self._entry(plugin)
        for key, value in fields.items():
            entry.setdefault(key, [])
            entry[key].append(value)

    def incr(self, plugin: str, **fields: int) -> None:
        """Add to counters."""
        entry = self._entry(plugin)
        for key, value in fields.items():
            entry[key] = entry.get(key, 0) + value

    def get(self, plugin: str) -> dict[str, Any] | None:
        """Everything recorded for C{plugin}, or None."""
        return self._by_plugin.get(plugin)

    def has(self, plugin: str, key: str, value: Any) -> bool:
        """Whether C{key} of C{plugin} is, or contains, C{value}."""
        entry = self._by_plugin.get(plugin)
        if entry is None or key not in entry:
            return False
        held = entry[key]
        return value in held if isinstance(held, list) else bool(held == value)

    def reset(self, plugin: str) -> None:
        """Forget everything recorded for C{plugin} (a new client, after XCLIENT)."""
        self._by_plugin.pop(plugin, None)

    def collate(self, plugin: str) -> str:
        """A one-line summary, for logs."""
        entry = self._by_plugin.get(plugin) or {}
        return " ".join(
            f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in entry.items()
            if v not in ([], None, "")
        )

    def __contains__(self, plugin: object) -> bool:
        return plugin in self._by_plugin
