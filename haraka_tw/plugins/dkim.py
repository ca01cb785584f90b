"""dkim: sign outgoing mail, verify the signatures of incoming mail (RFC 6376).

Haraka's C{dkim} plugin (and its older C{dkim_sign}/C{dkim_verify}, names kept here),
reading its dkim.ini and key layout. The signing and checking over bytes is
L{haraka_tw.message.dkim}.

B{Signing} (C{[sign] enabled=true}) happens to relayed mail, at queue_outbound (before a
queue plugin hands it on, so list dkim above it) and at pre_send_trans_email (before the
built-in outbound queue writes it), once per message. The signing domain is the From
field's domain (with several From addresses, the Sender's), else the envelope sender's;
with C{transaction.notes["forward"]} set, the envelope sender's. Its key is
C{dkim/<domain>/private} (PEM, RSA or Ed25519) with its selector in
C{dkim/<domain>/selector}, looked for at the domain and then at each parent domain (the
one found becomes d=); else C{dkim.private.key} with C{[sign] domain} and C{selector}.
Without a key the message goes unsigned (never refused). C{haraka-tw dkim-keygen DOMAIN}
makes a key and the DNS record to publish.

Where Haraka's signer falls short, this one does not: relaxed/relaxed by default (Haraka
relaxed/simple, broken by any relay that touches trailing spaces); every instance of a
repeated field is signed (Haraka merges them, and the signature fails); each signed name
is oversigned (listed once more than present, so a From or Subject added on the way
breaks the signature, the replay Haraka's #1526 declined to close); Date and Message-ID
are added before signing when missing (signed, not added after by the queue); C{t=} (and
C{x=} with C{[sign] expire}); the signature on top, where verifiers expect the newest.

B{Verifying} (C{[verify] enabled=true}, the default) happens at data_post for every
message: each DKIM-Signature (at most C{max_signatures}) is checked against its key
record (C{selector._domainkey.domain} TXT, through the server's resolver), and each
result goes in the Authentication-Results header (C{dkim=pass header.d=... header.s=...
header.i=... header.b=...}, RFC 8601), in C{transaction.results} and in
C{transaction.notes["dkim_results"]} (dicts: result, domain, selector, identity,
reason) for policy plugins. A message without signatures gets C{dkim=none}. Results are
RFC 8601's (pass, fail, permerror, temperror; Haraka uses invalid/tempfail); nothing is
refused here. A DNS failure or a lookup past C{timeout} is temperror; no key record,
a revoked key, a bad signature field, rsa-sha1, an RSA key under 1,024 bits or an expired
signature is permerror. C{l=} is honoured (only that much of the body is signed: a
policy plugin may read C{length} in the notes).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate, getaddresses
from pathlib import Path
from typing import Any

import dns.rcode
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519 as crypto_ed25519
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import Deferred, DeferredList
from zope.interface import implementer

from haraka_tw.codes import CONT, Code
from haraka_tw.config.formats import ini_count, ini_number
from haraka_tw.dns import DNSError, DNSServerError, DNSTimeout, NoAnswer, NXDomain
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import (
    IDataPostHook,
    IPluginContext,
    IPreSendTransEmailHook,
    IQueueOutboundHook,
    IRegistration,
)
from haraka_tw.message import dkim
from haraka_tw.message.header import comment_text
from haraka_tw.smtp.connection import Connection, Transaction

__all__ = ["Plugin", "Verdict", "signing_domain", "write_key"]

BOOLEANS = ["-sign.enabled", "+sign.oversign", "+verify.enabled"]
DEFAULT_CANONICALIZATION = "relaxed/relaxed"


@dataclass(frozen=True)
class SignConfig:
    enabled: bool = False
    selector: str = "mail"
    domain: str = "example.com"
    headers: tuple[str, ...] = dkim.DEFAULT_HEADERS
    relaxed: tuple[bool, bool] = (True, True)
    oversign: bool = True
    expire: int = 0


@dataclass(frozen=True)
class Verdict:
    """One signature's result, as recorded in C{notes["dkim_results"]}."""

    result: str  # pass, fail, permerror, temperror
    domain: str
    selector: str
    identity: str = ""
    reason: str = ""
    b_prefix: str = ""
    length: int | None = None  # l=: only that much of the body is signed
    from_signed: bool = False  # every From field of the message is signed
    testing: bool = False  # the key record says t=y (the domain is testing DKIM)

    @property
    def vouches_for_from(self) -> bool:
        """A pass that a policy may trust for the From field: every From signed (a From
        added above the signed one, where mail readers show it, is not), the whole body
        signed, and the key not in testing mode."""
        return (
            self.result == "pass" and self.from_signed and self.length is None and not self.testing
        )

    def auth_result(self) -> str:
        """Its Authentication-Results entry (RFC 8601, header.b as RFC 6008). Every value
        in it was checked when the signature was parsed; the reason is one of ours."""
        words = [f"dkim={self.result}"]
        if self.reason:
            words.append(f"({comment_text(self.reason)})")
        words += [f"header.d={self.domain or 'unknown'}", f"header.s={self.selector or 'unknown'}"]
        if self.identity:
            words.append(f"header.i={self.identity}")
        if self.b_prefix:
            words.append(f'header.b="{self.b_prefix}"')
        return " ".join(words)


@implementer(IRegistration, IDataPostHook, IQueueOutboundHook, IPreSendTransEmailHook)
class Plugin:
    name = "dkim"

    def __init__(self) -> None:
        self.sign_config = SignConfig()
        self.verify_enabled = True
        self.timeout = 29.0
        self.max_signatures = 5
        self._keys: dict[bytes, dkim.PrivateKey] = {}

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.resolver = context.resolver
        self.clock = context.reactor
        self.load()
        context.config.on_change("dkim.ini", self.load)

    def load(self) -> None:
        """(Re)read dkim.ini; a bad value raises, naming it, and changes nothing."""
        name = "dkim.ini"
        ini = self.config.get_ini(name, booleans=BOOLEANS)
        sign, verify = ini.get("sign", {}), ini.get("verify", {})
        canon = str(sign.get("canonicalization") or DEFAULT_CANONICALIZATION).strip().lower()
        header_c, _, body_c = canon.partition("/")
        body_c = body_c or "simple"
        if {header_c, body_c} - {"simple", "relaxed"}:
            raise ValueError(
                f"{name} [sign] canonicalization: {canon!r} is not simple|relaxed/simple|relaxed"
            )
        headers = str(sign.get("headers") or "").replace(";", ",").replace(":", ",")
        names = tuple(h.strip().lower() for h in headers.split(",") if h.strip())
        sign_config = SignConfig(
            enabled=bool(sign.get("enabled", False)),
            selector=str(sign.get("selector") or "mail").strip(),
            domain=str(sign.get("domain") or "example.com").strip().lower(),
            headers=names or dkim.DEFAULT_HEADERS,
            relaxed=(header_c == "relaxed", body_c == "relaxed"),
            oversign=bool(sign.get("oversign", True)),
            expire=int(ini_number(sign, "expire", 0, zero_ok=True, where=f"{name} [sign]")),
        )
        where = f"{name} [verify]"
        timeout = ini_number(verify, "timeout", 29, zero_ok=False, where=where)
        most = ini_count(verify, "max_signatures", 5, where, minimum=1)
        self.sign_config = sign_config
        self.verify_enabled = bool(verify.get("enabled", True))
        self.timeout = float(timeout)
        self.max_signatures = most

    # -- signing -------------------------------------------------------------------------

    def hook_queue_outbound(self, connection: Connection) -> Code:
        return self._sign(connection)

    def hook_pre_send_trans_email(self, connection: Connection) -> Code:
        return self._sign(connection)

    def _sign(self, connection: Connection) -> Code:
        txn = connection.transaction
        if not self.sign_config.enabled or txn is None or txn.notes.get("dkim_signed"):
            return CONT
        if not connection.relaying:  # (queue/deliver sends inbound mail to outbound too)
            return CONT
        found = self._key_for(signing_domain(txn))
        if found is None:
            return CONT
        domain, selector, key = found
        header = txn.header
        now = int(self.clock.seconds())
        if "Date" not in header:
            header.add_end("Date", formatdate(now, localtime=True))
        if "Message-Id" not in header:
            header.add_end("Message-Id", f"<{txn.uuid}@{self._me()}>")
        hasher = dkim.BodyHasher(self.sign_config.relaxed[1])
        for chunk in _body(txn):
            hasher.update(chunk)
        expire = self.sign_config.expire
        value = dkim.sign(
            header.fields(),
            hasher.digest(),
            key,
            domain=domain,
            selector=selector,
            headers=self.sign_config.headers,
            relaxed=self.sign_config.relaxed,
            oversign=self.sign_config.oversign,
            timestamp=now,
            expires=now + expire if expire > 0 else None,
        )
        header.add("DKIM-Signature", value)
        txn.notes["dkim_signed"] = True
        txn.results.add(self.name, **{"pass": f"signed d={domain} s={selector}"})
        connection.loginfo(f"signed d={domain} s={selector}", self.name)
        return CONT

    def _me(self) -> str:
        return str(self.config.get_value("me", None) or socket.getfqdn() or "localhost").strip()

    def _key_for(self, domain: str | None) -> tuple[str, str, dkim.PrivateKey] | None:
        """(d=, selector, key) for mail from C{domain}: its own key or a parent domain's,
        else the default one; None (logged) when there is none."""
        labels = domain.split(".") if domain else []
        folders = self._key_folders()
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate not in folders:
                continue
            pem = self.config.get_binary(f"dkim/{candidate}/private")
            selector = self.config.get_list(f"dkim/{candidate}/selector")
            if pem is None and not selector:
                continue
            where = f"dkim/{candidate}"
            if pem is None or not selector:
                self.log.error(f"{where}: needs both a private and a selector file")
                continue
            key = self._load_key(pem, f"{where}/private")
            if key is not None:
                return candidate, selector[0], key
        pem = self.config.get_binary("dkim.private.key")
        if pem is not None:
            key = self._load_key(pem, "dkim.private.key")
            if key is not None:
                return self.sign_config.domain, self.sign_config.selector, key
        self.log.info(f"not signed: no key for {domain or 'an unknown sender domain'}")
        return None

    def _key_folders(self) -> set[str]:
        """The domains with a folder under dkim/ in a config directory. Listed for each
        message signed (a folder added is used at once), so that only those are read
        through the config cache, not every domain a sender names."""
        found: set[str] = set()
        for directory in self.config.directories:
            try:
                found.update(
                    entry.name for entry in os.scandir(directory / "dkim") if entry.is_dir()
                )
            except OSError:
                continue  # (no dkim/ there)
        return found

    def _load_key(self, pem: bytes, where: str) -> dkim.PrivateKey | None:
        key = self._keys.get(pem)
        if key is None:
            try:
                key = dkim.load_private_key(pem)
            except ValueError as e:
                self.log.error(f"{where}: {e}; mail goes unsigned")
                return None
            self._keys[pem] = key
        return key

    # -- verifying -----------------------------------------------------------------------

    def hook_data_post(self, connection: Connection) -> Code | Deferred[Code]:
        txn = connection.transaction
        if not self.verify_enabled or txn is None:
            return CONT
        fields = txn.header.fields()
        found = [raw for name, raw in fields if name == "dkim-signature"]
        if not found:
            txn.auth_results("dkim=none")
            txn.results.add(self.name, skip="no signatures")
            txn.notes["dkim_results"] = []
            return CONT
        if len(found) > self.max_signatures:
            connection.loginfo(
                f"{len(found)} signatures: checking the first {self.max_signatures}", self.name
            )
        now = self.clock.seconds()
        froms = sum(1 for name, _ in fields if name == "from")
        verdicts: list[Verdict | None] = []
        signatures: list[dkim.Signature] = []
        for raw in found[: self.max_signatures]:
            try:
                signatures.append(dkim.parse_signature(raw, now))
                verdicts.append(None)
            except dkim.PermError as e:
                verdicts.append(_unparsed(raw, str(e)))
        digests = _body_digests(txn, signatures)
        checks = [
            self._check(s, fields, digests[(s.body_relaxed, s.length)], froms) for s in signatures
        ]
        done: Deferred[Any] = DeferredList(checks, consumeErrors=True)

        def record(outcomes: list[tuple[bool, Verdict]]) -> Code:
            checked = iter(v for _, v in outcomes)  # (each check ends in a verdict)
            results = [v if v is not None else next(checked) for v in verdicts]
            for verdict in results:
                self._record(txn, verdict)
            txn.notes["dkim_results"] = [dataclasses.asdict(v) for v in results]
            return CONT

        return done.addCallback(record)

    def _check(
        self, signature: dkim.Signature, fields: list[tuple[str, bytes]], digest: bytes, froms: int
    ) -> Deferred[Verdict]:
        """Look up C{signature}'s key and check it (C{froms}: From fields in the message)."""

        def verdict(result: str, reason: str = "", testing: bool = False) -> Verdict:
            return Verdict(
                result,
                signature.domain,
                signature.selector,
                signature.identity,
                reason,
                signature.b_prefix,
                signature.length,
                from_signed=signature.headers.count("from") >= froms,
                testing=testing,
            )

        def with_records(records: list[str]) -> Verdict:
            error: dkim.DKIMError | None = None
            for text in records:
                try:
                    record = dkim.parse_key_record(text)
                except dkim.PermError as e:
                    error = error or e
                    continue
                try:
                    dkim.verify(signature, fields, digest, record)
                except dkim.DKIMError as e:
                    return verdict(e.result, str(e), record.testing)
                return verdict("pass", testing=record.testing)
            return verdict("permerror", str(error) if error else "no key for signature")

        def lookup_failed(failure: Any) -> Verdict:
            e = failure.value
            if isinstance(e, NXDomain | NoAnswer):
                return verdict("permerror", "no key for signature")
            if isinstance(e, DNSTimeout):
                return verdict("temperror", "key lookup timed out")
            if isinstance(e, DNSServerError):
                return verdict("temperror", f"key unavailable: {dns.rcode.to_text(e.rcode)}")
            if isinstance(e, DNSError):
                return verdict("temperror", f"key unavailable: {e.message}")
            return verdict("temperror", f"key lookup failed: {failure.getErrorMessage()}")

        def timed_out(_: object, timeout: float) -> Verdict:
            return verdict("temperror", f"key lookup timed out after {timeout:g} s")

        def crashed(failure: Any) -> Verdict:
            self.log.error(f"checking {signature.key_name}: {failure.getErrorMessage()}")
            return verdict("temperror", "internal error")

        lookup: Deferred[list[str]] = self.resolver.lookup_txt(signature.key_name)
        lookup.addTimeout(
            under_hook_limit(self.config, self.name, self.timeout),
            self.clock,
            onTimeoutCancel=timed_out,
        )
        checked: Deferred[Verdict] = lookup.addCallbacks(with_records, lookup_failed)
        return checked.addErrback(crashed)

    def _record(self, txn: Transaction, verdict: Verdict) -> None:
        txn.auth_results(verdict.auth_result())
        label = verdict.domain or "unknown"
        if verdict.result == "pass":
            txn.results.add(self.name, **{"pass": label})
        elif verdict.result == "fail":
            txn.results.add(self.name, fail=f"{label}: {verdict.reason}")
        else:
            txn.results.add(self.name, err=f"{label}: {verdict.result} ({verdict.reason})")


def _unparsed(raw: bytes, reason: str) -> Verdict:
    """The verdict on a signature field that could not be parsed: d= and s= as far as
    they can be read, for the Authentication-Results entry."""
    tags: dict[str, str] = {}
    for spec in raw.partition(b":")[2].decode("utf-8", "replace").split(";"):
        name, eq, value = spec.partition("=")
        if eq:
            tags.setdefault(name.strip(), "".join(value.split()))

    def safe(text: str) -> str:
        return text if dkim.is_dns_name(text.lower()) else ""

    return Verdict("permerror", safe(tags.get("d", "")), safe(tags.get("s", "")), reason=reason)


def _body_digests(
    txn: Transaction, signatures: list[dkim.Signature]
) -> dict[tuple[bool, int | None], bytes]:
    """The body hash each signature asks for (canonicalization, l=), the body read once."""
    hashers = {
        (s.body_relaxed, s.length): dkim.BodyHasher(s.body_relaxed, s.length) for s in signatures
    }
    if hashers:
        for chunk in _body(txn):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {key: hasher.digest() for key, hasher in hashers.items()}


def _body(txn: Transaction) -> Iterator[bytes]:
    """The body as DKIM reads it: after the blank line that ends the header (the message
    stream keeps that line at the start of its body)."""
    chunks = txn.message_stream.body_chunks()
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 2:
            break
    if head.startswith(b"\r\n"):
        head = head[2:]
    elif head.startswith(b"\n"):
        head = head[1:]
    if head:
        yield head
    yield from chunks


def signing_domain(txn: Transaction) -> str | None:
    """Whose mail this is, for signing (as Haraka chooses): the From field's domain; with
    several From addresses, the Sender's; else, or when C{notes["forward"]} is set, the
    envelope sender's. None when none is known."""
    envelope = txn.mail_from.host.lower().rstrip(".") if txn.mail_from else None
    envelope = envelope if envelope and dkim.is_dns_name(envelope) else None
    if txn.notes.get("forward"):
        return envelope
    header = txn.header
    senders = getaddresses(header.get_all("From"))
    if len(senders) > 1:
        senders = getaddresses(header.get_all("Sender"))[:1]
    for _, address in senders[:1]:
        domain = address.rpartition("@")[2].strip().lower().rstrip(".")
        return domain if "@" in address and dkim.is_dns_name(domain) else None
    return envelope


def write_key(
    config: Path, domain: str, selector: str | None, *, bits: int = 2048, ed25519: bool = False
) -> tuple[Path, str]:
    """Make a signing key for C{domain} in C{config}/dkim/<domain>/: C{private} (PEM, mode
    0600), C{public}, C{selector} (default: the month, as Haraka's dkim_key_gen.sh) and
    C{dns}, the TXT record to publish. Returns the folder and the record.

    @raise ValueError: a domain or selector that is not a DNS name, or an RSA size under
        1,024 bits.
    @raise FileExistsError: a key is already there (never replaced: mail signed with it
        may still be in transit).
    """
    domain = domain.strip().lower().rstrip(".")
    selector = (selector or time.strftime("%b%Y")).strip().lower()
    for what, name in (("domain", domain), ("selector", selector)):
        if not dkim.is_dns_name(name):
            raise ValueError(f"{what} {name!r} is not a DNS name")
    if not ed25519 and bits < dkim.MIN_RSA_BITS:
        raise ValueError(f"an RSA key needs at least {dkim.MIN_RSA_BITS} bits")
    folder = config / "dkim" / domain
    if (folder / "private").exists():
        raise FileExistsError(f"{folder / 'private'} exists: remove it first to replace it")
    key: dkim.PrivateKey = (
        crypto_ed25519.Ed25519PrivateKey.generate()
        if ed25519
        else rsa.generate_private_key(public_exponent=65537, key_size=bits)
    )
    folder.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(folder / "private", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (folder / "public").write_bytes(public)
    (folder / "selector").write_text(selector + "\n")
    record = dkim.public_record(key)
    # (a TXT string holds at most 255 bytes: the BIND form splits the record)
    pieces = " ".join(f'"{record[i : i + 250]}"' for i in range(0, len(record), 250))
    (folder / "dns").write_text(
        f"Publish this TXT record in the DNS zone of {domain}:\n\n"
        f"{selector}._domainkey.{domain}. IN TXT ( {pieces} )\n\n"
        f"Check it once published: dig +short TXT {selector}._domainkey.{domain}\n"
    )
    return folder, record
