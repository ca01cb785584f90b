"""Tests for haraka_tw.config.errors."""

from __future__ import annotations

from haraka_tw.config import ConfigError


def test_str_names_path_and_line() -> None:
    """A ConfigError with a line reads path:line: message."""
    error = ConfigError("/etc/haraka/smtp.ini", 3, "bad line")
    assert str(error) == "/etc/haraka/smtp.ini:3: bad line"
    assert (error.path, error.line, error.message) == ("/etc/haraka/smtp.ini", 3, "bad line")


def test_str_without_line() -> None:
    """A ConfigError without a line reads path: message."""
    assert str(ConfigError("me", None, "unreadable")) == "me: unreadable"
