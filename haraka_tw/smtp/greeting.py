"""The start of a session: PROXY protocol, the connect hooks, the banner; and restart."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.python.failure import Failure

from haraka_tw import __version__
from haraka_tw.codes import Code, HookResult
from haraka_tw.hooks.runner import then
from haraka_tw.hooks.table import Outcome, Then, outcome
from haraka_tw.ids import new_uuid
from haraka_tw.logging import Level
from haraka_tw.smtp import catalogue as S
from haraka_tw.smtp.command import Command
from haraka_tw.smtp.connection import (
    Connection,
    Hello,
    Local,
    Remote,
    SessionControl,
    State,
    forget_auth,
)
from haraka_tw.smtp.proxy import ProxyError, ProxyHeader, parse_proxy_header
from haraka_tw.smtp.proxy_first import proxy_header_below
from haraka_tw.smtp.replies import Reply
from haraka_tw.smtp.session import SessionCore
from haraka_tw.smtp.settings import SessionSettings

__all__ = ["Greeting"]

_BANNERS: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}


def _make_banner(settings: SessionSettings) -> Reply:
    """The 220 banner, without the uuid tag: the configured greeting, or the server's name."""
    if settings.greeting:
        return Reply(220, None, tuple(settings.greeting))
    version = f"/{__version__}" if settings.show_version else ""
    return Reply(220, None, (f"{settings.me} ESMTP {S.PRODUCT}{version} ready",))


class Greeting(SessionCore):
    """Connection start: a PROXY header from a trusted proxy, then connect_init,
    lookup_rdns (or the core reverse lookup) and connect, then the banner. XCLIENT's
    restart() runs the same path again."""

    def connectionMade(self) -> None:
        """Wait for a PROXY header from a trusted proxy, else greet (connect hooks first)."""
        self.settings = self.factory.settings
        self.runner = self.factory.runner
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.connection = self._conn = Connection(
            Remote(getattr(peer, "host", "") or "", getattr(peer, "port", 0) or 0),
            Local(getattr(host, "host", "") or "", getattr(host, "port", 0) or 0, self.settings.me),
            server_notes=self.factory.server_notes,
            log=self.factory.log,
            session=cast("SessionControl", self),  # HarakaESMTP implements it
        )
        conn = self.connection
        implicit_tls = ISSLTransport.providedBy(self.transport)
        if implicit_tls:
            conn.tls.enabled = True
        # We are the producer of our replies: when the client stops reading and the
        # transport's buffer fills, pauseProducing stops us reading (and so replying).
        self.transport.registerProducer(self, True)
        self.factory.sessions.add(self)
        self.setTimeout(self.settings.inactivity_timeout)
        self._log(Level.PROTOCOL, f"connect ip={conn.remote.ip} port={conn.remote.port}")
        self._busy = True
        limit = self.settings.max_connections
        if limit and len(self.factory.sessions) > limit:
            conn.log(Level.WARN, f"connection limit {limit} reached: refusing {conn.remote.ip}")
            self._send(S.S421_TOO_MANY_CONNECTIONS)
            self._close()
            return
        below = proxy_header_below(self.transport) if implicit_tls else None
        if below is not None:  # read before TLS began
            self._apply_proxy(below)
        elif not implicit_tls and self.settings.trusts_proxy(conn.remote.ip):
            conn.state = State.PROXY
            conn.proxy.allowed = True
            self._proxy_timer = self.callLater(self.settings.proxy_timeout, self._proxy_timeout)
            return
        self._start_greeting()

    def _start_greeting(self) -> None:
        """Greet, then read commands; at once when every connect hook answered in time."""
        pending = self._attempt(self._greet)
        if pending is None:
            self._greeted(None)
        else:
            pending.addBoth(self._greeted)

    def _greet(self) -> Deferred[Any] | None:
        """connect_init, lookup_rdns (or the core lookup), connect; then banner or denial."""
        conn = self._conn
        conn.state = State.CONNECTING
        runner = self.runner

        def initialised(_: HookResult) -> Deferred[Any] | None:
            return then(runner.call("lookup_rdns", conn), self._rdns_answered)

        return then(runner.call("connect_init", conn), initialised)

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
            return then(self.runner.call("connect", conn), self._connect_answered)

        def named(host: str | None) -> Deferred[Any] | None:
            conn.remote.host = host
            return then(self.runner.call("connect", conn), self._connect_answered)

        return then(self.factory.rdns.lookup_now(conn.remote.ip), named)

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
        elif result.text:  # a connect plugin's text replaces the banner's
            self._send(Reply.of(220, None, result.text))
        else:
            self._send_banner()

    def _send_banner(self) -> None:
        """The banner, with C{[uuid] banner_chars} of the connection's uuid on its first
        line. Its wire form is made once per settings and cut where the uuid goes."""
        s = self.settings
        key = (s.me, tuple(s.greeting), s.show_version)
        cut = _BANNERS.get(key)
        if cut is None:
            wire = _make_banner(s).to_bytes()
            end = wire.index(b"\r\n")
            cut = _BANNERS[key] = (wire[:end], wire[end:])
            if len(_BANNERS) > 64:  # (a reload makes a new key: the oldest goes)
                del _BANNERS[next(iter(_BANNERS))]
        conn = self._conn
        tag = f" ({conn.uuid[: s.banner_chars]})".encode() if s.banner_chars else b""
        self._send_wire(conn, 220, cut[0] + tag + cut[1])

    def _proxy_header(self) -> None:
        """Bytes from a trusted proxy before the banner: a PROXY v1/v2 header, or 421."""
        try:
            header = parse_proxy_header(bytes(self._inbuf))
        except ProxyError as e:
            self._conn.log(Level.WARN, f"bad PROXY header from {self._conn.remote.ip}: {e}")
            self._refuse_proxy(S.S421_PROXY_REFUSED)
            return
        if header is None:
            return  # (the rest is still to come)
        del self._inbuf[: header.length]
        self._cancel_proxy_timer()
        self._apply_proxy(header)
        self._start_greeting()

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
        if header.family == "UNIX":  # a client on the proxy's own socket: no address but
            self._log(  # the proxy's, whose trust it then has (relaying by address, ...)
                Level.INFO, f"PROXY v{header.version} from {proxy_ip}: client on a UNIX socket"
            )
            return
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

    def restart(
        self, remote_ip: str | None, remote_port: int | None, remote_host: str | None
    ) -> Deferred[None]:
        """XCLIENT: the session begins again for the client the trusted peer names."""
        conn = self._conn
        d = self._reset_transaction() or succeed(None)

        def again(_: Any) -> Deferred[Any] | None:
            conn.uuid = new_uuid()
            forget_auth(conn)
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
