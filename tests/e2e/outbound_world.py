"""What the outbound end-to-end tests share: a loopback "internet" and ways to look at it.

- L{OutboundPlugin} (C{tests.e2e.outbound_world:Factory} in a plugins file): every client
  may relay, and a get_mx hook that routes the domains in C{ROUTES} (an L{MXHost} or a
  list of them) and leaves the rest to DNS.
- L{WorldPeer}: a L{Peer} that listens on a chosen address and port (so several peers can
  share C{mx_port} on 127.0.0.2, 127.0.0.3, ...), counts the connections open at once,
  and with C{drop_once} drops only its first connection in the middle of DATA.
- L{Twistd}: C{twistd -n haraka --config DIR} as a subprocess for async (trial) tests,
  where the DNS server and the peers run in the test's own reactor.
- L{dsn_parts}, L{message_id}, L{queue_listing}, L{wait_until}.
"""

from __future__ import annotations

import email
import email.message
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory as ProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import CONT, OK
from haraka_tw.interfaces import IConnectHook, IGetMxHook
from haraka_tw.outbound.queue import QueueStore
from tests.smtp_peers import Peer, PeerConnection, PeerScript, _ServerTLS
from tests.support import REPO_ROOT, spawn_twistd, write_config

HARAKA_TW = Path(sys.executable).parent / "haraka-tw"
RUN_MARK = "\n=== (the test stopped twistd) ===\n"

#: domain -> what get_mx answers (an MXHost or a list of them); others go to DNS
ROUTES: dict[str, Any] = {}


@implementer(IConnectHook, IGetMxHook)
class OutboundPlugin:
    """Test plugin: every client relays; get_mx routes the domains in L{ROUTES}."""

    def hook_connect(self, connection: Any) -> Any:
        connection.relaying = True
        return CONT

    def hook_get_mx(self, hmail: Any, domain: str) -> Any:
        route = ROUTES.get(domain)
        return (OK, route) if route is not None else CONT


def Factory() -> OutboundPlugin:
    return OutboundPlugin()


# -- peers -------------------------------------------------------------------------------


class _Connection(PeerConnection):
    def __init__(self, peer: WorldPeer) -> None:
        super().__init__(peer)
        if peer.drop_once and self.index > 0:
            self.script = replace(peer.script, drop_in_data=None)

    def connectionMade(self) -> None:
        peer: WorldPeer = self.peer  # type: ignore[assignment]
        peer.open_now += 1
        peer.most_open = max(peer.most_open, peer.open_now)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        peer: WorldPeer = self.peer  # type: ignore[assignment]
        peer.open_now -= 1
        super().connectionLost(reason)


class WorldPeer(Peer):
    """A L{Peer} on a chosen address and port that counts simultaneous connections."""

    def __init__(self, script: PeerScript | None = None, *, drop_once: bool = False) -> None:
        super().__init__(script)
        self.drop_once = drop_once
        self.open_now = 0
        self.most_open = 0

    def start(self, interface: str = "127.0.0.1", port: int = 0) -> int:
        factory = ProtocolFactory.forProtocol(lambda: _Connection(self))
        if self.script.implicit_tls:
            self._port = reactor.listenSSL(  # type: ignore[attr-defined]
                port, factory, _ServerTLS(self.script), interface=interface
            )
        else:
            self._port = reactor.listenTCP(port, factory, interface=interface)  # type: ignore[attr-defined]
        return int(self._port.getHost().port)

    def ids(self) -> list[str]:
        """The Message-Id of every message taken, in order."""
        return [message_id(m.data) for m in self.messages]


def start_peers(case: Any, peers: Mapping[str, WorldPeer]) -> int:
    """Start each peer on its address (the keys), all on one port; return that port."""
    for _ in range(20):
        port = 0
        started: list[WorldPeer] = []
        try:
            for address, peer in peers.items():
                port = peer.start(address, port)
                started.append(peer)
        except OSError:
            for peer in started:
                peer.stop()
            continue
        for peer in started:
            case.addCleanup(peer.stop)
        return port
    raise RuntimeError("no port free on every peer address")


# -- reading what arrived ----------------------------------------------------------------


def message_id(data: bytes) -> str:
    """The Message-Id header of a message ("" if none)."""
    return str(email.message_from_bytes(data).get("Message-Id", "")).strip()


@dataclass
class DSN:
    """A delivery status notification, taken apart."""

    report: email.message.Message
    human: email.message.Message
    per_message: email.message.Message
    recipients: list[email.message.Message]
    original: email.message.Message

    def recipient(self, address: str) -> email.message.Message:
        for fields in self.recipients:
            if fields["Final-Recipient"] == f"rfc822; {address}":
                return fields
        raise KeyError(address)


def dsn_parts(data: bytes) -> DSN:
    """Parse a multipart/report; report-type=delivery-status (RFC 3464).

    @raise AssertionError: if the structure is not that of a DSN.
    """
    report = email.message_from_bytes(data)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status", report["Content-Type"]
    parts = report.get_payload()
    assert isinstance(parts, list) and len(parts) == 3, parts
    human, status, original = parts
    assert status.get_content_type() == "message/delivery-status", status["Content-Type"]
    assert original.get_content_type() in ("message/rfc822", "text/rfc822-headers")
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, blocks
    return DSN(report, human, blocks[0], list(blocks[1:]), original)


def queue_listing(queue_dir: Path) -> list[Any]:
    """The queue's entries as C{haraka-tw queue list} sees them (read only)."""
    return QueueStore(queue_dir, log=lambda line: None).listing().entries


@inlineCallbacks
def wait_until(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Spin the reactor until C{condition()} is true; fail naming C{what} at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield deferLater(reactor, step, lambda: None)


# -- twistd as a subprocess, for async tests ---------------------------------------------


class Twistd:
    """C{twistd -n haraka --config DIR} started and stopped from an async test."""

    def __init__(self, case: Any, base: Path, files: Mapping[str, str]) -> None:
        self.case = case
        self.base = base
        self.config = base / "config"
        self.log_path = base / "twistd.out"
        write_config(self.config, files)
        self.proc: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        return env

    @inlineCallbacks
    def start(self, port: int) -> Deferred[None]:
        """Start it and wait until it listens on C{port} and owns its queue directory."""
        proc = spawn_twistd(["-n", "--pidfile="], self.config, self.base, self.log_path)
        self.proc = proc
        self.case.addCleanup(self._reap, proc)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"twistd exited with {proc.returncode}:\n{self.output()}")
            return _accepts(port) and "outbound queue:" in self.output().split(RUN_MARK)[-1]

        yield wait_until(up, 20, "twistd to listen")

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    @inlineCallbacks
    def stop(self) -> Deferred[int]:
        """SIGTERM; wait for the exit; its status (0 or -SIGTERM is a clean stop)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        proc = self.proc
        yield wait_until(lambda: proc.poll() is not None, 20, "twistd to stop after SIGTERM")
        self.mark()
        return proc.returncode

    @inlineCallbacks
    def kill(self) -> Deferred[None]:
        """SIGKILL, and wait until the process is gone."""
        assert self.proc is not None
        self.proc.kill()
        proc = self.proc
        yield wait_until(lambda: proc.poll() is not None, 10, "twistd to die")
        self.mark()

    def mark(self) -> None:
        """Separate this run's output from the next one's."""
        with open(self.log_path, "ab") as out:
            out.write(RUN_MARK.encode())

    def tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run C{haraka-tw queue ARGS -c CONFIG} (blocking; call it in a thread)."""
        argv = [str(HARAKA_TW), "queue", *args, "-c", str(self.config)]
        return subprocess.run(
            argv, env=self.env(), cwd=self.base, capture_output=True, text=True, timeout=30
        )


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
