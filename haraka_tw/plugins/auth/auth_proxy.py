"""auth/auth_proxy: AUTH checked by logging in to the SMTP server of the user's domain.

The username must be C{user@domain}; C{[domains]} in C{auth_proxy.ini} names the servers
for each domain (Haraka's format)::

    [domains]
    example.com = mx1.example.com:587, mx2.example.com
    example.net = [2001:db8::25]:587

Hosts are separated by spaces, commas or semicolons; the port defaults to 25. The first
host is asked; the next only when one gives no answer (refused, timed out, no AUTH
offered, a 4xx). A 235 there is success; a 5xx is tried once more with the unqualified
username (C{user}), as Haraka does, and then is a failure (535 here). When no host
answers, the client gets 454 4.7.0 (temporary) and it does not count as a failure.

The remote session: EHLO (as this server's C{me}), STARTTLS when offered (opportunistic:
the certificate is not checked unless C{[core] tls_verify=true}, which also requires
STARTTLS), AUTH PLAIN (or LOGIN), QUIT. Only PLAIN and LOGIN can be offered here: the
password is needed in the clear to pass it on.

C{[core]} keys: those of L{haraka_tw.plugins.auth.auth_base} (C{methods} defaults to
C{PLAIN,LOGIN}; C{constrain_sender} defaults to false, as in Haraka), and C{timeout}
(seconds per remote host, default 10), C{tls_verify}. Keep the timeouts of all a domain's
hosts under the plugin timeout (C{auth/auth_proxy.timeout}, else C{plugin_timeout}).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from zope.interface import implementer

from haraka_tw.outbound.endpoint import Endpoint, parse_endpoints
from haraka_tw.plugins.auth.auth_base import AuthPlugin, AuthUnavailable
from haraka_tw.plugins.auth.remote_smtp import RemoteAuthenticator, RemoteError, TLSPolicy
from haraka_tw.plugins.auth.sasl import LOGIN, PLAIN

__all__ = ["Plugin", "RemoteChecker", "read_domains"]


def read_domains(section: Mapping[str, Any]) -> dict[str, list[Endpoint]]:
    """C{[domains]} as lower-case domain -> hosts.

    @raise ValueError: for a host or port that does not parse.
    """
    domains: dict[str, list[Endpoint]] = {}
    for domain, value in section.items():
        if isinstance(value, bool | list):
            raise ValueError(f"[domains] {domain} needs a list of hosts")
        domains[domain.lower().rstrip(".")] = parse_endpoints(value)
    return domains


@implementer(ICredentialsChecker)
class RemoteChecker:
    """Checks a username and password on remote SMTP servers.

    @ivar route: username -> the hosts to ask, or None when the user cannot be routed.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        authenticator: RemoteAuthenticator,
        route: Any,
        log: Any = None,
    ) -> None:
        self.authenticator = authenticator
        self.route = route
        self.log = log

    def requestAvatarId(self, credentials: ICredentials) -> Deferred[bytes | tuple[()]]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: ICredentials) -> bytes:
        username: bytes = credentials.username  # type: ignore[attr-defined]
        password: bytes = credentials.password  # type: ignore[attr-defined]
        hosts: Sequence[Endpoint] | None = self.route(username.decode("utf-8"))
        if not hosts:
            raise UnauthorizedLogin("no remote server for this user")
        problems: list[str] = []
        for endpoint in hosts:
            try:
                accepted = await self.authenticator.check(endpoint, username, password)
            except RemoteError as e:
                problems.append(f"{endpoint}: {e}")
                self._log(f"AUTH check on {endpoint} gave no answer: {e}")
                continue
            self._log(f"AUTH user={username.decode('utf-8')!r} on {endpoint}: {accepted}")
            if accepted:
                return username
            raise UnauthorizedLogin(f"refused by {endpoint}")
        raise AuthUnavailable("; ".join(problems))

    def _log(self, message: str) -> None:
        if self.log is not None:
            self.log.info(message)


class Plugin(AuthPlugin):
    name = "auth/auth_proxy"
    config_file = "auth_proxy.ini"
    supported_methods = (PLAIN, LOGIN)
    default_methods = (PLAIN, LOGIN)
    constrain_sender_default = False
    extra_booleans = ("-core.tls_verify",)
    #: Haraka's auth_proxy retries a refused user@domain as user.
    strip_domain = True

    def authenticator(self, ini: dict[str, dict[str, Any]]) -> RemoteAuthenticator:
        """The client for the remote checks, from C{[core]} C{timeout} and C{tls_verify}."""
        core = ini.get("core", {})
        timeout = core.get("timeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"timeout must be a number of seconds, not {timeout!r}")
        return RemoteAuthenticator(
            self.reactor,
            helo=str(self.config.get_value("me", None) or socket.getfqdn() or "localhost"),
            timeout=float(timeout),
            tls=TLSPolicy(enabled=True, verify=bool(core.get("tls_verify"))),
            strip_domain=self.strip_domain,
            log=self.log.protocol,
        )

    def make_checker(self, ini: dict[str, dict[str, Any]]) -> ICredentialsChecker:
        domains = read_domains(ini.get("domains", {}))

        def route(username: str) -> list[Endpoint] | None:
            _, at, domain = username.rpartition("@")
            if not at:
                return None
            return domains.get(domain.lower().rstrip("."))

        return RemoteChecker(self.authenticator(ini), route, self.log)
