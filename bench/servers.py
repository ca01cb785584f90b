"""The servers under test: how each is configured, started on loopback and stopped.

Every server gets its own free port and work directory and runs as its own process, so
its CPU time and memory can be read from /proc/<pid>. The kinds:

- ``haraka``: haraka_tw under ``twistd -n haraka --config DIR`` with a realistic chain,
  rcpt_to.in_host_list (host_list holds the domain smtp-source sends to) and queue/discard.
- ``haraka-maildir``: the same with queue/maildir, fsync on (maildir.ini fsync=true).
- ``haraka-nodes2``: ``haraka`` with smtp.ini nodes=2: a master and two worker processes
  (not in the default list: ``--servers`` names it).
- ``twisted``: stock twisted.mail ESMTP with a no-op delivery (peers/twisted_noop.py).
- ``aiosmtpd``: aiosmtpd 1.4.6 with a discard handler (peers/aiosmtpd_discard.py).
- ``smtp-sink``: Postfix's smtp-sink, the ceiling (C, does nothing).

haraka_tw's lookup_rdns: no plugin answers it, so the core reverse lookup runs; it reads
/etc/hosts first, and the bench's client is 127.0.0.1, which /etc/hosts names, so no DNS
query is ever made (L{rdns_note} checks and says so for the results).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench import tools

__all__ = [
    "HARAKA_DOMAIN",
    "KINDS",
    "REPO_ROOT",
    "ServerKind",
    "ServerProcess",
    "free_port",
    "make_kind",
    "rdns_note",
    "shipped_backlog",
    "write_haraka_config",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
VENV_BIN = Path(sys.executable).parent
HARAKA_DOMAIN = "bench.test"  # smtp-source's recipients: user@bench.test


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the ephemeral range, not handed out before by this
    process. (A port the kernel picks with bind(0) is ephemeral: one of the bench's many
    client connections may take it as its local port before the server binds it.)"""
    high = _ephemeral_low() - 1
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(min(10000, high - 1000), high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free port below the ephemeral range")


def rdns_note() -> str:
    """How haraka_tw's lookup_rdns is answered on this machine, for the results."""
    from haraka_tw.smtp.rdns import read_hosts_file

    name = read_hosts_file().get("127.0.0.1")
    if name:
        return (
            "no lookup_rdns plugin; the core reverse lookup answers 127.0.0.1 from "
            f"/etc/hosts ({name!r}), so no DNS query is made"
        )
    return (
        "no lookup_rdns plugin; 127.0.0.1 is NOT in /etc/hosts, so the core reverse lookup "
        "asks the resolv.conf nameservers (cached; short timeout)"
    )


def shipped_backlog() -> str:
    """haraka_tw's listen backlog as shipped (etc/smtp.ini listen_backlog), for the results."""
    import configparser

    from haraka_tw.paths import default_config_dir

    ini = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    ini.read(default_config_dir() / "smtp.ini")
    value = ini.get("main", "listen_backlog", fallback=None)
    return value.strip() if value else "Twisted's default, 50"


def write_haraka_config(
    confdir: Path,
    port: int,
    plugins: list[str],
    extra: Mapping[str, str] = {},
    backlog: int | None = None,
    nodes: int = 1,
) -> None:
    """A haraka_tw config directory overlaying the shipped defaults. The listen backlog is
    the shipped one (L{shipped_backlog}) unless C{backlog} is given."""
    work = confdir.parent
    smtp_ini = f"[main]\nlisten=127.0.0.1:{port}\nmax_connections=0\n"
    if backlog:
        smtp_ini += f"listen_backlog={backlog}\n"
    if nodes > 1:
        smtp_ini += f"nodes={nodes}\n"
    (work / "spool").mkdir(parents=True, exist_ok=True)
    files = {
        "smtp.ini": smtp_ini,
        "connection.ini": f"[main]\nspool_dir={work / 'spool'}\n",
        "host_list": f"{HARAKA_DOMAIN}\n",
        "plugins": "".join(f"{name}\n" for name in plugins),
        "maildir.ini": f"[main]\npath={work / 'maildir'}\nfsync=true\n",
        **extra,
    }
    confdir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (confdir / name).write_text(text)


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cwd: Path | None = None


class ServerKind:
    """One kind of server: its name in the results and how to launch it."""

    key = ""
    label = ""
    version = ""

    #: a peer the bench installs itself: when that fails, the run goes on without it
    optional = False

    def prepare(self) -> None:
        """Fetch or install what L{launch} needs, before any run starts.

        @raise bench.tools.ToolError: when it cannot be had.
        """

    def launch(self, work: Path, port: int) -> Launch:
        raise NotImplementedError

    def after_run(self, work: Path) -> None:
        """Called after each load run (queue/maildir moves its messages aside here)."""


def twistd_haraka(work: Path, confdir: Path) -> Launch:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    argv = [
        str(VENV_BIN / "twistd"),
        "-n",
        "--pidfile",
        str(work / "twistd.pid"),
        "--logfile",
        str(work / "twistd.log"),
        "haraka",
        "--config",
        str(confdir),
    ]
    return Launch(argv, env, work)


class Haraka(ServerKind):
    def __init__(self, queue: str, backlog: int | None = None, nodes: int = 1) -> None:
        from importlib.metadata import version

        self.queue = queue
        self.backlog = backlog
        self.nodes = nodes
        self.key = "haraka" if queue == "discard" else f"haraka-{queue}"
        if nodes > 1:
            self.key += f"-nodes{nodes}"
        self.version = f"haraka_tw {version('haraka_tw')}"
        fsync = ", fsync" if queue == "maildir" else ""
        workers = f", nodes={nodes}" if nodes > 1 else ""
        self.label = f"haraka_tw, in_host_list + queue/{queue}{fsync}{workers}"

    def launch(self, work: Path, port: int) -> Launch:
        confdir = work / "config"
        plugins = ["rcpt_to.in_host_list", f"queue/{self.queue}"]
        write_haraka_config(confdir, port, plugins, backlog=self.backlog, nodes=self.nodes)
        return twistd_haraka(work, confdir)

    def after_run(self, work: Path) -> None:
        """Move the run's messages aside, deleting none: they go with the work directory
        when the bench ends. On an ext4 without a journal (this VM's), creating files
        within minutes of deleting thousands scans past every recently freed inode: with
        the Maildir emptied here, each run paid for its predecessor (measured: system
        time per message doubled after a mass delete, for several minutes)."""
        new = work / "maildir" / "new"
        if new.is_dir():
            kept = work / "maildir-kept"
            kept.mkdir(exist_ok=True)
            new.rename(kept / str(len(os.listdir(kept))))
            new.mkdir()


class TwistedNoop(ServerKind):
    key = "twisted"
    label = "stock twisted.mail ESMTP, no-op delivery"

    def __init__(self) -> None:
        import twisted

        self.version = f"Twisted {twisted.__version__}"

    def launch(self, work: Path, port: int) -> Launch:
        return Launch([sys.executable, str(PEERS / "twisted_noop.py"), str(port)], cwd=work)


class Aiosmtpd(ServerKind):
    key = "aiosmtpd"
    label = f"aiosmtpd {tools.AIOSMTPD_VERSION}, discard"
    version = f"aiosmtpd {tools.AIOSMTPD_VERSION}"
    optional = True  # (pip-installed into a venv of its own)

    def prepare(self) -> None:
        tools.aiosmtpd_python()

    def launch(self, work: Path, port: int) -> Launch:
        python = tools.aiosmtpd_python()
        return Launch([str(python), str(PEERS / "aiosmtpd_discard.py"), str(port)], cwd=work)


class SmtpSink(ServerKind):
    key = "smtp-sink"
    label = "Postfix smtp-sink (C, does nothing: the ceiling)"

    def __init__(self) -> None:
        self.postfix = tools.postfix()
        self.version = f"Postfix smtp-sink {self.postfix.version}"

    def launch(self, work: Path, port: int) -> Launch:
        argv = [str(self.postfix.smtp_sink)]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # required when started as root
        # -m: connections handled at once (default 256); the idle scenario holds 10,000.
        argv += ["-m", "20000", f"127.0.0.1:{port}", "1024"]
        return Launch(argv, self.postfix.env, work)


KINDS: dict[str, Callable[..., ServerKind]] = {
    "haraka": lambda backlog=None: Haraka("discard", backlog),
    "haraka-maildir": lambda backlog=None: Haraka("maildir", backlog),
    "haraka-nodes2": lambda backlog=None: Haraka("discard", backlog, nodes=2),
    "twisted": TwistedNoop,
    "aiosmtpd": Aiosmtpd,
    "smtp-sink": SmtpSink,
}


def make_kind(key: str, haraka_backlog: int | None = None) -> ServerKind:
    """The server kind named C{key} (a key of L{KINDS})."""
    if key.startswith("haraka"):
        return KINDS[key](haraka_backlog)
    return KINDS[key]()


class ServerError(Exception):
    """A server did not come up; the message holds the end of its output."""

    def __init__(self, message: str, exited: bool) -> None:
        super().__init__(message)
        self.exited = exited


class ServerProcess:
    """One running server: started in its own work directory, greeted, stopped."""

    def __init__(self, kind: ServerKind, work: Path) -> None:
        self.kind = kind
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0, attempts: int = 3) -> None:
        """Start the server and wait for its 220 greeting; a server that exits at once
        (its port taken after all) is tried again on another port."""
        for attempt in range(attempts):
            try:
                self._start(timeout)
                return
            except ServerError as e:
                if not e.exited or attempt == attempts - 1:
                    raise
                self.port = free_port()

    def _start(self, timeout: float) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        launch = self.kind.launch(self.work, self.port)
        with open(self.work / "server.out", "wb") as out:
            self.proc = subprocess.Popen(
                launch.argv,
                cwd=launch.cwd or self.work,
                env=launch.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if greets(self.port):
                return
            time.sleep(0.1)
        exited = self.proc.poll() is not None
        tail = self.output_tail()
        self.stop()
        raise ServerError(f"{self.kind.key} did not greet on port {self.port}:\n{tail}", exited)

    def output_tail(self) -> str:
        text = ""
        for name in ("server.out", "twistd.log"):
            path = self.work / name
            if path.exists():
                text += path.read_text(errors="replace")[-2000:]
        return text

    def after_run(self) -> None:
        self.kind.after_run(self.work)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def greets(port: int, timeout: float = 2.0) -> bool:
    """Whether a 220 greeting comes from 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(512)
                if not chunk:
                    return False
                data += chunk
            ok = data.startswith(b"220")
            s.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False
