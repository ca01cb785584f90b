"""The OpenSSL side of a L{TLSPolicy}: what STARTTLS and implicit TLS connections use.

L{client_tls} gives a L{ClientTLS}: a connection creator (Twisted's
C{IOpenSSLClientConnectionCreator}) that sends SNI for host names, plus L{ClientTLS.check},
which the protocol runs once the handshake is done. A verifying policy has OpenSSL check
the chain against the trust roots during the handshake (a bad chain fails the handshake)
and then C{check} matches the server's name or address with service_identity. A policy
without verification accepts any certificate.

Contexts are built from files with pyOpenSSL directly (no deprecated X509 objects) and
cached per (policy, name), so trust stores and client certificates are read once.
"""

from __future__ import annotations

import functools
from typing import Any

from OpenSSL import SSL
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.outbound.delivery import TLSPolicy

__all__ = ["ClientTLS", "client_context", "client_tls", "is_ip"]

_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.0": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}


def is_ip(name: str) -> bool:
    """True for an IPv4 or IPv6 address literal."""
    return bool(isIPAddress(name) or isIPv6Address(name))


def _chain_ok(connection: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    return bool(ok)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """Client TLS connections to one server name under one policy."""

    def __init__(self, context: SSL.Context, servername: str, verify: bool) -> None:
        self._context = context
        self.servername = servername
        self.verify = verify
        self._ip = is_ip(servername)
        self._sni = None if self._ip or not servername else servername.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection

    def in_handshake(self) -> IOpenSSLClientConnectionCreator:
        """These connections with L{check} made at the end of the handshake, a failure
        failing it: for a client (a scanner's) that does not call C{check} itself."""
        return _CheckedInHandshake(self)

    def check(self, connection: SSL.Connection) -> None:
        """After the handshake: the certificate must name the server (when verifying).

        @raise service_identity.VerificationError: (or another error) when it does not.
        """
        if not self.verify:
            return
        if self._ip:
            verify_ip_address(connection, self.servername)
        else:
            verify_hostname(connection, self.servername)


@implementer(IOpenSSLClientConnectionCreator)
class _CheckedInHandshake:
    def __init__(self, tls: ClientTLS) -> None:
        self.tls = tls

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self.tls.clientConnectionForTLS(tlsProtocol)
        connection.set_info_callback(self._handshaking)
        return connection

    def _handshaking(self, connection: SSL.Connection, where: int, _: int) -> None:
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        try:
            self.tls.check(connection)
        except Exception:
            connection.get_app_data().failVerification(Failure())


def client_context(policy: TLSPolicy) -> SSL.Context:
    """A new OpenSSL context for client connections under C{policy} (its files read now)."""
    try:
        version = _VERSIONS[policy.min_version]
    except KeyError:
        raise ValueError(f"unknown TLS version {policy.min_version!r}") from None
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_options(SSL.OP_NO_COMPRESSION)
    if policy.client_cert is not None:
        context.use_certificate_chain_file(policy.client_cert)
        context.use_privatekey_file(policy.client_key or policy.client_cert)
        context.check_privatekey()
    if policy.verifying:
        if policy.ca_file is not None:
            context.load_verify_locations(policy.ca_file)
        else:
            context.set_default_verify_paths()
        context.set_verify(SSL.VERIFY_PEER, _chain_ok)
    else:
        context.set_verify(SSL.VERIFY_NONE, _chain_ok)
    return context


@functools.lru_cache(maxsize=128)
def client_tls(policy: TLSPolicy, servername: str) -> ClientTLS:
    """TLS for connections under ``policy`` to the server called ``servername`` (a host
    name or an address literal; what a verifying policy checks).

    @raise ValueError: for an unknown C{min_version}.
    @raise OpenSSL.SSL.Error: for a C{ca_file} or client certificate that cannot be used.
    """
    return ClientTLS(client_context(policy), servername, policy.verifying)
