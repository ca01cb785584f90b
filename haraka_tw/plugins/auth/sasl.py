"""The SASL mechanisms AUTH offers (RFC 4954): decoding client responses, and credentials.

Plain functions over bytes, no reactor: L{decode_response} turns one line a client sent
after a 334 into bytes, L{parse_plain} and L{parse_cram_md5} take those bytes apart. The
credentials classes are what the auth plugins hand to a C{twisted.cred} portal:

- L{PasswordCredentials} (C{IUsernamePassword}) for PLAIN and LOGIN, with PLAIN's
  authorization identity;
- L{CramMD5Credentials} (C{IUsernameHashedPassword}) for CRAM-MD5: its challenge names
  the server (never C{<...@None>}), and C{checkPassword(stored)} checks the client's HMAC
  against the stored plain password.

Both compare in constant time.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
import time

from twisted.cred import credentials
from zope.interface import implementer

__all__ = [
    "CRAM_MD5",
    "LOGIN",
    "LOGIN_PASSWORD_PROMPT",
    "LOGIN_USERNAME_PROMPT",
    "MECHANISMS",
    "PLAIN",
    "AuthCancelled",
    "CramMD5Credentials",
    "MalformedResponse",
    "PasswordCredentials",
    "cram_md5_challenge",
    "decode_response",
    "encode_challenge",
    "parse_cram_md5",
    "parse_plain",
]

PLAIN = "PLAIN"
LOGIN = "LOGIN"
CRAM_MD5 = "CRAM-MD5"
#: Every mechanism the auth plugins know, in the order they advertise them.
MECHANISMS = (PLAIN, LOGIN, CRAM_MD5)

#: LOGIN's prompts, base64 of "Username:" and "Password:" as every client expects.
LOGIN_USERNAME_PROMPT = "VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = "UGFzc3dvcmQ6"

_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_HEX_DIGEST = re.compile(rb"[0-9a-fA-F]{32}")


class MalformedResponse(ValueError):
    """A client response that is not what the mechanism allows (bad base64, no NULs, ...)."""


class AuthCancelled(Exception):
    """The client answered a challenge with C{*} (RFC 4954 4)."""


def decode_response(line: bytes) -> bytes:
    """The bytes a client's response line stands for.

    C{=} is the empty response (RFC 4954 4); anything else must be strict base64.

    @raise AuthCancelled: for C{*}.
    @raise MalformedResponse: for anything that is not base64.
    """
    line = line.strip(b" \t")
    if line == b"*":
        raise AuthCancelled()
    if line == b"=":
        return b""
    if not line or len(line) % 4 or _BASE64.fullmatch(line) is None:
        raise MalformedResponse("not base64")
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except binascii.Error:
        raise MalformedResponse("not base64") from None


def encode_challenge(data: bytes) -> str:
    """A challenge as it goes after C{334 }."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def parse_plain(data: bytes) -> tuple[bytes, bytes, bytes]:
    """PLAIN's message (RFC 4616): C{[authzid] NUL authcid NUL passwd}.

    @return: (authzid, authcid, passwd); authzid may be empty.
    @raise MalformedResponse: without exactly two NULs, or with an empty authcid or
        password, or with text that is not UTF-8.
    """
    parts = data.split(b"\x00")
    if len(parts) != 3:
        raise MalformedResponse("PLAIN needs authzid NUL authcid NUL password")
    authzid, authcid, passwd = parts
    if not authcid or not passwd:
        raise MalformedResponse("PLAIN needs a username and a password")
    _check_utf8(authzid, authcid, passwd)
    return authzid, authcid, passwd


def parse_cram_md5(data: bytes) -> tuple[bytes, bytes]:
    """CRAM-MD5's response (RFC 2195): C{username SP hex-digest}.

    The username may itself hold spaces; the digest is after the last one.

    @return: (username, digest) with the digest in lower case.
    @raise MalformedResponse: without a username or a 32-digit hex digest.
    """
    username, space, digest = data.rpartition(b" ")
    if not space or not username or _HEX_DIGEST.fullmatch(digest) is None:
        raise MalformedResponse("CRAM-MD5 needs a username and a hex digest")
    _check_utf8(username)
    return username, digest.lower()


def cram_md5_challenge(host: str) -> bytes:
    """A fresh challenge in RFC 2195's msg-id form, C{<random.timestamp@host>}."""
    name = host or "localhost"
    return f"<{secrets.randbelow(2**31)}.{int(time.time())}@{name}>".encode()


def _check_utf8(*values: bytes) -> None:
    for value in values:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedResponse("not UTF-8") from None


@implementer(credentials.IUsernamePassword)
class PasswordCredentials:
    """A username and password, from PLAIN or LOGIN.

    @ivar authzid: the identity PLAIN asks to act as (empty: the username itself).
    """

    def __init__(self, username: bytes, password: bytes, authzid: bytes = b"") -> None:
        self.username = username
        self.password = password
        self.authzid = authzid

    def checkPassword(self, password: bytes) -> bool:
        """Whether C{password} is the one the client gave (constant time)."""
        return hmac.compare_digest(self.password, password)

    def __repr__(self) -> str:  # never the password
        return f"<PasswordCredentials {self.username!r}>"


class CramMD5Credentials(credentials.CramMD5Credentials):
    """CRAM-MD5: a challenge naming C{host}, and the client's answer to it."""

    def __init__(self, host: str) -> None:
        self.host = host.encode("utf-8")
        self.challenge = cram_md5_challenge(host)
        self.username: bytes | None = None
        self.response = b""

    def set_response(self, data: bytes) -> None:
        """Take the client's decoded response.

        @raise MalformedResponse: see L{parse_cram_md5}.
        """
        self.username, self.response = parse_cram_md5(data)

    def setResponse(self, response: bytes) -> None:
        self.set_response(response)

    def checkPassword(self, password: bytes) -> bool:
        """Whether the client's digest is HMAC-MD5(C{password}, challenge) (constant time)."""
        expected = hmac.new(password, self.challenge, hashlib.md5).hexdigest().encode()
        return hmac.compare_digest(expected, self.response)

    def __repr__(self) -> str:
        return f"<CramMD5Credentials {self.username!r}>"
