"""Retry timing: temp_fail_intervals, maxTempFailures and Haraka's 2^(n+5) schedule."""

from __future__ import annotations

import pytest

from haraka_tw.config.ini import parse_ini
from haraka_tw.outbound.retry import RetryPolicy, parse_intervals

HARAKA_DEFAULT = [2.0 ** (i + 5) for i in range(1, 13)]


def policy(ini: str) -> tuple[RetryPolicy, list[str]]:
    """The policy an outbound.ini text gives, and what it logged."""
    lines: list[str] = []
    return RetryPolicy.from_ini(parse_ini(ini, "outbound.ini")["main"], lines.append), lines


def test_haraka_examples() -> None:
    """Haraka's tests: '10s, 1m*2' -> [10, 60, 60]; 'none' -> []."""
    assert parse_intervals("10s, 1m*2") == [10, 60, 60]
    assert parse_intervals("none") == []
    assert parse_intervals(" NONE ") == []


def test_documented_example() -> None:
    """'1m, 5m*2, 1h*3' -> [60, 300, 300, 3600, 3600, 3600]; days and fractions work."""
    assert parse_intervals("1m, 5m*2, 1h*3") == [60, 300, 300, 3600, 3600, 3600]
    assert parse_intervals("1d,0.5m, 2H") == [86400, 30, 7200]


@pytest.mark.parametrize(
    "bad",
    ["", " ", "1x", "5s**2", "4s", "abc", "1m*x", "1m*0", "1m*-1", "m", "1m,", "1,5m", "-5m"],
)
def test_invalid_falls_back_with_a_log(bad: str) -> None:
    """A value that does not parse is logged and Haraka's default schedule is used."""
    with pytest.raises(ValueError):
        parse_intervals(bad)
    if bad.strip():
        got, lines = policy(f"temp_fail_intervals={bad}\n")
        assert list(got.intervals) == HARAKA_DEFAULT
        assert lines and "temp_fail_intervals" in lines[0]


def test_absent_is_haraka_default() -> None:
    """No setting: 2^(n+5) s after the n-th failure, 12 retries over ~72.8 h, then give up."""
    got, lines = policy("")
    assert list(got.intervals) == HARAKA_DEFAULT
    assert got.delay_for(1) == 64
    assert got.delay_for(12) == 131072
    assert got.delay_for(13) is None
    assert sum(got.intervals) / 3600 == pytest.approx(72.8, abs=0.05)
    assert got.max_attempts == 13
    assert lines == []


def test_none_bounces_on_first_failure() -> None:
    """temp_fail_intervals=none: the first temporary failure bounces."""
    got, _ = policy("temp_fail_intervals=none\n")
    assert got.intervals == ()
    assert got.delay_for(1) is None


def test_intervals_win_over_max_temp_failures() -> None:
    """temp_fail_intervals takes precedence over maxTempFailures."""
    got, _ = policy("maxTempFailures=3\ntemp_fail_intervals=10s, 1m*2\n")
    assert [got.delay_for(n) for n in (1, 2, 3, 4)] == [10, 60, 60, None]


def test_max_temp_failures() -> None:
    """maxTempFailures=N gives N-1 retries on the 2^(n+5) schedule; 1 gives none."""
    got, _ = policy("maxTempFailures=4\n")
    assert list(got.intervals) == [64, 128, 256]
    got, _ = policy("maxTempFailures=1\n")
    assert got.intervals == ()


def test_bad_max_temp_failures() -> None:
    """A maxTempFailures that is not a positive integer is logged; 13 is used."""
    for value in ("zero", "0", "-2"):
        got, lines = policy(f"maxTempFailures={value}\n")
        assert list(got.intervals) == HARAKA_DEFAULT
        assert lines


def test_delay_for_counts_from_one() -> None:
    """delay_for(0) is a caller error: failures are counted from 1."""
    with pytest.raises(ValueError):
        RetryPolicy((60.0,)).delay_for(0)


def test_retry_until() -> None:
    """retry_until: now plus the delays still to come; give_up_time from arrival."""
    p = RetryPolicy((10.0, 60.0, 60.0))
    assert p.retry_until(1000.0, 1) == 1130.0
    assert p.retry_until(1000.0, 3) == 1060.0
    assert p.retry_until(1000.0, 4) is None
    assert p.give_up_time(500.0) == 630.0
