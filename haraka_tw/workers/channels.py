"""What travels between the master and a worker, as pure functions over bytes.

- The output channel (worker to master) carries the worker's log: each line of each event
  as C{LEVEL<TAB>text}, LEVEL a twisted.logger level name. A line without one (what a
  dying interpreter prints) is taken whole, at WARN.
- The control channel (master to worker) carries the requests of C{haraka-tw queue}: one
  JSON object per line, C{{"control": ACTION, "args": {...}}}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import LogLevel

__all__ = ["control_line", "log_lines", "read_control_line", "read_log_line"]


def log_lines(level: LogLevel, text: str) -> bytes:
    """One log event's text as output-channel lines (a line per line of C{text})."""
    lines = text.splitlines() or [""]
    return "".join(f"{level.name}\t{line}\n" for line in lines).encode("utf-8", "replace")


def read_log_line(line: bytes) -> tuple[LogLevel, str]:
    """An output-channel line (without its newline): its level and text."""
    text = line.decode("utf-8", "replace").rstrip("\r")
    name, tab, rest = text.partition("\t")
    level = _LEVELS.get(name) if tab else None  # (levelWithName searches the constants)
    return (LogLevel.warn, text) if level is None else (level, rest)


_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def control_line(action: str, args: dict[str, Any]) -> bytes:
    """A control-channel line asking the worker to carry out C{action}."""
    return json.dumps({"control": action, "args": args}).encode() + b"\n"


def read_control_line(line: bytes) -> tuple[str, dict[str, Any]]:
    """A control-channel line (without its newline): the action and its arguments.

    @raise ValueError: if it is not one.
    """
    try:
        message = json.loads(line)
        action, args = message["control"], message.get("args", {})
        args = {} if args is None else args
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not a control line: {line[:200]!r}") from e
    if not isinstance(action, str) or not isinstance(args, dict):
        raise ValueError(f"not a control line: {line[:200]!r}")
    return action, args
