"""quiet_checks: leave a load balancer's health checks out of the log.

docs/scaling.md shows this plugin. HAProxy's health check of a haraka_tw instance is a
short SMTP session from the balancer itself: with ``send-proxy-v2`` it opens with a PROXY
v2 ``LOCAL`` header (no client address), then EHLO and QUIT. The core logs one NOTICE
summary line per session, so every check would write a line. This log plugin drops the
NOTICE, INFO and chattier lines of such sessions; warnings and errors still get through.

List it first in the plugins file, as ``quiet_checks:QuietHealthChecks`` with this file
on the Python path (or copy it into a package of your own).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, OK, Code
from haraka_tw.interfaces import ILogHook
from haraka_tw.logging import Level, LogRecord

__all__ = ["QuietHealthChecks", "is_health_check"]


def is_health_check(connection: Any) -> bool:
    """Whether C{connection} is a trusted proxy speaking for itself: its PROXY header
    named no client (a v2 LOCAL command, or v1 C{PROXY UNKNOWN})."""
    header = connection.notes.get("proxy")
    return header is not None and header.get("src_ip") is None


@implementer(ILogHook)
class QuietHealthChecks:
    """Suppresses the log lines of health-check sessions below WARN."""

    def hook_log(self, connection: Any, record: LogRecord) -> Code:
        if connection is not None and record.level > Level.WARN and is_health_check(connection):
            return OK  # any answer but CONT: the line is not written
        return CONT
