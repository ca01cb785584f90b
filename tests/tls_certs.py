"""A throwaway PKI for the TLS tests, made once per test session in a temporary directory.

L{pki} returns a L{PKI}: a CA, server certificates for two sets of names (so SNI can
be told apart), a client certificate the CA signed, and a self-signed "rogue" client
certificate the CA never saw. Keys are EC P-256 (fast to make). Every certificate is
written three ways: the key alone, the certificate alone, and both in one PEM (the shape
the tls/ directory wants).
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["PKI", "Issued", "pki"]

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """One certificate on disk: C{key}, C{cert}, and C{bundle} (key then cert)."""

    name: str
    key: Path
    cert: Path
    bundle: Path

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()


@dataclass(frozen=True)
class PKI:
    """The session's certificates."""

    directory: Path
    ca: Path  # the CA certificate (PEM)
    mx: Issued  # mx.test, localhost, IP 127.0.0.1
    other: Issued  # other.test, *.wild.test
    client: Issued  # client.test, signed by the CA, for clientAuth
    rogue: Issued  # rogue.test, self-signed: no CA vouches for it
    expired: Issued  # expired.test, signed by the CA, expired yesterday


_made: PKI | None = None


def pki() -> PKI:
    """The test session's PKI (made on first use, removed when the process exits)."""
    global _made
    if _made is None:
        directory = Path(tempfile.mkdtemp(prefix="haraka_tw-pki-")).resolve()
        atexit.register(shutil.rmtree, directory, True)
        _made = _make(directory)
    return _made


def _make(directory: Path) -> PKI:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haraka_tw test CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        name: str,
        dns: list[str],
        ips: list[str] = [],  # noqa: B006 - read only
        *,
        client: bool = False,
        self_signed: bool = False,
        expired: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_key, issuer_name = (key, subject) if self_signed else (ca_key, ca_name)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        start, end = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        cert = builder.sign(issuer_key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        stem = name.replace("*", "_")
        paths = directory / f"{stem}.key", directory / f"{stem}.crt", directory / f"{stem}.pem"
        paths[0].write_bytes(key_pem)
        paths[1].write_bytes(cert_pem)
        paths[2].write_bytes(key_pem + cert_pem)
        return Issued(name, *paths)

    return PKI(
        directory=directory,
        ca=ca_path,
        mx=issue("mx.test", ["mx.test", "localhost"], ["127.0.0.1"]),
        other=issue("other.test", ["other.test", "*.wild.test"]),
        client=issue("client.test", ["client.test"], client=True),
        rogue=issue("rogue.test", ["rogue.test"], client=True, self_signed=True),
        expired=issue("expired.test", ["expired.test"], client=True, expired=True),
    )
