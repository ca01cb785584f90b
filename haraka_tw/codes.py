"""Hook result codes: the small closed set every plugin answers with.

The numeric values are Haraka's (haraka-constants), so logs and plugin ports read the same.
A hook method may return any of:

- ``None`` (the same as ``CONT``);
- a :class:`Code` (``OK``, ``DENY``, ...);
- a ``(code, message)`` pair, where ``message`` is a ``str``, a list of lines, or a value
  the hook defines (a hostname for ``lookup_rdns``, seconds for ``DELAY``, a hook name for
  ``HOOK_NEXT``);
- a :class:`HookResult`;
- a Deferred or a coroutine that produces any of the above.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONT",
    "CONT_RESULT",
    "DELAY",
    "DENY",
    "DENYDISCONNECT",
    "DENYSOFT",
    "DENYSOFTDISCONNECT",
    "DISCONNECT",
    "HOOK_NEXT",
    "OK",
    "STOP",
    "Code",
    "HookResult",
    "normalise",
]


class Code(enum.IntEnum):
    """What a plugin answers to a hook."""

    CONT = 900
    STOP = 901
    DENY = 902
    DENYSOFT = 903
    DENYDISCONNECT = 904
    DISCONNECT = 905
    OK = 906
    HOOK_NEXT = 907
    DELAY = 908
    DENYSOFTDISCONNECT = 909

    @property
    def is_denial(self) -> bool:
        """True for the four codes that run the ``deny`` hook first."""
        return self in _DENIALS


_DENIALS = frozenset({Code.DENY, Code.DENYSOFT, Code.DENYDISCONNECT, Code.DENYSOFTDISCONNECT})

CONT = Code.CONT
STOP = Code.STOP
DENY = Code.DENY
DENYSOFT = Code.DENYSOFT
DENYDISCONNECT = Code.DENYDISCONNECT
DISCONNECT = Code.DISCONNECT
OK = Code.OK
HOOK_NEXT = Code.HOOK_NEXT
DELAY = Code.DELAY
DENYSOFTDISCONNECT = Code.DENYSOFTDISCONNECT


@dataclass(frozen=True, slots=True)
class HookResult:
    """A plugin's answer: a code and an optional message or value.

    @ivar code: the result code.
    @ivar message: reply text (``str`` or a list of lines), a L{haraka_tw.smtp.replies.Reply}
        that sets the whole reply, or a value the hook defines.
    @ivar plugin: the name of the plugin that answered, filled in by the hook runner.
    """

    code: Code
    message: Any = None
    plugin: str | None = None

    @property
    def text(self) -> str | None:
        """The message as reply text, or None when it carries no text."""
        message = self.message
        if message is None:
            return None
        if isinstance(message, str):
            return message
        if isinstance(message, (list, tuple)) and all(isinstance(m, str) for m in message):
            return "\n".join(message)
        return None


# A result of each code with no message, shared (they are frozen): a hook answering a bare
# code needs no new object, nor Code(value), which runs the enum machinery in Python.
_PLAIN_RESULTS = {code: HookResult(code) for code in Code}
CONT_RESULT = _PLAIN_RESULTS[Code.CONT]  # a plain "carry on"


def normalise(value: object) -> HookResult:
    """Turn whatever a hook method returned (once resolved) into a L{HookResult}.

    @raise TypeError: for a value that is none of the accepted shapes.
    """
    if value is None:
        return CONT_RESULT
    if type(value) is Code:
        return _PLAIN_RESULTS[value]
    if isinstance(value, HookResult):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return _PLAIN_RESULTS[Code(value)]
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        return HookResult(Code(value[0]), value[1])
    raise TypeError(
        f"a hook returned {value!r}: expected None, a code, (code, message) or a HookResult"
    )
