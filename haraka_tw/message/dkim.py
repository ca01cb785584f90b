"""DKIM (RFC 6376) over bytes: canonicalization, signing, and checking one signature.

No DNS and no reactor here: L{haraka_tw.plugins.dkim} fetches the key records and hands
them in. Header fields are (lower-case name, raw bytes with the CRLF) pairs, as
L{Header.fields<haraka_tw.message.header.Header.fields>} gives them, top first.

Algorithms: rsa-sha256 and ed25519-sha256 (RFC 8463). rsa-sha1 signatures and RSA keys
under 1,024 bits are not valid (RFC 8301). A failed check raises L{PermError} (the
signature or its key record cannot be used) or L{SignatureFail} (they can, and the
message does not match), each naming the reason as Authentication-Results comments do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

__all__ = [
    "DEFAULT_HEADERS",
    "BodyHasher",
    "DKIMError",
    "KeyRecord",
    "PermError",
    "PrivateKey",
    "Signature",
    "SignatureFail",
    "algorithm_of",
    "is_dns_name",
    "load_private_key",
    "parse_key_record",
    "parse_signature",
    "public_record",
    "sign",
    "verify",
]

Fields = Sequence[tuple[str, bytes]]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey

#: What Haraka signs by default (dkim.ini [sign] headers); From is always signed.
DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
)  # fmt: skip
MIN_RSA_BITS = 1024  # RFC 8301 3.2

_WSP_RUN = re.compile(rb"[ \t]+")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_B_VALUE = re.compile(rb"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*")
_ALL_WSP = re.compile(r"[ \t\r\n]+")
_DIGITS = re.compile(r"[0-9]{1,76}\Z")
# i=: a dot-atom local part (quoted ones are not taken: the value goes into
# Authentication-Results), "@", a domain
_IDENTITY = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]*@[A-Za-z0-9._-]+\Z")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")  # fmt: skip


class DKIMError(Exception):
    """A signature did not verify; C{result} is its Authentication-Results value."""

    result = "permerror"


class PermError(DKIMError):
    """The signature, or its key record, cannot be used (RFC 8601 permerror)."""


class SignatureFail(DKIMError):
    """The signature is well formed and its key usable, but the message does not match."""

    result = "fail"


# -- tag lists (RFC 6376 3.2) ---------------------------------------------------------------


def is_dns_name(text: str) -> bool:
    """Whether C{text} is an ASCII domain name as d= and s= must be (labels of letters,
    digits, hyphens and, but in the last, underscores): no address literal, no path."""
    return _DOMAIN.match(text) is not None


def parse_tags(text: str) -> dict[str, str]:
    """C{a=b; c=d} -> {"a": "b", "c": "d"}, values without their surrounding FWS.

    @raise PermError: a tag without C{=}, a bad tag name, or a tag given twice.
    """
    tags: dict[str, str] = {}
    for spec in text.split(";"):
        if not spec.strip(" \t\r\n"):
            continue
        name, eq, value = spec.partition("=")
        name = name.strip(" \t\r\n")
        if not eq or _TAG_NAME.match(name) is None:
            raise PermError("bad tag")
        if name in tags:
            raise PermError(f"tag {name}= given twice")
        tags[name] = value.strip(" \t\r\n")
    return tags


def _base64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(_ALL_WSP.sub("", value), validate=True)
    except (binascii.Error, ValueError):
        raise PermError(f"{what} is not base64") from None


# -- canonicalization (RFC 6376 3.4) ----------------------------------------------------------


def canonical_header(raw: bytes, relaxed: bool) -> bytes:
    """One header field (with its CRLF) as it is hashed."""
    if not relaxed:
        return raw
    name, _, value = raw.partition(b":")
    value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" \t")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


class BodyHasher:
    """The body hash, fed in chunks of any size: C{update} each chunk, then C{digest}.

    Empty lines at the end are held back until a line with content follows (both
    canonicalizations drop them); relaxed also shrinks runs of spaces and tabs to one
    space and removes them at line ends. C{limit} (a signature's C{l=}) stops hashing after
    that many canonical bytes.
    """

    def __init__(self, relaxed: bool, limit: int | None = None) -> None:
        self.relaxed = relaxed
        self.limit = limit
        self.length = 0  # canonical bytes hashed
        self._hash = hashlib.sha256()
        self._partial = b""  # the last line, until its CRLF comes
        self._blank = 0  # empty lines held back

    def update(self, data: bytes) -> None:
        data = self._partial + data
        cut = data.rfind(b"\r\n") + 2
        if cut < 2:
            self._partial = data
            return
        self._partial = data[cut:]
        self._lines(data[:cut])

    def digest(self) -> bytes:
        """The hash of the whole body (call once, after the last chunk)."""
        if self._partial:  # a last line without CRLF gets one
            partial, self._partial = self._partial, b""
            self._lines(partial + b"\r\n")
        if not self.relaxed and self.length == 0:
            self._hash_bytes(b"\r\n")  # simple: an empty body is one CRLF
        return self._hash.digest()

    def _lines(self, block: bytes) -> None:
        if self.relaxed:
            block = _WSP_RUN.sub(b" ", block).replace(b" \r\n", b"\r\n")
        run = _trailing_crlfs(block)
        crlfs = (len(block) - run) // 2
        if run == 0:  # only empty lines
            self._blank += crlfs
            return
        if self._blank:
            self._hash_bytes(b"\r\n" * self._blank)
        self._hash_bytes(block[: run + 2])
        self._blank = crlfs - 1

    def _hash_bytes(self, data: bytes) -> None:
        if self.limit is not None:
            data = data[: max(0, self.limit - self.length)]
        self._hash.update(data)
        self.length += len(data)


def _trailing_crlfs(block: bytes) -> int:
    """Where the run of CRLFs that ends C{block} starts. (Linear: a regex anchored at the
    end tries every start and is quadratic in a body of empty lines.)"""
    start = len(block.rstrip(b"\r\n"))
    tail = len(block) - start
    if tail % 2 == 0 and block.count(b"\r\n", start) * 2 == tail:
        return start
    end = len(block)  # a bare CR or LF among them: pair by pair, from the end
    while end >= 2 and block.startswith(b"\r\n", end - 2):
        end -= 2
    return end


def body_hash(chunks: Iterable[bytes], relaxed: bool) -> bytes:
    """The SHA-256 body hash of the body in C{chunks}."""
    hasher = BodyHasher(relaxed)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.digest()


def _header_input(fields: Fields, names: Sequence[str], relaxed: bool) -> bytes:
    """The signed fields, each name taking the lowest instance not taken yet (RFC 6376
    5.4.2); a name with no instance left adds nothing (that is what oversigning relies on)."""
    by_name: dict[str, list[bytes]] = {}
    for name, raw in fields:
        by_name.setdefault(name, []).append(raw)
    out = []
    for name in names:
        left = by_name.get(name.lower())
        if left:
            out.append(canonical_header(left.pop(), relaxed))
    return b"".join(out)


def _own_field(raw: bytes, relaxed: bool) -> bytes:
    """The DKIM-Signature field itself as hashed: its b= value empty, no final CRLF."""
    name, _, value = raw.partition(b":")
    emptied = name + b":" + _B_VALUE.sub(rb"\1", value)
    return canonical_header(emptied, relaxed).removesuffix(b"\r\n")


# -- keys ------------------------------------------------------------------------------------


def load_private_key(pem: bytes) -> PrivateKey:
    """A PEM private key (RSA of at least 1,024 bits, or Ed25519).

    @raise ValueError: saying what is wrong with it.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ValueError(f"not a PEM private key without a passphrase ({e})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ValueError(f"a {type(key).__name__}: DKIM signs with RSA or Ed25519 keys")


def algorithm_of(key: PrivateKey) -> str:
    """The a= value for C{key}."""
    return "rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else "ed25519-sha256"


def public_record(key: PrivateKey) -> str:
    """The DNS TXT record publishing C{key}'s public half (C{v=DKIM1; k=...; p=...})."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@dataclass(frozen=True)
class KeyRecord:
    """A selector's key record (RFC 6376 3.6.1), checked and loaded."""

    key: PublicKey
    key_type: str  # "rsa" or "ed25519"
    strict_identity: bool  # t=s: i= must be in d= itself, not a subdomain
    testing: bool = False  # t=y: the domain is testing DKIM (RFC 6376: treat as unsigned)


def parse_key_record(text: str) -> KeyRecord:
    """A key record's TXT text.

    @raise PermError: not DKIM1, an unknown key type, no email service, revoked (empty
        p=), undecodable, or an RSA key under 1,024 bits.
    """
    tags = parse_tags(text)
    if tags.get("v", "DKIM1") != "DKIM1":
        raise PermError("key record is not DKIM1")
    key_type = tags.get("k", "rsa").lower()
    hashes_allowed = {h.strip().lower() for h in tags.get("h", "sha256").split(":")}
    if "sha256" not in hashes_allowed:
        raise PermError("key does not allow sha256")
    services = {s.strip().lower() for s in tags.get("s", "*").split(":")}
    if not services & {"*", "email"}:
        raise PermError("key is not for email")
    if "p" not in tags:
        raise PermError("key record has no p=")
    data = _base64(tags["p"], "key data")
    if not data:
        raise PermError("key revoked")
    key: PublicKey
    try:
        if key_type == "rsa":
            loaded = serialization.load_der_public_key(data)
            if not isinstance(loaded, rsa.RSAPublicKey):
                raise PermError("k=rsa, but the key is not RSA")
            if loaded.key_size < MIN_RSA_BITS:
                raise PermError(f"key too small ({loaded.key_size} bits)")
            key = loaded
        elif key_type == "ed25519":
            key = ed25519.Ed25519PublicKey.from_public_bytes(data)
        else:
            raise PermError("unknown key type")
    except (ValueError, UnsupportedAlgorithm):
        raise PermError("key data unreadable") from None
    flags = {f.strip().lower() for f in tags.get("t", "").split(":")}
    return KeyRecord(key, key_type, "s" in flags, "y" in flags)


# -- signatures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One DKIM-Signature field, parsed and checked for form (L{parse_signature})."""

    raw: bytes
    algorithm: str
    header_relaxed: bool
    body_relaxed: bool
    domain: str
    selector: str
    identity: str
    headers: tuple[str, ...]
    body_hash: bytes
    signature: bytes
    length: int | None

    @property
    def key_name(self) -> str:
        """Where its key record is: C{selector._domainkey.domain}."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def b_prefix(self) -> str:
        """The start of b= that tells signatures apart (RFC 6008 header.b)."""
        return base64.b64encode(self.signature).decode()[:8]


def parse_signature(raw: bytes, now: float) -> Signature:
    """A DKIM-Signature field (name, colon, value and CRLF, as received).

    @raise PermError: a missing or bad tag, a version or algorithm not supported, From
        not signed, i= outside d=, or a signature expired or made in the future.
    """
    _, _, value = raw.partition(b":")
    tags = parse_tags(value.decode("utf-8", "replace"))
    for required in ("v", "a", "b", "bh", "d", "h", "s"):
        if required not in tags:
            raise PermError(f"signature has no {required}=")
    if tags["v"] != "1":
        raise PermError("signature version not supported")
    algorithm = tags["a"].lower()
    if algorithm == "rsa-sha1":
        raise PermError("rsa-sha1 is not accepted (RFC 8301)")
    if algorithm not in ("rsa-sha256", "ed25519-sha256"):
        raise PermError("algorithm not supported")
    header_c, _, body_c = tags.get("c", "simple/simple").lower().partition("/")
    body_c = body_c or "simple"
    if header_c not in ("simple", "relaxed") or body_c not in ("simple", "relaxed"):
        raise PermError("canonicalization not supported")
    if "q" in tags and "dns/txt" not in tags["q"].lower().split(":"):
        raise PermError("query method not supported")
    domain = tags["d"].lower().rstrip(".")
    selector = tags["s"].lower()
    if not (is_dns_name(domain) and is_dns_name(selector)):
        raise PermError("bad d= or s=")
    headers = tuple(h.strip(" \t\r\n").lower() for h in tags["h"].split(":"))
    if "from" not in headers:
        raise PermError("From is not signed")
    identity = tags.get("i", f"@{domain}")
    i_domain = identity.rpartition("@")[2].lower().rstrip(".")
    if _IDENTITY.match(identity) is None:
        raise PermError("bad i=")
    if i_domain != domain and not i_domain.endswith("." + domain):
        raise PermError("i= is not in d=")
    length = _number(tags, "l")
    timestamp, expires = _number(tags, "t"), _number(tags, "x")
    if expires is not None:
        if timestamp is not None and expires < timestamp:
            raise PermError("x= is before t=")
        if expires < now:
            raise PermError("signature expired")
    if timestamp is not None and timestamp > now + 300:
        raise PermError("signature made in the future")
    return Signature(
        raw=raw,
        algorithm=algorithm,
        header_relaxed=header_c == "relaxed",
        body_relaxed=body_c == "relaxed",
        domain=domain,
        selector=selector,
        identity=identity,
        headers=headers,
        body_hash=_base64(tags["bh"], "bh="),
        signature=_base64(tags["b"], "b="),
        length=length,
    )


def _number(tags: dict[str, str], name: str) -> int | None:
    if name not in tags:
        return None
    value = tags[name]
    if _DIGITS.match(value) is None:
        raise PermError(f"{name}= is not a number")
    return int(value)


def verify(signature: Signature, fields: Fields, body_digest: bytes, record: KeyRecord) -> None:
    """Check C{signature} against the message (its header C{fields} and the hash of its
    body, made as the signature says) and the key C{record}.

    @raise PermError: the key does not fit the signature.
    @raise SignatureFail: the body hash or the signature does not match.
    """
    wanted = "rsa" if signature.algorithm == "rsa-sha256" else "ed25519"
    if record.key_type != wanted:
        raise PermError(f"key type {record.key_type} for {signature.algorithm}")
    i_domain = signature.identity.rpartition("@")[2].lower().rstrip(".")
    if record.strict_identity and i_domain != signature.domain:
        raise PermError("key with t=s, i= a subdomain of d=")
    if body_digest != signature.body_hash:
        raise SignatureFail("body hash did not verify")
    data = _header_input(fields, signature.headers, signature.header_relaxed)
    data += _own_field(signature.raw, signature.header_relaxed)
    try:
        if isinstance(record.key, rsa.RSAPublicKey):
            record.key.verify(signature.signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            record.key.verify(signature.signature, hashlib.sha256(data).digest())
    except InvalidSignature:
        raise SignatureFail("signature did not verify") from None


def sign(
    fields: Fields,
    body_digest: bytes,
    key: PrivateKey,
    *,
    domain: str,
    selector: str,
    headers: Sequence[str] = DEFAULT_HEADERS,
    relaxed: tuple[bool, bool] = (True, True),
    oversign: bool = True,
    timestamp: int,
    expires: int | None = None,
) -> str:
    """The value of a DKIM-Signature field over C{fields} (the message header, top first)
    and the body hash C{body_digest} (L{BodyHasher} with C{relaxed[1]}), folded for a
    C{DKIM-Signature: } field prefix.

    Each name in C{headers} (and From, always) is signed once per field present; with
    C{oversign}, once more, so that a field added later breaks the signature."""
    present: dict[str, int] = {}
    for name, _ in fields:
        present[name] = present.get(name, 0) + 1
    names: list[str] = []
    for name in dict.fromkeys([*(h.lower() for h in headers), "from"]):
        names += [name] * (present.get(name, 0) + (1 if oversign else 0))
    canon = "/".join("relaxed" if r else "simple" for r in relaxed)
    tags = [
        f"v=1; a={algorithm_of(key)}; c={canon}; d={domain}; s={selector};",
        f"t={timestamp};" + (f" x={expires};" if expires is not None else ""),
        *_folded_list("h=", names),
        f"bh={base64.b64encode(body_digest).decode()};",
        "b=",
    ]
    unsigned = "\r\n\t".join(tags)
    data = _header_input(fields, names, relaxed[0])
    data += _own_field(f"DKIM-Signature: {unsigned}\r\n".encode(), relaxed[0])
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raw = key.sign(hashlib.sha256(data).digest())
    b64 = base64.b64encode(raw).decode()
    return unsigned + "\r\n\t ".join(b64[i : i + 72] for i in range(0, len(b64), 72))


def _folded_list(tag: str, names: Sequence[str], width: int = 72) -> list[str]:
    """C{h=a:b:...;} in lines of about C{width} (FWS may follow any colon)."""
    lines, line = [], tag
    for i, name in enumerate(names):
        item = name + (":" if i < len(names) - 1 else ";")
        if len(line) + len(item) > width and line != tag:
            lines.append(line)
            line = " "
        line += item
    lines.append(line)
    return lines
