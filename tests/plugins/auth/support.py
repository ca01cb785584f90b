"""Driving an auth plugin in a transcript session (StringTransport, task.Clock)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from tests.plugins.loading import Loaded, accepting, load
from tests.support import Session, reply_codes

USERS_INI = """
[core]
allow_cleartext=false
[users]
matt=test
user@example.com=secret
"""


def b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    """PLAIN's initial response."""
    return b64(f"{authzid}\x00{user}\x00{password}")


def cram_answer(challenge_line: str, user: str, password: str) -> str:
    """The answer to a '334 <challenge>' line."""
    challenge = base64.b64decode(challenge_line[4:].strip())
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    return b64(f"{user} {digest}")


class AuthSession:
    """One session with C{names} loaded from the shipped config overlaid by C{files},
    every plugin's clock the session's, an accepting queue behind them, and EHLO sent."""

    def __init__(
        self,
        case: Any,
        files: dict[str, str] | None = None,
        *,
        tls: bool = True,
        names: Iterable[str] = ("auth/flat_file",),
        ehlo: str | None = "EHLO client.test\r\n",
        stored: list[bytes] | None = None,
    ) -> None:
        self.loaded: Loaded = load(case, list(names), files or {"auth_flat_file.ini": USERS_INI})
        self.session = Session([*self.loaded.pairs(), accepting(stored)])
        self.clock = self.session.clock
        for loaded in self.loaded.plugins:
            loaded.plugin.reactor = self.clock
        self.connection = self.session.connection
        self.connection.tls.enabled = tls
        self.ehlo_reply = self.send(ehlo) if ehlo else ""

    @property
    def plugin(self) -> Any:
        return self.loaded.plugins[0].plugin

    def send(self, data: str | bytes) -> str:
        """Send C{data}, let pending calls at time 0 run, and return what came back."""
        out = self.session.send(data)
        self.clock.advance(0)
        return out + self.session.read()

    def codes(self, data: str | bytes) -> list[int]:
        return reply_codes(self.send(data))

    def wait(self, seconds: float) -> str:
        """Let C{seconds} pass; what was written meanwhile."""
        self.clock.advance(seconds)
        return self.session.read()

    @property
    def closed(self) -> bool:
        return self.session.closed

    def log_records(self) -> list[Any]:
        """What the core and the plugins logged."""
        return [*self.session.log.records, *self.loaded.log.records]

    def log_text(self) -> str:
        return "\n".join(f"{r.message} {r.fields!r}" for r in self.log_records())
