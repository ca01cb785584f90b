"""A real ClamAV clamd on loopback for the tests (Debian's clamav-daemon, installed by
scripts/system-packages.sh), with a signature database of its own: no download (the
tests have no network), only test signatures. clamd names signatures from a database it
did not get signed .UNOFFICIAL, as it would a third party's."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unittest
from typing import IO

from tests.support import free_port, wait_for_port

#: A string the test database finds, as Haraka-Test-EICAR.UNOFFICIAL (the EICAR line).
EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: A string the test database finds as Heuristics.Phishing.Haraka-Test.UNOFFICIAL.
PHISH = "HARAKA-PHISHING-TEST-STRING-7F3A"
SIGNATURES = {
    "Haraka-Test-EICAR": b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE",
    "Heuristics.Phishing.Haraka-Test": PHISH.encode(),
}


def _clamd_path() -> str | None:
    return shutil.which("clamd") or (
        "/usr/sbin/clamd" if os.access("/usr/sbin/clamd", os.X_OK) else None
    )


class ClamdServer:
    """C{clamd} on 127.0.0.1:C{port}."""

    def __init__(self, stream_max_length: str = "10M") -> None:
        path = _clamd_path()
        if path is None:
            raise unittest.SkipTest("clamd is not installed (scripts/system-packages.sh)")
        self.path = path
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="clamd-test-")
        self.stream_max_length = stream_max_length
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def start(self) -> ClamdServer:
        database = os.path.join(self.directory, "db")
        os.mkdir(database)
        with open(os.path.join(database, "haraka-test.ndb"), "w") as f:
            for name, text in SIGNATURES.items():
                f.write(f"{name}:0:*:{text.hex()}\n")
        conf = os.path.join(self.directory, "clamd.conf")
        lines = [
            f"DatabaseDirectory {database}",
            f"TCPSocket {self.port}",
            "TCPAddr 127.0.0.1",
            "Foreground yes",
            f"PidFile {self.directory}/clamd.pid",
            f"StreamMaxLength {self.stream_max_length}",
        ]
        if os.geteuid() == 0:
            lines.append("User root")  # (else it takes the clamav user, which may not read here)
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.log = open(os.path.join(self.directory, "clamd.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [self.path, "-c", conf],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, timeout=60, alive=self._alive)
        except BaseException:
            self.stop()
            raise
        return self

    def _alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"clamd exited with {self.process.returncode}")

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
