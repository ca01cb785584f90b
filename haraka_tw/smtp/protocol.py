"""The ESMTP protocol: Twisted's C{ESMTP}, with every step handed to the hook runner.

This class is an adapter. It splits the byte stream into command lines, DATA and BDAT
chunks (parsing lives in L{haraka_tw.smtp.command}, L{haraka_tw.smtp.address},
L{haraka_tw.smtp.data}, L{haraka_tw.smtp.proxy}; message assembly in
L{haraka_tw.smtp.intake}), runs the hook for each step, and turns the deciding result into
a reply with the one table in L{haraka_tw.hooks.table}.

Commands are processed strictly one at a time, in order: while a hook is pending, further
input is held (and the socket paused past a bound), so pipelined replies never overtake
each other. Replies produced while working through one read are written in one go.

Stock C{ESMTP} defects this replaces (each pinned by a test): out-of-order replies with
asynchronous validators, no connect/helo hooks, 550 for every end-of-data failure,
overlong-line smuggling, STARTTLS plaintext injection, UnicodeDecodeError on non-ASCII
verbs, NOOP and VRFY unimplemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import Code, HookResult
from haraka_tw.hooks.runner import then
from haraka_tw.hooks.table import outcome
from haraka_tw.logging import Level
from haraka_tw.smtp import catalogue as S
from haraka_tw.smtp.command import Command
from haraka_tw.smtp.connection import Hello, forget_auth
from haraka_tw.smtp.envelope import Envelope
from haraka_tw.smtp.greeting import Greeting
from haraka_tw.smtp.receiving import Receiving
from haraka_tw.smtp.replies import Reply
from haraka_tw.smtp.session import SessionCore

__all__ = ["HarakaESMTP", "SessionCore"]


@implementer(IHandshakeListener, IPushProducer)
class HarakaESMTP(Greeting, Envelope, Receiving):
    """One SMTP session. Built by L{haraka_tw.smtp.factory.HarakaSMTPFactory}.

    The rooms: L{SessionCore} (framing, ordering, replies), L{Greeting} (PROXY, connect
    hooks, banner), L{Envelope} (HELO/EHLO/MAIL/RCPT), L{Receiving} (DATA/BDAT and the
    end of the message). This class adds the command table, the simple commands, and what
    plugins may ask of the session through L{Connection} (respond, read_line, start_tls).
    """

    _COMMAND_METHODS: ClassVar[Mapping[str, str]] = {
        verb: f"do_{verb}"
        for verb in (
            "HELO",
            "EHLO",
            "MAIL",
            "RCPT",
            "DATA",
            "BDAT",
            "RSET",
            "NOOP",
            "VRFY",
            "HELP",
            "QUIT",
            "PROXY",
        )
    }

    def respond(self, code: int, text: Any, enhanced: str | None) -> None:
        """A plugin's own reply, written now."""
        if isinstance(text, Reply):
            self._send(text)
        else:
            self._send(Reply.of(code, enhanced, text if text is not None else ""))
        self._flush()

    def disconnect(self) -> None:
        self._close()

    def unread_input(self) -> int:
        return len(self._inbuf)

    def read_line(self) -> Deferred[bytes]:
        if self._line_waiter is not None:
            raise RuntimeError("read_line() called while another read_line() is pending")

        def cancel(d: Deferred[bytes]) -> None:
            # The plugin gave up (its hook timed out): the next line is a command again.
            if self._line_waiter is d:
                self._line_waiter = None

        waiter: Deferred[bytes] = Deferred(canceller=cancel)
        if self._closing:
            waiter.errback(Failure(ConnectionError("connection closed")))
            return waiter
        self._line_waiter = waiter
        self._flush()
        self.callLater(0, self._pump)  # lines may already be buffered
        return waiter

    def start_tls(self, context_factory: Any) -> Deferred[None]:
        """STARTTLS, after the plugin's 220: discard pipelined plaintext (RFC 3207 4.2),
        start TLS, and forget everything the client said before it."""
        conn = self._conn
        if self._inbuf:
            conn.log(Level.NOTICE, f"discarded {len(self._inbuf)} bytes pipelined after STARTTLS")
            self._inbuf.clear()
        self._flush()
        self.transport.startTLS(context_factory)
        conn.tls.enabled = True
        conn.hello = Hello()
        conn.esmtp = False
        conn.capabilities = []
        forget_auth(conn)  # RFC 3207 4.2: nothing the client proved before TLS counts
        self._tls_waiter = Deferred()
        d = self._reset_transaction()
        waiter = self._tls_waiter
        return waiter if d is None else d.addCallback(lambda _: waiter)

    def handshakeCompleted(self) -> None:
        """TLS is up (STARTTLS or an implicit TLS port): record what was agreed."""
        conn = self._conn
        tls = conn.tls
        tls.enabled = True
        handle = self.transport.getHandle() if hasattr(self.transport, "getHandle") else None
        if handle is not None and hasattr(handle, "get_cipher_name"):
            tls.cipher = handle.get_cipher_name()
            tls.version = handle.get_protocol_version_name()
            cert = handle.get_peer_certificate()
            tls.peer_certificate = cert
            verify = getattr(handle, "get_verify_result", None)  # haraka_tw.tls records it
            tls.verify_error = verify() if verify is not None and cert is not None else None
            tls.verified = cert is not None and tls.verify_error == 0
        conn.log(Level.INFO, f"TLS {tls.version} {tls.cipher} verified={tls.verified}")
        self._reading_paused(self._held)  # reads held back during the handshake resume
        waiter, self._tls_waiter = self._tls_waiter, None
        if waiter is not None:
            waiter.callback(None)

    def do_RSET(self, cmd: Command) -> Deferred[Any] | None:
        if cmd.argument:
            self._send(S.S501_SYNTAX)
            return None
        d = self._reset_transaction()

        def run(_: Any = None) -> Deferred[Any] | None:
            # rset plugins are told; their answer does not change the 250.
            return then(
                self.runner.call("rset", self._conn),
                lambda _: self._act(outcome("rset", Code.CONT), HookResult(Code.CONT)),
            )

        return run() if d is None else d.addCallback(run)

    def do_NOOP(self, cmd: Command) -> Deferred[Any] | None:
        return then(
            self.runner.call("noop", self._conn), lambda r: self._act(outcome("noop", r.code), r)
        )

    def do_VRFY(self, cmd: Command) -> Deferred[Any] | None:
        return then(
            self.runner.call("vrfy", self._conn), lambda r: self._act(outcome("vrfy", r.code), r)
        )

    def do_HELP(self, cmd: Command) -> None:
        self._send(S.S214_HELP)

    def do_QUIT(self, cmd: Command) -> Deferred[Any] | None:
        if cmd.argument:
            self._send(S.S501_SYNTAX)
            return None
        row = outcome("quit", Code.CONT)
        reply = cast("Reply", row.reply)
        close_message = self.settings.close_message

        def answered(_: HookResult) -> None:
            if close_message:  # the operator's text (connection.ini [message] close)
                self._send(reply.with_text(close_message).fill(lambda n: self._field(n, "")))
            else:
                self._send_row(reply)
            self._close()

        return then(self.runner.call("quit", self._conn), answered)

    def _unrecognized_answered(self, result: HookResult) -> Deferred[Any] | None:
        conn = self._conn
        if result.code is Code.HOOK_NEXT:
            # The plugin says: treat this command as the core command it names.
            command = conn.current_command
            name = str(result.message or "").upper()
            handler = self._command_handler(name)
            if handler is not None and command is not None:
                alias = Command(
                    name, command.argument, command.raw, command.has_8bit, command.bad_bytes
                )
                return handler(alias)
            conn.log(Level.ERROR, f"HOOK_NEXT names no core command: {name!r}", result.plugin)
            result = HookResult(Code.CONT)
        self._act(outcome("unrecognized_command", result.code), result)
        return None
