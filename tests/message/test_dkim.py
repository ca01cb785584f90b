"""haraka_tw.message.dkim: canonicalization byte by byte, signing and checking, and both
checked against an independent implementation (dkimpy) in each direction."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
from collections.abc import Sequence

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.message import dkim
from haraka_tw.message.header import Header

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
HEADER = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject:  Is dinner  ready?\r\n"
    b"\tAnd lunch?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
)
BODY = b"Hi.  \r\n\r\nWe lost the game. Are you hungry yet?\r\n\r\nJoe.\r\n\r\n\r\n"
# 768 bits (openssl genrsa 768): cryptography no longer makes keys this small
SMALL_PEM = b"""\
-----BEGIN PRIVATE KEY-----
MIIB5AIBADANBgkqhkiG9w0BAQEFAASCAc4wggHKAgEAAmEA2AMnRux5jeanjZpP
tzoWcL6ROWiBnR2kToabIyNMz7xCZK9pUAaFBfvYBJKcaRmejTBptm7+f7pa35lL
2zEYg9PrDFG7PLKVoJWzhUx8lHRD0fH5BDrAx2cuTb8eYPIJAgMBAAECYEtJvhTQ
MwWsUNXf5Mzd6Bhfs0opDJPwUuYzsDqtAQaefR2OrcwAmbieMIpXd0CCdsaRIYCE
Mq+yN0xnzYWhJjsO0p5dEWxkBJPhs7kIwi6ic5u7lDtr7IzVIe2LGrlniQIxAPEm
NZnTADUk/i1Rqw5jIT9tc5ZGcssBoaYNyTTbG5P5C0RQvtlJVhx/tT2p4cCkDwIx
AOVQpxTbb7By5joZ+EqiTabVoCF58o50qy0j+M7yaFadT6kvzvf+CVszVrF7EIIQ
ZwIxAKBJXm1dU5D/grdKxmEswMexD5g+QUTwU6rVFP09+imz6qpA5Wn2FfehZy2S
goySPwIwfYjCfsuGAB1WZbYz03+4bL2DtO/SViQOVV7c5UWU0t25b1ApyF78dj3L
lstdBSa/AjB1aZsX1Dhg+lfuVIhTRuvH9TYgp2pbT3KP78dXduMhLUZKXqOhE6PU
7qQ12OruLkg=
-----END PRIVATE KEY-----
"""
# A valid signature's and key record's tags, with up to four of them replaced or added:
# values near the parsers' edge cases, so that every check is reached.
VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["1", "DKIM1", "rsa-sha256", "ed25519-sha256", "relaxed/simple", "\u00b2",
                     "from:to", "@example.com", "a@x.example.com", "example.com", "dns/txt",
                     "y:s", "email", "AAAA", "sha1", "ed25519", "12", ""]),
)  # fmt: skip
SIGNATURE_TAGS = {"v": "1", "a": "rsa-sha256", "d": "example.com", "s": "sel", "h": "from",
                  "bh": "AAAA", "b": "AAAA"}  # fmt: skip
KEY_TAGS = {"v": "DKIM1", "k": "rsa", "p": dkim.public_record(RSA_KEY).rpartition("p=")[2]}


def mutated(base: dict[str, str]) -> st.SearchStrategy[str]:
    names = st.sampled_from(["v", "a", "b", "bh", "c", "d", "h", "i", "l", "q", "s", "t", "x",
                             "k", "p", "g", "n"])  # fmt: skip
    changes = st.dictionaries(names, VALUES, max_size=4)
    return changes.map(lambda c: "; ".join(f"{k}={v}" for k, v in {**base, **c}.items()))


COMBINATIONS = [(True, True), (True, False), (False, True), (False, False)]


def signed(
    key: dkim.PrivateKey = RSA_KEY,
    relaxed: tuple[bool, bool] = (True, True),
    header: bytes = HEADER,
    body: bytes = BODY,
    **options: object,
) -> bytes:
    """The message signed by haraka_tw, the signature on top, as a peer receives it."""
    fields = Header.parse(header)
    value = dkim.sign(
        fields.fields(),
        dkim.body_hash([body], relaxed[1]),
        key,
        domain="example.com",
        selector="sel",
        relaxed=relaxed,
        timestamp=int(time.time()),
        **options,  # type: ignore[arg-type]
    )
    fields.add("DKIM-Signature", value)
    return fields.to_bytes() + b"\r\n" + body


def check(message: bytes, key: dkim.PrivateKey = RSA_KEY, record: str | None = None) -> None:
    """Verify the top signature of C{message} with haraka_tw (raises as verify does)."""
    header, _, body = message.partition(b"\r\n\r\n")
    fields = Header.parse(header + b"\r\n").fields()
    raw = next(raw for name, raw in fields if name == "dkim-signature")
    signature = dkim.parse_signature(raw, time.time())
    digest = dkim.BodyHasher(signature.body_relaxed, signature.length)
    digest.update(body)
    parsed = dkim.parse_key_record(record or dkim.public_record(key))
    dkim.verify(signature, fields, digest.digest(), parsed)


def dkimpy_dns(key: dkim.PrivateKey) -> object:
    record = dkim.public_record(key).encode()
    return lambda name, timeout=5: record if name == b"sel._domainkey.example.com." else None


class CanonicalizationTests(SynchronousTestCase):
    def test_rfc6376_example(self) -> None:
        """The example of RFC 6376 3.4.6, relaxed header and body, byte for byte."""
        self.assertEqual(
            dkim.canonical_header(b"A: X\r\n", True)
            + dkim.canonical_header(b"B : Y\t\r\n\tZ  \r\n", True),
            b"a:X\r\nb:Y Z\r\n",
        )
        relaxed = dkim.BodyHasher(True)
        relaxed.update(b" C \r\nD \t E\r\n\r\n\r\n")
        self.assertEqual(relaxed.digest(), hashlib.sha256(b" C\r\nD E\r\n").digest())
        simple = dkim.BodyHasher(False)
        simple.update(b" C \r\nD \t E\r\n\r\n\r\n")
        self.assertEqual(simple.digest(), hashlib.sha256(b" C \r\nD \t E\r\n").digest())

    def test_empty_bodies(self) -> None:
        """An empty body is one CRLF in simple and nothing in relaxed (RFC 6376 3.4.3-4);
        a last line without CRLF gets one."""
        self.assertEqual(dkim.body_hash([], False), hashlib.sha256(b"\r\n").digest())
        self.assertEqual(dkim.body_hash([b"\r\n\r\n"], False), hashlib.sha256(b"\r\n").digest())
        self.assertEqual(dkim.body_hash([], True), hashlib.sha256(b"").digest())
        self.assertEqual(dkim.body_hash([b"x  "], True), hashlib.sha256(b"x\r\n").digest())

    def test_a_body_of_empty_lines(self) -> None:
        """200,000 empty lines before a line of text hash as they should, in both
        canonicalizations (a search for the trailing CRLFs anchored at the end took
        quadratic time: seconds for 16,000 lines, from any client, in the reactor)."""
        body = b"\r\n" * 200_000 + b"x\r\n" + b"\r\n" * 3
        for relaxed in (True, False):
            self.assertEqual(dkim.body_hash([body], relaxed), hashlib.sha256(body[:-6]).digest())

    def test_length_limit(self) -> None:
        """l= hashes only that many canonical bytes."""
        hasher = dkim.BodyHasher(False, limit=4)
        hasher.update(b"abc\r\ndef\r\n")
        self.assertEqual(hasher.digest(), hashlib.sha256(b"abc\r").digest())

    @given(
        st.lists(
            st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"\r", b"\n", b"xy  z"]), max_size=40
        ),
        st.lists(st.integers(min_value=0, max_value=60), max_size=6),
        st.booleans(),
    )
    def test_chunks_do_not_matter(
        self, pieces: list[bytes], cuts: list[int], relaxed: bool
    ) -> None:
        """The body hash is the same however the body is cut into chunks, and equals the
        hash of the canonical form made in one piece."""
        body = b"".join(pieces)
        points = sorted({min(c, len(body)) for c in cuts})
        chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
        self.assertEqual(dkim.body_hash(chunks, relaxed), dkim.body_hash([body], relaxed))
        self.assertEqual(
            dkim.body_hash([body], relaxed), hashlib.sha256(_canonical(body, relaxed)).digest()
        )


def _canonical(body: bytes, relaxed: bool) -> bytes:
    """RFC 6376 3.4.3/3.4.4 written the slow, obvious way, to compare with."""
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if relaxed:
        lines = [b" ".join(line.replace(b"\t", b" ").split(b" ")).rstrip(b" ") for line in lines]
        lines = [_squeeze(line) for line in lines]
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        return b"" if relaxed else b"\r\n"
    return b"".join(line + b"\r\n" for line in lines)


def _squeeze(line: bytes) -> bytes:
    while b"  " in line:
        line = line.replace(b"  ", b" ")
    return line


class SignAndVerifyTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """Every canonicalization, RSA and Ed25519: what we sign, we verify."""
        for key in (RSA_KEY, ED_KEY):
            for relaxed in COMBINATIONS:
                check(signed(key, relaxed), key)

    def test_dkimpy_verifies_ours(self) -> None:
        """An independent verifier (dkimpy) passes what haraka_tw signs."""
        for key in (RSA_KEY, ED_KEY):
            for relaxed in COMBINATIONS:
                message = signed(key, relaxed)
                self.assertTrue(dkimpy.verify(message, dnsfunc=dkimpy_dns(key)), (key, relaxed))

    def test_we_verify_dkimpys(self) -> None:
        """haraka_tw passes what dkimpy signs (RSA and Ed25519, relaxed and simple)."""
        message = HEADER + b"\r\n" + BODY
        rsa_pem = RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        ed_raw = ED_KEY.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        cases: Sequence[tuple[dkim.PrivateKey, bytes, bytes]] = [
            (RSA_KEY, rsa_pem, b"rsa-sha256"),
            (ED_KEY, base64.b64encode(ed_raw), b"ed25519-sha256"),
        ]
        for key, private, algorithm in cases:
            for canon in ((b"relaxed", b"relaxed"), (b"simple", b"simple")):
                line = dkimpy.sign(
                    message, b"sel", b"example.com", private, canonicalize=canon,
                    signature_algorithm=algorithm,
                )  # fmt: skip
                check(line + message, key)

    def test_tampering_fails(self) -> None:
        """A changed body, a changed signed field, or a From added on the way fails."""
        message = signed()
        with self.assertRaisesRegex(dkim.SignatureFail, "body hash"):
            check(message.replace(b"hungry", b"angry"))
        with self.assertRaisesRegex(dkim.SignatureFail, "signature did not verify"):
            check(message.replace(b"Suzie Q", b"Suzie R"))
        with self.assertRaisesRegex(dkim.SignatureFail, "signature did not verify"):
            check(b"From: ceo@bank.example\r\n" + message)

    def test_oversigning_is_what_stops_an_added_field(self) -> None:
        """Without oversigning, a second From added above the signed one passes (the
        verifier reads the lowest; RFC 6376 8.15); with it (the default), it fails."""
        forged = b"From: ceo@bank.example\r\n"  # on top, where a mail reader shows it
        check(forged + signed(oversign=False))
        with self.assertRaises(dkim.SignatureFail):
            check(forged + signed())

    def test_repeated_fields_are_all_signed(self) -> None:
        """A repeated field (two To) is signed once per instance and verifies; dropping
        one fails (Haraka merged them into one, and its signature never verified)."""
        header = HEADER + b"To: second@example.net\r\n"
        message = signed(header=header)
        check(message)
        with self.assertRaises(dkim.SignatureFail):
            check(message.replace(b"To: second@example.net\r\n", b""))


class RecordAndSignatureErrorTests(SynchronousTestCase):
    @settings(max_examples=1500)
    @given(st.one_of(st.text(max_size=300), mutated(SIGNATURE_TAGS)), mutated(KEY_TAGS))
    def test_any_text_parses_or_is_permerror(self, signature: str, record: str) -> None:
        """Whatever a sender puts in a DKIM-Signature field or a key record, parsing
        either succeeds or raises PermError (never another exception)."""
        with contextlib.suppress(dkim.PermError):
            dkim.parse_signature(f"DKIM-Signature: {signature}\r\n".encode(), 1e9)
        with contextlib.suppress(dkim.PermError):
            dkim.parse_key_record(record)

    def test_strict_identity_and_testing_keys(self) -> None:
        """A key record with t=s refuses an i= in a subdomain of d=; t=y is kept for
        policies to see."""
        message = signed()
        record = dkim.public_record(RSA_KEY)
        check(message, record=record + "; t=s")
        sub = message.replace(b"d=example.com;", b"d=example.com; i=@mail.example.com;", 1)
        with self.assertRaisesRegex(dkim.PermError, "t=s"):
            check(sub, record=record + "; t=s")
        self.assertTrue(dkim.parse_key_record(record + "; t=y:s").testing)

    def test_key_records(self) -> None:
        """Revoked, too small, the wrong type, sha1 only and not for email are permerror."""
        small = serialization.load_pem_private_key(SMALL_PEM, password=None)
        der = small.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        record = dkim.public_record(RSA_KEY)
        for text, reason in [
            ("v=DKIM1; k=rsa; p=", "revoked"),
            (f"v=DKIM1; p={base64.b64encode(der).decode()}", "too small"),
            (record.replace("k=rsa", "k=ed25519"), "unreadable"),
            (record + "; h=sha1", "sha256"),
            (record + "; s=tlsrpt", "not for email"),
            ("v=DKIM2; " + record[9:], "DKIM1"),
            (record.replace("p=", "p=!!"), "base64"),
        ]:
            with self.assertRaisesRegex(dkim.PermError, reason):
                dkim.parse_key_record(text)
        with self.assertRaisesRegex(dkim.PermError, "key type ed25519"):
            check(signed(), record=dkim.public_record(ED_KEY))

    def test_signature_fields(self) -> None:
        """rsa-sha1, From unsigned, i= outside d=, expired, a repeated tag, another
        version, a tag without "=": permerror, naming why."""
        now = int(time.time())
        good = "v=1; a=rsa-sha256; d=example.com; s=sel; h=from:to; bh=AAAA; b=AAAA"
        dkim.parse_signature(f"DKIM-Signature: {good}\r\n".encode(), now)
        for old, new, reason in [
            ("a=rsa-sha256", "a=rsa-sha1", "rsa-sha1"),
            ("h=from:to", "h=to:subject", "From is not signed"),
            ("s=sel;", "s=sel; i=joe@evil.example;", "i= is not in d="),
            ("s=sel;", "s=sel; i=joe@badexample.com;", "i= is not in d="),
            ("s=sel;", "s=sel; d=x.example;", "twice"),
            ("v=1;", "v=2;", "version"),
            ("s=sel;", f"s=sel; t={now - 100}; x={now - 10};", "expired"),
            ("s=sel;", "s=sel; garbage;", "bad tag"),
            ("bh=AAAA", "bh=A?A", "base64"),
            ("s=sel;", "s=sel; i=a b@example.com;", "bad i="),
            ("s=sel;", "s=sel; t=\u00b2;", "t= is not a number"),
            ("s=sel;", f"s=sel; t={now + 3600};", "future"),
            ("a=rsa-sha256", "a=x) dkim=pass (", "algorithm not supported"),
        ]:
            raw = f"DKIM-Signature: {good.replace(old, new, 1)}\r\n".encode()
            with self.assertRaisesRegex(dkim.PermError, reason):
                dkim.parse_signature(raw, now)
        ok = good.replace("s=sel;", "s=sel; i=joe@mail.example.com;")
        dkim.parse_signature(f"DKIM-Signature: {ok}\r\n".encode(), now)

    def test_private_keys(self) -> None:
        """A PEM that is not a key, or a small RSA key, is refused, saying why."""
        with self.assertRaisesRegex(ValueError, "not a PEM private key"):
            dkim.load_private_key(b"-----BEGIN NONSENSE-----\n")
        with self.assertRaisesRegex(ValueError, "768 bits"):
            dkim.load_private_key(SMALL_PEM)
