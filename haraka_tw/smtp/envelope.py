"""The envelope commands: HELO, EHLO, MAIL, RCPT."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from haraka_tw.codes import Code, HookResult
from haraka_tw.hooks.runner import then
from haraka_tw.hooks.table import Then, outcome
from haraka_tw.smtp import catalogue as S
from haraka_tw.smtp.address import (
    Address,
    AddressError,
    ParameterError,
    parse_mail_argument,
    parse_rcpt_argument,
)
from haraka_tw.smtp.command import Command
from haraka_tw.smtp.connection import Hello, Transaction
from haraka_tw.smtp.dsn import DSNError, check_mail_params, check_rcpt_params
from haraka_tw.smtp.replies import Reply
from haraka_tw.smtp.session import SessionCore

__all__ = ["Envelope"]

_SUBMISSION_PORTS = frozenset({587, 465})
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


def _bare_postmaster(recipient: Address) -> bool:
    """RCPT TO:<postmaster> with no domain, which RFC 5321 4.5.1 says a server MUST take:
    when no rcpt plugin decides, the core accepts it (Haraka refuses it)."""
    return not recipient.domain and recipient.local.lower() == "postmaster"


class Envelope(SessionCore):
    """HELO/EHLO (with capabilities), MAIL and RCPT: parsing, checks, hooks, replies."""

    def do_HELO(self, cmd: Command) -> Deferred[Any] | None:
        return self._hello("HELO", cmd)

    def do_EHLO(self, cmd: Command) -> Deferred[Any] | None:
        return self._hello("EHLO", cmd)

    def _hello(self, verb: str, cmd: Command) -> Deferred[Any] | None:
        conn = self._conn
        host = cmd.argument.strip()
        if not host:
            self._send(S.S501_EHLO if verb == "EHLO" else S.S501_HELO)
            return None
        d = self._reset_transaction()
        conn.hello = Hello(verb, host)
        conn.esmtp = verb == "EHLO"
        hook = verb.lower()

        def run(_: Any = None) -> Deferred[Any] | None:
            return then(self.runner.call(hook, conn, host), answered)

        def answered(result: HookResult) -> Deferred[Any] | None:
            row = outcome(hook, result.code)
            if row.then is not Then.PROCEED:
                self._act(row, result)
                conn.hello = Hello()  # a refused greeting is no greeting: MAIL needs a new one
                conn.esmtp = False
                return None
            if not result.text and self.settings.helo_message:
                result = HookResult(result.code, self.settings.helo_message, result.plugin)
            row = outcome("helo", Code.CONT)
            if verb == "HELO":
                self._answer(row, result)
                return None
            greeting = self._reply_for(row, result)
            conn.capabilities = self._capabilities()
            return then(
                self.runner.call("capabilities", conn),
                lambda _: self._send(Reply(250, None, (*greeting.lines, *conn.capabilities))),
            )

        return run() if d is None else d.addCallback(run)

    def _capabilities(self) -> list[str]:
        caps = ["PIPELINING", "8BITMIME"]
        if self.settings.smtputf8:
            caps.append("SMTPUTF8")
        caps += ["ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]
        caps.append(f"SIZE {self.settings.max_bytes}" if self.settings.max_bytes else "SIZE")
        return caps

    def do_MAIL(self, cmd: Command) -> Deferred[Any] | None:
        conn = self._conn
        if conn.hello.host is None:
            self._send(S.S503_HELO_FIRST)
            return None
        if conn.local.port in _SUBMISSION_PORTS and not conn.relaying:
            self._send(S.S550_AUTH_REQUIRED)
            return None
        try:
            sender, params = parse_mail_argument(
                cmd.argument,
                strict=self.settings.strict_rfc1869,
                allow_utf8=self.settings.smtputf8 and conn.esmtp,
            )
        except ParameterError as e:
            self._send(S.S501_SYNTAX.with_text(f"Invalid MAIL FROM parameters: {e}"))
            return None
        except AddressError as e:
            self._send(S.S501_MAIL.with_text(f"Invalid MAIL FROM address: {e}"))
            return None
        problem = self._check_params(params, _MAIL_PARAMS, check_mail_params)
        if problem is None and sender.is_utf8 and "SMTPUTF8" not in params:
            problem = S.S553_UTF8
        if problem is None:
            problem = self._check_size(params)
        if problem is not None:
            self._send(problem)
            return None
        d = self._reset_transaction()

        def run(_: Any = None) -> Deferred[Any] | None:
            conn.tran_count += 1
            s = self.settings
            txn = Transaction(f"{conn.uuid}.{conn.tran_count}", s.spool_dir, s.spool_after)
            txn.mail_from, txn.mail_params = sender, params
            conn.transaction = txn
            return then(self.runner.call("mail", conn, sender, params), answered)

        def answered(result: HookResult) -> Deferred[Any] | None:
            row = outcome("mail", result.code)
            self._act(row, result)
            if row.then is not Then.PROCEED:
                return self._reset_transaction()
            return None

        return run() if d is None else d.addCallback(run)

    def _check_params(
        self,
        params: dict[str, str | None],
        known: frozenset[str],
        check: Callable[[dict[str, str | None]], None],
    ) -> Reply | None:
        if not params:  # (the usual command: nothing below could object)
            return None
        if not self._conn.esmtp:
            return S.S555_PARAMS
        unknown = sorted(set(params) - known)
        if unknown:
            return S.S555_PARAMS.with_text(f"Unsupported parameter {unknown[0]}")
        for key, value in params.items():  # (RFC 1870, 6152, 6531, 3461, 4954)
            if (value is None) != (key == "SMTPUTF8"):
                wanted = "takes no value" if key == "SMTPUTF8" else "needs a value"
                return S.S501_SYNTAX.with_text(f"Syntax error: {key} {wanted}")
        body = params.get("BODY")
        if body is not None and body.upper() not in ("7BIT", "8BITMIME"):
            return S.S501_SYNTAX.with_text(f"Unsupported BODY={body}")
        try:
            check(params)
        except DSNError as e:
            return S.S501_SYNTAX.with_text(f"Syntax error: {e}")
        return None

    def _check_size(self, params: dict[str, str | None]) -> Reply | None:
        size = params.get("SIZE")
        if size is None:
            return None
        if not (size.isascii() and size.isdigit()):
            return S.S501_SYNTAX.with_text("SIZE must be a number")
        if self.settings.max_bytes and int(size) > self.settings.max_bytes:
            return S.S552_TOO_BIG
        return None

    def do_RCPT(self, cmd: Command) -> Deferred[Any] | None:
        conn = self._conn
        txn = conn.transaction
        if txn is None:
            self._send(S.S503_MAIL_FIRST)
            return None
        try:
            recipient, params = parse_rcpt_argument(
                cmd.argument,
                strict=self.settings.strict_rfc1869,
                allow_utf8=self.settings.smtputf8 and conn.esmtp,
            )
        except ParameterError as e:
            self._send(S.S501_SYNTAX.with_text(f"Invalid RCPT TO parameters: {e}"))
            return None
        except AddressError as e:
            self._send(S.S501_RCPT.with_text(f"Invalid RCPT TO address: {e}"))
            return None
        problem = self._check_params(params, _RCPT_PARAMS, check_rcpt_params)
        if problem is None and recipient.is_utf8 and "SMTPUTF8" not in txn.mail_params:
            problem = S.S553_UTF8
        if problem is None and len(txn.rcpt_to) >= self.settings.max_recipients:
            problem = S.S452_TOO_MANY_RCPTS
        if problem is not None:
            self._count(conn.rcpt_count, problem.code)
            self._send(problem)
            return None
        shown = recipient.format()

        def answered(result: HookResult) -> Deferred[Any] | None:
            code = result.code
            if code is Code.CONT and (conn.relaying or _bare_postmaster(recipient)):
                code = Code.OK
            if code is Code.OK:
                return then(self.runner.call("rcpt_ok", conn, recipient), accepted)
            row = outcome("rcpt", code)
            self._count(conn.rcpt_count, row.reply.code if row.reply else 550)
            self._act(row, result, shown)
            return None

        def accepted(result: HookResult) -> None:
            row = outcome("rcpt_ok", result.code)
            if row.then is Then.PROCEED and conn.transaction is txn:
                txn.rcpt_to.append(recipient)
                txn.rcpt_params.append(params)
            self._count(conn.rcpt_count, row.reply.code if row.reply else 250)
            self._act(row, result, shown)

        return then(self.runner.call("rcpt", conn, recipient, params), answered)
