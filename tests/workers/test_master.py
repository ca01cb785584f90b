"""WorkerMaster's own listening, on a real loopback port: while every worker keeps failing
it answers 421; once one stays up it stops and the port has its factory back."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.paths import default_config_dir
from haraka_tw.server import HarakaServer
from haraka_tw.workers.master import WorkerMaster
from tests.support import temp_dir, write_config


def first_bytes(port: int) -> bytes:
    """What a new connection to C{port} is sent first (b"" if closed, or nothing in 2 s)."""
    with socket.create_connection(("127.0.0.1", port), 2) as client:
        client.settimeout(2)
        try:
            return client.recv(200)
        except TimeoutError:
            return b""


class RefusingTests(TestCase):
    async def test_answers_421_while_every_worker_fails_then_gives_the_port_back(
        self,
    ) -> None:
        """_set_refusing(True): the master's port (not read while workers serve) is read
        with a factory that answers 421 4.3.2 and closes; _set_refusing(False): it is no
        longer read and has the server's factory again."""
        base = temp_dir(self)
        config = write_config(base / "config", {"outbound.ini": f"[main]\nqueue_dir={base}/q\n"})
        server = HarakaServer(ConfigDirectory([default_config_dir(), config]), reactor)
        port = reactor.listenTCP(0, server.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        port.stopReading()  # (as the master's ports are while workers serve)
        number = port.getHost().port
        master = WorkerMaster(
            server, [("tcp", port)], 2, force_shutdown_timeout=1, on_fatal=lambda: None
        )
        master._set_refusing(True)
        said: Deferred[bytes] = deferToThread(first_bytes, number)
        self.assertEqual(await said, b"421 4.3.2 Service not available, try again later\r\n")
        master._set_refusing(False)
        self.assertIs(port.factory, server.factory)
        self.assertNotIn(port, reactor.getReaders())  # type: ignore[attr-defined]
