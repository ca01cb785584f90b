"""prevent_credential_leaks: refuse a message in which an authenticated user sends out their
own username and password (replying to a phish, say).

Runs at data_post for a connection whose AUTH left C{connection.notes.auth_user} and
C{connection.notes.auth_passwd}. When the body contains both the username (case-insensitive;
for C{user@example.com}, the part before the C{@} is enough, so C{user} alone also counts)
and the password (exactly), the answer is DENY "Credential leak detected: never give out your
username/password to anyone!" (550 5.7.1). The body is searched chunk by chunk as received,
after the header.

No config.
"""

from __future__ import annotations

import re

from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, Code
from haraka_tw.interfaces import IDataPostHook, IPluginContext, IRegistration
from haraka_tw.plugins.data import BodySearch, search_body
from haraka_tw.smtp.connection import Connection

__all__ = ["MESSAGE", "Plugin", "user_part"]

MESSAGE = "Credential leak detected: never give out your username/password to anyone!"


def user_part(username: str) -> str:
    """What must appear for the username to count as given away: the local part of a
    qualified name (C{user} for C{user@example.com}), else the whole name."""
    local, at, _ = username.partition("@")
    return local if at and local else username


@implementer(IRegistration, IDataPostHook)
class Plugin:
    name = "prevent_credential_leaks"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name

    def hook_data_post(self, connection: Connection) -> Code | tuple[Code, str]:
        txn = connection.transaction
        user = connection.notes.get("auth_user")
        password = connection.notes.get("auth_passwd")
        if txn is None or not isinstance(user, str) or not isinstance(password, str):
            return CONT
        if not user or not password:
            return CONT
        name = user_part(user).encode("utf-8")
        secret = password.encode("utf-8")
        name_search = BodySearch(re.compile(re.escape(name), re.IGNORECASE), len(name))
        secret_search = BodySearch(re.compile(re.escape(secret)), len(secret))
        search_body(txn.message_stream.body_chunks(), name_search, secret_search)
        if name_search.found and secret_search.found:
            txn.results.add(self.name, fail="credentials in body")
            connection.lognotice(f"{user} sent their own credentials; refused", self.name)
            return DENY, MESSAGE
        txn.results.add(self.name, **{"pass": "no credentials"})
        return CONT
