"""The ESMTP protocol: Twisted's C{ESMTP}, with every step handed to the hook runner.

This class is an adapter. It splits the byte stream into command lines and DATA (parsing
lives in L{haraka_tw.smtp.command}, L{haraka_tw.smtp.address} and L{haraka_tw.smtp.data}),
runs the hook for each step, and turns the deciding result into a reply with the one table
in L{haraka_tw.hooks.table}.

Commands are processed strictly one at a time, in order: while a hook is pending, further
input is held (and the socket paused past a bound), so pipelined replies never overtake
each other. Replies produced while working through one read are written in one go.

Stock C{ESMTP} defects this replaces (each pinned by a test): out-of-order replies with
asynchronous validators, no connect/helo hooks, 550 for every end-of-data failure,
overlong-line smuggling, STARTTLS plaintext injection, UnicodeDecodeError on non-ASCII
verbs, NOOP and VRFY unimplemented.
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.mail import smtp
from twisted.python.failure import Failure

from haraka_tw import __version__
from haraka_tw.codes import Code, HookResult
from haraka_tw.hooks.table import Outcome, Then, outcome
from haraka_tw.logging import Level
from haraka_tw.message.header import Header, HeaderCollector
from haraka_tw.smtp.address import AddressError, parse_mail_argument, parse_rcpt_argument
from haraka_tw.smtp.command import Command, parse_command
from haraka_tw.smtp.connection import Connection, Hello, Local, Remote, State, Transaction
from haraka_tw.smtp.data import BareNewline, DataReader
from haraka_tw.smtp.replies import Reply

if TYPE_CHECKING:
    from haraka_tw.smtp.factory import HarakaSMTPFactory

__all__ = ["HarakaESMTP"]

PRODUCT = "Haraka_tw"
_HOLD_LIMIT = 256 * 1024  # input held while a hook runs before the socket is paused
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


def _r(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply.of(code, enhanced, text)


# The replies the core sends itself, outside the hook table.
S501_SYNTAX = _r(501, "5.5.4", "Syntax error")
S501_HELO = _r(501, "5.5.4", "HELO requires domain/address")
S501_EHLO = _r(501, "5.5.4", "EHLO requires domain/address")
S501_BAD_BYTES = _r(501, "5.5.2", "Syntax error: control characters or NUL in command")
S501_8BIT = _r(501, "5.5.2", "Syntax error: 8-bit characters in command")
S501_MAIL = _r(501, "5.1.7", "Invalid MAIL FROM address")
S501_RCPT = _r(501, "5.1.3", "Invalid RCPT TO address")
S503_HELO_FIRST = _r(503, "5.5.1", "Use EHLO/HELO before MAIL")
S503_MAIL_FIRST = _r(503, "5.5.1", "Use MAIL before RCPT")
S503_DATA_NO_MAIL = _r(503, "5.5.1", "MAIL required first")
S503_DATA_NO_RCPT = _r(503, "5.5.1", "RCPT required first")
S554_NO_VALID_RCPT = _r(554, "5.5.1", "No valid recipients")
S555_PARAMS = _r(555, "5.5.4", "Invalid command parameters")
S553_UTF8 = _r(553, "5.6.7", "UTF-8 addresses require the SMTPUTF8 parameter")
S452_TOO_MANY_RCPTS = _r(452, "4.5.3", "Too many recipients")
S550_TOO_BIG = _r(550, "5.3.4", "Message too big!")
S550_BARE_NEWLINE = _r(
    550, "5.6.0", "Bare LF or CR in message: lines must end with CRLF (see RFC 5321 2.3.8)"
)
S550_LOOP = _r(550, "5.4.6", "Too many received headers - possible mail loop")
S521_LINE_TOO_LONG = _r(521, "5.5.2", "Command line too long")
S421_TIMEOUT = _r(421, "4.4.2", "timeout, closing connection")
S421_SHUTDOWN = _r(421, "4.3.2", "server shutting down, closing connection")
S451_INTERNAL = _r(451, "4.3.0", "Internal error, try again later")
S214_HELP = _r(214, "2.0.0", f"This is {PRODUCT}/{__version__}; see RFC 5321")


class HarakaESMTP(smtp.ESMTP):
    """One SMTP session. Built by L{haraka_tw.smtp.factory.HarakaSMTPFactory}."""

    factory: HarakaSMTPFactory
    transport: Any  # a TCP (or TLS, or unix) transport: pause/resumeProducing, abortConnection

    def __init__(self) -> None:
        smtp.ESMTP.__init__(self)
        self.connection: Connection | None = None
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._busy = False
        self._closing = False
        self._paused = False
        self._loop_reply: Reply | None = None
        self._reader: DataReader | None = None
        self._headers: HeaderCollector | None = None
        self._received: str | None = None
        self._quit_seen = False
        self._on_idle: list[Callable[[], None]] = []
        self._line_waiter: Deferred[bytes] | None = None
        self._commands: dict[str, Callable[[Command], Deferred[Any] | None]] = {
            "HELO": self.do_HELO,
            "EHLO": self.do_EHLO,
            "MAIL": self.do_MAIL,
            "RCPT": self.do_RCPT,
            "DATA": self.do_DATA,
            "RSET": self.do_RSET,
            "NOOP": self.do_NOOP,
            "VRFY": self.do_VRFY,
            "HELP": self.do_HELP,
            "QUIT": self.do_QUIT,
        }

    # -- connection life -----------------------------------------------------------------

    def connectionMade(self) -> None:
        """Run connect_init, lookup_rdns and connect; greet only when they allow it."""
        self.settings = self.factory.settings
        self.runner = self.factory.runner
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.connection = Connection(
            Remote(getattr(peer, "host", "") or "", getattr(peer, "port", 0) or 0),
            Local(getattr(host, "host", "") or "", getattr(host, "port", 0) or 0, self.settings.me),
            server_notes=self.factory.server_notes,
            log=self.factory.log,
            respond=self._plugin_respond,
            disconnect=self._close,
        )
        self.factory.sessions.add(self)
        self.setTimeout(self.settings.inactivity_timeout)
        self._log(
            Level.PROTOCOL,
            f"connect ip={self.connection.remote.ip} port={self.connection.remote.port}",
        )
        self._busy = True
        d = self.runner.run("connect_init", self.connection)
        d.addCallback(lambda _: self.runner.run("lookup_rdns", self.connection))
        d.addCallback(self._rdns_answered)
        d.addErrback(self._internal_error)

    def _rdns_answered(self, result: HookResult) -> Deferred[Any] | None:
        """A denial ends the greeting; OK (with a name) skips the core lookup; else look up."""
        conn = self._conn
        row = outcome("lookup_rdns", result.code)
        if row.then is not Then.PROCEED:
            self._greeting_done(row, result)
            return None
        if result.code is Code.OK:
            if isinstance(result.message, str) and result.message:
                conn.remote.host = result.message
            return self.runner.run("connect", conn).addCallback(self._connect_answered)

        def named(host: str | None) -> Deferred[HookResult]:
            conn.remote.host = host
            return self.runner.run("connect", conn)

        d = self.factory.rdns.lookup(conn.remote.ip)
        return d.addCallback(named).addCallback(self._connect_answered)

    def _connect_answered(self, result: HookResult) -> None:
        self._greeting_done(outcome("connect", result.code), result)

    def _greeting_done(self, row: Outcome, result: HookResult) -> None:
        """Send the banner (a connect plugin's text replaces it) or the denial; then read."""
        if row.then is Then.PROCEED:
            self._conn.state = State.CMD
            if isinstance(result.message, Reply):
                self._send(result.message)
            else:
                banner = self._banner()
                self._send(banner.with_text(result.text) if result.text else banner)
        else:
            self._act(row, result)
        self._set_idle()

    def _banner(self) -> Reply:
        s = self.settings
        if s.greeting:
            lines = list(s.greeting)
        else:
            version = f"/{__version__}" if s.show_version else ""
            lines = [f"{s.me} ESMTP {PRODUCT}{version} ready"]
        if s.banner_chars:
            lines[0] += f" ({self._conn.uuid[: s.banner_chars]})"
        return Reply(220, None, tuple(lines))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        conn = self.connection
        self.factory.sessions.discard(self)
        if conn is None:
            return
        conn.remote.closed = True
        conn.state = State.DISCONNECTED
        self._closing = True  # nothing more is parsed: buffered commands die with the client
        self._reader = None
        self._inbuf.clear()
        if self._line_waiter is not None:
            waiter, self._line_waiter = self._line_waiter, None
            waiter.errback(reason)
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
        d = self.runner.run("disconnect", conn)
        d.addBoth(lambda _: conn.log(Level.NOTICE, "disconnect", **conn.summary()))

    def timeoutConnection(self) -> None:
        """No input for inactivity_timeout seconds: 421 and close."""
        self._send(S421_TIMEOUT)
        self._close()

    def shutdown(self) -> None:
        """The server is stopping: 421 to the client and close."""
        self._send(S421_SHUTDOWN)
        self._close()

    # -- input -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client: to the DATA reader in bulk, else to the command buffer."""
        if self._closing:
            return
        self.resetTimeout()
        conn = self._conn
        conn.bytes_in += len(data)
        if conn.state is State.CONNECTING:
            conn.early_talker = True
        if self._reader is not None and not self._inbuf and not self._busy:
            self._feed_message(data)
        else:
            self._inbuf += data
        self._pump()

    def _pump(self) -> None:
        """Work through buffered input until it runs out or a hook is pending."""
        limit = self.settings.max_line_length
        while not self._busy and not self._closing and self._inbuf:
            if self._reader is not None:
                data = bytes(self._inbuf)
                self._inbuf.clear()
                self._feed_message(data)
                continue
            nl = self._inbuf.find(b"\n")
            if nl < 0:
                if len(self._inbuf) > limit:
                    self._inbuf.clear()
                    self._send(S521_LINE_TOO_LONG)
                    self._close()
                break
            if nl + 1 > limit:
                self._inbuf.clear()
                self._send(S521_LINE_TOO_LONG)
                self._close()
                break
            line = bytes(self._inbuf[: nl + 1])
            del self._inbuf[: nl + 1]
            self._command(line)
        if self._busy and not self._paused and len(self._inbuf) > _HOLD_LIMIT:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not self._busy and len(self._inbuf) < _HOLD_LIMIT // 4:
            self._paused = False
            self.transport.resumeProducing()
        self._flush()

    def _command(self, line: bytes) -> None:
        conn = self._conn
        cmd = parse_command(line)
        conn.current_command = cmd
        self._log(Level.PROTOCOL, f"C: {cmd.raw.decode('utf-8', 'replace')}")
        if conn.state is State.LOOP and cmd.verb != "QUIT":
            assert self._loop_reply is not None
            self._send(self._loop_reply)
            return
        if cmd.bad_bytes:
            conn.errors += 1
            self._send(S501_BAD_BYTES)
            return
        if cmd.has_8bit and not (
            cmd.verb in ("MAIL", "RCPT") and self.settings.smtputf8 and conn.esmtp
        ):
            conn.errors += 1
            self._send(S501_8BIT)
            return
        handler = self._commands.get(cmd.verb)
        if handler is None:
            d = self.runner.run("unrecognized_command", conn, cmd.verb, cmd.argument)
            self._wait(d.addCallback(self._unrecognized_answered))
        else:
            self._wait(handler(cmd))

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

    def _set_idle(self) -> None:
        """The pending work is done: run what waited for it, then read on."""
        self._busy = False
        waiting, self._on_idle = self._on_idle, []
        for fn in waiting:
            fn()
        self._pump()

    def _when_idle(self, fn: Callable[[], None]) -> None:
        """Call C{fn} now, or once the pending hook has answered."""
        if self._busy:
            self._on_idle.append(fn)
        else:
            fn()

    # -- commands --------------------------------------------------------------------

    def do_HELO(self, cmd: Command) -> Deferred[Any] | None:
        return self._hello("HELO", cmd)

    def do_EHLO(self, cmd: Command) -> Deferred[Any] | None:
        return self._hello("EHLO", cmd)

    def _hello(self, verb: str, cmd: Command) -> Deferred[Any] | None:
        conn = self._conn
        host = cmd.argument.strip()
        if not host:
            self._send(S501_EHLO if verb == "EHLO" else S501_HELO)
            return None
        d = self._reset_transaction()
        conn.hello = Hello(verb, host)
        conn.esmtp = verb == "EHLO"
        hook = verb.lower()

        def run(_: Any = None) -> Deferred[Any]:
            return self.runner.run(hook, conn, host).addCallback(answered)

        def answered(result: HookResult) -> Deferred[Any] | None:
            row = outcome(hook, result.code)
            if row.then is not Then.PROCEED:
                conn.hello = Hello()  # a refused greeting is no greeting: MAIL needs a new one
                self._act(row, result)
                return None
            if not result.text and self.settings.helo_message:
                result = HookResult(result.code, self.settings.helo_message, result.plugin)
            greeting = self._reply_for(outcome("helo", Code.CONT), result)
            if verb == "HELO":
                self._send(greeting)
                return None
            conn.capabilities = self._capabilities()
            return self.runner.run("capabilities", conn).addCallback(
                lambda _: self._send(Reply(250, None, (*greeting.lines, *conn.capabilities)))
            )

        return run() if d is None else d.addCallback(run)

    def _capabilities(self) -> list[str]:
        caps = ["PIPELINING", "8BITMIME"]
        if self.settings.smtputf8:
            caps.append("SMTPUTF8")
        caps.append("ENHANCEDSTATUSCODES")
        caps.append(f"SIZE {self.settings.max_bytes}" if self.settings.max_bytes else "SIZE")
        return caps

    def do_MAIL(self, cmd: Command) -> Deferred[Any] | None:
        conn = self._conn
        if conn.hello.host is None:
            self._send(S503_HELO_FIRST)
            return None
        try:
            sender, params = parse_mail_argument(
                cmd.argument,
                strict=self.settings.strict_rfc1869,
                allow_utf8=self.settings.smtputf8 and conn.esmtp,
            )
        except AddressError as e:
            self._send(S501_MAIL.with_text(f"Invalid MAIL FROM address: {e}"))
            return None
        problem = self._check_params(params, _MAIL_PARAMS)
        if problem is None and sender.is_utf8 and "SMTPUTF8" not in params:
            problem = S553_UTF8
        if problem is None:
            problem = self._check_size(params)
        if problem is not None:
            self._send(problem)
            return None
        d = self._reset_transaction()

        def run(_: Any = None) -> Deferred[Any]:
            conn.tran_count += 1
            s = self.settings
            txn = Transaction(f"{conn.uuid}.{conn.tran_count}", s.spool_dir, s.spool_after)
            txn.mail_from, txn.mail_params = sender, params
            conn.transaction = txn
            return self.runner.run("mail", conn, sender, params).addCallback(answered)

        def answered(result: HookResult) -> Deferred[Any] | None:
            row = outcome("mail", result.code)
            self._act(row, result)
            if row.then is not Then.PROCEED:
                return self._reset_transaction()
            return None

        return run() if d is None else d.addCallback(run)

    def _check_params(self, params: dict[str, str | None], known: frozenset[str]) -> Reply | None:
        if params and not self._conn.esmtp:
            return S555_PARAMS
        unknown = sorted(set(params) - known)
        if unknown:
            return S555_PARAMS.with_text(f"Unsupported parameter {unknown[0]}")
        body = params.get("BODY")
        if body is not None and body.upper() not in ("7BIT", "8BITMIME"):
            return S501_SYNTAX.with_text(f"Unsupported BODY={body}")
        return None

    def _check_size(self, params: dict[str, str | None]) -> Reply | None:
        size = params.get("SIZE")
        if size is None:
            return None
        if not size.isdigit():
            return S501_SYNTAX.with_text("SIZE must be a number")
        if self.settings.max_bytes and int(size) > self.settings.max_bytes:
            return S550_TOO_BIG
        return None

    def do_RCPT(self, cmd: Command) -> Deferred[Any] | None:
        conn = self._conn
        txn = conn.transaction
        if txn is None:
            self._send(S503_MAIL_FIRST)
            return None
        try:
            recipient, params = parse_rcpt_argument(
                cmd.argument,
                strict=self.settings.strict_rfc1869,
                allow_utf8=self.settings.smtputf8 and conn.esmtp,
            )
        except AddressError as e:
            self._send(S501_RCPT.with_text(f"Invalid RCPT TO address: {e}"))
            return None
        problem = self._check_params(params, _RCPT_PARAMS)
        if problem is None and recipient.is_utf8 and "SMTPUTF8" not in txn.mail_params:
            problem = S553_UTF8
        if problem is None and len(txn.rcpt_to) >= self.settings.max_recipients:
            problem = S452_TOO_MANY_RCPTS
        if problem is not None:
            self._count_rcpt(problem.code)
            self._send(problem)
            return None
        shown = recipient.format()

        def answered(result: HookResult) -> Deferred[Any] | None:
            code = result.code
            if code is Code.CONT and conn.relaying:
                code = Code.OK
            if code is Code.OK:
                return self.runner.run("rcpt_ok", conn, recipient).addCallback(accepted)
            row = outcome("rcpt", code)
            self._count_rcpt(row.reply.code if row.reply else 550)
            self._act(row, result, shown)
            return None

        def accepted(result: HookResult) -> None:
            row = outcome("rcpt_ok", result.code)
            if row.then is Then.PROCEED and conn.transaction is txn:
                txn.rcpt_to.append(recipient)
                txn.rcpt_params.append(params)
            self._count_rcpt(row.reply.code if row.reply else 250)
            self._act(row, result, shown)

        return self.runner.run("rcpt", conn, recipient, params).addCallback(answered)

    def _count_rcpt(self, code: int) -> None:
        counts = self._conn.rcpt_count
        if code < 400:
            counts.accept += 1
        elif code < 500:
            counts.tempfail += 1
        else:
            counts.reject += 1

    def do_DATA(self, cmd: Command) -> Deferred[Any] | None:
        conn = self._conn
        txn = conn.transaction
        if cmd.argument:
            self._send(S501_SYNTAX)
            return None
        if txn is None:
            self._send(S503_DATA_NO_MAIL)
            return None
        if not txn.rcpt_to:
            # A pipelining client sends its body right behind DATA: say why it is refused.
            self._send(S554_NO_VALID_RCPT if self._inbuf else S503_DATA_NO_RCPT)
            return None

        def answered(result: HookResult) -> Deferred[Any] | None:
            row = outcome("data", result.code)
            if row.then is not Then.PROCEED:
                self._act(row, result)
                return self._reset_transaction()  # as Haraka: a refused DATA ends the message
            s = self.settings
            self._received = self._received_header(txn)
            self._headers = HeaderCollector(max_lines=s.header_max_lines)
            self._reader = DataReader(
                self._body_sink,
                max_bytes=s.max_bytes,
                max_line_length=s.max_data_line_length,
                bare_newline=s.bare_newline,
            )
            conn.state = State.DATA
            self._act(row, result)
            return None

        return self.runner.run("data", conn).addCallback(answered)

    def _received_header(self, txn: Transaction) -> str:
        conn, s = self._conn, self.settings
        esmtp = conn.esmtp
        proto = ("ESMTP" if esmtp else "SMTP") + ("S" if conn.tls.enabled else "")
        proto += "A" if conn.notes.get("auth_user") else ""
        version = f" ({PRODUCT}/{__version__})" if s.show_version else ""
        tls = f"\n\ttls {conn.tls.cipher}" if conn.tls.enabled and conn.tls.cipher else ""
        sender = txn.mail_from.format() if txn.mail_from is not None else "<>"
        return (
            f"from {conn.hello.host} ({self._remote_name()})\n"
            f"\tby {s.me}{version} with {proto} id {txn.uuid}\n"
            f"\tenvelope-from {sender}{tls};\n\t{formatdate(localtime=True)}"
        )

    def _body_sink(self, data: bytes) -> None:
        txn = self._conn.transaction
        if txn is None:
            return
        collector = self._headers
        if collector is not None and not collector.done:
            split = collector.feed(data)
            if split is None:
                return
            self._header_done(txn, *split)
            return
        txn.message_stream.write(data)

    def _header_done(self, txn: Transaction, head: bytes, body: bytes) -> None:
        header = Header.parse(head)
        if self.settings.clean_auth_results:
            header.rename("Authentication-Results", "Original-Authentication-Results")
        if self.settings.add_received and self._received:
            header.add("Received", self._received)
        txn.header = header
        txn.message_stream.header = header
        txn.message_stream.write(body)

    def _feed_message(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        rest = reader.feed(data)
        if rest is None:
            return
        self._reader = None
        if rest:
            self._inbuf[:0] = rest
        txn = self._conn.transaction
        if txn is not None and self._headers is not None and not self._headers.done:
            self._header_done(txn, *self._headers.finish())
        self._headers = None
        self._conn.state = State.CMD
        self._wait(self._message_received(reader))

    # -- end of data ----------------------------------------------------------------------

    def _message_received(self, reader: DataReader) -> Deferred[Any] | None:
        conn = self._conn
        txn = conn.transaction
        assert txn is not None
        txn.data_bytes = reader.size
        if reader.long_lines:
            txn.notes["data_line_length_exceeded"] = True
        if (reader.bare_lf or reader.bare_cr) and self.settings.bare_newline is BareNewline.REJECT:
            conn.log(
                Level.INFO, f"bare newlines in message: lf={reader.bare_lf} cr={reader.bare_cr}"
            )
            return self._message_refused(S550_BARE_NEWLINE)
        if len(txn.header.get_all("Received")) > self.settings.header_max_received:
            return self._message_refused(S550_LOOP)
        if reader.exceeded:
            d = self.runner.run("max_data_exceeded", conn)
            return d.addCallback(lambda r: self._finish_message("max_data_exceeded", r))
        return self.runner.run("data_post", conn).addCallback(self._data_post_answered)

    def _message_refused(self, reply: Reply) -> Deferred[Any] | None:
        self._count_msg(reply.code)
        self._send(reply)
        return self._reset_transaction()

    def _data_post_answered(self, result: HookResult) -> Deferred[Any] | None:
        row = outcome("data_post", result.code)
        if row.then is not Then.PROCEED:
            return self._finish_message("data_post", result)
        conn = self._conn
        hook = "queue_outbound" if conn.relaying else "queue"
        d = self.runner.run(hook, conn)
        return d.addCallback(lambda r: self._queue_answered(hook, r))

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
                    lambda f: self._queue_answered(
                        hook, HookResult(Code.DENYSOFT, f"Queueing failed: {f.getErrorMessage()}")
                    ),
                )
        row = outcome(hook, result.code)
        if row.then is not Then.PROCEED or row.reply is None:
            return self._finish_message(hook, result)
        reply = self._reply_for(row, result)
        return self.runner.run("queue_ok", conn, reply.text).addCallback(
            lambda _: self._finish_message(hook, result, reply)
        )

    def _finish_message(
        self, hook: str, result: HookResult, reply: Reply | None = None
    ) -> Deferred[Any] | None:
        """Reply to the end of DATA, count the message, and end the transaction."""
        row = outcome(hook, result.code)
        reply = reply or self._reply_for(row, result)
        self._count_msg(reply.code)
        self._send(reply)
        d = self._reset_transaction()
        if row.then is Then.CLOSE:
            self._close()
        elif row.then is Then.LOOP:
            self._loop(reply)
        return d

    def _count_msg(self, code: int) -> None:
        counts = self._conn.msg_count
        if code < 400:
            counts.accept += 1
        elif code < 500:
            counts.tempfail += 1
        else:
            counts.reject += 1

    # -- the simple commands -------------------------------------------------------

    def do_RSET(self, cmd: Command) -> Deferred[Any] | None:
        if cmd.argument:
            self._send(S501_SYNTAX)
            return None
        d = self._reset_transaction()

        def run(_: Any = None) -> Deferred[Any]:
            # rset plugins are told; their answer does not change the 250.
            return self.runner.run("rset", self._conn).addCallback(
                lambda _: self._act(outcome("rset", Code.CONT), HookResult(Code.CONT))
            )

        return run() if d is None else d.addCallback(run)

    def do_NOOP(self, cmd: Command) -> Deferred[Any]:
        return self.runner.run("noop", self._conn).addCallback(
            lambda r: self._act(outcome("noop", r.code), r)
        )

    def do_VRFY(self, cmd: Command) -> Deferred[Any]:
        return self.runner.run("vrfy", self._conn).addCallback(
            lambda r: self._act(outcome("vrfy", r.code), r)
        )

    def do_HELP(self, cmd: Command) -> None:
        self._send(S214_HELP)

    def do_QUIT(self, cmd: Command) -> Deferred[Any] | None:
        if cmd.argument:
            self._send(S501_SYNTAX)
            return None
        if self._quit_seen:
            return None
        self._quit_seen = True
        row = outcome("quit", Code.CONT)
        reply = self._reply_for(row, HookResult(Code.CONT))
        if self.settings.close_message:
            reply = reply.with_text(self.settings.close_message)

        def answered(_: HookResult) -> None:
            self._send(reply)
            self._close()

        return self.runner.run("quit", self._conn).addCallback(answered)

    def _unrecognized_answered(self, result: HookResult) -> Deferred[Any] | None:
        conn = self._conn
        if result.code is Code.HOOK_NEXT:
            # The plugin says: treat this command as the core command it names.
            command = conn.current_command
            handler = self._commands.get(str(result.message or "").upper())
            if handler is not None and command is not None:
                alias = Command(
                    str(result.message).upper(),
                    command.argument,
                    command.raw,
                    command.has_8bit,
                    command.bad_bytes,
                )
                return handler(alias)
            conn.log(
                Level.ERROR, f"HOOK_NEXT names no core command: {result.message!r}", result.plugin
            )
            result = HookResult(Code.CONT)
        if result.code in (Code.CONT, Code.DENY):
            conn.errors += 1
        self._act(outcome("unrecognized_command", result.code), result)
        return None

    # -- acting on results ---------------------------------------------------------

    def _reply_for(self, row: Outcome, result: HookResult, recipient: str = "") -> Reply:
        """The row's reply, with the plugin's text (or whole Reply) when it gave one, and
        the placeholders {me} {remote} {sender} {recipient} {uuid} filled."""
        if isinstance(result.message, Reply):
            return result.message
        assert row.reply is not None
        reply = row.reply.with_text(result.text) if result.text else row.reply
        conn = self._conn
        txn = conn.transaction
        return reply.fill(
            {
                "me": self.settings.me,
                "remote": self._remote_name(),
                "sender": txn.mail_from.format() if txn is not None and txn.mail_from else "<>",
                "recipient": recipient or "<>",
                "uuid": txn.uuid if txn is not None else conn.uuid,
            }
        )

    def _act(self, row: Outcome, result: HookResult, recipient: str = "") -> None:
        """Reply as the row says and move to its next state."""
        if row.reply is None:
            return
        reply = self._reply_for(row, result, recipient)
        self._send(reply)
        if row.then is Then.CLOSE:
            self._close()
        elif row.then is Then.LOOP:
            self._loop(reply)

    def _loop(self, reply: Reply) -> None:
        self._conn.state = State.LOOP
        self._loop_reply = reply

    def _reset_transaction(self) -> Deferred[Any] | None:
        """End the open transaction (running reset_transaction); None when there is none."""
        conn = self._conn
        txn = conn.transaction
        if txn is None:
            return None

        def drop(_: Any) -> None:
            if conn.transaction is txn:
                conn.transaction = None
            txn.close()

        return self.runner.run("reset_transaction", conn).addBoth(drop)

    # -- output ------------------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        conn = self._conn
        if conn.remote.closed:
            return
        conn.last_response = str(reply)
        self._log(Level.PROTOCOL, f"S: {conn.last_response}")
        self._out.append(reply.to_bytes(enhanced=conn.esmtp))

    def _plugin_respond(self, code: int, text: Any, enhanced: str | None) -> None:
        if isinstance(text, Reply):
            self._send(text)
        else:
            self._send(Reply.of(code, enhanced, text if text is not None else ""))

    def _flush(self) -> None:
        if self._out and self.transport is not None:
            data = b"".join(self._out)
            self._out.clear()
            self.transport.write(data)

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._conn.state = State.DISCONNECTING
        self._flush()
        self._inbuf.clear()
        if self._paused:
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def _internal_error(self, failure: Failure) -> None:
        """A bug in the core or an unexpected failure: log it, answer 451, carry on."""
        self.factory.log.log(
            Level.CRIT,
            f"internal error: {failure.getTraceback()}",
            uuid=self.connection.uuid if self.connection else None,
        )
        self._send(S451_INTERNAL)
        self._flush()

    # -- helpers -------------------------------------------------------------------------

    @property
    def _conn(self) -> Connection:
        conn = self.connection
        assert conn is not None
        return conn

    def _remote_name(self) -> str:
        remote = self._conn.remote
        return f"{remote.host} [{remote.ip}]" if remote.host else f"[{remote.ip}]"

    def _log(self, level: Level, message: str) -> None:
        if self.factory.log.enabled(level):
            self._conn.log(level, message)
