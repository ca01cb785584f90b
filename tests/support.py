"""Test support: a transcript driver on StringTransport, and real servers on loopback.

- L{Session}: the protocol on a StringTransport with a task.Clock, for byte-level
  transcripts of one session (unit tests; no sockets).
- L{start_server}: a L{HarakaServer} from a real config directory, listening on a real
  loopback port of the global reactor (for trial TestCases, which spin the reactor).
- L{smtp_client}, L{raw_exchange}: blocking clients to run in a thread (deferToThread)
  against such a server.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from haraka_tw.codes import CONT
from haraka_tw.hooks.runner import HookRunner, LoadedPlugin
from haraka_tw.interfaces import HOOKS
from haraka_tw.logging import HarakaLog, Level
from haraka_tw.server import HarakaServer
from haraka_tw.smtp.factory import HarakaSMTPFactory
from haraka_tw.smtp.rdns import ReverseLookup
from haraka_tw.smtp.settings import SessionSettings
from haraka_tw.writethrough import dispatch_without_log_context, write_through_reactor

CLIENT_IP = "192.0.2.10"


class RunningClock(Clock):
    """A task.Clock that says it is running, as a reactor does, and keeps the system
    event triggers it is given (for the log observers that write in batches)."""

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[str, str, Any]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))


class ListLog(HarakaLog):
    """A HarakaLog that keeps its records for assertions."""

    def __init__(self, level: Level = Level.DATA) -> None:
        super().__init__(level=level)
        self.records: list[Any] = []
        self.hook = self._keep

    def _keep(self, connection: Any, record: Any) -> bool:
        self.records.append(record)
        return True  # keep test output quiet

    def messages(self, level: Level | None = None) -> list[str]:
        return [r.message for r in self.records if level is None or r.level == level]


def plugin_with(hooks: Mapping[str, Any]) -> object:
    """A plugin object providing the interfaces of the hooks given as name -> function.

    Each function is called as the hook method (without self).
    """
    ifaces = [HOOKS[name] for name in hooks]

    @implementer(*ifaces)
    class Built:
        pass

    obj = Built()
    for name, fn in hooks.items():
        setattr(obj, f"hook_{name}", fn)
    return obj


class Session:
    """One SMTP session on a StringTransport: send bytes, read what came back."""

    def __init__(
        self,
        plugins: Iterable[tuple[str, object]] = (),
        settings: SessionSettings | None = None,
        plugin_timeout: float = 30,
        greet: bool = True,
    ) -> None:
        self.clock = Clock()
        self.log = ListLog()
        loaded = [LoadedPlugin(name, p) for name, p in plugins]
        self.runner = HookRunner(loaded, self.clock, self.log, plugin_timeout)
        self.settings = settings or SessionSettings(me="mx.test", spool_after=-1)
        rdns = ReverseLookup(self.clock, hosts={CLIENT_IP: "client.example"})
        self.factory = HarakaSMTPFactory(
            self.runner, self.settings, self.log, reactor=self.clock, rdns=rdns
        )
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 25),
            peerAddress=IPv4Address("TCP", CLIENT_IP, 40000),
        )
        self.proto = self.factory.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)
        self.banner = self.read()
        if greet:
            assert self.banner.startswith("220 "), self.banner

    @property
    def connection(self) -> Any:
        return self.proto.connection

    def read(self) -> str:
        """Everything written since the last read."""
        data = self.transport.value()
        self.transport.clear()
        return data.decode("utf-8", "replace")

    def send(self, data: bytes | str) -> str:
        """Feed bytes as one read from the socket; return the replies written."""
        if isinstance(data, str):
            data = data.encode()
        self.proto.dataReceived(data)
        return self.read()

    def codes(self, data: bytes | str) -> list[int]:
        """The reply codes written for C{data} (continuation lines folded)."""
        return reply_codes(self.send(data))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.producer = None  # as a real transport's connectionLost does
        self.proto.connectionLost(Failure(ConnectionDone()))


def reply_codes(text: str) -> list[int]:
    """Codes of the final lines of each reply in C{text}."""
    return [int(line[:3]) for line in text.split("\r\n") if len(line) >= 4 and line[3] == " "]


def data_reply(
    port: int, sender: str, recipients: list[str], data: bytes
) -> Deferred[tuple[int, bytes]]:
    """Send C{data} with smtplib (in a thread); the code and text of the reply to the end
    of DATA, or of the command refused before it."""

    def run() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            try:
                client.sendmail(sender, recipients, data)
            except smtplib.SMTPResponseException as e:
                return e.smtp_code, e.smtp_error
        return 250, b""

    return deferToThread(run)


def write_config(directory: Path, files: Mapping[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return directory


def temp_dir(case: Any) -> Path:
    """A fresh temporary directory removed after the test (trial's mktemp would put it
    in the working directory when pytest runs the test)."""
    path = Path(tempfile.mkdtemp(prefix="haraka_tw-test-")).resolve()
    case.addCleanup(shutil.rmtree, path, True)
    return path


def start_server(case: Any, files: Mapping[str, str]) -> tuple[HarakaServer, int]:
    """A server on the shipped defaults overlaid with C{files}, on a loopback port.

    The maildir and the outbound queue go under the test's temporary directory unless
    C{files} says otherwise; C{{base}} in a file's text is that directory. The outbound
    service runs as under twistd and owns its queue, but delivers nothing unless C{files}
    gives an outbound.ini of its own (so a test can read what was queued); DNS goes to a
    closed loopback port unless C{files} gives a dns.ini (no test waits on a nameserver).
    """
    base = temp_dir(case)
    all_files = {
        "maildir.ini": f"[main]\npath={base / 'maildir'}\n",
        "outbound.ini": "[main]\nqueue_dir={base}/queue\ndisabled=true\n",
        "dns.ini": "[main]\nnameservers=127.0.0.1:9\ntimeout=1\nattempts=1\n",
        "me": "mx.test\n",
    }
    all_files.update(files)
    all_files = {name: text.replace("{base}", str(base)) for name, text in all_files.items()}
    config_dir = write_config(base / "config", all_files)
    server = HarakaServer.from_directory(config_dir, reactor)
    if os.environ.get("HARAKA_TW_TEST_LOG"):  # see every server line while debugging a test
        server.log.hook = lambda c, r: print(f"{r.level.name} [{r.origin}] {r.message}") or True
    server.log.hook = server.log.hook or (lambda c, r: r.level > Level.WARN)
    # As HarakaService under twistd listens: with write-through connections whose events
    # skip the legacy log context (haraka_tw.writethrough); the other tests' connections on
    # this reactor are dispatched as Twisted does.
    dispatch_without_log_context(reactor)
    port = write_through_reactor(reactor).listenTCP(0, server.factory, interface="127.0.0.1")

    def stop() -> Any:
        for session in list(server.factory.sessions):
            if session.transport is not None:
                session.transport.abortConnection()
        return port.stopListening()

    case.addCleanup(stop)
    server.outbound.start()
    case.addCleanup(server.outbound.stop)
    server.base = base  # type: ignore[attr-defined]
    return server, port.getHost().port


def raw_exchange(
    port: int, chunks: Iterable[bytes], *, settle: float = 0.3, timeout: float = 10
) -> bytes:
    """Connect, read the banner, send each chunk (pausing C{settle}s after each), and
    return everything the server wrote until it closed or went quiet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = bytearray()
    try:
        sock.settimeout(timeout)
        got += sock.recv(4096)
        for chunk in chunks:
            sock.sendall(chunk)
            got += _drain(sock, settle)
        got += _drain(sock, settle)
    finally:
        sock.close()
    return bytes(got)


def _drain(sock: socket.socket, settle: float) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + settle
    sock.settimeout(0.05)
    while time.monotonic() < deadline:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not piece:
            break
        out += piece
        deadline = time.monotonic() + settle
    return bytes(out)


REPO_ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"


def spawn_twistd(
    twistd_args: Iterable[str],
    config: Path,
    cwd: Path,
    log_path: Path,
    python_path: Iterable[Path] = (),
) -> subprocess.Popen[bytes]:
    """Start C{twistd <twistd_args> haraka --config CONFIG} in C{cwd}, its output appended
    to C{log_path}, with the repository (and C{python_path}) importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *map(str, python_path), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    argv = [str(TWISTD), *twistd_args, "haraka", "--config", str(config)]
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, alive: Any = None) -> None:
    """Poll until something accepts on 127.0.0.1:C{port}.

    C{alive}, if given, is called between attempts and should raise if the server is gone.
    @raise TimeoutError: if nothing listens within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if alive is not None:
                alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} in {timeout}s") from None
            time.sleep(0.05)


def wait_for_refusal(port: int, timeout: float = 10.0) -> bool:
    """Poll until 127.0.0.1:C{port} refuses connections; False if it still accepts at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def reply_code(reply: bytes) -> int:
    """The code of one reply as L{WireClient.reply} returns it."""
    return int(reply[:3])


class WireClient:
    """A blocking SMTP client on a raw socket, for a thread: exact bytes out, whole replies in."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buf = bytearray()
        self.banner = self.reply()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes | str) -> None:
        """Write C{data} as it is, in one C{sendall}."""
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def command(self, line: bytes | str) -> bytes:
        """Send one command line (CRLF added) and return its reply."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def reply(self) -> bytes:
        """The next whole reply (every line, CRLFs kept).

        @raise ConnectionError: if the server closes before a whole reply came.
        """
        start = 0
        while True:
            end = self._buf.find(b"\r\n", start)
            if end < 0:
                self._fill()
                continue
            line = self._buf[start:end]
            start = end + 2
            if len(line) < 4 or line[3:4] != b"-":
                out = bytes(self._buf[:start])
                del self._buf[:start]
                return out

    def replies(self, n: int) -> list[bytes]:
        """The next C{n} replies."""
        return [self.reply() for _ in range(n)]

    def quiet(self, seconds: float) -> bytes:
        """Whatever arrives within C{seconds} (plus what was already buffered)."""
        out = bytes(self._buf)
        self._buf.clear()
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    piece = self.sock.recv(65536)
                except TimeoutError:
                    break
                if not piece:
                    break
                out += piece
        finally:
            self.sock.settimeout(self.timeout)
        return out

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection within C{timeout}, with nothing more
        to read than what is already buffered."""
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    piece = self.sock.recv(65536)
                except TimeoutError:
                    return False
                except ConnectionResetError:
                    return True
                if not piece:
                    return True
                self._buf += piece
            return False
        finally:
            self.sock.settimeout(self.timeout)

    def _fill(self) -> None:
        piece = self.sock.recv(65536)
        if not piece:
            raise ConnectionError(f"server closed; unread: {bytes(self._buf)!r}")
        self._buf += piece


def maildir_messages(path: str | Path) -> list[bytes]:
    """The messages in a Maildir's new/, oldest name first."""
    new = Path(path) / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


__all__ = [
    "CLIENT_IP",
    "CONT",
    "REPO_ROOT",
    "TWISTD",
    "ListLog",
    "Session",
    "WireClient",
    "free_port",
    "maildir_messages",
    "plugin_with",
    "raw_exchange",
    "reply_code",
    "reply_codes",
    "spawn_twistd",
    "start_server",
    "wait_for_port",
    "wait_for_refusal",
    "write_config",
]
