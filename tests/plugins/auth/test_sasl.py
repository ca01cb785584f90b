"""The SASL wire formats (RFC 4954, 4616, 2195) and the credentials handed to the portal."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.plugins.auth.sasl import (
    AuthCancelled,
    CramMD5Credentials,
    MalformedResponse,
    PasswordCredentials,
    cram_md5_challenge,
    decode_response,
    encode_challenge,
    parse_cram_md5,
    parse_plain,
)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class DecodeResponseTests(SynchronousTestCase):
    def test_base64(self) -> None:
        """A base64 line decodes to its bytes (surrounding blanks ignored)."""
        self.assertEqual(decode_response(b" " + b64(b"\x00u\x00p") + b" "), b"\x00u\x00p")

    def test_star_cancels(self) -> None:
        """'*' is the client cancelling the exchange."""
        self.assertRaises(AuthCancelled, decode_response, b"*")

    def test_equals_is_empty(self) -> None:
        """'=' is the empty response."""
        self.assertEqual(decode_response(b"="), b"")

    def test_not_base64(self) -> None:
        """Bad characters, bad length, bad padding and an empty line are malformed."""
        for line in (b"QUIT!", b"abc", b"ab=c", b"a===", b"", b"\xff\xfe==", b"YQ=\x00"):
            self.assertRaises(MalformedResponse, decode_response, line)

    @given(st.binary(max_size=200))
    def test_any_bytes(self, line: bytes) -> None:
        """Any line decodes, cancels or is malformed: nothing else escapes."""
        with contextlib.suppress(AuthCancelled, MalformedResponse):
            decode_response(line)

    @given(st.binary(max_size=300))
    def test_round_trip(self, data: bytes) -> None:
        """Whatever is encoded as a challenge decodes back as a response."""
        encoded = encode_challenge(data).encode()
        self.assertEqual(decode_response(encoded or b"="), data)


class PlainTests(SynchronousTestCase):
    def test_three_parts(self) -> None:
        """authzid NUL authcid NUL password; the authzid may be empty."""
        self.assertEqual(parse_plain(b"\x00matt\x00test"), (b"", b"matt", b"test"))
        self.assertEqual(parse_plain(b"boss\x00matt\x00te st"), (b"boss", b"matt", b"te st"))

    def test_wrong_shapes(self) -> None:
        """Too few or too many NULs, an empty name or password, bad UTF-8: malformed."""
        for data in (
            b"matt test",
            b"\x00matt",
            b"\x00\x00pw",
            b"\x00matt\x00",
            b"a\x00b\x00c\x00d",
        ):
            self.assertRaises(MalformedResponse, parse_plain, data)
        self.assertRaises(MalformedResponse, parse_plain, b"\x00m\xffatt\x00pw")

    @given(st.binary(max_size=100))
    def test_any_bytes(self, data: bytes) -> None:
        """Any message parses or is malformed."""
        with contextlib.suppress(MalformedResponse):
            parse_plain(data)


class CramMD5Tests(SynchronousTestCase):
    def test_username_may_hold_spaces(self) -> None:
        """The digest follows the last space; it is folded to lower case."""
        digest = "AB" * 16
        self.assertEqual(parse_cram_md5(f"jo smith {digest}".encode()), (b"jo smith", b"ab" * 16))

    def test_wrong_shapes(self) -> None:
        """No space, no name, or a digest that is not 32 hex digits: malformed."""
        for data in (b"matt", b" " + b"a" * 32, b"matt " + b"g" * 32, b"matt abc"):
            self.assertRaises(MalformedResponse, parse_cram_md5, data)

    def test_challenge_names_the_server(self) -> None:
        """The challenge is <random.time@host>, never @None."""
        challenge = cram_md5_challenge("mx.test")
        self.assertRegex(challenge, rb"^<\d+\.\d+@mx\.test>$")
        self.assertNotEqual(challenge, cram_md5_challenge("mx.test"))
        self.assertTrue(CramMD5Credentials("mx.test").challenge.endswith(b"@mx.test>"))

    def test_check_password(self) -> None:
        """checkPassword recomputes HMAC-MD5 of the challenge with the stored password."""
        creds = CramMD5Credentials("mx.test")
        digest = hmac.new(b"test", creds.challenge, hashlib.md5).hexdigest()
        creds.set_response(b"matt " + digest.encode())
        self.assertTrue(IUsernameHashedPassword.providedBy(creds))
        self.assertEqual(creds.username, b"matt")
        self.assertTrue(creds.checkPassword(b"test"))
        self.assertFalse(creds.checkPassword(b"tesT"))

    def test_repr_has_no_digest(self) -> None:
        """The repr names the user only."""
        creds = CramMD5Credentials("mx.test")
        creds.set_response(b"matt " + b"a" * 32)
        self.assertNotIn("aaaa", repr(creds))


class PasswordCredentialsTests(SynchronousTestCase):
    def test_check_and_repr(self) -> None:
        """IUsernamePassword; checkPassword compares; the repr never shows the password."""
        creds = PasswordCredentials(b"matt", b"s3cret", b"boss")
        self.assertTrue(IUsernamePassword.providedBy(creds))
        self.assertTrue(creds.checkPassword(b"s3cret"))
        self.assertFalse(creds.checkPassword(b"s3cre"))
        self.assertEqual(creds.authzid, b"boss")
        self.assertNotIn("s3cret", repr(creds))
