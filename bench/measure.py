"""Measurements of one server: CPU time and memory from /proc/<pid> (summed over the
process and its descendants, for a server with worker processes), a load run with
smtp-source, and memory per idle greeted connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from bench.tools import Postfix

__all__ = [
    "LoadError",
    "PeakRSS",
    "Sample",
    "cpu_seconds",
    "cpu_times",
    "hold_idle",
    "rss_kb",
    "smtp_source",
    "warm_up",
]

_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """C{pid} and every live descendant of it (haraka_tw's workers, with nodes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return found


def _cpu_of(pid: int) -> float:
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of C{pid} alone (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS  # utime, stime


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of C{pid} (all its threads) and its live descendants, in
    seconds."""
    total = _cpu_of(pid)
    for other in process_tree(pid)[1:]:
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            total += _cpu_of(other)
    return total


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS for {pid}")


def rss_kb(pid: int) -> int:
    """Resident memory of C{pid} and its live descendants in KiB (pages a fork still
    shares with its parent count in each)."""
    total = _rss_of(pid)
    for other in process_tree(pid)[1:]:
        with contextlib.suppress(OSError):
            total += _rss_of(other)
    return total


class PeakRSS:
    """Samples a process's RSS every C{interval} seconds while in the with-block."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            try:
                self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
            except OSError:
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))


@dataclass
class Sample:
    """One load run against one server."""

    messages: int
    seconds: float
    cpu_seconds: float
    peak_rss_kb: int
    error: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 and not self.error else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        return 1000 * self.cpu_seconds / self.messages if self.messages else 0.0


class LoadError(Exception):
    """smtp-source failed; the message is its last output line."""


def smtp_source(
    postfix: Postfix,
    port: int,
    *,
    sessions: int,
    messages: int,
    size: int,
    reuse: bool,
    timeout: float,
) -> float:
    """Send C{messages} messages of C{size} bytes over C{sessions} parallel sessions; a new
    connection per message unless C{reuse} (smtp-source -d). Returns the wall time."""
    argv = [
        str(postfix.smtp_source),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-M",
        "client.test",
        "-f",
        "bench@client.test",
        "-t",
        "user@bench.test",
    ]
    if reuse:
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, env=postfix.env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise LoadError(f"smtp-source timed out after {timeout:.0f}s") from e
    took = time.monotonic() - started
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise LoadError(lines[-1] if lines else f"smtp-source exit {done.returncode}")
    return took


def warm_up(postfix: Postfix, pid: int, port: int) -> Sample:
    """The short unmeasured run every server gets once it has started (2 sessions x 20
    messages of 1 KB): imports, caches and the first connections are done before the
    measured runs."""
    return load(postfix, pid, port, sessions=2, messages=20, size=1024, reuse=False, timeout=60)


def load(
    postfix: Postfix,
    pid: int,
    port: int,
    *,
    sessions: int,
    messages: int,
    size: int,
    reuse: bool,
    timeout: float,
) -> Sample:
    """One smtp-source run with the server's CPU time and peak RSS around it."""
    cpu0 = cpu_seconds(pid)
    error = ""
    seconds = 0.0
    with PeakRSS(pid) as peak:
        try:
            seconds = smtp_source(
                postfix,
                port,
                sessions=sessions,
                messages=messages,
                size=size,
                reuse=reuse,
                timeout=timeout,
            )
        except LoadError as e:
            error = str(e)
    return Sample(messages, seconds, cpu_seconds(pid) - cpu0, peak.peak_kb, error)


@dataclass
class IdleSample:
    """C{held} connections greeted at once; the server's RSS before and with them."""

    wanted: int
    held: int
    rss_before_kb: int
    rss_with_kb: int
    seconds: float

    @property
    def bytes_per_connection(self) -> float:
        return 1024 * (self.rss_with_kb - self.rss_before_kb) / self.held if self.held else 0.0


_LINGER_RESET = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT left behind


def hold_idle(
    pid: int, port: int, count: int, timeout: float = 60.0, in_flight: int = 40
) -> IdleSample:
    """Open C{count} connections to 127.0.0.1:port, read each 220 banner, and keep them
    open (sending nothing) while the server's RSS is read; then close them all.

    At most C{in_flight} connections wait for their banner at once, so a server with a
    small listen backlog is not sent into SYN retries.
    """
    rss_before = rss_kb(pid)
    sel = selectors.DefaultSelector()
    waiting: dict[socket.socket, bytes] = {}
    greeted: list[socket.socket] = []
    opened = 0
    started = time.monotonic()
    deadline = started + timeout
    try:
        while len(greeted) < count and time.monotonic() < deadline:
            while opened < count and len(waiting) < in_flight:
                s = socket.socket()
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                err = s.connect_ex(("127.0.0.1", port))
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    raise OSError(err, os.strerror(err))
                sel.register(s, selectors.EVENT_READ)
                waiting[s] = b""
                opened += 1
            for key, _ in sel.select(timeout=1.0):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = s.recv(4096)
                except OSError:
                    chunk = b""
                if not chunk:  # refused or closed: try another one
                    sel.unregister(s)
                    del waiting[s]
                    s.close()
                    opened -= 1
                    continue
                data = waiting[s] + chunk
                waiting[s] = data
                # the greeting is complete at its last line: "220 ..." (not "220-")
                if data.endswith(b"\r\n") and b"\n220 " in b"\n" + data:
                    sel.unregister(s)
                    del waiting[s]
                    greeted.append(s)
        took = time.monotonic() - started
        time.sleep(0.5)  # let the server settle
        rss_with = rss_kb(pid)
    finally:
        for s in list(waiting) + greeted:
            s.close()
        sel.close()
    return IdleSample(count, len(greeted), rss_before, rss_with, took)
