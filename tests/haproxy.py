"""Test harness for the PROXY protocol: a real HAProxy on loopback, and header builders.

- L{HAProxy}: runs C{/usr/sbin/haproxy} in the foreground with a minimal TCP-mode config
  (one frontend on a free loopback port, round-robin over the given backends, each sent a
  PROXY header), or a config of the test's own, for end-to-end tests. L{haproxy_path} says
  whether it is installed; L{listening} whether a server listens, without connecting.
- L{connect_from}, L{SourcedClient}: a client socket (or a L{tests.support.WireClient})
  bound to another loopback source address (all of 127.0.0.0/8 is loopback on Linux), so
  the "real client" differs from the proxy's 127.0.0.1; the client may send a header
  before it reads the banner, as a proxy does.
- L{v1_header}, L{v2_header}, L{v2_local}: the bytes a proxy sends, built independently of
  the parser under test.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from tests.support import WireClient

__all__ = [
    "V2_SIGNATURE",
    "HAProxy",
    "HAProxyError",
    "SourcedClient",
    "connect_from",
    "haproxy_path",
    "listening",
    "v1_header",
    "v2_header",
    "v2_local",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HAPROXY_CANDIDATES = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")


def haproxy_path() -> str | None:
    """The haproxy binary, or None when it is not installed."""
    for candidate in HAPROXY_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("haproxy")


# -- header builders ------------------------------------------------------------------


def v1_header(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """A version 1 line; TCP4 or TCP6 from the source address."""
    family = "TCP6" if ipaddress.ip_address(source[0]).version == 6 else "TCP4"
    return f"PROXY {family} {source[0]} {dest[0]} {source[1]} {dest[1]}\r\n".encode("ascii")


def v2_header(
    source: tuple[str, int] | str,
    dest: tuple[str, int] | str,
    tlvs: Iterable[tuple[int, bytes]] = (),
    *,
    crc: bool = False,
) -> bytes:
    """A version 2 PROXY header, STREAM transport.

    C{source}/C{dest} are (ip, port) pairs (INET or INET6 from the address), or socket
    paths (UNIX). C{tlvs} are written in order; C{crc} appends a CRC32C TLV over the whole
    header, as the spec defines it.
    """
    if isinstance(source, str) and isinstance(dest, str):
        family = 0x3
        block = _unix_path(source) + _unix_path(dest)
    elif isinstance(source, tuple) and isinstance(dest, tuple):
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(dest[0])
        family = 0x2 if src.version == 6 else 0x1
        block = src.packed + dst.packed + struct.pack("!HH", source[1], dest[1])
    else:
        raise TypeError("source and dest must both be addresses or both be paths")
    body = block + b"".join(_tlv(kind, value) for kind, value in tlvs)
    if not crc:
        return _v2(0x21, (family << 4) | 0x1, body)
    body += _tlv(0x03, b"\0\0\0\0")
    blank = _v2(0x21, (family << 4) | 0x1, body)
    return blank[:-4] + struct.pack("!I", _crc32c(blank))


def v2_local(body: bytes = b"") -> bytes:
    """A version 2 LOCAL header (a proxy's own health check), UNSPEC family."""
    return _v2(0x20, 0x00, body)


def _v2(version_command: int, family_transport: int, body: bytes) -> bytes:
    return (
        V2_SIGNATURE + bytes([version_command, family_transport]) + struct.pack("!H", len(body))
    ) + body


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def _unix_path(path: str) -> bytes:
    raw = path.encode()
    if len(raw) > 108:
        raise ValueError("a UNIX path block is 108 bytes")
    return raw.ljust(108, b"\0")


def _crc32c(data: bytes) -> int:
    # Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): slow and plain, on
    # purpose not the parser's table-driven code.
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


# -- clients --------------------------------------------------------------------------


def connect_from(
    source_ip: str, port: int, host: str = "127.0.0.1", timeout: float = 10.0
) -> socket.socket:
    """A TCP connection to C{host:port} whose source address is C{source_ip}."""
    return socket.create_connection((host, port), timeout=timeout, source_address=(source_ip, 0))


def proxied(port: int, client_ip: str, timeout: float = 20.0) -> SourcedClient:
    """A client that a server trusting loopback's PROXY headers sees as C{client_ip}: a
    version 1 header from loopback, then the banner read."""
    preamble = v1_header((client_ip, 40000), ("127.0.0.1", 25))
    return SourcedClient(port, preamble=preamble, timeout=timeout)


class SourcedClient(WireClient):
    """A L{WireClient} that connects from C{source_ip}, sends C{preamble} (a PROXY header,
    say) at once, and then reads the banner unless C{read_banner} is false."""

    def __init__(
        self,
        port: int,
        *,
        source_ip: str = "127.0.0.1",
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        preamble: bytes = b"",
        read_banner: bool = True,
    ) -> None:
        self.sock = connect_from(source_ip, port, host, timeout)
        self.timeout = timeout
        self._buf = bytearray()
        if preamble:
            self.sock.sendall(preamble)
        self.banner = self.reply() if read_banner else b""

    def __enter__(self) -> SourcedClient:
        return self

    @property
    def address(self) -> tuple[str, int]:
        """This end of the connection: (source ip, source port)."""
        ip, port = self.sock.getsockname()[:2]
        return str(ip), int(port)


# -- HAProxy --------------------------------------------------------------------------


class HAProxyError(RuntimeError):
    """HAProxy would not check its config or start; the message carries its output."""


class HAProxy:
    """A real HAProxy on loopback in TCP mode, in front of C{backends}.

    Use as a context manager, or call L{start} and L{stop}. C{send_proxy} is the server
    option naming the header sent to each backend: C{"send-proxy"} (v1) or
    C{"send-proxy-v2"}; C{proxy_v2_options} are HAProxy's C{proxy-v2-options} words
    (C{"crc32c"}, C{"unique-id"}, ...) for v2. C{port} is the frontend's loopback port.

    C{config}, when given, is a whole configuration to run instead of the generated one
    (C{backends} and the options above are then unused); its frontend must bind
    127.0.0.1:C{port}. C{environment} is added to HAProxy's environment, which fills in
    the C{"${NAME}"} a config may hold.
    """

    def __init__(
        self,
        backends: list[tuple[str, int]],
        *,
        send_proxy: str = "send-proxy-v2",
        listen_port: int | None = None,
        proxy_v2_options: Iterable[str] = (),
        start_timeout: float = 10.0,
        config: str | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        if send_proxy not in ("send-proxy", "send-proxy-v2"):
            raise ValueError(f"send_proxy must be send-proxy or send-proxy-v2: {send_proxy!r}")
        if not backends and config is None:
            raise ValueError("HAProxy needs at least one backend")
        self.backends = list(backends)
        self.send_proxy = send_proxy
        self.proxy_v2_options = list(proxy_v2_options)
        self.port = listen_port if listen_port is not None else _free_port()
        self.start_timeout = start_timeout
        self.config = config
        self.environment = {**os.environ, **(environment or {})}
        self.binary = haproxy_path()
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def config_text(self, pidfile: Path) -> str:
        """The configuration HAProxy runs with."""
        if self.config is not None:
            return self.config
        options = self.send_proxy
        if self.proxy_v2_options:
            options += " proxy-v2-options " + ",".join(self.proxy_v2_options)
        servers = "\n".join(
            f"    server s{i} {host}:{port} {options}"
            for i, (host, port) in enumerate(self.backends)
        )
        return (
            "global\n"
            "    maxconn 256\n"
            f"    pidfile {pidfile}\n"
            "\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 2s\n"
            "    timeout client 30s\n"
            "    timeout server 30s\n"
            "\n"
            "frontend smtp_in\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    unique-id-format %ci:%cp\n"
            "    default_backend smtp_out\n"
            "\n"
            "backend smtp_out\n"
            "    balance roundrobin\n"
            f"{servers}\n"
        )

    def start(self) -> None:
        """Check the config, start HAProxy, and wait until its frontend listens.

        @raise HAProxyError: if haproxy is missing, rejects the config, exits, or does not
            listen within C{start_timeout} seconds.
        """
        if self.binary is None:
            raise HAProxyError("haproxy is not installed")
        if self._process is not None:
            raise HAProxyError("already started")
        self._dir = Path(tempfile.mkdtemp(prefix="haraka_tw-haproxy-"))
        config = self._dir / "haproxy.cfg"
        config.write_text(self.config_text(self._dir / "haproxy.pid"), encoding="utf-8")
        check = subprocess.run(
            [self.binary, "-c", "-f", str(config)],
            capture_output=True,
            timeout=30,
            check=False,
            env=self.environment,
        )
        if check.returncode != 0:
            output = (check.stdout + check.stderr).decode("utf-8", "replace")
            self._cleanup_dir()
            raise HAProxyError(f"haproxy -c rejected the config:\n{output}")
        self._log_path = self._dir / "haproxy.log"
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                [self.binary, "-db", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment,
            )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        # Watch the kernel's listening sockets rather than connecting: a probe connection
        # through HAProxy would reach a backend and look like a client to it.
        deadline = time.monotonic() + self.start_timeout
        while not listening("127.0.0.1", self.port):
            assert self._process is not None
            if self._process.poll() is not None:
                raise HAProxyError(
                    f"haproxy exited with {self._process.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise HAProxyError(
                    f"haproxy did not listen on 127.0.0.1:{self.port} in "
                    f"{self.start_timeout}s:\n{self.output()}"
                )
            time.sleep(0.02)

    def output(self) -> str:
        """What HAProxy wrote to stdout and stderr so far."""
        try:
            return self._log_path.read_text(encoding="utf-8", errors="replace")
        except (AttributeError, OSError):
            return ""

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL after 10 s) and remove its files."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(ip: str, port: int) -> bool:
    """Whether a TCP socket listens on C{ip:port}, from /proc/net/tcp (Linux): no probe
    connection, which a server behind a PROXY check would take for a client."""
    want = f"{struct.unpack('=I', socket.inet_aton(ip))[0]:08X}:{port:04X}"
    try:
        with open("/proc/net/tcp", encoding="ascii") as table:
            next(table)
            return any(
                fields[1] == want and fields[3] == "0A"  # 0A: LISTEN
                for fields in (line.split() for line in table)
            )
    except OSError:  # no procfs: fall back to probing (which a backend may notice)
        try:
            socket.create_connection((ip, port), timeout=1).close()
        except OSError:
            return False
        return True
