"""RFC 3461 DSN parameters on MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT): checks and decoding.

They are kept on the transaction (C{mail_params}, C{rcpt_params}) for the outbound engine's
delivery status notifications.
"""

from __future__ import annotations

import re

__all__ = ["DSNError", "check_mail_params", "check_rcpt_params", "xtext_decode"]

_XTEXT = re.compile(rb"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


class DSNError(ValueError):
    """A DSN parameter that does not follow RFC 3461; the text says which."""


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext (C{+XX} hex escapes).

    @raise DSNError: for characters xtext does not allow or a bad escape.
    """
    raw = text.encode("utf-8", "surrogateescape")
    if not _XTEXT.match(raw):
        raise DSNError(f"not xtext: {text!r}")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def check_mail_params(params: dict[str, str | None]) -> None:
    """Check RET and ENVID.

    @raise DSNError: naming the parameter at fault.
    """
    ret = params.get("RET")
    if "RET" in params and (ret is None or ret.upper() not in ("FULL", "HDRS")):
        raise DSNError("RET must be FULL or HDRS")
    if "ENVID" in params:
        envid = params["ENVID"]
        if not envid or len(envid) > 100:
            raise DSNError("ENVID must be 1 to 100 characters of xtext")
        xtext_decode(envid)


def check_rcpt_params(params: dict[str, str | None]) -> None:
    """Check NOTIFY (NEVER, or a list of SUCCESS, FAILURE, DELAY) and ORCPT (type;xtext).

    @raise DSNError: naming the parameter at fault.
    """
    if "NOTIFY" in params:
        words = [w.upper() for w in (params["NOTIFY"] or "").split(",")]
        if words != ["NEVER"] and (
            not words or any(w not in _NOTIFY_WORDS for w in words) or len(set(words)) != len(words)
        ):
            raise DSNError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    if "ORCPT" in params:
        addr_type, sep, value = (params["ORCPT"] or "").partition(";")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", addr_type) or not value:
            raise DSNError("ORCPT must be addr-type;xtext (e.g. rfc822;user@example.com)")
        if len(params["ORCPT"] or "") > 500:
            raise DSNError("ORCPT is too long")
        xtext_decode(value)
