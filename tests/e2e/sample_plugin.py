"""A sample plugin, written as a plugin author would: from haraka_tw.codes and
haraka_tw.interfaces only, loaded through the plugins file as
C{tests.e2e.sample_plugin:Factory}.

It answers as the message tells it to, so end-to-end tests can drive every result code
through every way of answering:

- MAIL: the sender's local part is the directive (C{deny.deferred@x.test});
- RCPT: the recipient's local part (C{ok.coroutine@example.com});
- data_post and queue: the Subject holds C{data_post=<directive>} and/or
  C{queue=<directive>}.

A directive is C{<code>.<mode>}. C{<code>} is deny, denysoft, denydisconnect,
denysoftdisconnect, ok or cont, or hang (never answers: a Deferred that never fires, or
with mode coroutine an C{async def} that never returns). C{<mode>} is sync (return the
code), deferred (a Deferred fired 0.05 s later), coroutine (an C{async def} that awaits
first) or wait<ms> (a Deferred fired after that many milliseconds); no mode is sync.
Anything that is not a directive is CONT, so ordinary mail passes through.

At data_post the plugin records a copy of the transaction's notes in the server notes,
under C{sample_plugin.data_post_notes}, for tests to look at.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from zope.interface import implementer

from haraka_tw.codes import (
    CONT,
    DENY,
    DENYDISCONNECT,
    DENYSOFT,
    DENYSOFTDISCONNECT,
    OK,
    Code,
)
from haraka_tw.interfaces import (
    IDataPostHook,
    IMailHook,
    IPluginContext,
    IQueueHook,
    IRcptHook,
    IRegistration,
)

__all__ = ["CODES", "MODES", "Factory"]

#: directive word -> the code answered
CODES: dict[str, Code] = {
    "deny": DENY,
    "denysoft": DENYSOFT,
    "denydisconnect": DENYDISCONNECT,
    "denysoftdisconnect": DENYSOFTDISCONNECT,
    "ok": OK,
    "cont": CONT,
}
MODES = ("sync", "deferred", "coroutine")
DEFERRED_DELAY = 0.05


def parse_directive(text: str) -> tuple[str, str] | None:
    """C{"deny.deferred"} -> C{("deny", "deferred")}; None when C{text} is no directive."""
    word, _, mode = text.strip().lower().partition(".")
    mode = mode or "sync"
    if word not in CODES and word != "hang":
        return None
    if mode not in MODES and not (mode.startswith("wait") and mode[4:].isdigit()):
        return None
    return word, mode


def answer(word: str, mode: str) -> Any:
    """The code for C{word}, answered the way C{mode} says."""
    if word == "hang":  # never answers: the server's plugin timeout must
        if mode == "coroutine":

            async def forever() -> None:
                await Deferred()

            return forever()
        return Deferred()
    code = CODES[word]
    if mode == "sync":
        return code
    if mode == "coroutine":

        async def later() -> Code:
            await task.deferLater(reactor, 0.01, lambda: None)
            return code

        return later()
    delay = DEFERRED_DELAY if mode == "deferred" else int(mode[4:]) / 1000
    return task.deferLater(reactor, delay, lambda: code)


def subject_directive(connection: Any, hook: str) -> tuple[str, str] | None:
    """The C{<hook>=<directive>} word of the Subject, if any."""
    txn = connection.transaction
    if txn is None:
        return None
    for word in txn.header.get("Subject").split():
        name, sep, value = word.partition("=")
        if sep and name.lower() == hook:
            return parse_directive(value)
    return None


@implementer(IRegistration, IMailHook, IRcptHook, IDataPostHook, IQueueHook)
class Factory:
    """The plugin; the plugins file names this class as its factory."""

    name = "sample_plugin"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.log = context.log
        self.notes = context.server_notes
        self.notes.setdefault("sample_plugin.data_post_notes", [])

    def _answer(self, connection: Any, hook: str, directive: tuple[str, str] | None) -> Any:
        if directive is None:
            return CONT
        word, mode = directive
        self.log.info(f"{hook}: answering {word} ({mode})", connection)
        return answer(word, mode)

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Any:
        return self._answer(connection, "mail", parse_directive(sender.local))

    def hook_rcpt(self, connection: Any, recipient: Any, params: Any) -> Any:
        return self._answer(connection, "rcpt", parse_directive(recipient.local))

    def hook_data_post(self, connection: Any) -> Any:
        self.notes["sample_plugin.data_post_notes"].append(dict(connection.transaction.notes))
        return self._answer(connection, "data_post", subject_directive(connection, "data_post"))

    def hook_queue(self, connection: Any) -> Any:
        return self._answer(connection, "queue", subject_directive(connection, "queue"))
