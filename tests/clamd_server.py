"""A real ClamAV clamd on loopback for the tests (Debian's clamav-daemon, installed by
scripts/system-packages.sh), with a signature database of its own: no download (the
tests have no network), only test signatures. clamd names signatures from a database it
did not get signed .UNOFFICIAL, as it would a third party's."""

from __future__ import annotations

import os

from tests.daemon import Daemon

#: A string the test database finds, as Haraka-Test-EICAR.UNOFFICIAL (the EICAR line).
EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: A string the test database finds as Heuristics.Phishing.Haraka-Test.UNOFFICIAL.
PHISH = "HARAKA-PHISHING-TEST-STRING-7F3A"
SIGNATURES = {
    "Haraka-Test-EICAR": b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE",
    "Heuristics.Phishing.Haraka-Test": PHISH.encode(),
}


class ClamdServer(Daemon):
    """C{clamd} on 127.0.0.1:C{port}."""

    name = "clamd"
    package = "clamav-daemon"

    def __init__(self, stream_max_length: str = "10M") -> None:
        super().__init__()
        self.stream_max_length = stream_max_length

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
        self.run([self.path, "-c", conf])
        return self
