"""When to retry a temporary failure, and when to give up: Haraka's rules as a policy object.

outbound.ini ``[main]``:

- ``temp_fail_intervals``: comma-separated ``<number><s|m|h|d>[*<count>]``, e.g.
  ``1m, 5m*2, 1h*3`` -> 60, 300, 300, 3600, 3600, 3600 seconds. ``none`` bounces on the
  first temporary failure. Each delay must be at least 5 seconds. A value that does not
  parse is logged and the default below is used (as Haraka does).
- ``maxTempFailures`` (default 13), used only without ``temp_fail_intervals``: the
  delays are ``2^(i+5)`` seconds for i = 1 .. maxTempFailures-1, that is 64 s, 128 s, ...
  36.4 h: 12 retries over about 72.8 hours, then a bounce.

Counting as Haraka does: after the n-th temporary failure of a message (n = 1, 2, ...) the
next attempt waits ``intervals[n-1]``; when n exceeds the number of intervals the message
bounces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.logger import Logger

__all__ = ["DEFAULT_MAX_TEMP_FAILURES", "RetryPolicy", "parse_intervals"]

DEFAULT_MAX_TEMP_FAILURES = 13

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)\Z")
_MIN_DELAY = 5

_logger = Logger(namespace="haraka_tw.outbound.retry")


def _log_to_twisted(message: str) -> None:
    _logger.error("{message}", message=message)


def parse_intervals(text: str) -> list[float]:
    """``"1m, 5m*2"`` -> ``[60, 300, 300]``; ``"none"`` -> ``[]``.

    @raise ValueError: naming the element at fault (counted from 0, as Haraka does).
    """
    spec = re.sub(r"\s+", "", text).lower()
    if not spec:
        raise ValueError("element 0: nothing specified")
    if spec == "none":
        return []
    times: list[float] = []
    for i, element in enumerate(spec.split(",")):
        span, star, count_text = element.partition("*")
        count = 1
        if star:
            if "*" in count_text:
                raise ValueError(f"element {i}: too many *")
            if not count_text.isdigit() or int(count_text) < 1:
                raise ValueError(f"element {i}: multiplier is not a positive integer")
            count = int(count_text)
        if len(span) < 2:
            raise ValueError(f"element {i}: invalid time span")
        number, unit = span[:-1], span[-1]
        if unit not in _UNITS:
            raise ValueError(f"element {i}: invalid time span symbol {unit!r}")
        if not _NUMBER.match(number):
            raise ValueError(f"element {i}: invalid number {number!r}")
        seconds = float(number) * _UNITS[unit]
        if seconds < _MIN_DELAY:
            raise ValueError(f"element {i}: delay time too small, should be >= 5 seconds")
        times.extend([seconds] * count)
    return times


@dataclass(frozen=True)
class RetryPolicy:
    """The delays before each retry; past the last one, the message bounces."""

    intervals: tuple[float, ...]

    @classmethod
    def haraka_default(cls, max_temp_failures: int = DEFAULT_MAX_TEMP_FAILURES) -> RetryPolicy:
        """Haraka's original schedule: ``2^(i+5)`` s for i = 1 .. max_temp_failures-1."""
        return cls(tuple(float(2 ** (i + 5)) for i in range(1, max_temp_failures)))

    @classmethod
    def from_ini(
        cls,
        main: Mapping[str, object],
        log: Callable[[str], None] | None = None,
    ) -> RetryPolicy:
        """The policy outbound.ini's ``[main]`` section asks for (see the module docstring).

        Errors are logged through C{log} (default: the Twisted logger) and never raised.
        """
        report = log or _log_to_twisted
        max_failures = DEFAULT_MAX_TEMP_FAILURES
        raw_max = main.get("maxTempFailures")
        if raw_max not in (None, ""):
            try:
                max_failures = int(str(raw_max))
                if max_failures < 1:
                    raise ValueError(raw_max)
            except ValueError:
                report(f"outbound.ini maxTempFailures={raw_max!r} is not a positive integer")
                max_failures = DEFAULT_MAX_TEMP_FAILURES
        spec = main.get("temp_fail_intervals")
        if spec is None or spec == "":
            return cls.haraka_default(max_failures)
        try:
            return cls(tuple(parse_intervals(str(spec))))
        except ValueError as e:
            report(
                f"outbound.ini temp_fail_intervals syntax error parsing {e}; "
                "using the maxTempFailures schedule"
            )
            return cls.haraka_default(max_failures)

    def delay_for(self, attempts_done: int) -> float | None:
        """Seconds to wait after the C{attempts_done}-th temporary failure (1 = the first),
        or None: give up and bounce."""
        if attempts_done < 1:
            raise ValueError("attempts_done counts failures from 1")
        if attempts_done > len(self.intervals):
            return None
        return self.intervals[attempts_done - 1]

    @property
    def max_attempts(self) -> int:
        """Delivery attempts in all: the first one and a retry per interval."""
        return len(self.intervals) + 1

    def give_up_time(self, arrival: float) -> float:
        """When a message that arrived at C{arrival} bounces if every attempt fails at
        once: for a delayed DSN's Will-Retry-Until."""
        return arrival + sum(self.intervals)

    def retry_until(self, now: float, attempts_done: int) -> float | None:
        """The time of the last retry left after C{attempts_done} failures, seen from
        C{now} (None: no retry left)."""
        left = self.intervals[attempts_done - 1 :] if attempts_done >= 1 else self.intervals
        return now + sum(left) if left else None
