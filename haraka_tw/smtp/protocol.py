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

import ipaddress
import re
import uuid as uuidlib
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw import __version__
from haraka_tw.codes import Code, HookResult
from haraka_tw.hooks.table import Outcome, Then, outcome
from haraka_tw.logging import Level
from haraka_tw.smtp import catalogue as S
from haraka_tw.smtp.address import AddressError, parse_mail_argument, parse_rcpt_argument
from haraka_tw.smtp.command import Command, parse_command
from haraka_tw.smtp.connection import Connection, Hello, Local, Remote, State, Transaction
from haraka_tw.smtp.data import BareNewline
from haraka_tw.smtp.dsn import DSNError, check_mail_params, check_rcpt_params
from haraka_tw.smtp.intake import MessageEnd, MessageIntake
from haraka_tw.smtp.proxy import ProxyError, ProxyHeader, parse_proxy_header
from haraka_tw.smtp.replies import Reply

if TYPE_CHECKING:
    from haraka_tw.smtp.factory import HarakaSMTPFactory

__all__ = ["HarakaESMTP"]

_HOLD_LIMIT = 256 * 1024  # input held while a hook runs before the socket is paused
_CLOSE_GRACE = 10.0  # seconds a closing client has to read our last words
_AUTH_LINE_LIMIT = 12288  # RFC 4954 4: lines of an AUTH exchange may be this long
_PROXY_LIMIT = 16 + 65535  # the largest PROXY v2 header
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_SUBMISSION_PORTS = frozenset({587, 465})
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})
_BDAT_ARGS = re.compile(r"^(\d{1,12})(?: +(LAST))? *$", re.IGNORECASE)


@implementer(IHandshakeListener, IPushProducer)
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
        self._paused = False  # reading from the socket is paused
        self._held = False  # too much input while a hook runs
        self._output_full = False  # the client is not reading our replies
        self._loop_reply: Reply | None = None
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
        self._commands: dict[str, Callable[[Command], Deferred[Any] | None]] = {
            "HELO": self.do_HELO,
            "EHLO": self.do_EHLO,
            "MAIL": self.do_MAIL,
            "RCPT": self.do_RCPT,
            "DATA": self.do_DATA,
            "BDAT": self.do_BDAT,
            "RSET": self.do_RSET,
            "NOOP": self.do_NOOP,
            "VRFY": self.do_VRFY,
            "HELP": self.do_HELP,
            "QUIT": self.do_QUIT,
            "PROXY": self.do_PROXY,
        }

    # -- connection life -----------------------------------------------------------------

    def connectionMade(self) -> None:
        """Wait for a PROXY header from a trusted proxy, else greet (connect hooks first)."""
        self.settings = self.factory.settings
        self.runner = self.factory.runner
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.connection = Connection(
            Remote(getattr(peer, "host", "") or "", getattr(peer, "port", 0) or 0),
            Local(getattr(host, "host", "") or "", getattr(host, "port", 0) or 0, self.settings.me),
            server_notes=self.factory.server_notes,
            log=self.factory.log,
            session=self,
        )
        conn = self.connection
        conn.tls.enabled = ISSLTransport.providedBy(self.transport)  # an implicit TLS port
        # We are the producer of our replies: when the client stops reading and the
        # transport's buffer fills, pauseProducing stops us reading (and so replying).
        self.transport.registerProducer(self, True)
        self.factory.sessions.add(self)
        self.setTimeout(self.settings.inactivity_timeout)
        self._log(Level.PROTOCOL, f"connect ip={conn.remote.ip} port={conn.remote.port}")
        self._busy = True
        if self._proxy_allowed(conn.remote.ip):
            conn.state = State.PROXY
            conn.proxy.allowed = True
            self._proxy_timer = self.callLater(self.settings.proxy_timeout, self._proxy_timeout)
            return
        self._greet().addBoth(self._greeted)

    def _greet(self) -> Deferred[Any]:
        """connect_init, lookup_rdns (or the core lookup), connect; then banner or denial."""
        conn = self._conn
        conn.state = State.CONNECTING
        d = self.runner.run("connect_init", conn)
        d.addCallback(lambda _: self.runner.run("lookup_rdns", conn))
        return d.addCallback(self._rdns_answered)

    def _greeted(self, result: Any) -> None:
        if isinstance(result, Failure):
            self._internal_error(result)
            if self._conn.state is not State.CMD:  # no banner went out: say goodbye instead
                self._out.clear()
                self._send(S.S421_SHUTDOWN.with_text("internal error, closing connection"))
                self._close()
        self._set_idle()

    def _rdns_answered(self, result: HookResult) -> Deferred[Any] | None:
        """A denial ends the greeting; OK (with a name) skips the core lookup; else look up."""
        conn = self._conn
        row = outcome("lookup_rdns", result.code)
        if row.then is not Then.PROCEED:
            self._greeting_done(row, result)
            return None
        if result.code is Code.OK or conn.remote.host is not None:
            # A plugin named the client, or XCLIENT's NAME did: no core lookup.
            if result.code is Code.OK and isinstance(result.message, str) and result.message:
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
        """Send the banner (a connect plugin's text replaces it) or the denial."""
        if row.then is not Then.PROCEED:
            self._act(row, result)
            return
        self._conn.state = State.CMD
        if isinstance(result.message, Reply):
            self._send(result.message)
        else:
            banner = self._banner()
            self._send(banner.with_text(result.text) if result.text else banner)

    def _banner(self) -> Reply:
        s = self.settings
        if s.greeting:
            lines = list(s.greeting)
        else:
            version = f"/{__version__}" if s.show_version else ""
            lines = [f"{s.me} ESMTP {S.PRODUCT}{version} ready"]
        if s.banner_chars:
            lines[0] += f" ({self._conn.uuid[: s.banner_chars]})"
        return Reply(220, None, tuple(lines))

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
        self._intake = None
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
        d = self.runner.run("disconnect", conn)
        d.addBoth(lambda _: conn.log(Level.NOTICE, "disconnect", **conn.summary()))

    def timeoutConnection(self) -> None:
        """No input for the phase's timeout: 421 and close."""
        self._send(S.S421_TIMEOUT)
        self._close()

    def shutdown(self) -> None:
        """The server is stopping: 421 to the client and close."""
        self._send(S.S421_SHUTDOWN)
        self._close()

    # -- PROXY protocol ------------------------------------------------------------------

    def _proxy_allowed(self, ip: str) -> bool:
        hosts = self.settings.proxy_hosts
        if not hosts:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in hosts)

    def _proxy_header(self) -> None:
        """Bytes from a trusted proxy before the banner: a PROXY v1/v2 header, or 421."""
        try:
            header = parse_proxy_header(bytes(self._inbuf))
        except ProxyError as e:
            self._conn.log(Level.WARN, f"bad PROXY header from {self._conn.remote.ip}: {e}")
            self._refuse_proxy(S.S421_PROXY_REFUSED)
            return
        if header is None:
            if len(self._inbuf) > _PROXY_LIMIT:
                self._refuse_proxy(S.S421_PROXY_REFUSED)
            return
        del self._inbuf[: header.length]
        self._cancel_proxy_timer()
        self._apply_proxy(header)
        self._greet().addBoth(self._greeted)

    def _apply_proxy(self, header: ProxyHeader) -> None:
        conn = self._conn
        proxy_ip = conn.remote.ip
        conn.proxy.update(allowed=True, ip=proxy_ip, type="haproxy", version=header.version)
        conn.notes["proxy"] = {
            "type": "haproxy",
            "proto": header.family,
            "src_ip": header.source_ip,
            "src_port": header.source_port,
            "dst_ip": header.dest_ip,
            "dst_port": header.dest_port,
            "proxy_ip": proxy_ip,
        }
        if header.local or header.source_ip is None:
            return  # a health check: the proxy speaks for itself
        conn.remote = Remote(header.source_ip, header.source_port or 0)
        if header.dest_ip is not None:
            conn.local.ip = header.dest_ip
            conn.local.port = header.dest_port or conn.local.port
        self._log(Level.INFO, f"PROXY v{header.version} from {proxy_ip}: client {conn.remote.ip}")

    def _proxy_timeout(self) -> None:
        self._proxy_timer = None
        self._refuse_proxy(S.S421_PROXY_TIMEOUT)

    def _refuse_proxy(self, reply: Reply) -> None:
        self._cancel_proxy_timer()
        self._send(reply)
        self._close()

    def _cancel_proxy_timer(self) -> None:
        if self._proxy_timer is not None and self._proxy_timer.active():
            self._proxy_timer.cancel()
        self._proxy_timer = None

    def do_PROXY(self, cmd: Command) -> None:
        """A PROXY line after the banner, or from a host not in haproxy.hosts: 421, close."""
        self._conn.log(Level.WARN, f"PROXY command refused from {self._conn.remote.ip}")
        self._send(S.S421_PROXY_REFUSED)
        self._close()

    # -- input -----------------------------------------------------------------------

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
        self._reading_paused(self._held or self._output_full)
        self._flush()

    # IPushProducer: the transport tells us when the client is not reading our replies.

    def pauseProducing(self) -> None:
        self._output_full = True
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
        if buf[:1] == b"\x16" and bytes(buf[1:2]) in (b"", b"\x03"):
            # A TLS ClientHello on a plaintext port: say so in the clear, then close.
            self._send(S.S554_TLS_ON_PLAINTEXT)
            self._close()
            return None
        if buf[:4] == b"\r\n\r\n" and _V2_SIGNATURE.startswith(bytes(buf[:12])):
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
        if self.factory.log.enabled(Level.PROTOCOL):
            self._log(Level.PROTOCOL, f"C: {cmd.raw.decode('utf-8', 'replace')}")
        if conn.state is State.LOOP and cmd.verb != "QUIT":
            assert self._loop_reply is not None
            self._send(self._loop_reply)
            return
        if cmd.bad_bytes:
            conn.errors += 1
            self._send(S.S501_BAD_BYTES)
            return
        if cmd.has_8bit and not (
            cmd.verb in ("MAIL", "RCPT") and self.settings.smtputf8 and conn.esmtp
        ):
            conn.errors += 1
            self._send(S.S501_8BIT)
            return
        if self._inbuf:
            conn.pipelining = True  # the client sent more before reading this reply
        handler = self._commands.get(cmd.verb)
        try:
            if handler is None:
                d = self.runner.run("unrecognized_command", conn, cmd.verb, cmd.argument)
                self._wait(d.addCallback(self._unrecognized_answered))
            else:
                self._wait(handler(cmd))
        except Exception:
            self._internal_error(Failure())

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

    # -- what plugins may ask of the session (through Connection) --------------------------

    def respond(self, code: int, text: Any, enhanced: str | None) -> None:
        """A plugin's own reply, written now."""
        if isinstance(text, Reply):
            self._send(text)
        else:
            self._send(Reply.of(code, enhanced, text if text is not None else ""))
        self._flush()

    def disconnect(self) -> None:
        self._close()

    def read_line(self) -> Deferred[bytes]:
        if self._line_waiter is not None:
            raise RuntimeError("read_line() called while another read_line() is pending")
        waiter: Deferred[bytes] = Deferred()
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
            tls.verified = cert is not None and handle.get_verify_result() == 0
        conn.log(Level.INFO, f"TLS {tls.version} {tls.cipher} verified={tls.verified}")
        waiter, self._tls_waiter = self._tls_waiter, None
        if waiter is not None:
            waiter.callback(None)

    def restart(
        self, remote_ip: str | None, remote_port: int | None, remote_host: str | None
    ) -> Deferred[None]:
        """XCLIENT: the session begins again for the client the trusted peer names."""
        conn = self._conn
        d = self._reset_transaction() or succeed(None)

        def again(_: Any) -> Deferred[Any]:
            conn.uuid = str(uuidlib.uuid4()).upper()
            conn.relaying = False
            conn.hello = Hello()
            conn.esmtp = False
            conn.remote = Remote(
                remote_ip or conn.remote.ip,
                remote_port if remote_port is not None else conn.remote.port,
                remote_host,
            )
            conn.tran_count = 0
            return self._greet()

        return d.addCallback(again).addCallback(lambda _: None)

    # -- commands --------------------------------------------------------------------

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

        def run(_: Any = None) -> Deferred[Any]:
            return self.runner.run(hook, conn, host).addCallback(answered)

        def answered(result: HookResult) -> Deferred[Any] | None:
            row = outcome(hook, result.code)
            if row.then is not Then.PROCEED:
                self._act(row, result)
                conn.hello = Hello()  # a refused greeting is no greeting: MAIL needs a new one
                conn.esmtp = False
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

    def _check_params(
        self,
        params: dict[str, str | None],
        known: frozenset[str],
        check: Callable[[dict[str, str | None]], None],
    ) -> Reply | None:
        if params and not self._conn.esmtp:
            return S.S555_PARAMS
        unknown = sorted(set(params) - known)
        if unknown:
            return S.S555_PARAMS.with_text(f"Unsupported parameter {unknown[0]}")
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
            return S.S550_TOO_BIG
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
            if code is Code.CONT and conn.relaying:
                code = Code.OK
            if code is Code.OK:
                return self.runner.run("rcpt_ok", conn, recipient).addCallback(accepted)
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

        return self.runner.run("rcpt", conn, recipient, params).addCallback(answered)

    # -- receiving the message: DATA and BDAT ----------------------------------------------

    def _message_refusal(self) -> Reply | None:
        """Why DATA or a first BDAT cannot start now, or None."""
        txn = self._conn.transaction
        if txn is None:
            return S.S503_DATA_NO_MAIL
        if not txn.rcpt_to:
            # A pipelining client sends its body right behind DATA: say why it is refused.
            return S.S554_NO_VALID_RCPT if self._inbuf else S.S503_DATA_NO_RCPT
        return None

    def _start_message(self, then: Callable[[HookResult, Outcome], Any]) -> Deferred[Any]:
        """Run the data hook; if it allows the message, set up the intake."""
        conn = self._conn

        def answered(result: HookResult) -> Any:
            row = outcome("data", result.code)
            txn = conn.transaction
            if row.then is Then.PROCEED and txn is not None:
                received = self._received_header(txn) if self.settings.add_received else None
                self._intake = MessageIntake(txn, self.settings, received)
                self.setTimeout(self.settings.data_timeout)
            return then(result, row)

        return self.runner.run("data", conn).addCallback(answered)

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

        def then(result: HookResult, row: Outcome) -> Deferred[Any] | None:
            self._act(row, result)
            if row.then is not Then.PROCEED:
                self._discard_pipelined_body()
                return self._reset_transaction()  # as Haraka: a refused DATA ends the message
            self._conn.state = State.DATA
            self._in_data = True
            return None

        return self._start_message(then)

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

                def then(result: HookResult, row: Outcome) -> Deferred[Any] | None:
                    if row.then is Then.PROCEED:
                        return self._chunk_progress()
                    self._chunk_refusal = self._reply_for(row, result) if row.reply else None
                    return self._reset_transaction()

                return self._start_message(then)
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
                self._wait(self._chunk_progress())
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
            self._wait(self._message_received())
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
        return (
            f"from {conn.hello.host} ({self._remote_name()})\n"
            f"\tby {s.me}{version} with {proto} id {txn.uuid}\n"
            f"\tenvelope-from {sender}{tls};\n\t{formatdate(localtime=True)}"
        )

    # -- end of data ----------------------------------------------------------------------

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
        bare = end.bare_lf or end.bare_cr
        if bare and self.settings.bare_newline is BareNewline.REJECT:
            conn.log(Level.INFO, f"bare newlines in message: lf={end.bare_lf} cr={end.bare_cr}")
            return self._message_refused(S.S550_BARE_NEWLINE)
        if len(txn.header.get_all("Received")) > self.settings.header_max_received:
            return self._message_refused(S.S550_LOOP)
        if end.exceeded:
            d = self.runner.run("max_data_exceeded", conn)
            return d.addCallback(lambda r: self._finish_message("max_data_exceeded", r))
        results = [*conn.auth_results_list, *txn.auth_results_list]
        if results:  # as Haraka: one header naming this host, with every plugin's result
            txn.header.add("Authentication-Results", "; ".join([self.settings.me, *results]))
        return self.runner.run("data_post", conn).addCallback(self._data_post_answered)

    def _message_refused(self, reply: Reply) -> Deferred[Any] | None:
        self._count(self._conn.msg_count, reply.code)
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
                    lambda f: self._outbound_failed(hook, f),
                )
        row = outcome(hook, result.code)
        if row.then is not Then.PROCEED or row.reply is None:
            return self._finish_message(hook, result)
        reply = self._reply_for(row, result)
        return self.runner.run("queue_ok", conn, reply.text).addCallback(
            lambda _: self._finish_message(hook, result, reply)
        )

    def _outbound_failed(self, hook: str, failure: Failure) -> Deferred[Any] | None:
        self._conn.log(Level.ERROR, f"outbound queue failed: {failure.getErrorMessage()}")
        return self._queue_answered(hook, HookResult(Code.DENYSOFT, None, "outbound"))

    def _finish_message(
        self, hook: str, result: HookResult, reply: Reply | None = None
    ) -> Deferred[Any] | None:
        """Reply to the end of the message, count it, and end the transaction."""
        row = outcome(hook, result.code)
        reply = reply or self._reply_for(row, result)
        self._count(self._conn.msg_count, reply.code)
        self._send(reply)
        d = self._reset_transaction()
        if row.then is Then.CLOSE:
            self._close()
        elif row.then is Then.LOOP:
            self._loop(reply)
        return d

    @staticmethod
    def _count(counts: Any, code: int) -> None:
        """Count a reply as accept, tempfail or reject."""
        if code < 400:
            counts.accept += 1
        elif code < 500:
            counts.tempfail += 1
        else:
            counts.reject += 1

    # -- the simple commands -------------------------------------------------------

    def do_RSET(self, cmd: Command) -> Deferred[Any] | None:
        if cmd.argument:
            self._send(S.S501_SYNTAX)
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
        self._send(S.S214_HELP)

    def do_QUIT(self, cmd: Command) -> Deferred[Any] | None:
        if cmd.argument:
            self._send(S.S501_SYNTAX)
            return None
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
            name = str(result.message or "").upper()
            handler = self._commands.get(name)
            if handler is not None and command is not None:
                alias = Command(
                    name, command.argument, command.raw, command.has_8bit, command.bad_bytes
                )
                return handler(alias)
            conn.log(Level.ERROR, f"HOOK_NEXT names no core command: {name!r}", result.plugin)
            result = HookResult(Code.CONT)
        if result.code in (Code.CONT, Code.DENY):
            conn.errors += 1
        self._act(outcome("unrecognized_command", result.code), result)
        return None

    # -- acting on results ---------------------------------------------------------

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
        reply = base.with_text(result.text) if result.text else base
        if not any("{" in line for line in reply.lines):
            return reply
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
        self._intake = None
        self._in_data = False
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
        if conn.remote.closed or self._closing:
            return
        data = reply.to_bytes(enhanced=conn.esmtp)
        conn.last_reply = data
        if self.factory.log.enabled(Level.PROTOCOL):
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
        self.transport.loseConnection()
        # A client that never reads would keep the socket (and our output) for ever.
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
