"""auth/auth_bridge: AUTH checked on one remote SMTP server, whose credentials are then kept
so the message can be relayed through that server as the same user.

Like C{auth/auth_proxy}, but every user is checked on the one server in
C{smtp_bridge.ini} (Haraka's file, shared with the queue plugin that relays)::

    [main]
    host=smtp.example.com      ; or 192.0.2.25:587, or [2001:db8::1]:587
    ;port=25                   ; when host has none

and the username is passed on as it is (no domain needed, none stripped).

On success, besides what every auth plugin records, C{connection.notes.auth_bridge} holds
C{{"host", "port", "user", "password", "method"}}: the server checked and the credentials
it accepted. A queue plugin (C{queue/smtp_forward}) relays through that host and logs in
with them. The password stays in memory for the connection only and is never logged; this
is the plugin to use only when that relaying is wanted.

C{[core]} keys, in C{auth_bridge.ini}: those of L{haraka_tw.plugins.auth.auth_base}
(C{methods} defaults to C{PLAIN,LOGIN}; C{constrain_sender} to false), C{timeout} (seconds,
default 10) and C{tls_verify}, as for auth_proxy.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker

from haraka_tw.outbound.endpoint import Endpoint, parse_endpoint
from haraka_tw.plugins.auth.auth_base import AuthCredentials
from haraka_tw.plugins.auth.auth_proxy import Plugin as AuthProxyPlugin
from haraka_tw.plugins.auth.auth_proxy import RemoteChecker
from haraka_tw.plugins.auth.sasl import PasswordCredentials
from haraka_tw.smtp.connection import Connection

__all__ = ["Plugin", "read_bridge_host"]

BRIDGE_FILE = "smtp_bridge.ini"


def read_bridge_host(main: dict[str, Any]) -> Endpoint:
    """The server of C{smtp_bridge.ini}'s C{[main]}.

    @raise ValueError: without a host, or with a bad host or port.
    """
    host = main.get("host")
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"{BRIDGE_FILE}: [main] host is required")
    port = main.get("port")
    if port is None or port == "":
        return parse_endpoint(host)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{BRIDGE_FILE}: bad port {port!r}")
    return parse_endpoint(host, port)


class Plugin(AuthProxyPlugin):
    name = "auth/auth_bridge"
    config_file = "auth_bridge.ini"
    strip_domain = False

    def watched_files(self) -> tuple[str, ...]:
        return (self.config_file, BRIDGE_FILE)

    def make_checker(self, ini: dict[str, dict[str, Any]]) -> ICredentialsChecker:
        self.endpoint = read_bridge_host(self.config.get_ini(BRIDGE_FILE)["main"])
        hosts = [self.endpoint]
        return RemoteChecker(self.authenticator(ini), lambda _: hosts, self.log)

    def authenticated(
        self, connection: Connection, mechanism: str, user: str, credentials: AuthCredentials
    ) -> None:
        if not isinstance(credentials, PasswordCredentials):
            return
        connection.notes["auth_bridge"] = {
            "host": self.endpoint.host,
            "port": self.endpoint.port,
            "user": credentials.username.decode("utf-8"),
            "password": credentials.password.decode("utf-8"),
            "method": mechanism,
        }
