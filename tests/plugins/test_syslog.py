"""syslog: the server's log lines read from a real datagram socket standing where the
syslog daemon's would (a Unix socket, or UDP on loopback), as a mail goes through."""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from haraka_tw.interfaces import IShutdown
from haraka_tw.logging import Level
from haraka_tw.server import StartupError
from tests.support import data_reply, start_server, temp_dir

MESSAGE = b"From: a@sender.example\r\nSubject: hi\r\n\r\nhello\r\n"
LINE = re.compile(
    r"^<(\d+)>[A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d( \S+)? ([^ \[]+)(?:\[(\d+)\])?: (.*)$", re.S
)


def syslog_socket(case: TestCase, udp: bool = False) -> tuple[socket.socket, str]:
    """A datagram socket as syslogd's, and what syslog.ini's socket= names it by."""
    if udp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        where = f"127.0.0.1:{sock.getsockname()[1]}"
    else:
        where = str(temp_dir(case) / "log")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(where)
    sock.setblocking(False)
    case.addCleanup(sock.close)
    return sock, where


def received(sock: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode())
        except BlockingIOError:
            return lines


def output(case: TestCase) -> list[str]:
    """The lines the server writes to its own output from now on."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if "haraka_text" in event:
            lines.append(event["haraka_text"])

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def server(case: TestCase, ini: str) -> Any:
    """A server with the syslog plugin, shut down as twistd would (its socket closed)."""
    haraka, port = start_server(
        case,
        {
            "plugins": "syslog\nrcpt_to.in_host_list\nqueue/discard\n",
            "syslog.ini": ini,
            "host_list": "example.com\n",
            "log.ini": "[main]\nlevel=info\n",
        },
    )
    for loaded in haraka.runner.plugins:
        if IShutdown.providedBy(loaded.plugin):
            case.addCleanup(loaded.plugin.shutdown)
    return haraka, port


def send(port: int) -> Deferred[tuple[int, bytes]]:
    return data_reply(port, "a@sender.example", ["bob@example.com"], MESSAGE)


class SyslogTests(TestCase):
    @inlineCallbacks
    def test_lines_as_syslog_reads_them(self) -> Deferred[None]:
        """Each line is one datagram <PRI>Mmm dd hh:mm:ss name[pid]: line, the priority
        made of the facility (LOCAL3: 19) and the line's severity (the disconnect
        summary is a NOTICE: 5); the line as the server formats it (logfmt here); and,
        without always_ok, on the server's own output too."""
        sock, where = syslog_socket(self)
        ours = output(self)
        _, port = server(
            self, f"[general]\nsocket={where}\nfacility=local3\nname=mta-test\nformat=logfmt\n"
        )
        got = yield send(port)
        self.assertEqual(got[0], 250)
        yield deferLater(reactor, 0.1, lambda: None)
        lines = [LINE.match(line) for line in received(sock)]
        self.assertTrue(lines and all(lines), lines)
        summaries = [m for m in lines if m and "message=disconnect" in m.group(5)]
        self.assertEqual(len(summaries), 1)
        pri, host, name, pid, text = summaries[0].groups()
        self.assertEqual(
            (int(pri), host, name, int(pid)), (19 * 8 + 5, None, "mta-test", os.getpid())
        )
        self.assertTrue(text.startswith("level=NOTICE "), text)
        uuid = re.search(r"uuid=(\S+)", text)
        assert uuid is not None
        self.assertIn(f"[NOTICE] [{uuid.group(1)}] [core] disconnect ip=", "\n".join(ours))

    def test_always_ok_and_a_line_with_a_newline(self) -> None:
        """always_ok: to syslog only; a newline in a line is written as \\n (one
        datagram, one line); no pid with log_pid=false (Haraka's pid= is read too)."""
        sock, where = syslog_socket(self)
        ours = output(self)
        haraka, _ = server(self, f"[general]\nsocket={where}\nalways_ok=true\npid=false\n")
        haraka.log.log(Level.WARN, "one\ntwo", origin="test")
        lines = [LINE.match(line) for line in received(sock)]
        self.assertEqual(len(lines), 1)
        assert lines[0] is not None
        pri, host, name, pid, text = lines[0].groups()
        self.assertEqual((int(pri), host, name, pid), (2 * 8 + 4, None, "haraka", None))
        self.assertEqual(text, "[WARN] [-] [test] one\\ntwo")
        self.assertEqual([line for line in ours if "one" in line], [])

    @inlineCallbacks
    def test_a_syslog_that_is_away(self) -> Deferred[None]:
        """While nothing listens on the socket, lines go to the server's output even with
        always_ok, with one WARN saying why; once syslog is there (tried again after a
        second), they go to it, with one NOTICE saying so."""
        where = str(temp_dir(self) / "log")
        ours = output(self)
        haraka, _ = server(self, f"[general]\nsocket={where}\nalways_ok=true\n")
        haraka.log.log(Level.INFO, "first", origin="test")
        haraka.log.log(Level.INFO, "second", origin="test")
        warnings = [line for line in ours if "cannot reach syslog" in line]
        self.assertEqual(len(warnings), 1, ours)
        self.assertIn("[test] first", "\n".join(ours))
        self.assertIn("[test] second", "\n".join(ours))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(where)
        sock.setblocking(False)
        self.addCleanup(sock.close)
        yield deferLater(reactor, 1.1, lambda: None)
        haraka.log.log(Level.INFO, "third", origin="test")
        self.assertIn("[test] third", "\n".join(received(sock)))
        self.assertNotIn("[test] third", "\n".join(ours))
        self.assertEqual(len([line for line in ours if "reached again" in line]), 1)

    def test_a_full_syslog_is_not_waited_for(self) -> None:
        """A daemon that reads nothing: once its queue is full the lines are dropped at
        once (the server is not held up); when it takes lines again, a WARN says how many
        it had no room for."""
        sock, where = syslog_socket(self)
        ours = output(self)
        haraka, _ = server(self, f"[general]\nsocket={where}\nalways_ok=true\n")
        started = time.monotonic()
        for n in range(3000):
            haraka.log.log(Level.INFO, f"line {n}", origin="test")
        self.assertLess(time.monotonic() - started, 5)
        got = len(received(sock))
        self.assertEqual([line for line in ours if "did not take" in line], [])
        haraka.log.log(Level.INFO, "after", origin="test")
        self.assertEqual(len(received(sock)), 1)
        dropped = [line for line in ours if "syslog did not take" in line]
        self.assertEqual(len(dropped), 1, ours[-3:])
        count = re.search(r"did not take (\d+) lines", dropped[0])
        assert count is not None
        self.assertEqual(got + int(count.group(1)), 3000)

    @inlineCallbacks
    def test_udp_server(self) -> Deferred[None]:
        """socket=address:port: the lines go over UDP, with this host's name after the
        time, as a syslog server expects."""
        sock, where = syslog_socket(self, udp=True)
        _, port = server(self, f"[general]\nsocket={where}\n")
        got = yield send(port)
        self.assertEqual(got[0], 250)
        yield deferLater(reactor, 0.1, lambda: None)
        lines = [LINE.match(line) for line in received(sock)]
        self.assertTrue(lines and all(lines))
        first = lines[0]
        assert first is not None
        self.assertEqual(first.group(2), " " + socket.gethostname().split(".")[0])
        self.assertEqual(int(first.group(1)) // 8, 2)  # (MAIL)

    @inlineCallbacks
    def test_udp_with_nothing_listening(self) -> Deferred[None]:
        """Over UDP a line goes whether or not anything listens; the refusals loopback
        reports are counted, and a WARN says how many lines were not taken."""
        nobody = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        nobody.bind(("127.0.0.1", 0))
        where = f"127.0.0.1:{nobody.getsockname()[1]}"
        nobody.close()
        ours = output(self)
        haraka, _ = server(self, f"[general]\nsocket={where}\nalways_ok=true\n")
        for n in range(3):
            haraka.log.log(Level.INFO, f"line {n}", origin="test")
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue([line for line in ours if "syslog did not take" in line], ours)

    def test_a_long_line_is_cut_between_characters(self) -> None:
        """max_length cuts the datagram, never inside a UTF-8 character."""
        sock, where = syslog_socket(self)
        haraka, _ = server(self, f"[general]\nsocket={where}\nmax_length=70\n")
        haraka.log.log(Level.INFO, "\u00e9" * 100, origin="test")
        (datagram,) = received(sock)  # (received() decodes: it would fail on a cut one)
        self.assertLessEqual(len(datagram.encode()), 70)
        self.assertTrue(datagram.endswith("\u00e9\u00e9"), datagram)

    def test_bad_settings_stop_startup_naming_them(self) -> None:
        for ini, named in (
            ("facility=mailz\n", "syslog.ini [general] facility: 'MAILZ' is not one of"),
            ("name=my mta\n", "name: 'my mta' is not a tag"),
            ("socket=syslog.example.com:514\n", "socket: a path, or an IP address and port"),
            ("format=xml\n", "format: 'xml' is not one of"),
        ):
            with self.assertRaises(StartupError) as caught:
                server(self, "[general]\n" + ini)
            self.assertIn(named, str(caught.exception))
