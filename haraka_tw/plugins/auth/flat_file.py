"""auth/flat_file: AUTH against users and plain passwords in C{auth_flat_file.ini}.

Haraka's format::

    [core]
    methods=PLAIN,LOGIN,CRAM-MD5
    ; allow_cleartext=false   (AUTH only after STARTTLS)
    ; constrain_sender=true   (MAIL FROM must be in the user's domain)

    [users]
    matt=test
    user@example.com=secret

Every C{[core]} key is described in L{haraka_tw.plugins.auth.auth_base}. The file is
re-read when it changes (a broken file keeps the last good users). Usernames are
case-sensitive. Passwords are kept in clear text, as in Haraka: make the file readable by
the server's user only. As everywhere in Haraka's INI dialect, a value made only of digits
is read as a number (C{0123} becomes C{123}), and surrounding spaces are dropped; a bare
key without C{=} is a user who cannot log in.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from haraka_tw.plugins.auth.auth_base import AuthPlugin

__all__ = ["FlatFileChecker", "Plugin", "read_users"]

_DUMMY = b"\x00" * 16  # compared against when the user does not exist, to keep time even


def read_users(section: Mapping[str, Any]) -> dict[str, str]:
    """The C{[users]} section as name -> password; bare keys (no password) are left out."""
    users: dict[str, str] = {}
    for name, value in section.items():
        if isinstance(value, bool | list) or value == "":
            continue
        users[name] = str(value)
    return users


@implementer(ICredentialsChecker)
class FlatFileChecker:
    """Checks PLAIN/LOGIN passwords and CRAM-MD5 digests against plain stored passwords."""

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {name.encode("utf-8"): pw.encode("utf-8") for name, pw in users.items()}

    def __len__(self) -> int:
        return len(self._users)

    def requestAvatarId(self, credentials: ICredentials) -> Deferred[bytes | tuple[()]]:
        username: bytes = getattr(credentials, "username", None) or b""
        stored = self._users.get(username)
        if IUsernamePassword.providedBy(credentials):
            given: bytes = credentials.password
            matches = hmac.compare_digest(given, stored if stored is not None else _DUMMY)
        else:
            check = credentials.checkPassword  # type: ignore[attr-defined]
            matches = bool(check(stored if stored is not None else _DUMMY))
        if stored is not None and matches:
            return succeed(username)
        return fail(UnauthorizedLogin("no such user" if stored is None else "wrong password"))


class Plugin(AuthPlugin):
    name = "auth/flat_file"
    config_file = "auth_flat_file.ini"
    constrain_sender_default = True

    def make_checker(self, ini: dict[str, dict[str, Any]]) -> ICredentialsChecker:
        checker = FlatFileChecker(read_users(ini.get("users", {})))
        self.log.debug(f"{len(checker)} users in {self.config_file}")
        return checker
