"""Memory of a real server process stays flat under hostile input: an endless line, an
endless header, a flood of pipelined commands from a client that never reads."""

from __future__ import annotations

import socket
import time

from tests.e2e.test_twistd import TwistdTestCase
from tests.support import WireClient, reply_code

MB = 1024 * 1024


def rss_kb(pid: int) -> int:
    """Resident memory of C{pid} in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def pump(sock: socket.socket, piece: bytes, total: int) -> int:
    """Send C{piece} repeatedly until C{total} bytes went or the server closed."""
    sent = 0
    try:
        while sent < total:
            sock.sendall(piece)
            sent += len(piece)
    except OSError:
        pass
    return sent


class MemoryTests(TwistdTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.configure({"plugins": "rcpt_to.in_host_list\nqueue/discard\n"})
        self.proc = self.start_foreground()
        with WireClient(self.port) as c:  # warm up: one ordinary message
            c.command("EHLO client.test")
            c.command("QUIT")
        time.sleep(0.2)
        self.baseline = rss_kb(self.proc.pid)

    def grown_mb(self) -> float:
        return (rss_kb(self.proc.pid) - self.baseline) / 1024

    def test_endless_header(self) -> None:
        """60 MB of header lines (no blank line) in DATA: RSS grows by less than 30 MB."""
        with WireClient(self.port) as c:
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@client.test>")
            c.command("RCPT TO:<b@example.com>")
            self.assertEqual(reply_code(c.command("DATA")), 354)
            pump(c.sock, b"X-Flood: " + b"a" * 60 + b"\r\n\tfolded continuation\r\n", 60 * MB)
            peak = self.grown_mb()
            c.send(b"\r\n.\r\n")
            self.assertEqual(reply_code(c.reply()), 552)  # over max.bytes: too big
        self.assertLess(peak, 30, f"RSS grew {peak:.1f} MB")

    def test_endless_line_in_data_and_commands(self) -> None:
        """One 60 MB line in DATA, then an endless command line: flat memory, 521 for the latter."""
        with WireClient(self.port) as c:
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@client.test>")
            c.command("RCPT TO:<b@example.com>")
            c.command("DATA")
            pump(c.sock, b"b" * 65536, 60 * MB)
            c.send(b"\r\n.\r\n")
            self.assertEqual(reply_code(c.reply()), 552)
            peak = self.grown_mb()
            pump(c.sock, b"NOOP " + b"x" * 65536, 5 * MB)
            self.assertEqual(reply_code(c.reply()), 521)
        self.assertLess(peak, 30, f"RSS grew {peak:.1f} MB")

    def test_pipelined_flood_from_a_client_that_never_reads(self) -> None:
        """20 MB of pipelined NOOPs from a client that reads nothing: the server stops
        reading instead of queueing replies; RSS grows by less than 30 MB."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(3)
        sent = pump(sock, b"NOOP\r\n" * 10000, 20 * MB)
        peak = self.grown_mb()
        sock.close()
        self.assertLess(sent, 20 * MB, "the server kept reading without us reading replies")
        self.assertLess(peak, 30, f"RSS grew {peak:.1f} MB")
