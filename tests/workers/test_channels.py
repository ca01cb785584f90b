"""The master-worker channels as bytes: log lines out, control lines in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel

from haraka_tw.workers.channels import (
    control_line,
    log_lines,
    read_control_line,
    read_log_line,
)


def test_a_log_event_becomes_level_tab_text_lines() -> None:
    """Each line of an event's text carries the event's level."""
    assert log_lines(LogLevel.error, "boom\n  at x") == b"error\tboom\nerror\t  at x\n"
    assert log_lines(LogLevel.info, "") == b"info\t\n"


def test_a_log_line_reads_back() -> None:
    """A line reads back as its level and text; tabs in the text stay."""
    assert read_log_line(b"warn\t[WARN] [-] [core] a\tb") == (
        LogLevel.warn,
        "[WARN] [-] [core] a\tb",
    )
    assert read_log_line(b"critical\tx\r") == (LogLevel.critical, "x")


def test_a_line_without_a_level_is_kept_whole_at_warn() -> None:
    """What a dying interpreter prints has no level: kept as it is, at WARN."""
    assert read_log_line(b"Traceback (most recent call last):") == (
        LogLevel.warn,
        "Traceback (most recent call last):",
    )
    assert read_log_line(b"loud\tnoise") == (LogLevel.warn, "loud\tnoise")


@given(st.sampled_from(list(LogLevel.iterconstants())), st.text())
def test_log_lines_round_trip(level: LogLevel, text: str) -> None:
    """Every line written reads back at its level with the text's line."""
    lines = log_lines(level, text).split(b"\n")
    assert lines[-1] == b""
    expected = text.encode("utf-8", "replace").decode("utf-8").splitlines() or [""]
    assert [read_log_line(line) for line in lines[:-1]] == [(level, t) for t in expected]


@given(st.binary())
def test_read_log_line_never_raises(data: bytes) -> None:
    """Any bytes read as some level and text."""
    read_log_line(data)


def test_control_lines_round_trip() -> None:
    """A control line is one JSON line that reads back as the action and its arguments."""
    line = control_line("delete", {"ids": ["a", "b"]})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert read_control_line(line.rstrip(b"\n")) == ("delete", {"ids": ["a", "b"]})
    assert read_control_line(b'{"control": "flush"}') == ("flush", {})


@pytest.mark.parametrize(
    "line",
    [b"", b"flush", b"[]", b'{"args": {}}', b'{"control": 1}', b'{"control": "x", "args": []}'],
)
def test_bad_control_lines_are_refused(line: bytes) -> None:
    """Anything but a control object is a ValueError."""
    with pytest.raises(ValueError):
        read_control_line(line)
