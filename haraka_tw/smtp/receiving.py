"""Receiving the message: DATA, BDAT, and what happens at its end."""

from __future__ import annotations

import re
from collections.abc import Callable
from email.utils import formatdate
from functools import lru_cache
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from haraka_tw import __version__
from haraka_tw.codes import Code, HookResult
from haraka_tw.hooks.runner import then
from haraka_tw.hooks.table import Outcome, Then, outcome
from haraka_tw.logging import Level
from haraka_tw.smtp import catalogue as S
from haraka_tw.smtp.command import Command
from haraka_tw.smtp.connection import State, Transaction
from haraka_tw.smtp.data import BareNewline
from haraka_tw.smtp.intake import MessageEnd, MessageIntake
from haraka_tw.smtp.replies import Reply
from haraka_tw.smtp.session import SessionCore

__all__ = ["Receiving"]

_BDAT_ARGS = re.compile(r"^(\d{1,12})(?: +(LAST))? *$", re.IGNORECASE)


@lru_cache(maxsize=2)
def _rfc5322_date(second: int) -> str:
    """The local date and time for a Received header; formatted once per second."""
    return formatdate(second, localtime=True)


class Receiving(SessionCore):
    """DATA and BDAT into the transaction, then the end-of-message checks and hooks:
    max_data_exceeded or data_post, queue or queue_outbound, queue_ok, the reply."""

    _auth_results_shown = 0  # results in the Authentication-Results header added

    def _message_refusal(self) -> Reply | None:
        """Why DATA or a first BDAT cannot start now, or None."""
        txn = self._conn.transaction
        if txn is None:
            return S.S503_DATA_NO_MAIL
        if not txn.rcpt_to:
            # A pipelining client sends its body right behind DATA: say why it is refused.
            return S.S554_NO_VALID_RCPT if self._inbuf else S.S503_DATA_NO_RCPT
        return None

    def _start_message(
        self, started: Callable[[HookResult, Outcome], Deferred[Any] | None]
    ) -> Deferred[Any] | None:
        """Run the data hook; if it allows the message, set up the intake."""
        conn = self._conn

        def answered(result: HookResult) -> Deferred[Any] | None:
            row = outcome("data", result.code)
            txn = conn.transaction
            if row.then is Then.PROCEED and txn is not None:
                received = self._received_header(txn) if self.settings.add_received else None
                self._intake = MessageIntake(txn, self.settings, received)
                self.setTimeout(self.settings.data_timeout)
            return started(result, row)

        return then(self.runner.call("data", conn), answered)

    def do_DATA(self, cmd: Command) -> Deferred[Any] | None:
        if cmd.argument:
            self._send(S.S501_SYNTAX)
            return None
        if self._intake is not None:  # a message begun with BDAT
            self._send(S.S503_DATA_AFTER_BDAT)
            return None
        refusal = self._message_refusal()
        if refusal is not None:
            self._send(refusal)
            self._discard_pipelined_body()
            return None

        def started(result: HookResult, row: Outcome) -> Deferred[Any] | None:
            self._act(row, result)
            if row.then is not Then.PROCEED:
                self._discard_pipelined_body()
                return self._reset_transaction()  # as Haraka: a refused DATA ends the message
            self._conn.state = State.DATA
            self._in_data = True
            return None

        return self._start_message(started)

    def _discard_pipelined_body(self) -> None:
        """DATA was refused, but the client already sent more: a body sent without waiting
        for 354 (DATA must end a pipelined group). Read it to its CRLF.CRLF and drop it,
        so no line of it can run as a command."""
        if not self._inbuf or self._closing:
            return
        txn = self._conn.transaction or Transaction("discarded")
        self._intake = MessageIntake(txn, self.settings, None, discard=True)
        self._in_data = True

    def do_BDAT(self, cmd: Command) -> Deferred[Any] | None:
        """BDAT <size> [LAST] (RFC 3030). The chunk is always read, then answered."""
        m = _BDAT_ARGS.match(cmd.argument)
        if m is None:
            self._send(S.S501_BDAT)  # without a size the stream cannot be followed
            self._close()
            return None
        self._chunk_left = int(m.group(1))
        self._chunk_last = m.group(2) is not None
        self._chunk_refusal = None
        if not self._conn.esmtp:
            self._chunk_refusal = S.S503_BDAT_NEEDS_EHLO
        elif self._intake is None:
            self._chunk_refusal = self._message_refusal()
            if self._chunk_refusal is None:

                def started(result: HookResult, row: Outcome) -> Deferred[Any] | None:
                    if row.then is Then.PROCEED:
                        return self._chunk_progress()
                    self._chunk_refusal = self._reply_for(row, result) if row.reply else None
                    return self._reset_transaction()

                return self._start_message(started)
        return self._chunk_progress()

    def _take_message_bytes(self, data: bytes) -> bytes:
        """Give message bytes to the intake (a DATA stream or the current BDAT chunk);
        return what belongs to the command stream."""
        intake = self._intake
        if self._chunk_left:
            n = min(self._chunk_left, len(data))
            if self._chunk_refusal is None and intake is not None:
                intake.feed_chunk(data[:n])
            self._chunk_left -= n
            if not self._chunk_left:
                self._wait(self._attempt(self._chunk_progress))
            return data[n:]
        assert intake is not None
        rest = intake.feed_data(data)
        if rest is None:
            return b""
        self._in_data = False
        self._conn.state = State.CMD
        if intake.discard:
            self._intake = None
        else:
            self._wait(self._attempt(self._message_received))
        return rest

    def _chunk_progress(self) -> Deferred[Any] | None:
        """Once the whole chunk is read: refuse it, acknowledge it, or end the message."""
        if self._chunk_left:
            return None  # more of this chunk to come
        refusal, self._chunk_refusal = self._chunk_refusal, None
        if refusal is not None:
            self._send(refusal)
            return None
        if self._intake is None:
            return None
        if self._chunk_last:
            return self._message_received()
        self._send(Reply(250, "2.0.0", (f"{self._intake.size} octets received",)))
        return None

    def _received_header(self, txn: Transaction) -> str:
        conn, s = self._conn, self.settings
        proto = ("ESMTP" if conn.esmtp else "SMTP") + ("S" if conn.tls.enabled else "")
        proto += "A" if conn.notes.get("auth_user") else ""
        version = f" ({S.PRODUCT}/{__version__})" if s.show_version else ""
        tls = ""
        if conn.tls.enabled and conn.tls.cipher:
            tls = f"\n\ttls {conn.tls.version} {conn.tls.cipher}"
        sender = txn.mail_from.format() if txn.mail_from is not None else "<>"
        date = _rfc5322_date(int(self.factory.reactor.seconds()))
        return (
            f"from {conn.hello.host} ({self._remote_name()})\n"
            f"\tby {s.me}{version} with {proto} id {txn.uuid}\n"
            f"\tenvelope-from {sender}{tls};\n\t{date}"
        )

    def _message_received(self) -> Deferred[Any] | None:
        """The whole message is in: the core's checks, then data_post and the queue."""
        intake, self._intake = self._intake, None
        assert intake is not None
        self.setTimeout(self.settings.inactivity_timeout)
        end: MessageEnd = intake.finish()
        conn = self._conn
        txn = intake.transaction
        if end.long_lines:
            txn.notes["data_line_length_exceeded"] = True
        for error in end.plugin_errors:
            conn.log(Level.ERROR, f"attachment hook or body filter failed: {error!r}")
        if end.store_error is not None:
            conn.log(Level.ERROR, f"cannot store the message: {end.store_error}")
            return self._message_refused(S.S451_STORAGE)
        if end.too_many_parts:
            self._count(conn.msg_count, 554)
            self._send(S.S554_TOO_MANY_PARTS)
            self._close()
            return self._reset_transaction()
        bare = end.bare_lf or end.bare_cr
        if bare and self.settings.bare_newline is BareNewline.REJECT:
            conn.log(Level.INFO, f"bare newlines in message: lf={end.bare_lf} cr={end.bare_cr}")
            return self._message_refused(S.S550_BARE_NEWLINE)
        if txn.header.count("Received") > self.settings.header_max_received:
            return self._message_refused(S.S550_LOOP)
        if end.exceeded:
            return then(
                self.runner.call("max_data_exceeded", conn),
                lambda r: self._finish_message("max_data_exceeded", r),
            )
        self._auth_results_shown = self._show_auth_results(txn, 0)
        return then(self.runner.call("data_post", conn), self._data_post_answered)

    def _show_auth_results(self, txn: Transaction, shown: int) -> int:
        """As Haraka: one Authentication-Results header naming this host, with every
        plugin's result, on top. Made before data_post and made again after it when a
        data_post plugin (dkim) added results; C{shown} says how many the header made
        before holds (0: none was added). Returns how many it holds now."""
        conn_results = self._conn.auth_results_list
        if len(conn_results) + len(txn.auth_results_list) == shown:
            return shown
        results = [*conn_results, *txn.auth_results_list]
        value = "; ".join([self.settings.me, *results])
        if shown:
            txn.header.replace_first("Authentication-Results", value)
        else:
            txn.header.add("Authentication-Results", value)
        return len(results)

    def _message_refused(self, reply: Reply) -> Deferred[Any] | None:
        self._count(self._conn.msg_count, reply.code)
        self._send(reply)
        return self._reset_transaction()

    def _data_post_answered(self, result: HookResult) -> Deferred[Any] | None:
        row = outcome("data_post", result.code)
        if row.then is not Then.PROCEED:
            return self._finish_message("data_post", result)
        conn = self._conn
        if conn.transaction is not None:
            self._show_auth_results(conn.transaction, self._auth_results_shown)
        hook = "queue_outbound" if conn.relaying else "queue"
        return then(self.runner.call(hook, conn), lambda r: self._queue_answered(hook, r))

    def _queue_answered(self, hook: str, result: HookResult) -> Deferred[Any] | None:
        conn = self._conn
        if hook == "queue_outbound" and result.code is Code.CONT:
            outbound = self.factory.outbound
            if outbound is None:
                result = HookResult(Code.DENYSOFT, "Outbound delivery is not configured", "core")
            else:
                d: Deferred[Any] = outbound.queue_transaction(conn)
                return d.addCallbacks(
                    lambda _: self._queue_answered(hook, HookResult(Code.OK, None, "outbound")),
                    lambda f: self._outbound_failed(hook, f),
                )
        row = outcome(hook, result.code)
        if row.then is not Then.PROCEED or row.reply is None or not self.runner.has("queue_ok"):
            return self._finish_message(hook, result)
        reply = self._reply_for(row, result)
        return then(
            self.runner.call("queue_ok", conn, reply.text),
            lambda _: self._finish_message(hook, result, reply),
        )

    def _outbound_failed(self, hook: str, failure: Failure) -> Deferred[Any] | None:
        self._conn.log(Level.ERROR, f"outbound queue failed: {failure.getErrorMessage()}")
        return self._queue_answered(hook, HookResult(Code.DENYSOFT, None, "outbound"))

    def _finish_message(
        self, hook: str, result: HookResult, reply: Reply | None = None
    ) -> Deferred[Any] | None:
        """Reply to the end of the message, count it, and end the transaction."""
        row = outcome(hook, result.code)
        if reply is None:
            reply = self._answer(row, result)
        else:
            self._send(reply)
        self._count(self._conn.msg_count, reply.code)
        d = self._reset_transaction()
        if row.then is Then.CLOSE:
            self._close()
        elif row.then is Then.LOOP:
            self._loop(reply)
        return d
