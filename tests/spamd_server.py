"""A real SpamAssassin spamd on loopback for the tests (Debian's spamd package, installed
by scripts/system-packages.sh): its own port, local tests only (no network rules), no
per-user files. It takes about two seconds to start, so a test class shares one."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unittest
from typing import IO

from tests.support import free_port, wait_for_port


def _spamd_path() -> str | None:
    return shutil.which("spamd") or next(
        (p for p in ("/usr/sbin/spamd",) if os.access(p, os.X_OK)), None
    )


class SpamdServer:
    """C{spamd} on 127.0.0.1:C{port}."""

    def __init__(self) -> None:
        path = _spamd_path()
        if path is None:
            raise unittest.SkipTest("spamd is not installed (scripts/system-packages.sh)")
        self.path = path
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="spamd-test-")
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def start(self) -> SpamdServer:
        argv = [self.path, "--local", f"--listen=127.0.0.1:{self.port}", "--allowed-ips=127.0.0.1"]
        argv += ["--min-children=1", "--max-children=2", "--nouser-config", "--syslog=stderr"]
        argv += [f"--pidfile={self.directory}/spamd.pid"]
        if os.geteuid() == 0:
            argv.append("--username=nobody")  # spamd will not run as root
        self.log = open(os.path.join(self.directory, "spamd.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_for_port(self.port, timeout=60, alive=self._alive)
        except BaseException:
            self.stop()  # (tearDownClass does not run when setUpClass fails)
            raise
        return self

    def _alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"spamd exited with {self.process.returncode}: {self.output()}")

    def output(self) -> str:
        with open(os.path.join(self.directory, "spamd.log"), "rb") as f:
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
