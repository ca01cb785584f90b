"""Delivery rate from haraka_tw's outbound queue to smtp-sink.

One run: a loopback DNS server (peers/dns_server.py: every domain's MX is 127.0.0.1), an
smtp-sink that exits once it has received every message (``-M``), and a haraka_tw whose
outbound.ini points delivery at the sink (``mx_port``, ``local_mx_ok``) and starts
*disabled*. The bench asks the server (``XBENCH``, peers/outbound_load.py) to queue the
messages through ``OutboundService.send_email``; once all are on disk it rewrites
outbound.ini with ``disabled=false`` and sends SIGHUP (re-read config, flush), and times
until smtp-sink has them all. Connection reuse is haraka_tw's own pool (on by default).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.measure import PeakRSS, cpu_seconds
from bench.servers import (
    PEERS,
    Launch,
    ServerKind,
    ServerProcess,
    free_port,
    twistd_haraka,
    write_haraka_config,
)
from bench.tools import Postfix

__all__ = ["OutboundSample", "deliver"]

PLUGIN = "bench.peers.outbound_load:Plugin"


@dataclass
class OutboundSample:
    messages: int
    domains: int
    queue_seconds: float
    seconds: float
    cpu_seconds: float
    peak_rss_kb: int
    error: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 and not self.error else 0.0

    @property
    def queue_rate(self) -> float:
        return self.messages / self.queue_seconds if self.queue_seconds > 0 else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        return 1000 * self.cpu_seconds / self.messages if self.messages else 0.0


def outbound_ini(work: Path, sink_port: int, disabled: bool) -> str:
    return (
        "[main]\n"
        f"queue_dir={work / 'queue'}\n"
        f"mx_port={sink_port}\n"
        "local_mx_ok=true\n"
        f"disabled={'true' if disabled else 'false'}\n"
    )


class OutboundHaraka(ServerKind):
    key = "haraka-outbound"
    label = "haraka_tw outbound"

    def __init__(self, sink_port: int, dns_port: int) -> None:
        self.sink_port = sink_port
        self.dns_port = dns_port

    def launch(self, work: Path, port: int) -> Launch:
        confdir = work / "config"
        write_haraka_config(
            confdir,
            port,
            [PLUGIN],
            {
                "outbound.ini": outbound_ini(work, self.sink_port, disabled=True),
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{self.dns_port}\ntimeout=2\n",
                "plugin_timeout": "600\n",
            },
        )
        return twistd_haraka(work, confdir)


def _command(port: int, line: str, timeout: float) -> str:
    """Greet, EHLO, send C{line}; the reply to it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rwb")

        def reply() -> str:
            lines = []
            while True:
                got = f.readline()
                if not got:
                    raise OSError("connection closed")
                lines.append(got.decode(errors="replace").rstrip())
                if got[3:4] != b"-":
                    return "\n".join(lines)

        reply()
        for command in ("EHLO bench.client", line):
            f.write(command.encode() + b"\r\n")
            f.flush()
            answer = reply()
        f.write(b"QUIT\r\n")
        f.flush()
        return answer


def _queued_files(queue_dir: Path) -> int:
    try:
        return sum(1 for p in queue_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return 0


def deliver(
    postfix: Postfix, work: Path, *, messages: int, domains: int, size: int, timeout: float
) -> OutboundSample:
    """One outbound run (fresh DNS server, smtp-sink and haraka_tw in C{work})."""
    work.mkdir(parents=True, exist_ok=True)
    dns_port, sink_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    server: ServerProcess | None = None
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, str(PEERS / "dns_server.py"), str(dns_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        sink_argv = [str(postfix.smtp_sink)]
        if os.geteuid() == 0:
            sink_argv += ["-u", "nobody"]
        sink_argv += ["-M", str(messages), "-m", "2000", f"127.0.0.1:{sink_port}", "1024"]
        sink = subprocess.Popen(
            sink_argv, env=postfix.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(sink)
        kind = OutboundHaraka(sink_port, dns_port)
        server = ServerProcess(kind, work / "haraka")
        server.start()
        started = time.monotonic()
        answer = _command(server.port, f"XBENCH {messages} {domains} {size}", timeout)
        queue_seconds = time.monotonic() - started
        if not answer.startswith("250"):
            raise RuntimeError(f"XBENCH: {answer}")
        cpu0 = cpu_seconds(server.pid)
        error = ""
        with PeakRSS(server.pid) as peak:
            started = time.monotonic()
            (server.work / "config" / "outbound.ini").write_text(
                outbound_ini(server.work, sink_port, disabled=False)
            )
            os.kill(server.pid, signal.SIGHUP)
            try:
                sink.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                left = _queued_files(server.work / "queue")
                error = f"timed out: about {messages - left} of {messages} delivered"
            seconds = time.monotonic() - started
        return OutboundSample(
            messages,
            domains,
            queue_seconds,
            seconds,
            cpu_seconds(server.pid) - cpu0,
            peak.peak_kb,
            error,
        )
    finally:
        if server is not None:
            server.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
