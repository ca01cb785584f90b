"""tls: STARTTLS (RFC 3207), with certificates chosen by SNI.

Settings are tls.ini and the tls/ directory (see L{haraka_tw.tls}); a missing or
unreadable key, certificate, dhparam or ca file stops start-up with a message naming it.

- EHLO advertises STARTTLS unless the session is already TLS, the local port is in
  C{no_starttls_ports}, or the client is in C{[no_tls_hosts]}.
- C{STARTTLS} answers C{220 2.0.0 Ready to start TLS} and starts the handshake. Whatever
  the client pipelined behind the command is thrown away, and the session starts again:
  no greeting, no transaction, so MAIL before a new EHLO gets 503.
- C{STARTTLS} with an argument gets 501; inside TLS 503; before EHLO 503; where it is not
  offered, the core's 500 "Unrecognized command".
- On C{requireAuthorized} ports (and everywhere with C{rejectUnauthorized=true}) the
  handshake fails for a client without a certificate that verifies against C{ca}; on
  C{requireAuthorized} ports MAIL is refused with 530 until the client has done so.
- After the handshake: C{connection.tls} holds cipher, version, verified and the peer
  certificate; C{connection.notes.tls} has Haraka's fields (authorized,
  authorizationError, peerCertificate, cipher); C{connection.results} for this plugin has
  cipher, version, verified and authorized. On an implicit TLS port these are recorded at
  the first EHLO.
- A client that does not finish the handshake within the plugin's timeout
  (C{tls.timeout}, else C{plugin_timeout}) is disconnected.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, OK, Code, HookResult
from haraka_tw.interfaces import (
    ICapabilitiesHook,
    IMailHook,
    IPluginContext,
    IRegistration,
    IUnrecognizedCommandHook,
)
from haraka_tw.smtp.catalogue import S220_TLS_GO_AHEAD
from haraka_tw.smtp.connection import Connection
from haraka_tw.smtp.replies import Reply
from haraka_tw.tls import ServerTLS, server_tls

__all__ = ["Plugin", "describe_certificate"]

# X509_V_ERR_* codes a client certificate commonly fails with, for the logs.
_VERIFY_ERRORS = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsuitable certificate purpose",
}
_NEED_TLS = Reply(530, "5.7.0", ("Must issue a STARTTLS command first",))
_NEED_CERT = Reply(530, "5.7.0", ("A verified client certificate is required",))


def _name_fields(name: Any) -> dict[str, str]:
    fields = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME}
    out = {}
    for key, oid in fields.items():
        attrs = name.get_attributes_for_oid(oid)
        if attrs:
            value = attrs[0].value
            out[key] = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return out


def describe_certificate(cert: Any) -> dict[str, Any] | None:
    """A client certificate (pyOpenSSL or cryptography) as Node's peerCertificate fields:
    subject and issuer (CN, O), valid_to, fingerprint256; None for no certificate."""
    if cert is None:
        return None
    if hasattr(cert, "to_cryptography"):
        cert = cert.to_cryptography()
    digest = cert.fingerprint(hashes.SHA256())
    return {
        "subject": _name_fields(cert.subject),
        "issuer": _name_fields(cert.issuer),
        "valid_to": cert.not_valid_after_utc.isoformat(),
        "fingerprint256": ":".join(f"{b:02X}" for b in digest),
    }


@implementer(IRegistration, ICapabilitiesHook, IUnrecognizedCommandHook, IMailHook)
class Plugin:
    name = "tls"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.log = context.log
        # Loads tls.ini and every file it names; raises (naming the file) when it cannot.
        self.tls: ServerTLS = server_tls(
            context.config,
            context.server_notes,
            notice=context.log.notice,
            error=context.log.error,
        )
        for reason in self.tls.loaded.skipped:
            self.log.warn(reason)

    def offered(self, connection: Connection) -> bool:
        """Whether STARTTLS is offered to this (plaintext) session."""
        if connection.tls.enabled:
            return False
        return self.tls.settings.offers_starttls(connection.remote.ip, connection.local.port)

    def hook_capabilities(self, connection: Connection) -> Code:
        if connection.tls.enabled:
            if connection.results.get(self.name) is None:
                self._record(connection)  # an implicit TLS port: nothing recorded yet
            return CONT
        if self.offered(connection):
            connection.capabilities.append("STARTTLS")
            connection.tls.advertised = True
        return CONT

    def hook_unrecognized_command(self, connection: Connection, verb: str, argument: str) -> Any:
        if verb != "STARTTLS":
            return CONT
        if connection.tls.enabled:
            connection.respond(503, "TLS already active", "5.5.1")
            return OK
        if not self.offered(connection):
            return CONT  # the core's 500: it was never advertised
        if argument.strip():
            connection.respond(501, "Syntax error (no parameters allowed)", "5.5.4")
            return OK
        if not connection.tls.advertised:
            connection.respond(503, "Send EHLO first", "5.5.1")
            return OK
        connection.respond(220, S220_TLS_GO_AHEAD, None)
        d = connection.start_tls(self.tls.creator_for_port(connection.local.port))
        return d.addCallbacks(
            lambda _: self._secured(connection), self._failed, errbackArgs=(connection,)
        )

    def hook_mail(self, connection: Connection, sender: Any, params: Any) -> Any:
        if connection.local.port not in self.tls.settings.require_authorized:
            return CONT
        if not connection.tls.enabled:
            return HookResult(DENY, _NEED_TLS, self.name)
        if not connection.tls.verified:
            return HookResult(DENY, _NEED_CERT, self.name)
        return CONT

    # -- after the handshake ----------------------------------------------------------

    def _secured(self, connection: Connection) -> Code:
        self._record(connection)
        return OK

    def _failed(self, failure: Failure, connection: Connection) -> Code:
        """The handshake did not finish: the client left, failed it, or timed out."""
        reason = _handshake_failure(failure)
        connection.results.add(self.name, fail=f"handshake: {reason}")
        self.log.info(f"TLS handshake failed: {reason}", connection)
        if not connection.remote.closed:
            connection.disconnect()
        return OK

    def _record(self, connection: Connection) -> None:
        tls = connection.tls
        peer = describe_certificate(tls.peer_certificate)
        error = None
        if peer is not None and not tls.verified:
            code = getattr(tls, "verify_error", None)  # the X509_V_ERR_* code, when the core has it
            error = _VERIFY_ERRORS.get(code, f"error {code}") if code else "not verified"
        connection.notes["tls"] = {
            "authorized": tls.verified,
            "authorizationError": error,
            "peerCertificate": peer,
            "cipher": {"name": tls.cipher, "version": tls.version},
        }
        connection.results.add(
            self.name,
            cipher=tls.cipher,
            version=tls.version,
            verified=tls.verified,
            authorized=tls.verified,
        )
        line = f"secured: cipher={tls.cipher} version={tls.version} verified={tls.verified}"
        if error:
            line += f' error="{error}"'
        if peer is not None:
            line += (
                f' cn="{peer["subject"].get("CN", "")}"'
                f' issuer="{peer["issuer"].get("CN", "")}"'
                f" expires={peer['valid_to']}"
            )
        self.log.info(line, connection)


def _handshake_failure(failure: Failure) -> str:
    """Why a handshake did not finish, in words (a cancelled one ran out of time)."""
    if failure.check(CancelledError):
        return "not finished within the plugin's timeout"
    return failure.getErrorMessage() or type(failure.value).__name__
