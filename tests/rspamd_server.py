"""A real rspamd on loopback for the tests (Debian's rspamd, installed by
scripts/system-packages.sh): its normal worker alone (the one that scans), on its own port,
with its database, run and log directories in its own directory, no Redis (rspamd turns
off what needs it) and no network (its DNS lookups fail, so the tests send
C{IP: 127.0.0.1} or mail GTUBE, whose verdicts do not depend on them).

rspamd compiles its Hyperscan cache into the database directory; that directory is shared
by every test run on the machine, so only the first start waits for it."""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request

from tests.daemon import Daemon

#: rspamd's verdict for it: reject, with smtp_message "Gtube pattern"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

_CONF = """\
.include "$CONFDIR/common.conf"
options {{
  .include "$CONFDIR/options.inc"
  pidfile = "$RUNDIR/rspamd.pid";
}}
logging {{
  type = "console";
  level = "warning";
}}
worker "normal" {{
  bind_socket = "127.0.0.1:{port}";
  .include "$CONFDIR/worker-normal.inc"
  count = 1;
}}
"""


class RspamdServer(Daemon):
    """C{rspamd}'s normal worker on 127.0.0.1:C{port}."""

    name = "rspamd"
    package = "rspamd"

    def start(self) -> RspamdServer:
        conf = os.path.join(self.directory, "rspamd.conf")
        with open(conf, "w") as f:
            f.write(_CONF.format(port=self.port))
        database = os.path.join(tempfile.gettempdir(), f"haraka_tw-rspamd-db-{os.getuid()}")
        os.makedirs(database, exist_ok=True)
        argv = [self.path, "-f", "-c", conf, f"--var=DBDIR={database}"]
        argv += [f"--var=RUNDIR={self.directory}", f"--var=LOGDIR={self.directory}"]
        if os.geteuid() == 0:
            argv.append("--insecure")  # (rspamd's workers will not run as root without it)
        self.run(argv)
        # The port answers before the worker has loaded its rules: wait for its ping.
        deadline = time.monotonic() + 90
        while not self._pong():
            self._alive()
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"rspamd did not answer its ping in 90 s: {self.output()}")
            time.sleep(0.1)
        return self

    def _pong(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as got:
                return bool(got.read().strip() == b"pong")
        except OSError:
            return False
