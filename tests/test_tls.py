"""haraka_tw.tls: tls.ini settings, PEM files, SNI choice, contexts, implicit TLS listeners.

Handshakes here run in memory: a pyOpenSSL server connection from L{ServerTLS} and a
Python C{ssl} client, joined by memory BIOs (no sockets, no reactor).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import reactor

from haraka_tw.config import ConfigDirectory
from haraka_tw.config.ini import parse_ini
from haraka_tw.paths import default_config_dir
from haraka_tw.server import HarakaServer, StartupError
from haraka_tw.service import HarakaService, parse_listen
from haraka_tw.tls import (
    ServerTLS,
    TLSConfigError,
    TLSConnection,
    TLSSettings,
    choose_certificate,
    implicit_tls,
    load_tls,
    read_certified_key,
    server_tls,
    split_pem,
)
from tests.tls_certs import Issued, pki


def ini(text: str) -> TLSSettings:
    from haraka_tw.config.ini import BooleanRules
    from haraka_tw.tls import TLS_INI_BOOLEANS

    return TLSSettings.from_ini(parse_ini(text, "tls.ini", BooleanRules.parse(TLS_INI_BOOLEANS)))


def config_dir(tmp_path: Path, files: Mapping[str, str | bytes]) -> ConfigDirectory:
    """The shipped defaults overlaid with a directory of C{files}."""
    directory = tmp_path / "config"
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    directory.mkdir(parents=True, exist_ok=True)
    return ConfigDirectory([default_config_dir(), directory])


def mx_ini(extra: str = "") -> str:
    p = pki()
    return f"key={p.mx.key}\ncert={p.mx.cert}\nca={p.ca}\n{extra}"


def handshake(
    server: SSL.Connection, client: ssl.SSLContext, sni: str | None = "mx.test"
) -> tuple[ssl.SSLObject, Exception | None]:
    """Run a TLS handshake between C{server} and a C{client} through memory BIOs; the
    client side, and the error that ended it (None when both sides finished)."""
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client.wrap_bio(incoming, outgoing, server_hostname=sni)
    client_done = server_done = False
    for _ in range(20):
        try:
            if not client_done:
                obj.do_handshake()
                client_done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            return obj, e
        if data := outgoing.read():
            server.bio_write(data)
        try:
            if not server_done:
                server.do_handshake()
                server_done = True
        except SSL.WantReadError:
            pass
        except SSL.Error as e:
            return obj, e
        with contextlib.suppress(SSL.WantReadError):
            incoming.write(server.bio_read(65536))
        if client_done and server_done:
            # TLS 1.3: a refused client certificate is only told after the client is done.
            try:
                obj.read(1)
            except ssl.SSLWantReadError:
                return obj, None
            except ssl.SSLError as e:
                return obj, e
    raise AssertionError("handshake did not finish")


def client(cert: Issued | None = None, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki().ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    for name, version in versions.items():
        setattr(ctx, name, version)
    return ctx


def connection_for(tls: ServerTLS, verify_clients: bool = False) -> TLSConnection:
    conn = tls.connection_creator(verify_clients).serverConnectionForTLS(None)
    assert isinstance(conn, TLSConnection)
    return conn


# -- tls.ini ------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    """An empty tls.ini: TLSv1.2 minimum, client certificates requested, not demanded."""
    s = ini("")
    assert (s.min_version, s.request_cert, s.reject_unauthorized) == ("TLSv1.2", True, False)
    assert (s.keys, s.certs, s.ciphers, s.dhparam, s.ca) == ((), (), None, None, None)
    assert s.offers_starttls("192.0.2.1", 25)
    assert not s.verifies_clients(25)


def test_settings_lists_sections_and_inbound() -> None:
    """Ports as key[]= lists or comma lists; [no_tls_hosts] IPs and CIDRs; [inbound]
    overrides [main] key by key; declared booleans read as booleans."""
    s = ini(
        "key[]=a.key\ncert[]=a.crt\nkey[]=b.key\ncert[]=b.crt\n"
        "no_starttls_ports[]=465\nno_starttls_ports[]=2465\nrequireAuthorized=587, 2587\n"
        "requestCert=false\nhonorCipherOrder=yes\nminVersion=TLSv1.2\n"
        "[inbound]\nminVersion=TLSv1.3\n"
        "[no_tls_hosts]\n192.0.2.7\n198.51.100.0/24\n2001:db8::/32\n"
    )
    assert s.keys == ("a.key", "b.key") and s.certs == ("a.crt", "b.crt")
    assert s.no_starttls_ports == {465, 2465} and s.require_authorized == {587, 2587}
    assert (s.request_cert, s.honor_cipher_order, s.min_version) == (False, True, "TLSv1.3")
    assert s.is_no_tls_host("192.0.2.7") and s.is_no_tls_host("198.51.100.99")
    assert s.is_no_tls_host("2001:db8::1") and not s.is_no_tls_host("192.0.2.8")
    assert not s.offers_starttls("192.0.2.8", 465)
    assert not s.offers_starttls("198.51.100.1", 25)
    assert s.verifies_clients(587) and not s.verifies_clients(25)
    assert ini("rejectUnauthorized=true").verifies_clients(25)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("minVersion=SSLv3", "minVersion"),
        ("no_starttls_ports=smtps", "no_starttls_ports"),
        ("requireAuthorized[]=70000", "requireAuthorized"),
        ("[no_tls_hosts]\nmail.example.com", "no_tls_hosts"),
        ("key=a.key", "pairs"),
    ],
)
def test_settings_errors_name_the_key(text: str, named: str) -> None:
    """A value that cannot be used is a TLSConfigError naming its key."""
    with pytest.raises(TLSConfigError, match=named):
        ini(text)


# -- PEM and certificates ---------------------------------------------------------------


def test_split_pem_and_certificate_names() -> None:
    """A bundle splits into its blocks in order; names are the SAN DNS names and the CN."""
    bundle = pki().other.bundle.read_bytes()
    assert [label for label, _ in split_pem(bundle)] == ["PRIVATE KEY", "CERTIFICATE"]
    cert = read_certified_key(bundle, bundle, key_source="k", cert_source="c")
    assert cert.names == {"other.test", "*.wild.test"}
    assert cert.source == "c"


@given(st.binary(max_size=300))
def test_split_pem_never_raises(data: bytes) -> None:
    """Any bytes split into zero or more blocks, each a BEGIN..END of one label."""
    for label, block in split_pem(b"junk\n" + data):
        assert block.startswith(b"-----BEGIN " + label.encode())


def test_read_certified_key_errors_name_the_source() -> None:
    """No key, no certificate, an encrypted key, or a key that is not the certificate's:
    each an error naming the file."""
    p = pki()
    with pytest.raises(TLSConfigError, match=r"^K: no private key"):
        read_certified_key(p.mx.cert_pem, p.mx.cert_pem, key_source="K", cert_source="C")
    with pytest.raises(TLSConfigError, match=r"^C: no certificate"):
        read_certified_key(p.mx.key_pem, p.mx.key_pem, key_source="K", cert_source="C")
    with pytest.raises(TLSConfigError, match=r"^K: not the private key of the certificate in C"):
        read_certified_key(p.other.key_pem, p.mx.cert_pem, key_source="K", cert_source="C")
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----"
    with pytest.raises(TLSConfigError, match=r"^K: the private key is encrypted"):
        read_certified_key(encrypted, p.mx.cert_pem, key_source="K", cert_source="C")


def test_choose_certificate() -> None:
    """Exact names first, then a wildcard for the first label; case and a final dot do
    not matter; an unknown name or no name chooses nothing (the default applies)."""
    p = pki()
    mx = read_certified_key(p.mx.key_pem, p.mx.cert_pem, key_source="", cert_source="mx")
    other = read_certified_key(p.other.key_pem, p.other.cert_pem, key_source="", cert_source="o")
    certs = [mx, other]
    assert choose_certificate(certs, "MX.test.") is mx
    assert choose_certificate(certs, "localhost") is mx
    assert choose_certificate(certs, "a.wild.test") is other
    assert choose_certificate(certs, "a.b.wild.test") is None
    assert choose_certificate(certs, "nowhere.test") is None
    assert choose_certificate(certs, None) is None


# -- files ----------------------------------------------------------------------------------


def test_load_tls_relative_paths_and_tls_directory(tmp_path: Path) -> None:
    """tls_key.pem/tls_cert.pem in the config directory are the default; tls/*.pem
    pairs follow; a tls/ file without a pair is skipped with a reason."""
    p = pki()
    cfg = config_dir(
        tmp_path,
        {
            "tls_key.pem": p.mx.key_pem,
            "tls_cert.pem": p.mx.cert_pem,
            "tls/other.pem": p.other.bundle.read_bytes(),
            "tls/ca.pem": p.ca.read_bytes(),
        },
    )
    loaded = load_tls(cfg)
    assert [c.names for c in loaded.certificates] == [
        {"mx.test", "localhost"},
        {"other.test", "*.wild.test"},
    ]
    assert loaded.default.source.endswith("tls_cert.pem")
    assert len(loaded.skipped) == 1 and "ca.pem" in loaded.skipped[0]
    assert {"tls.ini", "tls_key.pem", "tls_cert.pem", "tls/other.pem"} <= set(loaded.files)


def test_load_tls_first_tls_directory_file_is_the_default(tmp_path: Path) -> None:
    """With nothing in tls.ini and no tls_key.pem, the first tls/*.pem is the default."""
    p = pki()
    cfg = config_dir(
        tmp_path,
        {"tls/b.pem": p.mx.bundle.read_bytes(), "tls/a.pem": p.other.bundle.read_bytes()},
    )
    assert load_tls(cfg).default.source.endswith("a.pem")


@pytest.mark.parametrize("key", ["key", "cert", "dhparam", "ca"])
def test_missing_file_names_the_path(tmp_path: Path, key: str) -> None:
    """A key, cert, dhparam or ca file that does not exist: an error naming the full path."""
    p = pki()
    values = {"key": str(p.mx.key), "cert": str(p.mx.cert)}
    values[key] = "missing.pem"
    text = "\n".join(f"{k}={v}" for k, v in values.items())
    cfg = config_dir(tmp_path, {"tls.ini": text})
    with pytest.raises(TLSConfigError) as caught:
        load_tls(cfg)
    assert f"tls.ini {key}" in str(caught.value)
    assert str(tmp_path / "config" / "missing.pem") in str(caught.value)


def test_directory_instead_of_file_names_the_path(tmp_path: Path) -> None:
    """A key path that is a directory: an error naming it and why."""
    cfg = config_dir(tmp_path, {"tls.ini": f"key={tmp_path}\ncert={pki().mx.cert}\n"})
    with pytest.raises(TLSConfigError, match=f"tls.ini key: cannot read {tmp_path}: "):
        load_tls(cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    """A key file that cannot be read: an error naming it and why."""
    key = tmp_path / "locked.key"
    key.write_bytes(pki().mx.key_pem)
    key.chmod(0)
    cfg = config_dir(tmp_path, {"tls.ini": f"key={key}\ncert={pki().mx.cert}\n"})
    with pytest.raises(TLSConfigError, match=f"cannot read {key}"):
        load_tls(cfg)


def test_half_default_pair_and_no_certificate(tmp_path: Path) -> None:
    """tls_key.pem without tls_cert.pem names the missing one; no certificate at all says
    where to put one."""
    cfg = config_dir(tmp_path / "a", {"tls_key.pem": pki().mx.key_pem})
    with pytest.raises(TLSConfigError, match=r"tls_cert\.pem does not exist"):
        load_tls(cfg)
    with pytest.raises(TLSConfigError, match="no certificate"):
        load_tls(config_dir(tmp_path / "b", {}))


def test_bad_values_checked_at_load(tmp_path: Path) -> None:
    """A cipher string OpenSSL does not know, and a dhparam file that is not DH
    parameters, are errors at load."""
    cfg = config_dir(tmp_path / "a", {"tls.ini": mx_ini("ciphers=NO-SUCH-CIPHER\n")})
    with pytest.raises(TLSConfigError, match="ciphers"):
        ServerTLS.from_config(cfg)
    garbage = b"-----BEGIN DH PARAMETERS-----\nAAAA\n-----END DH PARAMETERS-----\n"
    cfg = config_dir(tmp_path / "c", {"dh.pem": garbage, "tls.ini": mx_ini("dhparam=dh.pem\n")})
    with pytest.raises(TLSConfigError, match=r"dhparam: .*dh\.pem"):
        ServerTLS.from_config(cfg)
    cfg = config_dir(tmp_path / "b", {"tls.ini": mx_ini(f"dhparam={pki().ca}\n")})
    with pytest.raises(TLSConfigError, match=r"dhparam: .*ca\.pem: no DH PARAMETERS"):
        ServerTLS.from_config(cfg)


def test_dhparam_loads(tmp_path: Path) -> None:
    """DH parameters (RFC 7919 ffdhe2048, as openssl writes them) load into the contexts."""
    made = subprocess.run(
        ["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "dh_param:ffdhe2048"],
        capture_output=True,
        check=True,
        timeout=10,
    )
    cfg = config_dir(tmp_path, {"dh.pem": made.stdout, "tls.ini": mx_ini("dhparam=dh.pem\n")})
    assert ServerTLS.from_config(cfg).loaded.dhparam == tmp_path / "config" / "dh.pem"


# -- contexts and handshakes --------------------------------------------------------------


def test_sni_selects_the_context(tmp_path: Path) -> None:
    """The client's SNI name picks the certificate: other.test and *.wild.test get
    other.test's, mx.test and no name the default."""
    cfg = config_dir(
        tmp_path, {"tls.ini": mx_ini(), "tls/other.pem": pki().other.bundle.read_bytes()}
    )
    tls = ServerTLS.from_config(cfg)
    for sni, expected in [("mx.test", "mx.test"), ("x.wild.test", "other.test")]:
        conn = connection_for(tls)
        obj, error = handshake(conn, client(), sni)
        assert error is None, error
        subject = dict(item[0] for item in obj.getpeercert()["subject"])  # type: ignore[index]
        assert subject["commonName"] == expected
        assert conn.server_name == sni


@pytest.mark.parametrize(
    ("cert", "verified"),
    [("client", True), ("rogue", False), ("expired", False), (None, False)],
)
def test_request_cert_records_but_allows(tmp_path: Path, cert: str | None, verified: bool) -> None:
    """requestCert without demands: every client gets through; get_verify_result() is 0
    only for a certificate the CA signed and that is in date."""
    tls = ServerTLS.from_config(config_dir(tmp_path, {"tls.ini": mx_ini()}))
    conn = connection_for(tls)
    issued = getattr(pki(), cert) if cert else None
    _, error = handshake(conn, client(issued))
    assert error is None, error
    has_cert = conn.get_peer_certificate() is not None
    assert has_cert is (cert is not None)
    assert (has_cert and conn.get_verify_result() == 0) is verified
    if cert == "rogue":
        assert conn.get_verify_result() in (18, 20)  # self-signed / no local issuer


@pytest.mark.parametrize("cert", ["rogue", "expired", None])
def test_verify_clients_refuses_the_handshake(tmp_path: Path, cert: str | None) -> None:
    """A creator that verifies clients (requireAuthorized, rejectUnauthorized) fails the
    handshake without a certificate the CA signed and that is in date."""
    tls = ServerTLS.from_config(config_dir(tmp_path, {"tls.ini": mx_ini()}))
    issued = getattr(pki(), cert) if cert else None
    _, error = handshake(connection_for(tls, verify_clients=True), client(issued))
    assert error is not None


def test_verify_clients_takes_a_good_certificate(tmp_path: Path) -> None:
    """A creator that verifies clients takes a CA-signed client certificate."""
    tls = ServerTLS.from_config(config_dir(tmp_path, {"tls.ini": mx_ini()}))
    conn = connection_for(tls, verify_clients=True)
    _, error = handshake(conn, client(pki().client))
    assert error is None and conn.get_verify_result() == 0


def test_min_version(tmp_path: Path) -> None:
    """minVersion=TLSv1.3 refuses a client that stops at TLS 1.2."""
    cfg = config_dir(tmp_path, {"tls.ini": mx_ini("minVersion=TLSv1.3\n")})
    tls = ServerTLS.from_config(cfg)
    _, error = handshake(connection_for(tls), client(maximum_version=ssl.TLSVersion.TLSv1_2))
    assert error is not None
    obj, error = handshake(connection_for(tls), client())
    assert error is None and obj.version() == "TLSv1.3"


def test_creator_for_port(tmp_path: Path) -> None:
    """requireAuthorized ports get the verifying creator; creators are shared."""
    cfg = config_dir(tmp_path, {"tls.ini": mx_ini("requireAuthorized[]=587\n")})
    tls = ServerTLS.from_config(cfg)
    assert tls.creator_for_port(587).verify_clients
    assert not tls.creator_for_port(25).verify_clients
    assert not tls.creator_for_port(None).verify_clients
    assert tls.creator_for_port(25) is tls.connection_creator(False)


def test_server_tls_is_shared_and_reloads(tmp_path: Path) -> None:
    """server_tls keeps one ServerTLS in the server notes; a tls.ini change reloads it (a
    notice), a broken one is an error and the last good certificates stay."""
    cfg = config_dir(tmp_path, {"tls.ini": mx_ini()})
    notes: dict[str, Any] = {}
    said: list[str] = []
    errors: list[str] = []
    tls = server_tls(cfg, notes, notice=said.append, error=errors.append)
    assert server_tls(cfg, notes) is tls
    creator = tls.connection_creator()
    p = pki()
    (tmp_path / "config" / "tls.ini").write_text(f"key={p.other.key}\ncert={p.other.cert}\n")
    cfg.reload()
    assert tls.loaded.default.names == {"other.test", "*.wild.test"}
    assert creator is tls.connection_creator()
    assert said == ["tls: reloaded (1 certificates)"] and errors == []
    (tmp_path / "config" / "tls.ini").write_text("key=gone.pem\ncert=gone.pem\n")
    cfg.reload()
    assert tls.loaded.default.names == {"other.test", "*.wild.test"}
    assert len(said) == 1 and len(errors) == 1
    assert "gone.pem does not exist" in errors[0]


# -- implicit TLS listeners ---------------------------------------------------------------


def test_implicit_tls_specs() -> None:
    """tls:tcp/tcp6/unix wrap that endpoint; a tcp listener on smtps_port is TLS; other
    tls: strings are Twisted's own endpoint; plain listeners are not TLS."""
    found = implicit_tls("tls:tcp:4650:interface=127.0.0.1", 465)
    assert found is not None and (found.endpoint, found.port) == (
        "tcp:4650:interface=127.0.0.1",
        4650,
    )
    found = implicit_tls("tcp6:port=465:interface=\\:\\:1", 465)
    assert found is not None and found.port == 465
    found = implicit_tls("tls:unix:/run/smtps.sock", 465)
    assert found is not None and found.port is None
    assert implicit_tls("tls:/etc/pems:port=465", 465) is None
    assert implicit_tls("tcp:2525", 465) is None
    assert implicit_tls("tcp:465", 0) is None


def test_parse_listen_tls_entries() -> None:
    """smtp.ini listen: tls:HOST:PORT forms become tls:tcp endpoint strings; tls:tcp...
    and Twisted's tls:/dir endpoint pass through."""
    assert parse_listen("tls:127.0.0.1:4650, tls:[::1]:465, tls::465") == [
        "tls:tcp:4650:interface=127.0.0.1",
        "tls:tcp6:465:interface=\\:\\:1",
        "tls:tcp:465",
    ]
    assert parse_listen("tls:tcp:465,tls:/etc/pems:port=465") == [
        "tls:tcp:465",
        "tls:/etc/pems:port=465",
    ]


def _server_dir(tmp_path: Path, files: Mapping[str, str]) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    for name, text in {"maildir.ini": f"[main]\npath={tmp_path / 'md'}\n", **files}.items():
        (directory / name).write_text(text)
    return directory


def test_server_with_tls_plugin_names_the_missing_key(tmp_path: Path) -> None:
    """HarakaServer with the tls plugin and a key that does not exist: StartupError
    naming the file."""
    missing = tmp_path / "nope" / "key.pem"
    directory = _server_dir(
        tmp_path, {"plugins": "tls\n", "tls.ini": f"key={missing}\ncert={pki().mx.cert}\n"}
    )
    with pytest.raises(StartupError, match=str(missing)):
        HarakaServer.from_directory(directory, reactor)


def test_service_with_implicit_tls_names_the_missing_cert(tmp_path: Path) -> None:
    """HarakaService with an implicit TLS listener (no tls plugin) and a cert that does
    not exist: StartupError naming the file; without TLS listeners it starts."""
    missing = tmp_path / "nope" / "cert.pem"
    directory = _server_dir(tmp_path, {"tls.ini": f"key={pki().mx.key}\ncert={missing}\n"})
    with pytest.raises(StartupError, match=str(missing)):
        HarakaService.from_directory(directory, ["tls:tcp:0:interface=127.0.0.1"])
    with pytest.raises(StartupError, match=str(missing)):
        HarakaService.from_directory(directory, ["tcp:465:interface=127.0.0.1"])
    HarakaService.from_directory(directory, ["tcp:0:interface=127.0.0.1"])
