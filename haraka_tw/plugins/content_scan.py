"""What the content scanners (spamassassin, clamd) share: which clients' mail they leave
unscanned, as their C{[check]} sections say (Haraka's reading of them)."""

from __future__ import annotations

from collections.abc import Mapping

from haraka_tw.smtp.connection import Connection

__all__ = ["CHECK_BOOLEANS", "client_skips"]

#: The [check] keys, each on unless turned off: scan mail from such clients.
CHECK_BOOLEANS = (
    "+check.authenticated",
    "+check.private_ip",
    "+check.local_ip",
    "+check.relay",
)


def client_skips(connection: Connection, check: Mapping[str, object]) -> list[str]:
    """Why this client's mail is not scanned (every reason that holds), by C{check}
    (the [check] section): C{authed}, C{relay}, C{local_ip}, C{private_ip}. A loopback
    client is judged by C{local_ip} alone."""
    reasons = []
    if not check.get("authenticated", True) and connection.notes.get("auth_user"):
        reasons.append("authed")
    if not check.get("relay", True) and connection.relaying:
        reasons.append("relay")
    remote = connection.remote
    local_ok = check.get("local_ip", True)
    if not local_ok and remote.is_local:
        reasons.append("local_ip")
    if (
        not check.get("private_ip", True)
        and remote.is_private
        and not (local_ok and remote.is_local)
    ):
        reasons.append("private_ip")
    return reasons
