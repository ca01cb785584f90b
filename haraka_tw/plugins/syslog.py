"""syslog: every log line to syslog too, or instead (Haraka's C{syslog}, reading its
syslog.ini).

Each line that passes log.ini's level goes to the local syslog daemon's socket
(C{/dev/log}), or to a syslog server over UDP (C{socket=host:port}), as the C library's
C{syslog()} writes it: C{<PRI>Mmm dd hh:mm:ss name[pid]: line}, the priority made of
C{facility} and the line's level (EMERG to DEBUG as syslog's severities, PROTOCOL and
DATA as DEBUG), the line in log.ini's format. With C{always_ok} the line goes to syslog
only, else to the server's own output as well.

The socket is a non-blocking datagram socket: a line syslog cannot take at once (its
queue full) is dropped and counted, never waited for, so a stuck syslog daemon cannot
stall the server. While the socket cannot be reached (no daemon yet, or it restarted),
the lines go to the server's own output even with C{always_ok}, and the socket is tried
again at most once a second; the first failure and the return are logged.

Done otherwise than Haraka's plugin: a bad C{facility} stops start-up (Haraka fell back
to MAIL); the shipped file's keys are the ones read (Haraka's shipped C{pid=} and
C{odelay=}, while it read C{log_pid} and C{log_odelay}: both names are read here); a line
is cut to C{max_length} bytes; lines are not lost while the local socket is away (over
UDP nothing says whether a line arrived: a refusal the network reports is counted);
a syslog server over UDP can be set.

syslog.ini::

    [general]
    name=haraka          ; the tag (ident)
    facility=MAIL        ; KERN, USER, MAIL, DAEMON, AUTH, SYSLOG, LPR, NEWS, UUCP,
                         ; CRON, AUTHPRIV, FTP, LOCAL0 .. LOCAL7
    log_pid=true         ; (or pid=) the process id after the tag
    always_ok=false      ; true: to syslog only
    ;socket=/dev/log     ; or address:port (UDP), [IPv6]:port
    ;max_length=8192     ; bytes of a datagram, 64 to 65000 (longer lines are cut)
    ;format=             ; default, logfmt or json; log.ini's if unset

C{log_odelay}, C{log_cons}, C{log_ndelay} and C{log_nowait} (C library options) are
accepted and have no effect: the socket is opened at start, and nothing is written to
the console.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, OK, Code
from haraka_tw.config.formats import ini_number
from haraka_tw.config.ini import is_truthy
from haraka_tw.exchange import parse_address
from haraka_tw.interfaces import ILogHook, IPluginContext, IRegistration, IShutdown
from haraka_tw.logging import FORMATS, Level, LogRecord, format_record

__all__ = ["BOOLEANS", "FACILITIES", "INI", "Plugin", "Settings", "read_settings"]

INI = "syslog.ini"
FACILITIES = {
    "KERN": 0,
    "USER": 1,
    "MAIL": 2,
    "DAEMON": 3,
    "AUTH": 4,
    "SYSLOG": 5,
    "LPR": 6,
    "NEWS": 7,
    "UUCP": 8,
    "CRON": 9,
    "AUTHPRIV": 10,
    "FTP": 11,
    **{f"LOCAL{n}": 16 + n for n in range(8)},
}
BOOLEANS = ["-general.always_ok"]
_RETRY = 1.0  # seconds between attempts to reach a socket that failed
#: the longest datagram sent (UDP's limit is 65,507 bytes; a Unix socket takes this)
MAX_LENGTH = 65000
_TAG = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/")


@dataclass(frozen=True)
class Settings:
    name: str = "haraka"
    facility: int = FACILITIES["MAIL"]
    pid: bool = True
    always_ok: bool = False
    socket: str = "/dev/log"
    max_length: int = 8192
    format: str = "default"


def read_settings(ini: dict[str, dict[str, Any]], log_format: str) -> Settings:
    """syslog.ini's settings; ValueError naming the file and key for a bad value."""
    general = ini.get("general", {})
    where = f"{INI} [general]"
    name = str(general.get("name") or "haraka").strip()
    if not name or len(name) > 48 or not set(name) <= _TAG:
        raise ValueError(f"{where} name: {name!r} is not a tag (letters, digits, . _ - /)")
    facility = str(general.get("facility") or "MAIL").strip().upper()
    if facility not in FACILITIES:
        raise ValueError(f"{where} facility: {facility!r} is not one of {', '.join(FACILITIES)}")
    fmt = str(general.get("format") or log_format or "default").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"{where} format: {fmt!r} is not one of {', '.join(FORMATS)}")
    target = str(general.get("socket") or "/dev/log").strip()
    if not target.startswith("/"):
        try:
            ipaddress.ip_address(parse_address(target, 514).host)
        except ValueError as e:  # (an address: no lookup, which would hold the reactor)
            raise ValueError(f"{where} socket: a path, or an IP address and port: {e}") from None
    length = ini_number(general, "max_length", 8192, zero_ok=False, where=where)
    pid = general.get("log_pid", general.get("pid"))  # (Haraka read one, shipped the other)
    return Settings(
        name=name,
        facility=FACILITIES[facility],
        pid=True if pid is None else is_truthy(pid),
        always_ok=bool(general.get("always_ok", False)),
        socket=target,
        max_length=min(max(int(length), 64), MAX_LENGTH),
        format=fmt,
    )


class SyslogSocket:
    """A non-blocking datagram socket to syslog: a Unix socket's path, or host:port over
    UDP. L{send} never waits: it says whether the line went, and a socket that failed is
    tried again at most once a second."""

    def __init__(self, target: str, clock: Any = time.monotonic) -> None:
        self.target = target
        self.clock = clock
        self.sock: socket.socket | None = None
        self.error: str | None = None  # why the socket cannot be reached, while it cannot
        self.dropped = 0  # lines syslog did not take: no room, or refused over UDP
        self.full = False  # whether it had no room for the last one
        self._next_try = 0.0
        self.hostname = socket.gethostname().split(".")[0] or "-"

    @property
    def remote(self) -> bool:
        return not self.target.startswith("/")

    def _connect(self) -> bool:
        now = self.clock()
        if now < self._next_try:
            return False
        self._next_try = now + _RETRY
        try:
            where: Any = self.target
            if self.remote:
                address = parse_address(self.target, 514)
                info = socket.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
                )
                family, _, _, _, where = info[0]
                sock = socket.socket(family, socket.SOCK_DGRAM)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.connect(where)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            self.error = f"cannot reach syslog at {self.target}: {e.strerror or e}"
            return False
        self.sock = sock
        self.error = None
        return True

    def send(self, data: bytes) -> bool:
        """Send one datagram; whether it went (or syslog had no room, counted). Over UDP
        a line "went" whether or not anything listens: a refusal the network reports
        later is counted as a line not taken, and nothing else is known."""
        if self.sock is None and not self._connect():
            return False
        assert self.sock is not None
        try:
            self.sock.send(data)
            self.full = False
            return True
        except BlockingIOError:
            self.dropped += 1
            self.full = True
            return True
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self.dropped += 1
                self.full = True
                return True
            if e.errno == errno.EMSGSIZE:
                return False  # (too long for the socket: the server's output has it)
            if self.remote and e.errno == errno.ECONNREFUSED:
                self.dropped += 1  # (an earlier line was refused: nothing listens)
                self.full = False
                return True
            # (the daemon restarted, or went away: connect again when it is time)
            self.close()
            self.error = f"cannot reach syslog at {self.target}: {e.strerror or e}"
            self._next_try = self.clock() + _RETRY
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@implementer(IRegistration, ILogHook, IShutdown)
class Plugin:
    name = "syslog"

    def __init__(self) -> None:
        self.settings = Settings()
        self.socket: SyslogSocket | None = None
        self._reported: str | None = None
        self._dropped = 0  # lines dropped, as last reported
        self._dropped_at = -60.0

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.load()
        context.config.on_change(INI, self.load)
        context.config.on_change("log.ini", self.load)  # (its format, when ours has none)

    def load(self) -> None:
        """(Re)read syslog.ini; a bad value raises, naming it, and changes nothing."""
        log_format = str(self.config.get_ini("log.ini").get("main", {}).get("format") or "")
        settings = read_settings(self.config.get_ini(INI, booleans=BOOLEANS), log_format)
        if self.socket is None or self.socket.target != settings.socket:
            if self.socket is not None:
                self.socket.close()
            self.socket = SyslogSocket(settings.socket)
            self._dropped, self._dropped_at = 0, -60.0
        self.settings = settings

    def shutdown(self) -> None:
        """Close the socket; later lines go to the server's own output."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def hook_log(self, connection: Any, record: LogRecord) -> Code:
        settings, sock = self.settings, self.socket
        if sock is None:
            return CONT  # (shut down)
        severity = min(int(record.level), int(Level.DEBUG))
        text = format_record(record, settings.format)
        # (one line per datagram: a newline in it would read as another message)
        line = text.replace("\r", "\\r").replace("\n", "\\n").encode("utf-8", "replace")
        when = time.localtime(record.time or time.time())
        # (as the C library writes it: the day padded with a space, "Nov  1")
        stamp = f"{time.strftime('%b', when)} {when.tm_mday:2d} {time.strftime('%H:%M:%S', when)}"
        tag = f"{settings.name}[{os.getpid()}]" if settings.pid else settings.name
        host = f" {sock.hostname}" if sock.remote else ""
        head = f"<{settings.facility * 8 + severity}>{stamp}{host} {tag}: ".encode()
        datagram = (head + line)[: settings.max_length]
        if len(head) + len(line) > settings.max_length:  # (not in the middle of a character)
            datagram = datagram.decode("utf-8", "ignore").encode("utf-8")
        sent = sock.send(datagram)
        self._report(sock)
        return OK if sent and settings.always_ok else CONT

    def _report(self, sock: SyslogSocket) -> None:
        """Say once when syslog cannot be reached, and once when it can again; and, when it
        takes lines again (at most once a minute), how many it had no room for (this log
        hook is not called for its own lines: they go to the server's output)."""
        if (
            sock.dropped > self._dropped
            and not sock.full
            and time.monotonic() >= self._dropped_at + 60
        ):
            lost = sock.dropped - self._dropped
            self.log.warn(f"syslog did not take {lost} lines (no room, or refused over UDP)")
            self._dropped, self._dropped_at = sock.dropped, time.monotonic()
        if sock.error == self._reported:
            return
        if sock.error is not None:
            self.log.warn(f"{sock.error}: lines go to the server's own output meanwhile")
        else:
            self.log.notice(f"syslog at {sock.target} reached again")
        self._reported = sock.error
