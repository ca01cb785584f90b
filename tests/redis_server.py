"""A real redis-server on loopback for the tests (the Debian package, installed by
scripts/system-packages.sh): its own port and directory, nothing saved to disk."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import unittest
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from haraka_tw.interfaces import IShutdown
from haraka_tw.redis import RedisClient
from tests.plugins.test_dns_list import until
from tests.support import free_port, wait_for_port


class RedisServer:
    """C{redis-server} on 127.0.0.1:C{port}; L{stop} kills it (and can be started again
    on the same port with L{start}, to test a client across a restart)."""

    def __init__(self) -> None:
        path = shutil.which("redis-server")
        if path is None:
            raise unittest.SkipTest("redis-server is not installed (scripts/system-packages.sh)")
        self.path = path
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="redis-test-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        argv = [self.path, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", self.directory]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        wait_for_port(self.port, alive=self._alive)
        return self

    def _alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_redis(case: Any) -> RedisServer:
    """A redis-server for the test C{case}, killed and removed when it ends (the test is
    skipped, with the reason, where redis-server is not installed)."""
    server = RedisServer().start()
    case.addCleanup(server.cleanup)
    return server


@inlineCallbacks
def redis_command(port: int, *args: Any) -> Any:
    """One command to the redis-server on C{port}, over a connection of its own: a
    Deferred of the reply."""
    client = RedisClient(reactor, "127.0.0.1", port)
    try:
        yield client.connect()
        reply = yield client.execute(*args)
    finally:
        client.close()
    return reply


def stop_with_the_test(case: Any, server: Any) -> None:
    """When the test ends, shut C{server}'s plugins down as the service does when it
    stops, and close the server's shared Redis connection."""
    for loaded in server.runner.plugins:
        if IShutdown.providedBy(loaded.plugin):
            case.addCleanup(loaded.plugin.shutdown)

    def close_shared() -> None:
        client = server.notes.get("redis")
        if isinstance(client, RedisClient):
            client.close()

    case.addCleanup(close_shared)


def plugin_redis_connected(server: Any, name: str) -> Any:
    """A Deferred that fires once plugin C{name}'s Redis connection is up (a client that
    arrived sooner would meet Redis as down)."""
    plugin = next(p.plugin for p in server.runner.plugins if p.name == name)
    return until(lambda: plugin.redis.connected)
