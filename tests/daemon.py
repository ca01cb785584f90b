"""A real daemon run for the tests (spamd, clamd): found on the machine or the test is
skipped, given a loopback port and a directory of its own, started and waited for,
stopped and cleaned away."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unittest
from typing import IO

from tests.support import free_port, wait_for_port


class Daemon:
    """C{name} (looked up on PATH, else in /usr/sbin) on 127.0.0.1:C{port}; L{run} starts
    it with an argv of the subclass's making."""

    name = ""
    package = ""

    def __init__(self) -> None:
        path = shutil.which(self.name) or f"/usr/sbin/{self.name}"
        if not os.access(path, os.X_OK):
            raise unittest.SkipTest(
                f"{self.name} is not installed ({self.package}: scripts/system-packages.sh)"
            )
        self.path = path
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix=f"{self.name}-test-")
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def run(self, argv: list[str]) -> None:
        """Start C{argv}, its output to a log in the directory; return once the port takes
        connections (stopped again if it never does: tearDownClass does not run when
        setUpClass fails)."""
        self.log = open(os.path.join(self.directory, f"{self.name}.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_for_port(self.port, timeout=60, alive=self._alive)
        except BaseException:
            self.stop()
            raise

    def _alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}: {self.output()}"
            )

    def output(self) -> str:
        """The end of the daemon's log."""
        with open(os.path.join(self.directory, f"{self.name}.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")[-2000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)
