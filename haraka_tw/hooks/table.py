"""The one table: for each hook and result code, the reply and what happens next.

Haraka spreads this over mail_respond, rcpt_respond, rcpt_ok_respond and friends, each a
copy of the same switch. Here it is declared once; the protocol looks up
C{outcome(hook, code)} and acts on C{Then}. Reply text may hold the placeholders
C{{me}}, C{{remote}}, C{{sender}}, C{{recipient}} and C{{uuid}}, filled by the protocol.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from haraka_tw.codes import Code
from haraka_tw.smtp.replies import Reply

__all__ = ["TABLE", "Outcome", "Then", "outcome"]


class Then(enum.Enum):
    """What the session does after replying."""

    PROCEED = "proceed"  # the command succeeds: the core's next step for that hook
    REJECT = "reject"  # the command is refused; the session goes on
    LOOP = "loop"  # every later command but QUIT gets this reply
    CLOSE = "close"  # reply, then disconnect


@dataclass(frozen=True, slots=True)
class Outcome:
    """One row: what happens next, and the reply (None: the core, or the plugin itself,
    writes the reply, as for rcpt OK -> rcpt_ok, or data_post -> queue)."""

    then: Then
    reply: Reply | None


def _r(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply.of(code, enhanced, text)


def _o(then: Then, code: int, enhanced: str | None, text: str) -> Outcome:
    return Outcome(then, _r(code, enhanced, text))


P, R, L, C = Then.PROCEED, Then.REJECT, Then.LOOP, Then.CLOSE
_ANY = None  # the default row of a hook: every code not listed

_DISCONNECT_421 = _o(C, 421, "4.3.2", "closing connection")

# The pre-banner hooks share their rows: the client has not been greeted yet.
_GREETING_ROWS: dict[Code | None, Outcome] = {
    Code.DENY: _o(L, 554, "5.7.1", "Your mail is not welcome here"),
    Code.DENYSOFT: _o(L, 421, "4.7.0", "Come back later"),
    Code.DENYDISCONNECT: _o(C, 554, "5.7.1", "Your mail is not welcome here"),
    Code.DISCONNECT: _o(C, 554, "5.7.1", "Your mail is not welcome here"),
    Code.DENYSOFTDISCONNECT: _o(C, 421, "4.7.0", "Come back later"),
    _ANY: Outcome(P, None),
}


def _refusals(
    hard: tuple[int, str, str], soft: tuple[int, str, str], hard_then: Then = R
) -> dict[Code | None, Outcome]:
    """The four denial rows most hooks share: DENY / DENYSOFT refuse, the DISCONNECT ones close."""
    return {
        Code.DENY: _o(hard_then, *hard),
        Code.DENYSOFT: _o(hard_then, *soft),
        Code.DENYDISCONNECT: _o(C, *hard),
        Code.DENYSOFTDISCONNECT: _o(C, *soft),
        Code.DISCONNECT: _DISCONNECT_421,
    }


TABLE: dict[str, dict[Code | None, Outcome]] = {
    "lookup_rdns": _GREETING_ROWS,
    "connect": _GREETING_ROWS,
    "helo": {
        **_refusals((550, "5.7.1", "HELO rejected"), (450, "4.7.1", "HELO rejected")),
        _ANY: _o(P, 250, None, "{me} Hello {remote}, Haraka_tw is at your service."),
    },
    "ehlo": {
        **_refusals((550, "5.7.1", "EHLO rejected"), (450, "4.7.1", "EHLO rejected")),
        _ANY: Outcome(P, None),  # the helo greeting, then the capability list
    },
    "mail": {
        **_refusals(
            (550, "5.7.1", "sender {sender} denied"), (450, "4.7.1", "sender {sender} denied")
        ),
        _ANY: _o(P, 250, "2.1.0", "sender {sender} OK"),
    },
    "rcpt": {
        **_refusals(
            (550, "5.7.1", "delivery to {recipient} denied"),
            (450, "4.7.1", "delivery to {recipient} denied"),
        ),
        Code.OK: Outcome(P, None),  # rcpt_ok decides the reply
        _ANY: _o(R, 550, "5.7.1", "I cannot deliver mail for {recipient}"),
    },
    "rcpt_ok": {
        **_refusals(
            (550, "5.7.1", "delivery to {recipient} denied"),
            (450, "4.7.1", "delivery to {recipient} denied"),
        ),
        _ANY: _o(P, 250, "2.1.5", "recipient {recipient} OK"),
    },
    "data": {
        **_refusals((554, "5.7.1", "Message denied"), (451, "4.7.1", "Message deferred")),
        _ANY: _o(P, 354, None, "go ahead, make my day"),
    },
    "data_post": {
        **_refusals((550, "5.7.1", "Message denied"), (450, "4.7.1", "Message deferred")),
        _ANY: Outcome(P, None),  # the queue hook decides the reply
    },
    "max_data_exceeded": {
        # (552, not Haraka's 550: RFC 1870 and RFC 5321 4.5.3.1.10 give 552 for a size limit)
        **_refusals((552, "5.3.4", "Message too big!"), (450, "4.3.4", "Message too big!")),
        _ANY: _o(R, 552, "5.3.4", "Message too big!"),
    },
    "queue": {
        **_refusals((550, "5.3.0", "Message denied"), (450, "4.3.0", "Message deferred")),
        Code.OK: _o(P, 250, "2.0.0", "Message Queued ({uuid})"),
        _ANY: _o(R, 451, "4.3.0", "Queuing declined or disabled, try later"),
    },
    "queue_outbound": {
        **_refusals((550, "5.3.0", "Message denied"), (450, "4.3.0", "Message deferred")),
        Code.OK: _o(P, 250, "2.0.0", "Message Queued ({uuid})"),
        Code.CONT: Outcome(P, None),  # the built-in outbound queue takes it
        _ANY: _o(R, 451, "4.3.0", "Queuing declined or disabled, try later"),
    },
    "vrfy": {
        Code.OK: _o(P, 250, "2.1.5", "User OK"),
        **_refusals((550, "5.1.1", "User not found"), (450, "4.1.1", "Try again later")),
        _ANY: _o(P, 252, "2.1.5", "Just try sending a mail and we'll see how it turns out ..."),
    },
    "noop": {
        **_refusals((500, "5.5.1", "Command denied"), (450, "4.5.1", "Command deferred")),
        _ANY: _o(P, 250, "2.0.0", "OK"),
    },
    "rset": {_ANY: _o(P, 250, "2.0.0", "OK")},
    "quit": {_ANY: _o(C, 221, "2.0.0", "{me} closing connection. Have a jolly good day.")},
    "unrecognized_command": {
        Code.OK: Outcome(P, None),  # the plugin replied itself
        Code.DENY: _o(R, 500, "5.5.1", "Unrecognized command"),
        Code.DENYSOFT: _o(R, 450, "4.5.1", "Command deferred"),
        Code.DENYDISCONNECT: _o(C, 521, "5.5.1", "Unrecognized command"),
        Code.DENYSOFTDISCONNECT: _o(C, 421, "4.5.1", "Unrecognized command"),
        Code.DISCONNECT: _DISCONNECT_421,
        _ANY: _o(R, 500, "5.5.1", "Unrecognized command"),
    },
}


def outcome(hook: str, code: Code) -> Outcome:
    """The row for C{code} in C{hook}'s table, or the hook's default row."""
    rows = TABLE[hook]
    found = rows.get(code)
    return found if found is not None else rows[_ANY]
