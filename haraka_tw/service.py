"""The Twisted service: listeners bound while privileged, graceful stop, reload on SIGHUP.

L{HarakaService} is what C{twistd haraka} runs and what an existing Twisted application
embeds::

    from haraka_tw.service import HarakaService
    service = HarakaService.from_directory("/etc/haraka", ["tcp:2525:interface=127.0.0.1"])
    service.setServiceParent(application)

Listeners are bound in C{privilegedStartService}, before twistd drops to C{-u/-g}, so port
25 works for an unprivileged user. Stopping closes the listeners, lets open sessions finish
for up to smtp.ini C{force_shutdown_timeout} seconds, then sends the rest 421 and closes them.

With C{nodes} above 1 (smtp.ini nodes under twistd) the service is the I{master}: it binds
the listeners, then leaves serving to worker processes (L{haraka_tw.workers}). A worker
runs this service too, given its L{WorkerRole}: it adopts the master's sockets instead of
binding, runs C{init_child}, and delivers its partition of the outbound queue.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure

from haraka_tw.codes import Code, HookResult
from haraka_tw.config.formats import ini_count, ini_number
from haraka_tw.interfaces import IShutdown
from haraka_tw.logging import Level
from haraka_tw.server import HarakaServer, StartupError, where_in
from haraka_tw.smtp.proxy_first import ProxyFirstFactory
from haraka_tw.tls import (
    ImplicitTLS,
    ImplicitTLSEndpoint,
    ServerTLS,
    TLSConfigError,
    implicit_tls,
    server_tls,
)
from haraka_tw.workers import AdoptedEndpoint, WorkerRole, parse_nodes
from haraka_tw.workers.forkserver import exit_now
from haraka_tw.workers.master import WorkerMaster
from haraka_tw.writethrough import dispatch_without_log_context, write_through_reactor

__all__ = ["DEFAULT_LISTEN", "HarakaService", "listen_text", "parse_listen"]

_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+|[A-Za-z0-9.\-]+|\*))?(?::(?P<port>\d+))?$"
)
_ENDPOINT_KINDS = frozenset({"tcp", "tcp6", "unix", "ssl", "tls", "systemd"})


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _is_tls_host_port(entry: str) -> bool:
    """C{tls:} then a host:port form with a port (not an endpoint string, and not Twisted's
    own C{tls:/dir/of/pems:...} endpoint)."""
    if entry[:4].lower() != "tls:" or entry[4:].split(":", 1)[0].lower() in _ENDPOINT_KINDS:
        return False
    m = _HOST_PORT.match(entry[4:])
    return m is not None and m.group("port") is not None


def _refuse_haproxy_endpoint(entry: str) -> None:
    """Twisted's C{haproxy:} endpoint believes a PROXY header from anyone who can reach the
    port; haraka_tw takes one only from connection.ini [haproxy] hosts.

    @raise ValueError: for such an entry, naming it.
    """
    if entry.split(":", 1)[0].strip().lower() == "haproxy":
        raise ValueError(
            f"smtp.ini listen: {entry!r}: the haproxy: endpoint takes a PROXY header from "
            "any client; listen plainly and list the proxy in connection.ini [haproxy] hosts"
        )


def _listen_failure(failure: Failure) -> str:
    """Why a listener could not be bound, briefly (C{Address already in use})."""
    cause = getattr(failure.value, "socketError", None)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return failure.getErrorMessage()


def _one_line_startup_errors(previous: Any) -> Any:
    """An excepthook that shows a L{StartupError} ending the process as one line on stderr
    (exit status 1 all the same), and hands anything else to C{previous}."""

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if isinstance(value, StartupError):
            sys.stderr.write(f"haraka_tw: {value}\n")
        else:
            previous(kind, value, tb)

    return hook


# Twisted's default is 50: a burst of 100 clients then waits on SYN retransmits (seconds).
DEFAULT_BACKLOG = 1024


#: smtp.ini [main] keys read (by this module, the server, the settings and twistd's tap)
_SMTP_INI_KEYS = frozenset(
    {
        "listen", "port", "listen_host", "listen_backlog", "smtps_port", "nodes", "user",
        "group", "inactivity_timeout", "data_timeout", "max_connections",
        "graceful_shutdown", "force_shutdown_timeout", "ignore_bad_plugins", "daemonize",
        "public_ip",
    }
)  # fmt: skip

#: Haraka's smtp.ini keys that are not read here, and what to do instead
_SMTP_INI_ELSEWHERE = {
    "daemon_log_file": "twistd --logfile FILE",
    "daemon_pid_file": "twistd --pidfile FILE",
}


def _sets(key: str) -> Callable[[str], bool]:
    """Whether an ini line sets C{key} (C{key=}, C{key[]=})."""
    pattern = re.compile(rf"\s*{re.escape(key)}\s*(\[\])?\s*=")
    return lambda line: pattern.match(line) is not None


def _warn_unread_keys(server: HarakaServer) -> None:
    """A WARN for each smtp.ini [main] key this server does not read (a typo, or one of
    Haraka's handled otherwise here), naming the file and line: a setting an operator
    brought over must not be dropped without a word."""
    smtp = server.smtp_ini
    unread = sorted(k for k in smtp if k not in _SMTP_INI_KEYS)
    if smtp.get("daemonize"):
        unread.insert(0, "daemonize")
        hints = {"daemonize": "twistd runs as a daemon unless given -n"}
    else:
        hints = {}
    for key in unread:
        hint = hints.get(key) or _SMTP_INI_ELSEWHERE.get(key) or "not a key of smtp.ini"
        server.log.log(
            Level.WARN,
            f"{where_in(server.config, 'smtp.ini', _sets(key))}{key} is not read: {hint}",
        )


#: where the server listens when smtp.ini names nothing (Haraka: [::0]:25)
DEFAULT_LISTEN = "127.0.0.1:2525"


def listen_text(smtp: dict[str, Any]) -> str:
    """The listeners smtp.ini [main] names, as Haraka reads them: C{listen}, and before
    it C{listen_host:port} when the older C{port} key is set (C{listen_host} defaulting
    to C{[::0]}); L{DEFAULT_LISTEN} when there is neither."""
    entries = [str(smtp["listen"])] if str(smtp.get("listen") or "").strip() else []
    port = str(smtp.get("port") or "").strip()
    if port:
        host = str(smtp.get("listen_host") or "").strip() or "[::0]"
        entries.insert(0, f"{host}:{port}")
    return ",".join(entries) or DEFAULT_LISTEN


def parse_listen(text: str, default_port: int = 25, backlog: int | None = None) -> list[str]:
    """smtp.ini C{listen} as Twisted endpoint descriptions.

    Entries are comma-separated: C{127.0.0.1:2525}, C{[::1]:2525}, C{[::0]:25}, C{127.0.0.1}
    (port 25), C{:2525} or C{*:2525} (every IPv4 address), or an endpoint string such as
    C{tcp:2525:interface=127.0.0.1} or C{unix:/run/haraka.sock}. C{tls:} before a
    host:port form (C{tls:127.0.0.1:465}) makes that listener TLS from the first byte; it is
    written C{tls:tcp:465:interface=127.0.0.1} (see L{haraka_tw.tls.implicit_tls}).
    C{backlog} (smtp.ini listen_backlog) is the kernel's queue of connections not yet
    accepted, for the host:port forms; endpoint strings say their own.

    @raise ValueError: for an entry that is none of these, naming it.
    """
    out: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        _refuse_haproxy_endpoint(entry)
        if _is_tls_host_port(entry):
            out.extend(f"tls:{s}" for s in parse_listen(entry[4:], default_port, backlog))
            continue
        if entry.split(":", 1)[0].lower() in _ENDPOINT_KINDS:
            out.append(entry)
            continue
        m = _HOST_PORT.match(entry)
        if m is None or not (m.group("v6") or m.group("v4") or m.group("port")):
            raise ValueError(f"smtp.ini listen: cannot read {entry!r}")
        port = int(m.group("port") or default_port)
        if not 0 < port < 65536:
            raise ValueError(f"smtp.ini listen: port {port} in {entry!r} is out of range")
        extra = f":backlog={backlog}" if backlog else ""
        if m.group("v6") is not None:
            out.append(f"tcp6:{port}:interface={_escape(m.group('v6'))}{extra}")
        else:
            host = m.group("v4")
            if host in (None, "*", "0.0.0.0"):
                out.append(f"tcp:{port}{extra}")
            else:
                out.append(f"tcp:{port}:interface={_escape(host)}{extra}")
    if not out:
        raise ValueError("smtp.ini listen is empty")
    return out


class HarakaService(MultiService):
    """The SMTP server as a Twisted service.

    @param nodes: processes serving: 1 (this one), above 1 for workers under a master (this
        service), None for smtp.ini's C{nodes} (C{twistd haraka}).
    @param worker: set in a worker process: its role (its listeners are adopted).
    """

    name = "haraka"

    def __init__(
        self,
        server: HarakaServer,
        endpoints: Sequence[str | IStreamServerEndpoint] | None = None,
        *,
        watch_interval: float = 1.0,
        handle_sighup: bool = True,
        owns_process: bool = False,
        nodes: int | None = 1,
        worker: WorkerRole | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.reactor = server.reactor
        smtp = server.smtp_ini
        try:
            if nodes is None:
                nodes = parse_nodes(smtp.get("nodes"))
        except ValueError as e:
            raise StartupError(str(e)) from e
        self.nodes = 1 if worker is not None else max(1, nodes)
        self.worker = worker
        self.master: WorkerMaster | None = None
        if endpoints is None:
            try:
                endpoints = parse_listen(
                    listen_text(smtp),
                    backlog=ini_count(smtp, "listen_backlog", DEFAULT_BACKLOG, "smtp.ini")
                    or DEFAULT_BACKLOG,  # (0 means the default)
                )
            except ValueError as e:
                raise StartupError(str(e)) from e
        self.endpoints = list(endpoints)
        if self.nodes > 1 and not all(isinstance(e, str) for e in self.endpoints):
            raise StartupError("smtp.ini nodes: listeners must be endpoint strings")
        # Implicit TLS (tls: entries, and listeners on smtps_port): TLS from the first byte.
        self._implicit_tls: dict[int, ImplicitTLS] = {}
        self._tls: ServerTLS | None = None
        try:
            # (an empty smtps_port turns the port rule off, as 0 does)
            port = (
                0
                if smtp.get("smtps_port") == ""
                else ini_count(smtp, "smtps_port", 465, "smtp.ini")
            )
            if port > 65535:
                raise ValueError(f"smtp.ini smtps_port: {port} is not a port number")
            self.smtps_port = port
            for index, spec in enumerate(self.endpoints):
                found = implicit_tls(spec, self.smtps_port) if isinstance(spec, str) else None
                if found is not None:
                    self._implicit_tls[index] = found
            if self._implicit_tls:
                self._tls = server_tls(
                    server.config,
                    server.notes,
                    notice=lambda m: server.log.log(Level.NOTICE, m),
                    error=lambda m: server.log.log(Level.ERROR, m),
                )
        except (TLSConfigError, ValueError) as e:
            raise StartupError(f"implicit TLS: {e}") from e
        try:
            self.force_shutdown_timeout = ini_number(
                smtp, "force_shutdown_timeout", 30, zero_ok=True, where="smtp.ini"
            )
        except ValueError as e:
            raise StartupError(str(e)) from e
        self.graceful = bool(smtp.get("graceful_shutdown", True))
        self.watch_interval = watch_interval
        self.handle_sighup = handle_sighup
        self.owns_process = owns_process  # twistd: an init_master refusal stops the reactor
        self.ports: list[IListeningPort] = []
        self.refused = False  # init_master / init_child said no
        self._exit_status_set = False  # stopped for good under twistd: the master exits 1
        self._old_sighup: Any = None
        if worker is None:  # (a worker reads the same file: the master has said it)
            _warn_unread_keys(server)

    @classmethod
    def from_directory(
        cls,
        directory: str | Path | None,
        endpoints: Sequence[str | IStreamServerEndpoint] | None = None,
        reactor: IReactorTime | None = None,
        **kwargs: Any,
    ) -> HarakaService:
        """A service on the shipped defaults overlaid with the config C{directory}."""
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        assert reactor is not None
        return cls(HarakaServer.from_directory(directory, reactor), endpoints, **kwargs)

    def privilegedStartService(self) -> None:
        """Bind every listener now (as root, before twistd's -u/-g drop); a master also
        starts its fork server now (L{WorkerMaster.prepare}).

        A listener that cannot be bound (the address not on this machine, the port in use)
        is a L{StartupError}, the ones bound before it closed again. Under twistd (we own
        the process) it is logged at CRIT, and the exception goes on to twistd, which tells
        a daemon's launcher (it waits on a pipe only an exception closes: a SystemExit
        would leave it waiting) and removes the pid file; the process then ends with it,
        shown as one line (L{_one_line_startup_errors}), not a traceback."""
        try:
            self._bind()
        except StartupError as e:
            for port in self.ports:
                port.stopListening()
            self.ports = []
            if self.owns_process:
                self.server.log.log(Level.CRIT, str(e))
                sys.excepthook = _one_line_startup_errors(sys.excepthook)
            raise
        super().privilegedStartService()

    def _bind(self) -> None:
        factory = self.server.factory
        if self.owns_process:  # (an application that embeds us keeps its reactor as it is)
            dispatch_without_log_context(self.reactor)
        for index, spec in enumerate(self.endpoints):
            try:
                endpoint = self._endpoint(index, spec)
            except (ValueError, TypeError, OSError) as e:  # (a string Twisted cannot use)
                message = str(e)
                if not message.startswith("smtp.ini listen"):
                    message = f"smtp.ini listen: {spec}: {message}"
                raise StartupError(message) from None
            d = endpoint.listen(factory)
            failures: list[Any] = []
            d.addCallbacks(self.ports.append, failures.append)
            if failures:
                # (the reason first: a daemon's launcher shows only the first 100 bytes)
                raise StartupError(f"{_listen_failure(failures[0])}: cannot listen on {spec}")
            tls = " (implicit TLS)" if index in self._implicit_tls else ""
            if self.worker is None:
                self.server.log.log(Level.NOTICE, f"listening on {spec}{tls}")
        if self.nodes > 1:
            self.server.log.log(Level.NOTICE, f"{self.nodes} worker processes serve these")
            bound = zip(self.endpoints, self.ports, strict=True)
            listeners = [(str(spec), port) for spec, port in bound]
            self.master = WorkerMaster(
                self.server,
                listeners,
                self.nodes,
                force_shutdown_timeout=self.force_shutdown_timeout if self.graceful else 0,
                on_fatal=self._stop_for_good,
            )
            self.master.prepare()

    def _endpoint(self, index: int, spec: str | IStreamServerEndpoint) -> IStreamServerEndpoint:
        """The endpoint to listen on (in a worker: the master's socket, adopted); an
        implicit TLS one wraps its plain endpoint in TLS."""
        plain: IStreamServerEndpoint | None = None
        if self.worker is not None:
            plain = AdoptedEndpoint(self.reactor, self.worker.listeners[index][0])
        tls = self._implicit_tls.get(index)
        if tls is not None and self._tls is not None:
            plain = plain or serverFromString(write_through_reactor(self.reactor), tls.endpoint)
            return ImplicitTLSEndpoint(
                plain, self._tls.creator_for_port(tls.port), below=self._proxy_first
            )
        if plain is not None:
            return plain
        if not isinstance(spec, str):
            return spec
        _refuse_haproxy_endpoint(spec)  # endpoint strings given directly (embedding) too
        endpoint: IStreamServerEndpoint = serverFromString(
            write_through_reactor(self.reactor), spec
        )
        return endpoint

    def _proxy_first(self, tls: IProtocolFactory) -> IProtocolFactory:
        """Under an implicit TLS listener: a trusted proxy's PROXY header comes before TLS."""
        server = self.server
        return ProxyFirstFactory(
            tls,
            self.reactor,
            lambda: server.factory.settings,  # (the current ones: a reload replaces them)
            lambda line: server.log.log(Level.WARN, line),
        )

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()
        config = self.server.config
        if self.watch_interval > 0 and self.master is None:
            config.start_watching(self.reactor, self.watch_interval)
        if self.handle_sighup and hasattr(signal, "SIGHUP"):
            try:
                self._old_sighup = signal.signal(signal.SIGHUP, self._sighup)
            except ValueError:  # not the main thread
                self._old_sighup = None
        hook = "init_child" if self.worker is not None else "init_master"
        d = self.server.runner.run(hook, self.server).addCallback(self._init_answered, hook)
        if self.master is not None:
            master = self.master

            def start_workers(go: bool) -> None:  # once init_master has allowed it
                if go and self.running:
                    master.start()

            d.addCallback(start_workers)
            return
        if self.worker is not None and self.worker.queue_lock is None:
            return  # the master does not hold the queue directory: nobody delivers
        # After twistd's -u/-g drop, so the queue directory belongs to the server's user.
        self.server.outbound.start().addErrback(
            lambda f: self.server.log.log(Level.CRIT, f"outbound: {f.getErrorMessage()}")
        )

    def _init_answered(self, result: HookResult, hook: str) -> bool:
        """Anything but OK or CONT from init_master (init_child in a worker) stops the
        server (and under twistd, the process), as in Haraka. Whether to go on."""
        if result.code in (Code.OK, Code.CONT):
            return True
        self.refused = True
        self.server.log.log(
            Level.EMERG,
            f"{hook}: {result.plugin} answered {result.code.name}"
            f"{': ' + result.text if result.text else ''}; stopping",
        )
        self._stop_for_good()
        return False

    def _stop_for_good(self) -> None:
        """Stop the service; under twistd, the process too, with exit status 1, so that
        a supervisor (systemd's Restart=on-failure) sees a failure."""
        d = self.stopService() if self.running else defer.succeed(None)
        if self.owns_process:
            reactor: Any = self.reactor

            def stop_reactor(_: object) -> None:
                with contextlib.suppress(ReactorNotRunning):  # (a stop already under way)
                    reactor.stop()

            d.addBoth(stop_reactor)
            if not self._exit_status_set:
                self._exit_status_set = True
                # At interpreter exit, after twistd has finished (pid file removed, log
                # written): twistd itself always exits 0. Registered late, this runs before
                # the exit handlers registered earlier, which it skips (the standard logging
                # module's, whose handlers have flushed each record already).
                atexit.register(exit_now, 1)

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)  # type: ignore[attr-defined]

    def reload(self) -> list[str]:
        """Re-read every config file now (what SIGHUP does); a master passes SIGHUP on to
        its workers, which do the same."""
        changed: list[str] = self.server.config.reload()
        if self.master is not None:
            count = self.master.reload()
            self.server.log.log(Level.NOTICE, f"reload: passed on to {count} workers")
            return changed
        self.server.outbound.flush()  # as Haraka: SIGHUP retries the deferred queue now
        self.server.log.log(Level.NOTICE, f"reload: {', '.join(changed) or 'nothing changed'}")
        return changed

    def stopService(self) -> Deferred[None]:
        """Stop listening, let sessions finish (up to force_shutdown_timeout), then close them."""
        super().stopService()
        self.server.config.stop_watching()
        if self._old_sighup is not None:
            signal.signal(signal.SIGHUP, self._old_sighup)
            self._old_sighup = None
        ports, self.ports = self.ports, []
        stopped = [defer.maybeDeferred(p.stopListening) for p in ports]
        d: Deferred[Any] = defer.gatherResults(stopped, consumeErrors=True)
        if self.master is not None:  # its copies closed: once the workers close theirs,
            master = self.master  # connections are refused
            return d.addCallback(lambda _: master.stop()).addBoth(self._shut_plugins)
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda _: self.server.outbound.stop())
        return d.addBoth(self._shut_plugins)

    def _shut_plugins(self, result: Any) -> Any:
        """Stop the plugins' timers and connections (Redis), once no session or delivery
        can use them any more."""
        for loaded in self.server.runner.plugins:
            if IShutdown.providedBy(loaded.plugin):
                try:
                    loaded.plugin.shutdown()
                except Exception as e:
                    self.server.log.log(Level.ERROR, f"shutdown failed: {e!r}", origin=loaded.name)
        return result

    def _drain(self) -> Deferred[None]:
        sessions = self.server.factory.sessions
        done: Deferred[None] = Deferred()
        if not sessions:
            done.callback(None)
            return done
        deadline = self.force_shutdown_timeout if self.graceful else 0
        waited = [0.0]
        step = 0.1

        def check() -> None:
            if not sessions:
                done.callback(None)
                return
            if waited[0] >= deadline:
                for session in list(sessions):
                    session.shutdown()
                self.reactor.callLater(0.05, finish)
                return
            waited[0] += step
            self.reactor.callLater(step, check)

        def finish() -> None:
            for session in list(sessions):
                if session.transport is not None:
                    session.transport.abortConnection()
            done.callback(None)

        check()
        return done
