"""Scriptable SMTP/LMTP servers on loopback, for testing the outbound client.

    peer = Peer(PeerScript(pipelining=False, rcpt={"bad@x.test": "550 5.1.1 no such user"}))
    port = peer.start()          # listening on 127.0.0.1 (the global reactor)
    ...                          # deliver to it
    peer.messages                # what it received, byte-exact, with the envelope
    peer.connections[0].reads    # every chunk as it arrived (one read = one recv)
    peer.transcript              # "C: ..." / "S: ..." lines, all connections
    await peer.stop()            # stop listening, drop connections, cancel timers

What a script can make the peer do: offer or not PIPELINING, STARTTLS, AUTH mechanisms,
DSN, SMTPUTF8, 8BITMIME, SIZE; answer any command from a list of replies taken in turn
across connections (so C{["451 ...", "250 ..."]} refuses once, then accepts; the last one
repeats; C{"DROP"} closes instead of answering, C{"HANG"} never answers); per-recipient RCPT
replies and, for LMTP, per-recipient replies after the message; delay every reply; drop the
connection a number of bytes into the message (after a reply, if given); stop reading
once DATA starts (to fill the client's socket buffers); speak TLS from the first byte; answer
STARTTLS with 220 and then garbage (a handshake that fails), or with 220 and plaintext
that a client must not read (C{starttls_inject}) before a good handshake.

The peer unstuffs DATA with haraka_tw's own DataReader, so C{messages[i].data} is exactly
what the client meant to send, and C{messages[i].raw} is what it put on the wire.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import hmac
import ipaddress
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.smtp.data import DataReader

__all__ = ["Certs", "Peer", "PeerConnection", "PeerMessage", "PeerScript", "certs"]


# -- a throwaway PKI ---------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """A CA, a server certificate (mx.test, 127.0.0.1) and a client certificate it signed,
    plus a self-signed server certificate no CA vouches for. Paths to PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    selfsigned_cert: Path
    selfsigned_key: Path


_certs: Certs | None = None


def certs() -> Certs:
    """The test session's certificates (made on first use, removed at exit)."""
    global _certs
    if _certs is None:
        directory = Path(tempfile.mkdtemp(prefix="haraka_tw-peers-")).resolve()
        atexit.register(shutil.rmtree, directory, True)
        _certs = _make_certs(directory)
    return _certs


def _make_certs(directory: Path) -> Certs:
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def builder(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey) -> Any:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("peers test CA", "peers test CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)
    leaf = x509.BasicConstraints(ca=False, path_length=None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("mx.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server = (
        builder("mx.test", "peers test CA", server_key)
        .add_extension(leaf, critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write("server", server_key, server)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        builder("client.test", "peers test CA", client_key)
        .add_extension(leaf, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write("client", client_key, client)
    self_key = ec.generate_private_key(ec.SECP256R1())
    selfsigned = (
        builder("mx.test", "mx.test", self_key)
        .add_extension(san, critical=False)
        .sign(self_key, hashes.SHA256())
    )
    write("selfsigned", self_key, selfsigned)
    return Certs(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        selfsigned_cert=directory / "selfsigned.pem",
        selfsigned_key=directory / "selfsigned.key",
    )


class _ServerTLS(ssl.ContextFactory):
    """The peer's server context, built with pyOpenSSL from the PEM files."""

    def __init__(self, script: PeerScript) -> None:
        pki = certs()
        selfsigned = script.selfsigned
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate_chain_file(
            str(pki.selfsigned_cert if selfsigned else pki.server_cert)
        )
        context.use_privatekey_file(str(pki.selfsigned_key if selfsigned else pki.server_key))
        if script.request_client_cert:
            context.load_verify_locations(str(pki.ca))
            context.set_verify(SSL.VERIFY_PEER, lambda *args: True)  # record, never refuse
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context


# -- the script --------------------------------------------------------------------------


@dataclass
class PeerScript:
    """What the peer offers and how it answers; see the module docstring.

    C{replies} keys are BANNER, EHLO, LHLO, HELO, STARTTLS, AUTH, MAIL, RCPT, DATA,
    DATA_EMPTY (DATA with no recipient; 554 unless scripted), DOT, RSET, QUIT; a reply may
    hold several lines separated by newlines.
    """

    name: str = "peer.test"
    lmtp: bool = False
    pipelining: bool = True
    starttls: bool = False
    auth: tuple[str, ...] = ()
    dsn: bool = False
    smtputf8: bool = False
    eightbitmime: bool = True
    size: int | None = None
    chunking: bool = False
    implicit_tls: bool = False
    tls_broken: bool = False
    starttls_inject: bytes = b""
    selfsigned: bool = False
    request_client_cert: bool = False
    replies: dict[str, list[str]] = field(default_factory=dict)
    rcpt: dict[str, str] = field(default_factory=dict)
    lmtp_replies: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)
    drop_in_data: int | None = None
    drop_in_data_reply: str | None = None
    early_reply_at: int | None = None  # bytes of message data after which to reply early,
    early_reply: str = "250 2.0.0 ok (early)"  # and read on to the end
    stall_data: bool = False
    users: dict[str, str] = field(default_factory=lambda: {"user": "secret"})

    def capabilities(self) -> list[str]:
        caps = []
        if self.pipelining:
            caps.append("PIPELINING")
        if self.eightbitmime:
            caps.append("8BITMIME")
        if self.size is not None:
            caps.append(f"SIZE {self.size}" if self.size else "SIZE")
        if self.dsn:
            caps.append("DSN")
        if self.smtputf8:
            caps.append("SMTPUTF8")
        if self.chunking:
            caps.append("CHUNKING")
        caps.append("ENHANCEDSTATUSCODES")
        if self.auth:
            caps.append("AUTH " + " ".join(self.auth))
        return caps


@dataclass
class PeerMessage:
    """One message the peer took (DATA reached its end)."""

    mail_from: str
    mail_params: list[str]
    rcpt_to: list[str]
    rcpt_params: list[list[str]]
    data: bytes
    raw: bytes
    connection: int
    tls: bool
    auth_user: str | None


class Peer:
    """A scriptable server; see the module docstring."""

    def __init__(self, script: PeerScript | None = None) -> None:
        self.script = script or PeerScript()
        self._replies = {verb: list(rs) for verb, rs in self.script.replies.items()}
        self.messages: list[PeerMessage] = []
        self.connections: list[PeerConnection] = []
        self._port: Any = None

    def start(self, interface: str = "127.0.0.1") -> int:
        """Listen on ``interface``; return the port."""
        factory = Factory.forProtocol(lambda: PeerConnection(self))
        if self.script.implicit_tls:
            self._port = reactor.listenSSL(  # type: ignore[attr-defined]
                0, factory, _ServerTLS(self.script), interface=interface
            )
        else:
            self._port = reactor.listenTCP(0, factory, interface=interface)  # type: ignore[attr-defined]
        return int(self._port.getHost().port)

    def start_unix(self, path: str) -> None:
        """Listen on the Unix socket at ``path`` instead (as Dovecot's LMTP does)."""
        factory = Factory.forProtocol(lambda: PeerConnection(self))
        self._port = reactor.listenUNIX(path, factory)  # type: ignore[attr-defined]

    def stop(self) -> Deferred[None]:
        """Stop listening and drop every connection; fires when all are gone."""
        waits: list[Deferred[Any]] = []
        if self._port is not None:
            waits.append(Deferred.fromCoroutine(_maybe(self._port.stopListening())))
            self._port = None
        for conn in self.connections:
            waits.append(conn.shut())
        return DeferredList(waits).addCallback(lambda _: None)

    @property
    def transcript(self) -> list[str]:
        return [line for conn in self.connections for line in conn.transcript]

    def reply_for(self, verb: str, default: str) -> str:
        """The next scripted reply for ``verb`` (the last one repeats), else ``default``."""
        queue = self._replies.get(verb)
        if not queue:
            return default
        return queue.pop(0) if len(queue) > 1 else queue[0]


async def _maybe(result: Any) -> None:
    if isinstance(result, Deferred):
        await result


@implementer(IHandshakeListener)
class PeerConnection(Protocol):
    """One session on the peer."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.script = peer.script
        self.index = len(peer.connections)
        peer.connections.append(self)
        self.reads: list[bytes] = []
        self.transcript: list[str] = []
        self.tls = False
        self.client_cert_subject: str | None = None
        self.remote_host: str | None = None
        self.auth_user: str | None = None
        self.auth_mechanism: str | None = None
        self._buf = b""
        self._busy = False
        self._timers: list[IDelayedCall] = []
        self._lost: Deferred[None] | None = None
        self.closed = False
        self._reset()
        self._greeted = False
        self._auth: tuple[str, int, str] | None = None  # mechanism, step, user so far
        self._data: DataReader | None = None

    def _reset(self) -> None:
        self._mail: str | None = None
        self._mail_params: list[str] = []
        self._rcpts: list[str] = []
        self._rcpt_params: list[list[str]] = []
        self._pieces: list[bytes] = []
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._replied_early = False

    # -- Twisted ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.remote_host = getattr(peer, "host", None)
        self.tls = self.script.implicit_tls
        self._say("BANNER", self.peer.reply_for("BANNER", f"220 {self.script.name} ESMTP"))

    def handshakeCompleted(self) -> None:
        self.tls = True
        cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        if cert is not None:
            names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            self.client_cert_subject = str(names[0].value)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        if self._lost is not None:
            self._lost.callback(None)

    def shut(self) -> Deferred[None]:
        if self.closed:
            return succeed(None)
        self._lost = Deferred()
        self.transport.abortConnection()  # type: ignore[union-attr]
        return self._lost

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        self._buf += data
        self._pump()

    # -- the session -----------------------------------------------------------------

    def _pump(self) -> None:
        while not self._busy and not self.closed and self._buf:
            if self._data is not None:
                self._take_data()
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                return
            line, self._buf = self._buf[:end], self._buf[end + 2 :]
            self.transcript.append("C: " + line.decode("utf-8", "replace"))
            if self._auth is not None:
                self._auth_step(line.decode("utf-8", "replace"))
            else:
                self._command(line.decode("utf-8", "replace"))

    def _take_data(self) -> None:
        assert self._data is not None
        chunk, self._buf = self._buf, b""
        limit = self.script.drop_in_data
        if limit is not None and self._raw_size + len(chunk) >= limit:
            self._raw.append(chunk[: limit - self._raw_size])
            if self.script.drop_in_data_reply is not None:
                self._send(self.script.drop_in_data_reply)
            self.transcript.append("S: (drops the connection mid-message)")
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.closed = True
            return
        rest = self._data.feed(chunk)
        used = len(chunk) - (len(rest) if rest is not None else 0)
        self._raw.append(chunk[:used])
        self._raw_size += used
        early = self.script.early_reply_at
        if early is not None and self._raw_size >= early and not self._replied_early:
            self._replied_early = True
            self._send(self.script.early_reply)
        if rest is None:
            return
        self._data = None
        self._buf = rest
        self._end_of_data()

    def _end_of_data(self) -> None:
        self.peer.messages.append(
            PeerMessage(
                mail_from=self._mail or "",
                mail_params=self._mail_params,
                rcpt_to=self._rcpts,
                rcpt_params=self._rcpt_params,
                data=b"".join(self._pieces),
                raw=b"".join(self._raw),
                connection=self.index,
                tls=self.tls,
                auth_user=self.auth_user,
            )
        )
        self.transcript.append(f"C: <message, {self._raw_size} bytes>")
        if self.script.lmtp:
            for rcpt in self._rcpts:  # one reply each; a DROP closes before the rest
                self._send(self.script.lmtp_replies.get(rcpt, f"250 2.1.5 <{rcpt}> delivered"))
        else:
            self._say("DOT", self.peer.reply_for("DOT", "250 2.0.0 queued as X1"))
        self._reset()

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        script = self.script
        hello = "LHLO" if script.lmtp else "EHLO"
        if verb == hello:
            self._greeted = True
            self._reset()
            caps = script.capabilities()
            if script.starttls and not self.tls:
                caps.append("STARTTLS")
            lines = [f"250-{script.name} hello"] + [f"250-{c}" for c in caps]
            lines[-1] = "250 " + lines[-1][4:]
            self._say(verb, self.peer.reply_for(verb, "\n".join(lines)))
        elif verb == "HELO" and not script.lmtp:
            self._greeted = True
            self._say(verb, self.peer.reply_for(verb, f"250 {script.name}"))
        elif verb == "STARTTLS" and script.starttls and not self.tls:
            self._starttls()
        elif verb == "AUTH" and script.auth:
            self._auth_start(arg)
        elif verb == "MAIL":
            self._mail_command(arg)
        elif verb == "RCPT":
            self._rcpt_command(arg)
        elif verb == "DATA":
            self._data_command()
        elif verb == "RSET":
            self._reset()
            self._say(verb, self.peer.reply_for(verb, "250 2.0.0 OK"))
        elif verb == "NOOP":
            self._say(verb, "250 2.0.0 OK")
        elif verb == "QUIT":
            self._say(verb, self.peer.reply_for(verb, "221 2.0.0 bye"))
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self._say(verb, "500 5.5.1 unrecognized command")

    def _mail_command(self, arg: str) -> None:
        if not self._greeted:
            return self._say("MAIL", "503 5.5.1 EHLO first")
        address, params = _path(arg, "FROM:")
        self._reset()
        size = next((p[5:] for p in params if p.upper().startswith("SIZE=")), None)
        if self.script.size and size is not None and int(size) > self.script.size:
            return self._say("MAIL", "552 5.3.4 message too big")
        reply = self.peer.reply_for("MAIL", f"250 2.1.0 sender <{address}> OK")
        if reply.startswith("2"):
            self._mail = address
            self._mail_params = params
        self._say("MAIL", reply)

    def _rcpt_command(self, arg: str) -> None:
        if self._mail is None:
            return self._say("RCPT", "503 5.5.1 MAIL first")
        address, params = _path(arg, "TO:")
        default = self.peer.reply_for("RCPT", f"250 2.1.5 recipient <{address}> OK")
        reply = self.script.rcpt.get(address, default)
        if reply.startswith("2"):
            self._rcpts.append(address)
            self._rcpt_params.append(params)
        self._say("RCPT", reply)

    def _data_command(self) -> None:
        if not self._rcpts:
            reply = self.peer.reply_for("DATA_EMPTY", "554 5.5.1 no valid recipients")
        else:
            reply = self.peer.reply_for("DATA", "354 go ahead")
        if reply.startswith("354"):
            self._data = DataReader(self._pieces.append, max_line_length=0)
        self._say("DATA", reply)
        if reply.startswith("354") and self.script.stall_data:
            self.transcript.append("S: (stops reading)")
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _starttls(self) -> None:
        reply = self.peer.reply_for("STARTTLS", "220 2.0.0 go ahead")
        self._say("STARTTLS", reply)
        if not reply.startswith("220"):
            return
        self._buf = b""  # anything pipelined after STARTTLS is discarded (RFC 3207)
        if self.script.starttls_inject:
            self.transport.write(self.script.starttls_inject)  # type: ignore[union-attr]
        if self.script.tls_broken:
            self.transport.write(b"this is not a TLS handshake\r\n")  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.transport.startTLS(_ServerTLS(self.script))  # type: ignore[union-attr]
        self._greeted = False
        self._reset()

    # -- AUTH ------------------------------------------------------------------------

    def _auth_start(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self.script.auth:
            return self._say("AUTH", "504 5.5.4 unrecognized authentication type")
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial)
            self._auth = ("PLAIN", 0, "")
            return self._say("AUTH", "334 ")
        if mechanism == "LOGIN":
            self._auth = ("LOGIN", 0, "")
            return self._say("AUTH", "334 " + _b64("Username:"))
        self._auth = ("CRAM-MD5", 0, "")
        return self._say("AUTH", "334 " + _b64(_CHALLENGE))

    def _auth_step(self, line: str) -> None:
        assert self._auth is not None
        mechanism, step, user = self._auth
        self._auth = None
        if line == "*":
            return self._say("AUTH", "501 5.0.0 authentication cancelled")
        try:
            decoded = base64.b64decode(line, validate=True).decode()
        except ValueError:
            return self._say("AUTH", "501 5.5.2 bad base64")
        if mechanism == "PLAIN":
            return self._auth_plain(line)
        if mechanism == "LOGIN" and step == 0:
            self._auth = ("LOGIN", 1, decoded)
            return self._say("AUTH", "334 " + _b64("Password:"))
        if mechanism == "LOGIN":
            return self._auth_result("LOGIN", user, self.script.users.get(user) == decoded)
        name, _, digest = decoded.rpartition(" ")
        secret = self.script.users.get(name)
        good = secret is not None and hmac.compare_digest(
            hmac.new(secret.encode(), _CHALLENGE.encode(), "md5").hexdigest(), digest
        )
        return self._auth_result("CRAM-MD5", name, good)

    def _auth_plain(self, token: str) -> None:
        try:
            _, user, password = base64.b64decode(token, validate=True).decode().split("\0")
        except ValueError:
            return self._say("AUTH", "501 5.5.2 bad PLAIN token")
        self._auth_result("PLAIN", user, self.script.users.get(user) == password)

    def _auth_result(self, mechanism: str, user: str, good: bool) -> None:
        if not good:
            return self._say("AUTH", "535 5.7.8 authentication failed")
        self.auth_user = user
        self.auth_mechanism = mechanism
        self._say("AUTH", self.peer.reply_for("AUTH", "235 2.7.0 authenticated"))

    # -- replies ---------------------------------------------------------------------

    def _say(self, verb: str, reply: str) -> None:
        """Send ``reply`` (after the scripted delay); DROP closes, HANG never answers."""
        if reply == "HANG":
            self.transcript.append("S: (hangs)")
            self._busy = True
            return
        delay = self.script.delays.get(verb, self.script.delay)
        if delay:
            self._busy = True
            self._timers.append(reactor.callLater(delay, self._later, reply))  # type: ignore[attr-defined]
            return
        self._send(reply)

    def _later(self, reply: str) -> None:
        self._busy = False
        self._send(reply)
        self._pump()

    def _send(self, reply: str) -> None:
        if self.closed:
            return
        if reply == "DROP":
            self.transcript.append("S: (drops the connection)")
            self.transport.loseConnection()  # type: ignore[union-attr] # earlier replies go first
            self.closed = True
            return
        self.transcript.extend("S: " + line for line in reply.split("\n"))
        wire = reply.replace("\n", "\r\n") + "\r\n"
        self.transport.write(wire.encode())  # type: ignore[union-attr]


_CHALLENGE = "<1896.697170952@peer.test>"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _path(arg: str, prefix: str) -> tuple[str, list[str]]:
    """The address and parameters of a MAIL/RCPT argument (lenient: tests only)."""
    rest = arg[len(prefix) :] if arg.upper().startswith(prefix) else arg
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        return rest[1:end], rest[end + 1 :].split()
    words = rest.split()
    return (words[0] if words else ""), words[1:]
