"""The replies the core sends itself, outside the hook table (aiosmtpd's statuscodes idea).

Hook results go through L{haraka_tw.hooks.table}; these are the protocol's own answers to
malformed or out-of-order input.
"""

from __future__ import annotations

from haraka_tw import __version__
from haraka_tw.smtp.replies import Reply

PRODUCT = "Haraka_tw"


def _r(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply.of(code, enhanced, text)


S214_HELP = _r(214, "2.0.0", f"This is {PRODUCT}/{__version__}; see RFC 5321")
S220_TLS_GO_AHEAD = _r(220, "2.0.0", "Ready to start TLS")
S421_TIMEOUT = _r(421, "4.4.2", "timeout, closing connection")
S421_SHUTDOWN = _r(421, "4.3.2", "server shutting down, closing connection")
S421_TOO_MANY_CONNECTIONS = _r(421, "4.7.0", "Too many connections, try again later")
S421_UNAVAILABLE = _r(421, "4.3.2", "Service not available, try again later")
S421_PROXY_REFUSED = _r(421, "4.7.0", "PROXY header refused, closing connection")
S421_PROXY_TIMEOUT = _r(421, "4.4.2", "no PROXY header, closing connection")
S451_INTERNAL = _r(451, "4.3.0", "Internal error, try again later")
S451_STORAGE = _r(451, "4.3.0", "Temporary storage failure, try again later")
S452_TOO_MANY_RCPTS = _r(452, "4.5.3", "Too many recipients")
S501_SYNTAX = _r(501, "5.5.4", "Syntax error")
S501_HELO = _r(501, "5.5.4", "HELO requires domain/address")
S501_EHLO = _r(501, "5.5.4", "EHLO requires domain/address")
S501_BAD_BYTES = _r(501, "5.5.2", "Syntax error: control characters or NUL in command")
S501_8BIT = _r(501, "5.5.2", "Syntax error: 8-bit characters in command")
S501_MAIL = _r(501, "5.1.7", "Invalid MAIL FROM address")
S501_RCPT = _r(501, "5.1.3", "Invalid RCPT TO address")
S501_BDAT = _r(501, "5.5.4", "Syntax: BDAT <size> [LAST]; closing connection")
S503_HELO_FIRST = _r(503, "5.5.1", "Use EHLO/HELO before MAIL")
S503_MAIL_FIRST = _r(503, "5.5.1", "Use MAIL before RCPT")
S503_DATA_NO_MAIL = _r(503, "5.5.1", "MAIL required first")
S503_DATA_NO_RCPT = _r(503, "5.5.1", "RCPT required first")
S503_DATA_AFTER_BDAT = _r(503, "5.5.1", "DATA is not allowed after BDAT")
S503_BDAT_NEEDS_EHLO = _r(503, "5.5.1", "BDAT requires EHLO")
S521_LINE_TOO_LONG = _r(521, "5.5.2", "Command line too long")
S550_AUTH_REQUIRED = _r(550, "5.7.0", "Authentication required")
S550_BARE_NEWLINE = _r(
    550, "5.6.0", "Bare LF or CR in message: lines must end with CRLF (see RFC 5321 2.3.8)"
)
S550_LOOP = _r(550, "5.4.6", "Too many received headers - possible mail loop")
S552_TOO_BIG = _r(552, "5.3.4", "Message too big!")
S553_UTF8 = _r(553, "5.6.7", "UTF-8 addresses require the SMTPUTF8 parameter")
S554_NO_VALID_RCPT = _r(554, "5.5.1", "No valid recipients")
S554_TLS_ON_PLAINTEXT = _r(554, "5.7.0", "TLS on a plaintext port; use STARTTLS or the SMTPS port")
S554_TOO_MANY_PARTS = _r(554, "5.6.0", "Too many MIME parts; closing connection")
S555_PARAMS = _r(555, "5.5.4", "Invalid command parameters")
