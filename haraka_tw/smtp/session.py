"""The session core under the protocol: framing, ordering, flow control, replies.

See L{haraka_tw.smtp.protocol} for the class that puts the rooms together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import connectionDone
from twisted.mail import smtp
from twisted.python.failure import Failure

from haraka_tw.codes import HookResult
from haraka_tw.hooks.table import Outcome, Then
from haraka_tw.logging import Level
from haraka_tw.smtp import catalogue as S
from haraka_tw.smtp.command import Command, parse_command
from haraka_tw.smtp.connection import Connection, State
from haraka_tw.smtp.intake import MessageIntake
from haraka_tw.smtp.replies import Reply

if TYPE_CHECKING:
    from haraka_tw.smtp.factory import HarakaSMTPFactory


from haraka_tw.hooks.runner import HookRunner, then
from haraka_tw.smtp.settings import SessionSettings

__all__ = ["SessionCore"]

_HOLD_LIMIT = 256 * 1024  # input held while a hook runs before the socket is paused
_CLIENT_ERRORS = frozenset({500, 501, 502, 503, 504, 555})
_CLOSE_GRACE = 10.0  # seconds a closing client has to read our last words
_AUTH_LINE_LIMIT = 12288  # RFC 4954 4: lines of an AUTH exchange may be this long
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # a PROXY v2 header where a command should be


#: lines after an AUTH command that the protocol log treats as possible credentials
_LINES_AFTER_AUTH = 3
#: an AUTH command line, whatever comes before the verb (a NUL, spaces) or after it
_AUTH_LINE = re.compile(r"\W*AUTH(?:\s|$)", re.IGNORECASE)
#: SASL mechanism names (IANA) an AUTH line may show: anything else in their place is not
_SASL_NAMES = frozenset(
    {"PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "XOAUTH2", "OAUTHBEARER", "GSSAPI", "NTLM"}
    | {"EXTERNAL", "ANONYMOUS", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS"}
    | {"SCRAM-SHA-256-PLUS"}
)
#: one-word commands that plugins answer (not the core): shown after an AUTH all the same
_PLUGIN_VERBS = frozenset({"STARTTLS", "XCLIENT", "EXPN", "ETRN", "TURN", "ATRN"})


class SessionCore(smtp.ESMTP):
    """The session's machinery: input framing, one command at a time, flow control,
    output batching, closing, and turning hook results into replies.

    The rooms that build on it (greeting, envelope, receiving) and the protocol that
    composes them call each other through the methods declared at the end of this class.
    """

    factory: HarakaSMTPFactory
    transport: Any  # a TCP (or TLS, or unix) transport: pause/resumeProducing, abortConnection
    settings: SessionSettings
    runner: HookRunner
    # verb -> the name of its method: one table per class, looked up per command (a
    # per-session dict of bound methods cost 1.2 KB per connection)
    _COMMAND_METHODS: ClassVar[Mapping[str, str]] = {}
    # The connection, from connectionMade on: C{connection} without the None it starts as
    # (a property checking for None was some fifty calls per message).
    _conn: Connection

    def __init__(self) -> None:
        # Not smtp.ESMTP.__init__: the ten attributes it sets (mode, _from, _helo, _to,
        # delivery, ...) belong to the engine this class replaces, and with them a session
        # passes CPython's 30 shared-key attributes and gets a whole dict of its own.
        self.connection: Connection | None = None
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._busy = False
        self._closing = False
        self._paused = False  # reading from the socket is paused
        self._held = False  # too much input while a hook runs
        self._output_full = False  # the client is not reading our replies
        self._loop_reply: Reply | None = None
        self._after_auth = 0  # lines after an AUTH command whose unknown verbs are not logged
        self._on_idle: list[Callable[[], None]] = []
        self._line_waiter: Deferred[bytes] | None = None
        self._tls_waiter: Deferred[None] | None = None
        self._proxy_timer: Any = None
        self._abort_call: Any = None
        # A message being received: by DATA (_in_data), or by BDAT chunks (_chunk_left).
        self._intake: MessageIntake | None = None
        self._in_data = False
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_refusal: Reply | None = None  # a BDAT chunk read only to be refused

    def callLater(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any:
        """Timers on the factory's reactor (a task.Clock in tests). TimeoutMixin's own
        imports the global reactor on every call; a bound method per session would cost
        64 bytes each."""
        return self.factory.reactor.callLater(delay, fn, *args)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self._cancel_proxy_timer()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._in_data = False
        conn = self.connection
        self.factory.sessions.discard(self)
        if conn is None:
            return
        conn.remote.closed = True
        conn.state = State.DISCONNECTED
        self._closing = True  # nothing more is parsed: buffered commands die with the client
        self._drop_intake()
        self._chunk_left = 0
        self._inbuf.clear()
        for waiter in (self._line_waiter, self._tls_waiter):
            if waiter is not None and not waiter.called:
                waiter.errback(reason)
        self._line_waiter = self._tls_waiter = None
        # A hook may still be working on the transaction (a queue plugin writing the message
        # in a thread): end the transaction only once it has answered.
        self._when_idle(self._cleanup)

    def _cleanup(self) -> None:
        d = self._reset_transaction()
        if d is None:
            self._disconnected()
        else:
            d.addBoth(lambda _: self._disconnected())

    def _disconnected(self) -> None:
        conn = self._conn
        summarise = self.factory.log.enabled(Level.NOTICE)  # the summary is only built to be logged

        def ended(_: object) -> None:
            try:
                if summarise:
                    conn.log_fields(Level.NOTICE, "disconnect", conn.summary())
            finally:
                conn.detach()

        then(self.runner.call("disconnect", conn), ended)

    def timeoutConnection(self) -> None:
        """No input for the phase's timeout: 421 and close."""
        self._send(S.S421_TIMEOUT)
        self._close()

    def shutdown(self) -> None:
        """The server is stopping: 421 to the client and close."""
        self._send(S.S421_SHUTDOWN)
        self._close()

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client: message bytes in bulk, else into the command buffer."""
        if self._closing:
            return
        self.resetTimeout()
        conn = self._conn
        conn.bytes_in += len(data)
        if conn.state is State.PROXY:
            self._inbuf += data
            self._proxy_header()
            self._flush()
            return
        if conn.state is State.CONNECTING:
            conn.early_talker = True
        if (self._in_data or self._chunk_left) and not self._inbuf and not self._busy:
            data = self._take_message_bytes(data)
        self._inbuf += data
        self._pump()

    def _pump(self) -> None:
        """Work through buffered input until it runs out or a hook is pending."""
        while not self._closing and self._inbuf and not self._output_full:
            if self._line_waiter is not None:
                if not self._deliver_line():
                    break
                continue
            if self._busy:
                break
            if self._in_data or self._chunk_left:
                data = bytes(self._inbuf)
                self._inbuf.clear()
                self._inbuf[:0] = self._take_message_bytes(data)
                continue
            line = self._next_line(self.settings.max_line_length)
            if line is None:
                break
            self._command(line)
        if self._busy and len(self._inbuf) > _HOLD_LIMIT:
            self._held = True
        elif not self._busy and len(self._inbuf) < _HOLD_LIMIT // 4:
            self._held = False
        if (self._held or self._output_full) != self._paused:
            self._reading_paused(not self._paused)
        self._flush()

    def pauseProducing(self) -> None:
        self._output_full = True
        tls = self._conn.tls if self.connection is not None else None
        if tls is not None and tls.enabled and tls.cipher is None:
            # The TLS layer holds our output until its handshake is done; the handshake
            # needs us to keep reading, so only command processing waits.
            return
        self._reading_paused(True)

    def resumeProducing(self) -> None:
        self._output_full = False
        self._reading_paused(self._held)
        self._pump()

    def stopProducing(self) -> None:
        self._output_full = True

    def _reading_paused(self, paused: bool) -> None:
        """Stop or restart reading from the socket (input held, or output not drained)."""
        if paused == self._paused or self.transport is None:
            return
        self._paused = paused
        if paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def _next_line(self, limit: int) -> bytes | None:
        """Cut one line from the buffer; None to wait for more. Too long: 521 and close."""
        buf = self._inbuf
        first = buf[0] if buf else -1  # (an int: slices are made only for two first bytes)
        if first == 0x16 and bytes(buf[1:2]) in (b"", b"\x03"):
            # A TLS ClientHello on a plaintext port: say so in the clear, then close.
            self._send(S.S554_TLS_ON_PLAINTEXT)
            self._close()
            return None
        if first == 0x0D and buf[:4] == b"\r\n\r\n" and _V2_SIGNATURE.startswith(bytes(buf[:12])):
            if len(buf) < len(_V2_SIGNATURE):
                return None  # maybe a PROXY v2 header: wait for its signature to finish
            self.do_PROXY(parse_command(b"PROXY"))
            return None
        nl = buf.find(b"\n", 0, limit)
        if nl < 0:
            if len(buf) > limit:
                self._inbuf.clear()
                self._send(S.S521_LINE_TOO_LONG)
                self._close()
            return None
        line = bytes(buf[: nl + 1])
        del buf[: nl + 1]
        return line

    def _deliver_line(self) -> bool:
        """Hand the next raw line to a plugin waiting in read_line(); False to wait."""
        line = self._next_line(_AUTH_LINE_LIMIT)
        if line is None:
            return False
        waiter, self._line_waiter = self._line_waiter, None
        assert waiter is not None
        waiter.callback(line.rstrip(b"\r\n"))
        return True

    def _command(self, line: bytes) -> None:
        conn = self._conn
        cmd = parse_command(line)
        conn.current_command = cmd
        if self.factory.log.level >= Level.PROTOCOL:
            self._log(Level.PROTOCOL, f"C: {self._shown(cmd)}")
        if conn.state is State.LOOP and cmd.verb != "QUIT":
            assert self._loop_reply is not None
            self._send(self._loop_reply)
            return
        if cmd.bad_bytes:
            self._send(S.S501_BAD_BYTES)
            return
        if cmd.has_8bit and not (
            cmd.verb in ("MAIL", "RCPT") and self.settings.smtputf8 and conn.esmtp
        ):
            self._send(S.S501_8BIT)
            return
        if self._inbuf:
            conn.pipelining = True  # the client sent more before reading this reply
        handler = self._command_handler(cmd.verb)
        self._wait(self._attempt(handler or self._unrecognized, cmd))

    def _shown(self, cmd: Command) -> str:
        """The client's line for the protocol log, without credentials. An AUTH line keeps
        its mechanism only (a known SASL name; anything else may be the credentials of a
        client that left the name out). For the three lines after an AUTH command, a line
        of one word that is not a command is not shown: it may be the answer to an AUTH
        exchange the server gave up on (a timeout, a refusal the client did not wait
        for), which then arrives as a command. (The count is kept only while the protocol
        log is on: it serves that log alone.)"""
        shown = cmd.raw.decode("utf-8", "replace")
        words = shown.split()
        if _AUTH_LINE.match(shown):
            self._after_auth = _LINES_AFTER_AUTH
            named = words[1:2] if len(words) > 1 and words[1].upper() in _SASL_NAMES else []
            hidden = ["[redacted]"] if len(words) > 1 + len(named) else []
            return " ".join(["AUTH", *named, *hidden])
        if self._after_auth:
            self._after_auth -= 1
            known = self._command_handler(cmd.verb) is not None or cmd.verb in _PLUGIN_VERBS
            if len(words) == 1 and not known:
                return "[redacted: a line after AUTH]"
        return shown

    def _unrecognized(self, cmd: Command) -> Deferred[Any] | None:
        """A verb the core does not know: the unrecognized_command hook decides."""
        answer = self.runner.call("unrecognized_command", self._conn, cmd.verb, cmd.argument)
        return then(answer, self._unrecognized_answered)

    def _wait(self, d: Deferred[Any] | None) -> None:
        """Hold further commands until C{d} fires (at once, for synchronous hooks)."""
        if d is None:
            return
        finished: list[Any] = []
        d.addBoth(finished.append)
        if finished:
            if isinstance(finished[0], Failure):
                self._internal_error(finished[0])
            return
        self._busy = True

        def resume(result: Any) -> None:
            if isinstance(result, Failure):
                self._internal_error(result)
            self._set_idle()

        d.addBoth(lambda _: resume(finished[0]))

    def _command_handler(self, verb: str) -> Callable[[Command], Deferred[Any] | None] | None:
        """The method of a core command, or None."""
        name = self._COMMAND_METHODS.get(verb)
        return (
            None
            if name is None
            else cast("Callable[[Command], Deferred[Any] | None]", getattr(self, name))
        )

    @staticmethod
    def _attempt(step: Callable[..., Deferred[Any] | None], *args: Any) -> Deferred[Any] | None:
        """Run a step of the session; an exception becomes a failed Deferred, which
        L{_wait} answers with 451, as it does for a step after an asynchronous hook."""
        try:
            return step(*args)
        except Exception:
            return fail()

    def _set_idle(self) -> None:
        """The pending work is done: run what waited for it, then read on."""
        self._busy = False
        if self._on_idle:  # (no new list per command when nothing waits)
            waiting, self._on_idle = self._on_idle, []
            for fn in waiting:
                fn()
        self._pump()

    def _drop_intake(self) -> None:
        """Forget the message being received, if any (it is abandoned)."""
        intake, self._intake = self._intake, None
        if intake is not None:
            intake.close()

    def _when_idle(self, fn: Callable[[], None]) -> None:
        """Call C{fn} now, or once the pending hook has answered."""
        if self._busy:
            self._on_idle.append(fn)
        else:
            fn()

    def _reply_for(self, row: Outcome, result: HookResult, recipient: str = "") -> Reply:
        """The row's reply, with the plugin's text (or whole Reply) when it gave one, and
        the placeholders {me} {remote} {sender} {recipient} {uuid} filled."""
        base = row.reply if row.reply is not None else S.S451_INTERNAL
        given = result.message
        if isinstance(given, Reply):
            # A plugin's whole Reply stands (a DSN may turn 450 into 550), but it cannot
            # turn a refusal into a success or the other way round.
            if (given.code < 400) == (base.code < 400):
                return given
            given = list(given.lines)
            result = HookResult(result.code, given, result.plugin)
        text = result.text
        reply = base.with_text(text) if text else base
        return reply.fill(lambda name: self._field(name, recipient))  # (as is, if no field)

    def _field(self, name: str, recipient: str) -> str | None:
        """The value of a reply placeholder, computed only when a reply holds it."""
        conn = self._conn
        txn = conn.transaction
        if name == "me":
            return self.settings.me
        if name == "remote":
            return self._remote_name()
        if name == "sender":
            return txn.mail_from.format() if txn is not None and txn.mail_from else "<>"
        if name == "recipient":
            return recipient or "<>"
        if name == "uuid":
            return txn.uuid if txn is not None else conn.uuid
        return None

    def _act(self, row: Outcome, result: HookResult, recipient: str = "") -> None:
        """Reply as the row says and move to its next state."""
        if row.reply is None:
            return
        reply = self._answer(row, result, recipient)
        if row.then is Then.CLOSE:
            self._close()
        elif row.then is Then.LOOP:
            self._loop(reply)

    def _answer(self, row: Outcome, result: HookResult, recipient: str = "") -> Reply:
        """Send the row's reply (see L{_reply_for}); return it, filled for a LOOP row (which
        keeps it), else with the code sent. A plugin that gave no text, the usual answer,
        costs no new Reply: the row's is filled as it is encoded."""
        if result.message is None and row.then is not Then.LOOP:
            base = row.reply if row.reply is not None else S.S451_INTERNAL
            self._send_row(base, recipient)
            return base
        reply = self._reply_for(row, result, recipient)
        self._send(reply)
        return reply

    def _loop(self, reply: Reply) -> None:
        self._conn.state = State.LOOP
        self._loop_reply = reply

    def _reset_transaction(self) -> Deferred[Any] | None:
        """End the open transaction (running reset_transaction); None when there is none."""
        conn = self._conn
        txn = conn.transaction
        self._drop_intake()
        self._in_data = False
        if txn is None:
            return None

        def drop(_: Any = None) -> None:
            if conn.transaction is txn:
                conn.transaction = None
            try:
                txn.close()
            except Exception as e:  # releasing the spool must not cost the client a reply
                conn.log(Level.ERROR, f"closing the transaction failed: {e!r}")

        told = self.runner.call("reset_transaction", conn)
        if type(told) is HookResult:  # (not isinstance(told, Deferred): an ABC check)
            drop()
            return None
        return cast("Deferred[Any]", told).addBoth(drop)

    @staticmethod
    def _count(counts: Any, code: int) -> None:
        """Count a reply as accept, tempfail or reject."""
        if code < 400:
            counts.accept += 1
        elif code < 500:
            counts.tempfail += 1
        else:
            counts.reject += 1

    def _send(self, reply: Reply) -> None:
        """Send a reply as it stands (filled already, or with no placeholders)."""
        conn = self._conn
        self._send_wire(conn, reply.code, reply.to_bytes(conn.esmtp))

    def _send_row(self, reply: Reply, recipient: str = "") -> None:
        """Send a reply of the hook table with its placeholders filled (L{_field})."""
        conn = self._conn
        self._send_wire(conn, reply.code, reply.render(conn.esmtp, self._field, recipient))

    def _send_wire(self, conn: Connection, code: int, data: bytes) -> None:
        """Queue a reply's bytes for the next flush, unless the session is ending."""
        if conn.remote.closed or self._closing:
            return
        if code in _CLIENT_ERRORS:
            conn.errors += 1  # as Haraka: syntax and sequence errors count against the client
        conn.last_reply = data
        if self.factory.log.level >= Level.PROTOCOL:
            self._log(Level.PROTOCOL, f"S: {conn.last_response}")
        self._out.append(data)

    def _flush(self) -> None:
        if self._out and self.transport is not None:
            data = b"".join(self._out)
            self._out.clear()
            self.transport.write(data)

    def _close(self) -> None:
        if self._closing:
            return
        self._flush()
        self._closing = True
        self._conn.state = State.DISCONNECTING
        self._inbuf.clear()
        self._reading_paused(False)
        # A registered producer holds back the TLS close_notify and the TCP close.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        # A client that never reads would keep the socket (and our output) for ever. A timer
        # of its own: moving the inactivity timer sooner would make Twisted search its heap.
        # (Even with nothing left in Twisted's buffer: the kernel's may be full, and Twisted
        # closes only once epoll says the socket is writable.)
        self.setTimeout(None)
        self._abort_call = self.callLater(_CLOSE_GRACE, lambda: self.transport.abortConnection())

    def _internal_error(self, failure: Failure) -> None:
        """A bug in the core or an unexpected failure: log it, answer 451, carry on."""
        self.factory.log.log(
            Level.CRIT,
            f"internal error: {failure.getTraceback()}",
            uuid=self.connection.uuid if self.connection else None,
        )
        self._send(S.S451_INTERNAL)
        self._flush()

    def _remote_name(self) -> str:
        remote = self._conn.remote
        return f"{remote.host} [{remote.ip}]" if remote.host else f"[{remote.ip}]"

    def _log(self, level: Level, message: str) -> None:
        if self.factory.log.enabled(level):
            self._conn.log(level, message)

    # -- provided by the rooms built on this one -----------------------------------------

    def _proxy_header(self) -> None:
        raise NotImplementedError

    def _cancel_proxy_timer(self) -> None:
        raise NotImplementedError

    def do_PROXY(self, cmd: Command) -> None:
        raise NotImplementedError

    def _take_message_bytes(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _unrecognized_answered(self, result: HookResult) -> Deferred[Any] | None:
        raise NotImplementedError
