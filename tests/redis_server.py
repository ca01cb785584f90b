"""A real redis-server on loopback for the tests (the Debian package, installed by
scripts/system-packages.sh): its own port and directory, nothing saved to disk."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import unittest
from typing import Any

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
