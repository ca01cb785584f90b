"""prevent_credential_leaks: refuse a message in which an authenticated user sends out their
own username and password (replying to a phish, say).

Runs at data_post for a connection whose AUTH left C{connection.notes.auth_user} and
C{connection.notes.auth_passwd}. When the body contains both the username (case-insensitive;
for C{user@example.com}, the part before the C{@} is enough, so C{user} alone also counts)
and the password (exactly), the answer is DENY "Credential leak detected: never give out your
username/password to anyone!" (550 5.7.1). The body is searched as received, after the
header, and, as Haraka does, in the decoded text of each text part (quoted-printable and
base64 undone: a password with a C{=} is always C{=3D} in quoted-printable); for such
connections the plugin asks for the body to be parsed (C{transaction.parse_body}) at DATA.

No config.
"""

from __future__ import annotations

import re

from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, Code
from haraka_tw.interfaces import IDataHook, IDataPostHook, IPluginContext, IRegistration
from haraka_tw.plugins.data import BodySearch, search_body
from haraka_tw.smtp.connection import Connection

__all__ = ["MESSAGE", "Plugin", "user_part"]

MESSAGE = "Credential leak detected: never give out your username/password to anyone!"


def user_part(username: str) -> str:
    """What must appear for the username to count as given away: the local part of a
    qualified name (C{user} for C{user@example.com}), else the whole name."""
    local, at, _ = username.partition("@")
    return local if at and local else username


def _credentials(connection: Connection) -> tuple[str, str] | None:
    """The username and password an AUTH of this connection left, if both are there."""
    user = connection.notes.get("auth_user")
    password = connection.notes.get("auth_passwd")
    if isinstance(user, str) and isinstance(password, str) and user and password:
        return user, password
    return None


@implementer(IRegistration, IDataHook, IDataPostHook)
class Plugin:
    name = "prevent_credential_leaks"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name

    def hook_data(self, connection: Connection) -> Code:
        txn = connection.transaction
        if txn is not None and _credentials(connection) is not None:
            txn.parse_body = True  # (for the decoded text of each part, at data_post)
        return CONT

    def hook_data_post(self, connection: Connection) -> Code | tuple[Code, str]:
        txn = connection.transaction
        found = _credentials(connection)
        if txn is None or found is None:
            return CONT
        user, password = found
        name = user_part(user).encode("utf-8")
        secret = password.encode("utf-8")
        name_search = BodySearch(re.compile(re.escape(name), re.IGNORECASE), len(name))
        secret_search = BodySearch(re.compile(re.escape(secret)), len(secret))
        search_body(txn.message_stream.body_chunks(), name_search, secret_search)
        texts = [part.bodytext for part in txn.body.walk()] if txn.body is not None else []
        folded = user_part(user).casefold()
        named = name_search.found or any(folded in text.casefold() for text in texts)
        given = secret_search.found or any(password in text for text in texts)
        if named and given:
            txn.results.add(self.name, fail="credentials in body")
            connection.lognotice(f"{user} sent their own credentials; refused", self.name)
            return DENY, MESSAGE
        txn.results.add(self.name, **{"pass": "no credentials"})
        return CONT
