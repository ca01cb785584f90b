"""TLS for the SMTP server: tls.ini, certificates chosen by SNI, and the OpenSSL contexts.

Read by the C{tls} plugin (STARTTLS) and by the service (implicit TLS listeners), which
share one L{ServerTLS} per server (L{server_tls}).

tls.ini, as Haraka's (the C{[inbound]} section overrides C{[main]} key by key)::

    [main]
    key=tls_key.pem            ; or key[]=... with cert[]=... for several pairs
    cert=tls_cert.pem          ; the chain: leaf first, then intermediates
    ciphers=...                ; an OpenSSL cipher string (TLS 1.2 and below)
    minVersion=TLSv1.2         ; TLSv1, TLSv1.1, TLSv1.2, TLSv1.3
    dhparam=dhparams.pem       ; DH parameters for DHE ciphers
    requestCert=true           ; ask clients for a certificate
    rejectUnauthorized=false   ; true: every TLS client must show a verified certificate
    honorCipherOrder=false     ; our cipher order, not the client's
    ca=client_ca.pem           ; CAs that verify client certificates (else the system's)
    no_starttls_ports[]=465    ; ports where STARTTLS is not offered
    requireAuthorized[]=587    ; ports where a client must show a verified certificate

    [no_tls_hosts]             ; clients never offered STARTTLS (IPs or CIDR ranges)
    192.0.2.0/24

Relative paths are looked up in the config directories (the operator's first). Every
C{*.pem} in the C{tls/} directory holding a key and a certificate is loaded too; the
client's SNI name picks the certificate whose names (subjectAltName DNS names and common
name, C{*.example.com} wildcards included) match; otherwise the first pair of tls.ini (or
C{tls_key.pem}/C{tls_cert.pem}), else the first file of C{tls/}, is used.

A file that is named but missing or unreadable, a key that does not match its
certificate, or a bad value is a L{TLSConfigError} naming it: the server does not start
(there is no fallback to plaintext).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    ISSLTransport,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from haraka_tw.config import ConfigDirectory, ConfigError
from haraka_tw.config.ini import IniData

__all__ = [
    "NOTES_KEY",
    "TLS_INI_BOOLEANS",
    "VERSIONS",
    "CertifiedKey",
    "ImplicitTLS",
    "ImplicitTLSEndpoint",
    "LoadedTLS",
    "ServerTLS",
    "TLSConfigError",
    "TLSConnection",
    "TLSConnectionCreator",
    "TLSSettings",
    "certificate_names",
    "choose_certificate",
    "implicit_tls",
    "load_tls",
    "read_certified_key",
    "server_tls",
    "split_pem",
]

#: tls.ini minVersion values and the OpenSSL protocol versions they name.
VERSIONS: dict[str, int] = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
TLS_INI_BOOLEANS = ("*.requestCert", "*.rejectUnauthorized", "*.honorCipherOrder")
DEFAULT_KEY = "tls_key.pem"
DEFAULT_CERT = "tls_cert.pem"
#: where L{server_tls} keeps the server's L{ServerTLS} in the server notes.
NOTES_KEY = "tls.server"

_SESSION_ID = b"haraka_tw"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)
_KEY_LABELS = frozenset({"PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"})
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TLSConfigError(Exception):
    """TLS cannot be set up; the message names the file or tls.ini key at fault."""


# -- tls.ini ----------------------------------------------------------------------------


def _names(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, list):
        return tuple(str(v) for v in value if str(v))
    return (str(value),)


def _ports(value: Any, key: str) -> frozenset[int]:
    """A port, a key[]= list of ports, or a comma list, as a set of ints."""
    items: Iterable[Any] = value if isinstance(value, list) else str(value).split(",")
    ports = set()
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if not (text.isdigit() and 0 < int(text) < 65536):
            raise TLSConfigError(f"tls.ini {key}: {text!r} is not a port number")
        ports.add(int(text))
    return frozenset(ports)


@dataclass(frozen=True)
class TLSSettings:
    """tls.ini's values, checked; file names as written (see L{load_tls} for the files)."""

    keys: tuple[str, ...] = ()
    certs: tuple[str, ...] = ()
    ciphers: str | None = None
    min_version: str = "TLSv1.2"
    dhparam: str | None = None
    ca: str | None = None
    request_cert: bool = True
    reject_unauthorized: bool = False
    honor_cipher_order: bool = False
    no_tls_hosts: tuple[Network, ...] = ()
    no_starttls_ports: frozenset[int] = frozenset()
    require_authorized: frozenset[int] = frozenset()

    @classmethod
    def from_ini(cls, ini: IniData) -> TLSSettings:
        """The settings in a parsed tls.ini (booleans declared with L{TLS_INI_BOOLEANS}).

        @raise TLSConfigError: for a value that cannot be used, naming its key.
        """
        main = {**ini.get("main", {}), **ini.get("inbound", {})}
        keys, certs = _names(main.get("key")), _names(main.get("cert"))
        if len(keys) != len(certs):
            raise TLSConfigError(
                f"tls.ini: {len(keys)} key and {len(certs)} cert values; give them in pairs"
            )
        version = str(main.get("minVersion", "TLSv1.2"))
        if version not in VERSIONS:
            raise TLSConfigError(
                f"tls.ini minVersion: {version!r} is not one of {', '.join(VERSIONS)}"
            )
        hosts = []
        for entry in ini.get("no_tls_hosts", {}):
            try:
                hosts.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise TLSConfigError(
                    f"tls.ini [no_tls_hosts]: {entry!r} is not an IP address or CIDR range"
                ) from None
        ciphers = main.get("ciphers")
        return cls(
            keys=keys,
            certs=certs,
            ciphers=str(ciphers) if ciphers else None,
            min_version=version,
            dhparam=str(main["dhparam"]) if main.get("dhparam") else None,
            ca=str(main["ca"]) if main.get("ca") else None,
            request_cert=bool(main.get("requestCert", True)),
            reject_unauthorized=bool(main.get("rejectUnauthorized", False)),
            honor_cipher_order=bool(main.get("honorCipherOrder", False)),
            no_tls_hosts=tuple(hosts),
            no_starttls_ports=_ports(main.get("no_starttls_ports", ""), "no_starttls_ports"),
            require_authorized=_ports(main.get("requireAuthorized", ""), "requireAuthorized"),
        )

    def is_no_tls_host(self, ip: str) -> bool:
        """Whether C{ip} is in [no_tls_hosts]."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.no_tls_hosts)

    def offers_starttls(self, remote_ip: str, local_port: int) -> bool:
        """Whether a plaintext session from C{remote_ip} to C{local_port} gets STARTTLS."""
        return local_port not in self.no_starttls_ports and not self.is_no_tls_host(remote_ip)

    def verifies_clients(self, port: int | None) -> bool:
        """Whether TLS on C{port} demands a client certificate that verifies."""
        return self.reject_unauthorized or (port is not None and port in self.require_authorized)


# -- certificates -----------------------------------------------------------------------


def split_pem(data: bytes) -> list[tuple[str, bytes]]:
    """The PEM blocks in C{data}, in order, as (label, block) pairs."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def certificate_names(cert: x509.Certificate) -> frozenset[str]:
    """The host names a certificate is for: its DNS subjectAltNames and its common name
    (when that is a host name), lower-cased."""
    names: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.update(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode("utf-8", "replace")
        if _HOSTNAME.match(value.lower()):
            names.add(value.lower())
    return frozenset(names)


@dataclass(frozen=True)
class CertifiedKey:
    """A private key with its certificate chain (leaf first) and the names it serves."""

    key: Any  # a cryptography private key
    chain: tuple[x509.Certificate, ...]
    names: frozenset[str]
    source: str  # where it came from, for messages

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def read_certified_key(
    key_pem: bytes, cert_pem: bytes, *, key_source: str, cert_source: str
) -> CertifiedKey:
    """The first private key of C{key_pem} with the certificates of C{cert_pem}.

    @raise TLSConfigError: naming the source that has no key or certificate, cannot be
        read, or whose key is not the certificate's.
    """
    blocks = split_pem(key_pem)
    if any(label == "ENCRYPTED PRIVATE KEY" for label, _ in blocks):
        raise TLSConfigError(f"{key_source}: the private key is encrypted; give it unencrypted")
    keys = [block for label, block in blocks if label in _KEY_LABELS]
    if not keys:
        raise TLSConfigError(f"{key_source}: no private key in it")
    certs = [block for label, block in split_pem(cert_pem) if label == "CERTIFICATE"]
    if not certs:
        raise TLSConfigError(f"{cert_source}: no certificate in it")
    try:
        key = serialization.load_pem_private_key(keys[0], None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{key_source}: cannot read the private key: {e}") from None
    try:
        chain = tuple(x509.load_pem_x509_certificate(block) for block in certs)
    except ValueError as e:
        raise TLSConfigError(f"{cert_source}: cannot read a certificate: {e}") from None
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise TLSConfigError(
            f"{key_source}: not the private key of the certificate in {cert_source}"
        )
    return CertifiedKey(key, chain, certificate_names(chain[0]), cert_source)


def choose_certificate(
    certificates: Sequence[CertifiedKey], server_name: str | None
) -> CertifiedKey | None:
    """The first certificate for C{server_name} (exactly, then by wildcard), or None."""
    if not server_name:
        return None
    name = server_name.lower().rstrip(".")
    for cert in certificates:
        if name in cert.names:
            return cert
    if "." in name:
        wildcard = "*." + name.split(".", 1)[1]
        for cert in certificates:
            if wildcard in cert.names:
                return cert
    return None


# -- reading the files ------------------------------------------------------------------


def _read(config: ConfigDirectory, name: str, what: str, watched: list[str]) -> tuple[str, bytes]:
    """(where, contents) of a file named in tls.ini: absolute, or in the config directories.

    Relative names are read through the config (so a change reloads); they are added to
    C{watched}.
    """
    path = Path(name)
    if path.is_absolute():
        try:
            return str(path), path.read_bytes()
        except FileNotFoundError:
            raise TLSConfigError(f"{what}: {path} does not exist") from None
        except OSError as e:
            raise TLSConfigError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    try:
        data = config.get_binary(name)
    except ConfigError as e:
        raise TLSConfigError(f"{what}: {e}") from None
    except ValueError as e:
        raise TLSConfigError(f"{what}: {e}") from None
    if data is None:
        where = config.directories[-1] / name if config.directories else path
        raise TLSConfigError(f"{what}: {where} does not exist")
    watched.append(name)
    return str(config.path(name) or name), data


def _tls_dir_names(config: ConfigDirectory) -> list[str]:
    """C{tls/*.pem} across the config directories (a later directory's file wins)."""
    names: set[str] = set()
    for directory in config.directories:
        tls_dir = directory / "tls"
        if tls_dir.is_dir():
            names.update(f"tls/{p.name}" for p in tls_dir.iterdir() if p.suffix == ".pem")
    return sorted(names)


@dataclass(frozen=True)
class LoadedTLS:
    """Everything tls.ini names, read and checked."""

    settings: TLSSettings
    certificates: tuple[CertifiedKey, ...]  # the default first
    dhparam: Path | None = None
    ca: Path | None = None
    ca_certificates: tuple[x509.Certificate, ...] = ()
    files: tuple[str, ...] = ()  # config names read (a change to one reloads)
    skipped: tuple[str, ...] = ()  # why a tls/*.pem was not used

    @property
    def default(self) -> CertifiedKey:
        return self.certificates[0]


def load_tls(config: ConfigDirectory) -> LoadedTLS:
    """Read tls.ini and every file it names, and C{tls/*.pem}.

    @raise TLSConfigError: naming the file or value at fault, or saying no certificate
        was found at all.
    """
    try:
        settings = TLSSettings.from_ini(config.get_ini("tls.ini", booleans=TLS_INI_BOOLEANS))
    except ConfigError as e:
        raise TLSConfigError(str(e)) from None
    watched = ["tls.ini"]
    pairs = list(zip(settings.keys, settings.certs, strict=True))
    if not pairs:
        have_key, have_cert = config.path(DEFAULT_KEY), config.path(DEFAULT_CERT)
        if have_key or have_cert:  # one without the other is a mistake worth naming
            pairs = [(DEFAULT_KEY, DEFAULT_CERT)]
    certificates = []
    for key_name, cert_name in pairs:
        key_where, key_pem = _read(config, key_name, "tls.ini key", watched)
        cert_where, cert_pem = _read(config, cert_name, "tls.ini cert", watched)
        certificates.append(
            read_certified_key(key_pem, cert_pem, key_source=key_where, cert_source=cert_where)
        )
    skipped = []
    for name in _tls_dir_names(config):
        where, data = _read(config, name, "tls/", watched)
        labels = {label for label, _ in split_pem(data)}
        if not (labels & _KEY_LABELS and "CERTIFICATE" in labels):
            skipped.append(f"{where}: not a key and certificate pair; skipped")
            continue
        certificates.append(read_certified_key(data, data, key_source=where, cert_source=where))
    if not certificates:
        home = config.directories[-1] if config.directories else Path(".")
        raise TLSConfigError(
            f"tls: no certificate: set key and cert in tls.ini, or put {DEFAULT_KEY} and "
            f"{DEFAULT_CERT} (or key+certificate *.pem files in tls/) in {home}"
        )
    dhparam: Path | None = None
    ca: Path | None = None
    ca_certificates: tuple[x509.Certificate, ...] = ()
    if settings.dhparam:
        where, data = _read(config, settings.dhparam, "tls.ini dhparam", watched)
        if not any(label == "DH PARAMETERS" for label, _ in split_pem(data)):
            raise TLSConfigError(f"tls.ini dhparam: {where}: no DH PARAMETERS in it")
        dhparam = Path(where)
    if settings.ca:
        where, data = _read(config, settings.ca, "tls.ini ca", watched)
        blocks = [b for label, b in split_pem(data) if label == "CERTIFICATE"]
        try:
            ca_certificates = tuple(x509.load_pem_x509_certificate(b) for b in blocks)
        except ValueError as e:
            raise TLSConfigError(f"tls.ini ca: {where}: cannot read a certificate: {e}") from None
        if not ca_certificates:
            raise TLSConfigError(f"tls.ini ca: {where}: no certificate in it")
        ca = Path(where)
    return LoadedTLS(
        settings,
        tuple(certificates),
        dhparam,
        ca,
        ca_certificates,
        tuple(dict.fromkeys(watched)),
        tuple(skipped),
    )


# -- OpenSSL contexts -------------------------------------------------------------------


class TLSConnection(SSL.Connection):
    """A server-side OpenSSL connection that remembers why a client certificate did not
    verify, even when the handshake was allowed to go on (requestCert without
    rejectUnauthorized): C{get_verify_result()} then reports the first error, not 0."""

    def __init__(self, context: SSL.Context) -> None:
        super().__init__(context, None)
        self.verify_errors: list[tuple[int, int]] = []  # (depth, X509_V_ERR_* code)
        self.server_name: str | None = None

    def get_verify_result(self) -> int:
        """The first verification error (an X509_V_ERR_* code), or 0 (X509_V_OK)."""
        return self.verify_errors[0][1] if self.verify_errors else 0


def _verifier(strict: bool) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
    def verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok and isinstance(conn, TLSConnection):
            conn.verify_errors.append((depth, errno))
        return bool(ok) or not strict

    return verify


class ServerTLS:
    """The server's certificates and OpenSSL contexts; hands out connection creators.

    One per server (see L{server_tls}). L{reload} swaps in new certificates for new
    connections; the creators it handed out stay valid.
    """

    def __init__(self, loaded: LoadedTLS) -> None:
        self._creators: dict[bool, TLSConnectionCreator] = {}
        self._apply(loaded)

    @classmethod
    def from_config(cls, config: ConfigDirectory) -> ServerTLS:
        """@raise TLSConfigError: see L{load_tls}."""
        return cls(load_tls(config))

    @property
    def settings(self) -> TLSSettings:
        return self.loaded.settings

    def reload(self, config: ConfigDirectory) -> None:
        """Read everything again; on error raise and keep what was loaded."""
        self._apply(load_tls(config))

    def _apply(self, loaded: LoadedTLS) -> None:
        contexts = {
            (index, strict): self._context(cert, loaded, strict)
            for index, cert in enumerate(loaded.certificates)
            for strict in (False, True)
        }
        self.loaded, self._contexts = loaded, contexts

    def context(self, server_name: str | None, verify_clients: bool) -> SSL.Context:
        """The context for a client asking for C{server_name} (None: the default)."""
        chosen = choose_certificate(self.loaded.certificates, server_name)
        index = self.loaded.certificates.index(chosen) if chosen is not None else 0
        return self._contexts[(index, verify_clients)]

    def connection_creator(self, verify_clients: bool = False) -> TLSConnectionCreator:
        """What C{startTLS} or a TLS endpoint takes; C{verify_clients} demands a client
        certificate that verifies (the handshake fails without one)."""
        creator = self._creators.get(verify_clients)
        if creator is None:
            creator = self._creators[verify_clients] = TLSConnectionCreator(self, verify_clients)
        return creator

    def creator_for_port(self, port: int | None) -> TLSConnectionCreator:
        """The creator for TLS on local C{port} (requireAuthorized, rejectUnauthorized)."""
        return self.connection_creator(self.settings.verifies_clients(port))

    def _context(self, cert: CertifiedKey, loaded: LoadedTLS, strict: bool) -> SSL.Context:
        s = loaded.settings
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(VERSIONS[s.min_version])
        options = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
        if s.honor_cipher_order:
            options |= SSL.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_options(options)
        if s.ciphers:
            try:
                ctx.set_cipher_list(s.ciphers.encode("ascii", "replace"))
            except SSL.Error:
                raise TLSConfigError(
                    f"tls.ini ciphers: OpenSSL knows no cipher in {s.ciphers!r}"
                ) from None
        try:
            ctx.use_privatekey(cert.key)
            ctx.use_certificate(cert.certificate)
            for extra in cert.chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.check_privatekey()
        except (SSL.Error, TypeError, ValueError) as e:
            raise TLSConfigError(
                f"{cert.source}: OpenSSL refuses the key or certificate: {e}"
            ) from None
        if loaded.dhparam is not None:
            try:
                ctx.load_tmp_dh(str(loaded.dhparam))
            except SSL.Error as e:
                raise TLSConfigError(f"tls.ini dhparam: {loaded.dhparam}: {e}") from None
        ctx.set_session_id(_SESSION_ID)
        if strict or s.request_cert:
            mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if strict else 0)
            ctx.set_verify(mode, _verifier(strict))
            if loaded.ca is not None:
                ctx.load_verify_locations(str(loaded.ca))
                for ca in loaded.ca_certificates:
                    ctx.add_client_ca(ca)
            else:
                ctx.set_default_verify_paths()
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        ctx.set_tlsext_servername_callback(self._servername_callback(strict))
        return ctx

    def _servername_callback(self, strict: bool) -> Callable[[SSL.Connection], None]:
        def switch(conn: SSL.Connection) -> None:
            raw = conn.get_servername()
            name = raw.decode("ascii", "replace") if raw else None
            if isinstance(conn, TLSConnection):
                conn.server_name = name
            ctx = self.context(name, strict)
            if ctx is not conn.get_context():
                conn.set_context(ctx)

        return switch


@implementer(IOpenSSLServerConnectionCreator)
class TLSConnectionCreator:
    """Makes the server side of each TLS connection (what C{startTLS} takes)."""

    def __init__(self, tls: ServerTLS, verify_clients: bool) -> None:
        self.tls = tls
        self.verify_clients = verify_clients

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return TLSConnection(self.tls.context(None, self.verify_clients))


def server_tls(
    config: ConfigDirectory,
    server_notes: dict[str, Any],
    *,
    notice: Callable[[str], None] | None = None,
    error: Callable[[str], None] | None = None,
) -> ServerTLS:
    """The server's one L{ServerTLS}, loaded on first use and kept in C{server_notes}.

    It reloads when tls.ini or a key/cert file named relative to the config directory
    changes: a reload goes to C{notice}, a broken change to C{error} (and the last good
    certificates stay).

    @raise TLSConfigError: see L{load_tls}.
    """
    existing = server_notes.get(NOTES_KEY)
    if isinstance(existing, ServerTLS):
        return existing
    tls = ServerTLS.from_config(config)
    server_notes[NOTES_KEY] = tls
    watched: set[str] = set()

    def changed() -> None:
        try:
            tls.reload(config)
        except TLSConfigError as e:
            if error is not None:
                error(f"tls: {e}; keeping the last good certificates")
            return
        if notice is not None:
            notice(f"tls: reloaded ({len(tls.loaded.certificates)} certificates)")
        watch(tls.loaded.files)

    def watch(names: Iterable[str]) -> None:
        for name in names:
            if name not in watched:
                watched.add(name)
                config.on_change(name, changed)

    watch(tls.loaded.files)
    return tls


# -- implicit TLS listeners -------------------------------------------------------------


@dataclass(frozen=True)
class ImplicitTLS:
    """A listener that speaks TLS from the first byte: the plain endpoint under it, and
    its port (None for a unix socket)."""

    endpoint: str
    port: int | None = field(default=None)


_ENDPOINT_PORT = re.compile(r"^(?:port=)?(\d+)(?::|$)")


def _port_of(spec: str) -> int | None:
    kind, _, rest = spec.partition(":")
    if kind.lower() not in ("tcp", "tcp6"):
        return None
    m = _ENDPOINT_PORT.match(rest)
    return int(m.group(1)) if m else None


def implicit_tls(spec: str, smtps_port: int | None) -> ImplicitTLS | None:
    """Whether the endpoint string C{spec} is an implicit TLS listener, and on what.

    C{tls:tcp:...}, C{tls:tcp6:...} and C{tls:unix:...} wrap that endpoint in TLS (the
    service writes smtp.ini's C{tls:HOST:PORT} that way); a C{tcp:}/C{tcp6:} listener on
    C{smtps_port} is TLS too. Any other C{tls:} string is Twisted's own TLS endpoint (a
    directory of PEM files), not ours: None.
    """
    kind, _, rest = spec.partition(":")
    if kind.lower() == "tls":
        if rest.partition(":")[0].lower() in ("tcp", "tcp6", "unix"):
            return ImplicitTLS(rest, _port_of(rest))
        return None
    port = _port_of(spec)
    if smtps_port and port == smtps_port:
        return ImplicitTLS(spec, port)
    return None


@implementer(ISSLTransport)
class _ImplicitTLSProtocol(TLSMemoryBIOProtocol):
    """TLS from the first byte, saying ISSLTransport so the session knows before the
    handshake that it is secure."""

    def pauseProducing(self) -> None:
        """The session pauses reading while its output is not drained; but TLS holds
        everything written before the handshake (the banner) and says "paused" until the
        handshake is done, which needs reading. So reading goes on until then."""
        handle: SSL.Connection = self.getHandle()  # type: ignore[no-untyped-call]
        if handle.get_peer_finished() is None:
            return
        transport: Any = self.transport
        transport.pauseProducing()


class _ImplicitTLSFactory(TLSMemoryBIOFactory):
    protocol = _ImplicitTLSProtocol


@implementer(IStreamServerEndpoint)
class ImplicitTLSEndpoint:
    """Listens on C{endpoint} with TLS from the first byte (SMTPS, RFC 8314).

    C{below}, if given, wraps the TLS layer's factory: what it wraps it in sees the
    connection's bytes before TLS does (a PROXY header: L{haraka_tw.smtp.proxy_first}).
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        creator: TLSConnectionCreator,
        below: Callable[[IProtocolFactory], IProtocolFactory] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.creator = creator
        self.below = below

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory: IProtocolFactory = _ImplicitTLSFactory(self.creator, False, protocolFactory)
        if self.below is not None:
            factory = self.below(factory)
        return self.endpoint.listen(factory)
