"""The one exception the config reader raises for a file it cannot make sense of."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A config file is malformed or unreadable.

    ``str(error)`` reads ``path:line: message``, or ``path: message`` when the problem has
    no line (an unreadable file, a missing YAML library), so a log line points an operator
    straight at the spot to fix.
    """

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"
