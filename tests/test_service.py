"""smtp.ini listen parsing, and the service's graceful stop on a real port."""

from __future__ import annotations

import re
import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from haraka_tw.codes import DENYSOFT, OK
from haraka_tw.interfaces import IRcptHook, IShutdown
from haraka_tw.server import HarakaServer, StartupError
from haraka_tw.service import HarakaService, parse_listen
from haraka_tw.workers import available_cpus
from tests.support import temp_dir, write_config


def test_listen_forms() -> None:
    """ip:port, [v6]:port, bare ip (port 25), :port and endpoint strings."""
    assert parse_listen("127.0.0.1:2525, [::1]:2526,10.0.0.1") == [
        "tcp:2525:interface=127.0.0.1",
        "tcp6:2526:interface=\\:\\:1",
        "tcp:25:interface=10.0.0.1",
    ]
    assert parse_listen("[::0]:25") == ["tcp6:25:interface=\\:\\:0"]
    assert parse_listen("*:587,:465") == ["tcp:587", "tcp:465"]
    assert parse_listen("tcp:2525:interface=127.0.0.1,unix:/run/h.sock") == [
        "tcp:2525:interface=127.0.0.1",
        "unix:/run/h.sock",
    ]


def test_listen_refuses_twisted_haproxy_endpoint() -> None:
    """haproxy: would take a PROXY header from any client, past [haproxy] hosts."""
    with pytest.raises(ValueError, match=r"haproxy:tcp:2525.*\[haproxy\] hosts"):
        parse_listen("127.0.0.1:25,haproxy:tcp:2525")


def test_embedding_refuses_twisted_haproxy_endpoint(tmp_path: Path) -> None:
    """An endpoint string given straight to HarakaService is checked as listen is."""
    from twisted.internet import reactor

    conf = write_config(tmp_path / "c", {"me": "mx.test\n"})
    service = HarakaService(
        HarakaServer.from_directory(conf, reactor),
        ["haproxy:tcp:0:interface=127.0.0.1"],
        watch_interval=0,
        handle_sighup=False,
    )
    with pytest.raises(StartupError, match=r"\[haproxy\] hosts"):
        service.privilegedStartService()
    assert service.ports == []


def test_config_directory_missing_or_a_file_says_which(tmp_path: Path) -> None:
    """--config naming nothing, or a file, stops start-up saying which it is."""
    missing, afile = tmp_path / "nope", tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StartupError, match=rf"^config directory {missing} does not exist$"):
        HarakaServer.from_directory(missing, reactor)  # type: ignore[arg-type]
    with pytest.raises(StartupError, match=rf"^config directory {afile} is not a directory$"):
        HarakaServer.from_directory(afile, reactor)  # type: ignore[arg-type]


def test_listen_errors_name_the_entry() -> None:
    """A bad entry is an error naming it."""
    for bad in ("127.0.0.1:99999", "a b:25", "[zz]:25", ""):
        with pytest.raises(ValueError, match="listen"):
            parse_listen(bad)


@implementer(IRcptHook, IShutdown)
class Closing:
    """Test plugin: takes recipients until it is shut down (as greylist needs its Redis
    connection), and notes how many sessions were still open then."""

    def __init__(self) -> None:
        self.sessions: set[object] = set()
        self.open_at_shutdown: list[int] = []

    def hook_rcpt(self, connection: Any, recipient: Any, params: Any) -> Any:
        return DENYSOFT if self.open_at_shutdown else OK

    def shutdown(self) -> None:
        self.open_at_shutdown.append(len(self.sessions))


class GracefulStopTests(TestCase):
    @inlineCallbacks
    def test_stop_lets_open_session_finish_then_closes(self) -> Deferred[None]:
        """stopService closes the listener at once, lets a session finish, then closes it."""
        base = temp_dir(self)
        conf = write_config(
            base / "c",
            {
                "smtp.ini": "[main]\nforce_shutdown_timeout=1\n",
                "maildir.ini": f"[main]\npath={base / 'md'}\n",
                "me": "mx.test\n",
            },
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        service = HarakaService(
            HarakaServer.from_directory(conf, reactor),
            [f"tcp:{port}:interface=127.0.0.1"],
            watch_interval=0,
            handle_sighup=False,
        )
        service.startService()
        client = yield deferToThread(smtplib.SMTP, "127.0.0.1", port, timeout=5)
        yield deferToThread(client.ehlo, "c.test")
        stopping = service.stopService()
        yield deferLater(reactor, 0.1, lambda: None)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        code, _ = yield deferToThread(client.noop)  # still served while draining
        self.assertEqual(code, 250)
        yield stopping
        # The server said 421 and closed: the next read sees the 421, then the close.
        code, text = yield deferToThread(client.noop)
        self.assertEqual((code, text), (421, b"4.3.2 server shutting down, closing connection"))
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            yield deferToThread(client.noop)
        client.close()

    @inlineCallbacks
    def test_plugins_shut_down_after_the_sessions_end(self) -> Deferred[None]:
        """A plugin's shutdown() runs once the open session has ended, not when the
        stop begins: the session is still served by working plugins (their Redis
        connection, say) while it drains."""
        base = temp_dir(self)
        conf = write_config(
            base / "c",
            {
                "smtp.ini": "[main]\nforce_shutdown_timeout=5\n",
                "plugins": f"{__name__}:Closing\n",
                "me": "mx.test\n",
            },
        )
        server = HarakaServer.from_directory(conf, reactor)
        service = HarakaService(
            server, ["tcp:0:interface=127.0.0.1"], watch_interval=0, handle_sighup=False
        )
        service.startService()
        (plugin,) = [loaded.plugin for loaded in server.runner.plugins]
        plugin.sessions = server.factory.sessions
        port = service.ports[0].getHost().port
        client = yield deferToThread(smtplib.SMTP, "127.0.0.1", port, timeout=5)
        stopping = service.stopService()
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(plugin.open_at_shutdown, [])
        yield deferToThread(client.ehlo, "c.test")
        yield deferToThread(client.mail, "joe@example.com")
        code, _ = yield deferToThread(client.rcpt, "you@example.com")
        self.assertEqual(code, 250)
        code, _ = yield deferToThread(client.quit)  # (the session ends: the drain is over)
        self.assertEqual(code, 221)
        yield stopping
        self.assertEqual(plugin.open_at_shutdown, [0])
        client.close()


class InitMasterTests(TestCase):
    def service(self, answer: object) -> HarakaService:
        base = temp_dir(self)
        conf = write_config(base / "c", {"me": "mx.test\n", "plugins": "queue/discard\n"})
        server = HarakaServer.from_directory(conf, reactor)
        from haraka_tw.hooks.runner import HookRunner, LoadedPlugin
        from tests.support import plugin_with

        plugin = plugin_with({"init_master": lambda srv: answer})
        server.runner = HookRunner([LoadedPlugin("gate", plugin)], reactor, server.log)
        return HarakaService(
            server, ["tcp:0:interface=127.0.0.1"], watch_interval=0, handle_sighup=False
        )

    def test_init_master_refusal_stops_listening(self) -> None:
        """init_master answering DENY stops the service: its listener closes."""
        from haraka_tw.codes import DENY

        service = self.service((DENY, "license expired"))
        service.startService()
        self.assertEqual(service.ports, [])
        self.assertFalse(service.running)

    def test_init_master_ok_keeps_running(self) -> None:
        """init_master answering OK (or CONT) leaves the server listening."""
        from haraka_tw.codes import OK

        service = self.service(OK)
        service.startService()
        self.assertEqual(len(service.ports), 1)
        self.addCleanup(service.stopService)


def test_listen_backlog() -> None:
    """host:port listeners get smtp.ini listen_backlog; endpoint strings keep their own."""
    assert parse_listen("127.0.0.1:2525,[::1]:25,tcp:26", backlog=1024) == [
        "tcp:2525:interface=127.0.0.1:backlog=1024",
        "tcp6:25:interface=\\:\\:1:backlog=1024",
        "tcp:26",
    ]


class NodesOptionTests(TestCase):
    """smtp.ini nodes, as the service reads it (the processes themselves: tests/e2e)."""

    def server(self, nodes: str) -> HarakaServer:
        base = temp_dir(self)
        conf = write_config(base / "c", {"me": "mx.test\n", "smtp.ini": f"[main]\nnodes={nodes}\n"})
        return HarakaServer.from_directory(conf, reactor)

    def test_twistd_reads_nodes_from_smtp_ini(self) -> None:
        """nodes=None (what twistd haraka passes) takes smtp.ini's; 0 and 1 are one process."""
        for text, nodes in (("3", 3), ("0", 1), ("1", 1), ("cpus", available_cpus())):
            service = HarakaService(self.server(text), ["tcp:0"], nodes=None)
            self.assertEqual(service.nodes, nodes)

    def test_embedded_services_serve_in_their_process(self) -> None:
        """By default (embedded) the service is one process, whatever smtp.ini says."""
        self.assertEqual(HarakaService(self.server("4"), ["tcp:0"]).nodes, 1)

    def test_a_bad_value_is_a_startup_error_naming_smtp_ini(self) -> None:
        """nodes=-2 stops start-up with a message naming smtp.ini nodes."""
        with pytest.raises(StartupError, match=r"smtp\.ini nodes: .*-2"):
            HarakaService(self.server("-2"), ["tcp:0"], nodes=None)

    def test_workers_need_endpoint_strings(self) -> None:
        """Above 1, listeners given as objects cannot reach the workers: refused."""
        endpoint = serverFromString(reactor, "tcp:0")
        with pytest.raises(StartupError, match="endpoint strings"):
            HarakaService(self.server("2"), [endpoint], nodes=None)


class BadNumbersTests(TestCase):
    """Numbers the server reads at start-up: one that is no number, or out of range,
    stops it with a message naming the file and key (not Python's conversion error)."""

    def start(self, files: dict[str, str]) -> HarakaService:
        base = temp_dir(self)
        conf = write_config(base / "c", {"me": "mx.test\n", **files})
        return HarakaService(HarakaServer.from_directory(conf, reactor), ["tcp:0"])

    def test_each_is_named(self) -> None:
        for files, message in (
            ({"smtp.ini": "inactivity_timeout=-1\n"}, "smtp.ini inactivity_timeout: -1"),
            (
                {"smtp.ini": "force_shutdown_timeout=abc\n"},
                "smtp.ini force_shutdown_timeout: 'abc'",
            ),
            ({"smtp.ini": "smtps_port=abc\n"}, "smtp.ini smtps_port: 'abc'"),
            ({"smtp.ini": "smtps_port=70000\n"}, "smtp.ini smtps_port: 70000"),
            ({"plugin_timeout": "-3\n"}, "plugin_timeout: -3 is not a number of 0 or more"),
            ({"plugin_timeout": "soon\n"}, "plugin_timeout: 'soon'"),
            ({"outbound.ini": "concurrency_max=-1\n"}, "outbound.ini [main] concurrency_max: -1"),
            ({"outbound.ini": "connect_timeout=-5\n"}, "outbound.ini [main] connect_timeout: -5"),
            ({"outbound.ini": "domain_rate=fast\n"}, "outbound.ini [main] domain_rate: 'fast'"),
            (
                {"outbound.ini": "[domain.example.com]\nconcurrency=-2\n"},
                "outbound.ini [domain.example.com] concurrency: -2",
            ),
        ):
            with pytest.raises(StartupError, match=re.escape(message)):
                self.start(files)

    def test_zero_means_what_it_meant(self) -> None:
        """plugin_timeout=0 (no limit) and an empty smtps_port (no port rule) still start;
        outbound.ini concurrency_max=0, connect_timeout=0 and smtp.ini listen_backlog=0
        mean their defaults, as Haraka reads them."""
        service = self.start(
            {
                "plugin_timeout": "0\n",
                "smtp.ini": "smtps_port=\nlisten_backlog=0\n",
                "outbound.ini": "concurrency_max=0\nconnect_timeout=0\n",
            }
        )
        self.assertEqual(service.smtps_port, 0)
        self.assertEqual(service.server.runner.plugin_timeout, 0)
        outbound = service.server.outbound
        self.assertEqual(outbound.limits.concurrency_max, 100)
        self.assertEqual(outbound.settings.timeouts.connect, 30)
        parsed = HarakaService(service.server, None)  # (smtp.ini listen, read, not bound)
        self.assertEqual(parsed.endpoints, ["tcp:2525:interface=127.0.0.1:backlog=1024"])


def test_an_unusable_spool_dir_stops_start_up(tmp_path: Path) -> None:
    """connection.ini spool_dir that can never be a directory (a file in the way) stops
    start-up, naming it; one that is missing is left for the first spooled message to make
    (as the user twistd -u drops to, which start-up does not run as yet)."""
    conf = write_config(
        tmp_path / "c",
        {"me": "mx.test\n", "connection.ini": "[main]\nspool_dir=/dev/null/spool\n"},
    )
    with pytest.raises(
        StartupError,
        match=r"connection\.ini \[main\] spool_dir: /dev/null/spool: /dev/null is not a directory",
    ):
        HarakaServer.from_directory(conf, reactor)
    spool = tmp_path / "later" / "spool"
    conf = write_config(
        tmp_path / "d", {"me": "mx.test\n", "connection.ini": f"[main]\nspool_dir={spool}\n"}
    )
    HarakaServer.from_directory(conf, reactor)
    assert not (tmp_path / "later").exists()


def test_a_plugin_that_cannot_load_is_named_with_its_line(tmp_path: Path) -> None:
    """The start-up error for a plugin that cannot load names the plugins file and line."""
    conf = write_config(
        tmp_path / "c",
        {"me": "mx.test\n", "plugins": "# mine\nrcpt_to.in_host_list\nqueue/maildir # x\n"},
    )
    plugins = re.escape(str(conf / "plugins"))
    with pytest.raises(StartupError, match=rf"^{plugins}:3: plugin 'queue/maildir # x' failed"):
        HarakaServer.from_directory(conf, reactor)
