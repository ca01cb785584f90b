"""A real SpamAssassin spamd on loopback for the tests (Debian's spamd package, installed
by scripts/system-packages.sh): its own port, local tests only (no network rules), no
per-user files. It takes about two seconds to start, so a test class shares one."""

from __future__ import annotations

import os

from tests.daemon import Daemon


class SpamdServer(Daemon):
    """C{spamd} on 127.0.0.1:C{port}."""

    name = "spamd"
    package = "spamd"

    def start(self) -> SpamdServer:
        argv = [self.path, "--local", f"--listen=127.0.0.1:{self.port}", "--allowed-ips=127.0.0.1"]
        argv += ["--min-children=1", "--max-children=2", "--nouser-config", "--syslog=stderr"]
        argv += [f"--pidfile={self.directory}/spamd.pid"]
        if os.geteuid() == 0:
            argv.append("--username=nobody")  # spamd will not run as root
        self.run(argv)
        return self
