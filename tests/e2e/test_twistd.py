"""The real command: C{twistd haraka} as a subprocess, driven from outside.

Each test writes a config directory with a free loopback port in smtp.ini, starts
C{twistd} (the one next to this Python), waits for the port with a bounded poll, talks
SMTP to it with smtplib or a raw socket, and signals it. Every process is killed in
cleanup, whatever happened.
"""

from __future__ import annotations

import mailbox
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from tests.support import (
    TWISTD,
    WireClient,
    free_port,
    reply_code,
    spawn_twistd,
    temp_dir,
    wait_for_port,
    wait_for_refusal,
    write_config,
)

MESSAGE = b"From: <alice@x.test>\r\nTo: <bob@example.com>\r\nSubject: hello\r\n\r\nHi there.\r\n"


# twistd stopped by SIGTERM re-raises it once the reactor has shut down cleanly
# (twisted.application.app._exitWithSignal), so a clean stop exits with -SIGTERM.
CLEAN_STOP = frozenset({0, -signal.SIGTERM})


def ids(pid: int) -> tuple[list[str], list[str]]:
    """The Uid and Gid lines of C{pid}'s status (real, effective, saved, filesystem)."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(.*)$", status, re.M)
    gid = re.search(r"^Gid:\s+(.*)$", status, re.M)
    assert uid is not None and gid is not None
    return uid.group(1).split(), gid.group(1).split()


def poll(condition: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Call C{condition} until it returns something true; that value, or None at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(step)


def is_running(pid: int) -> bool:
    """Whether C{pid} is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return False
    m = re.search(r"^State:\s+(\S)", status, re.M)
    return m is not None and m.group(1) != "Z"


def rcpt_code(port: int, recipient: str) -> int:
    """The reply code to RCPT TO:<recipient> in a fresh session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@x.test")
        return int(smtp.rcpt(recipient)[0])


def ehlo_size(port: int) -> str | None:
    """The SIZE a fresh session advertises."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        return smtp.esmtp_features.get("size")


class TwistdTestCase(unittest.SynchronousTestCase):
    """Runs C{twistd} in a temporary directory with a config directory of its own."""

    def setUp(self) -> None:
        if not TWISTD.exists():
            raise unittest.SkipTest(f"no twistd next to {sys.executable}")
        self.base = temp_dir(self)
        self.config = self.base / "config"
        self.maildir = self.base / "maildir"
        self.port = free_port()
        self.log_path = self.base / "twistd.out"

    def configure(self, files: Mapping[str, str] | None = None, *, listen: str = "") -> None:
        """Write the config directory: our port, our maildir, plus C{files}."""
        all_files = {
            "smtp.ini": f"[main]\nlisten={listen or f'127.0.0.1:{self.port}'}\n",
            "maildir.ini": f"[main]\npath={self.maildir}\nfsync=false\n",
            "me": "mx.test\n",
        }
        all_files.update(files or {})
        write_config(self.config, all_files)

    def spool_for_nobody(self) -> Path:
        """For a test that drops to nobody: skip unless root; make the base readable and a
        spool nobody can write (self.maildir in it)."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: drops to nobody")
        # nobody must reach the config (for reloads) and write the maildir.
        os.chmod(self.base, 0o755)
        spool = self.base / "spool"
        spool.mkdir()
        os.chmod(spool, 0o777)
        self.maildir = spool / "maildir"
        return spool

    def spool_for_nobody_on_port_25(self) -> Path:
        """For a -u nobody -g nogroup test on 127.0.0.1:25: skip unless root and the port
        is free; make the base readable and a spool nobody can write (self.maildir in it)."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: binds port 25 and drops to nobody")
        with socket.socket() as probe:
            # As Twisted binds: connections of an earlier run in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", 25))
            except OSError as e:
                raise unittest.SkipTest(f"127.0.0.1:25 is not free ({e})") from None
        return self.spool_for_nobody()

    def spawn(self, twistd_args: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start C{twistd <twistd_args> haraka --config DIR}."""
        proc = spawn_twistd(twistd_args, self.config, self.base, self.log_path)
        self.addCleanup(self.reap, proc)
        return proc

    def reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start_foreground(
        self, extra: Sequence[str] = (), port: int | None = None
    ) -> subprocess.Popen[bytes]:
        """C{twistd -n} (no pid file) with the port up."""
        proc = self.spawn(["-n", "--pidfile=", *extra])
        self.wait_listening(proc, port or self.port)
        return proc

    def wait_listening(self, proc: subprocess.Popen[bytes] | None, port: int) -> None:
        def alive() -> None:
            if proc is not None and proc.poll() is not None:
                self.fail(f"twistd exited with {proc.returncode}:\n{self.output()}")

        try:
            wait_for_port(port, timeout=20, alive=alive)
        except TimeoutError as e:
            self.fail(f"{e}\n{self.output()}")

    def stored(self) -> list[bytes]:
        if not self.maildir.is_dir():
            return []
        box = mailbox.Maildir(str(self.maildir), create=False)
        return [box.get_bytes(key) for key in sorted(box.keys())]

    def send_message(self, port: int | None = None) -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", port or self.port, timeout=10) as smtp:
            return smtp.sendmail("alice@x.test", ["bob@example.com"], MESSAGE)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
        """SIGTERM, and a clean exit within C{timeout}."""
        proc.send_signal(signal.SIGTERM)
        self.assert_clean_exit(proc, timeout)

    def assert_clean_exit(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"twistd did not stop:\n{self.output()}")
        self.assertIn(code, CLEAN_STOP, self.output())


class ForegroundTests(TwistdTestCase):
    def test_foreground_accepts_a_message_into_the_maildir(self) -> None:
        """twistd -n haraka --config DIR accepts a message from smtplib into the Maildir."""
        self.configure()
        proc = self.start_foreground()
        self.assertEqual(self.send_message(), {})
        stored = self.stored()
        self.assertEqual(len(stored), 1)
        self.assertTrue(stored[0].startswith(b"Received: from "), stored[0])
        self.assertIn(b"by mx.test", stored[0])
        self.assertTrue(stored[0].endswith(MESSAGE))
        self.stop(proc)

    def test_foreground_loads_a_plugin_from_outside_the_package(self) -> None:
        """A module:Factory plugin on PYTHONPATH answers ahead of the built-in chain."""
        sample = "tests.e2e.sample_plugin:Factory"
        self.configure({"plugins": f"{sample}\nrcpt_to.in_host_list\nqueue/maildir\n"})
        proc = self.start_foreground()
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            code, text = smtp.mail("deny.deferred@x.test")
            self.assertEqual((code, text), (550, b"5.7.1 sender <deny.deferred@x.test> denied"))
            self.assertEqual(smtp.sendmail("alice@x.test", ["bob@example.com"], MESSAGE), {})
        self.assertEqual(len(self.stored()), 1)
        self.assertIn(f"[{sample}] mail: answering deny (deferred)", self.output())
        self.stop(proc)

    def test_daemon_writes_pid_and_log_and_stops_on_sigterm(self) -> None:
        """Daemon mode writes the pid file and log file, serves, and stops on SIGTERM."""
        self.configure()
        pidfile, logfile = self.base / "haraka.pid", self.base / "haraka.log"
        launcher = self.spawn(["--pidfile", str(pidfile), "--logfile", str(logfile)])
        self.assertEqual(launcher.wait(20), 0, self.output())
        text = poll(lambda: pidfile.exists() and pidfile.read_text().strip(), 10)
        self.assertTrue(text, f"no pid file:\n{self.output()}")
        pid = int(text)
        self.addCleanup(_kill_quietly, pid)
        self.assertNotEqual(pid, launcher.pid)  # it forked away
        self.wait_listening(None, self.port)
        self.assertEqual(self.send_message(), {})
        self.assertEqual(len(self.stored()), 1)

        # The lines of a session reach the file in a batch, a moment later.
        def delivered() -> str:
            text = logfile.read_text()
            return text if "delivered to" in text else ""

        log = poll(delivered, 5)
        self.assertTrue(log, logfile.read_text())
        self.assertIn(f"listening on tcp:{self.port}:interface=127.0.0.1", log)
        # twistd's line format (haraka_tw.logging.TwistdLogObserver writes it)
        disconnect = re.compile(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[haraka_tw#info\] \[NOTICE\] "
            r"\[[0-9A-F-]{36}\] \[core\] disconnect ip=127\.0\.0\.1 .* msgs=1/0/0 ",
            re.M,
        )
        self.assertTrue(poll(lambda: disconnect.search(logfile.read_text()), 10), log)
        self.assertRegex(log, r"(?m)^\S+ \[twisted\.scripts\._twistd_unix\.UnixAppLogger#info\] ")
        # SIGUSR1 rotates the log, as twistd's own log file does
        os.kill(pid, signal.SIGUSR1)
        rotated = self.base / "haraka.log.1"
        self.assertTrue(poll(rotated.exists, 10), "SIGUSR1 did not rotate the log")
        self.assertEqual(self.send_message(), {})
        self.assertTrue(poll(lambda: disconnect.search(logfile.read_text()), 10))
        self.assertIn("delivered to", rotated.read_text())
        os.kill(pid, signal.SIGTERM)
        self.assertTrue(poll(lambda: not is_running(pid), 15), "the daemon did not stop")
        self.assertFalse(pidfile.exists(), "the pid file was left behind")
        self.assertRaises(OSError, socket.create_connection, ("127.0.0.1", self.port), 1)


def _kill_quietly(pid: int) -> None:
    if is_running(pid):
        os.kill(pid, signal.SIGKILL)


class StartupErrorTests(TwistdTestCase):
    def run_to_exit(self) -> tuple[int, str]:
        proc = self.spawn(["-n", "--pidfile="])
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            self.fail(f"twistd kept running:\n{self.output()}")
        return code, self.output()

    def test_config_syntax_error_names_file_and_line(self) -> None:
        """connection.ini with a '[max' line: twistd exits non-zero naming the file and line."""
        self.configure({"connection.ini": "[main]\nsmtputf8=true\n[max\nbytes=10\n"})
        code, out = self.run_to_exit()
        self.assertNotEqual(code, 0, out)
        self.assertRegex(out, r"connection\.ini:3\b")
        self.assertIn("[max", out)

    def test_unknown_plugin_names_the_plugin(self) -> None:
        """A plugins file naming a missing plugin: twistd exits non-zero naming it."""
        self.configure({"plugins": "rcpt_to.in_host_list\nno_such_plugin_x\nqueue/maildir\n"})
        code, out = self.run_to_exit()
        self.assertNotEqual(code, 0, out)
        self.assertIn("no_such_plugin_x", out)

    def test_a_port_in_use_is_one_line_in_the_foreground_and_no_hang_as_a_daemon(self) -> None:
        """The listen port taken: in the foreground twistd exits 1 with one line naming the
        listener (no traceback); as a daemon the launcher exits 1 at once (twistd waits for
        the daemon's report, which must come), and the log file has the CRIT line; no pid
        file is left behind either way."""
        self.configure()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", self.port))
            taken.listen()
            code, out = self.run_to_exit()
            self.assertEqual(code, 1, out)
            self.assertIn(
                f"haraka_tw: Address already in use: cannot listen on tcp:{self.port}:interface=",
                out,
            )
            self.assertNotIn("Traceback", out)
            logfile = self.base / "daemon.log"
            launcher = self.spawn(
                ["--pidfile", str(self.base / "d.pid"), "--logfile", str(logfile)]
            )
            try:
                self.assertEqual(launcher.wait(20), 1, self.output())
            except subprocess.TimeoutExpired:
                self.fail(f"the daemon's launcher hung:\n{self.output()}")
            # (the launcher shows the first 100 bytes of the daemon's report: reason first)
            self.assertIn("Address already in use: cannot listen on", self.output())
            self.assertIn("[CRIT]", logfile.read_text())
            self.assertIn("Address already in use", logfile.read_text())
            self.assertFalse((self.base / "d.pid").exists(), "the daemon left its pid file")
            pidfile = self.base / "f.pid"  # (twistd removes it: the error is an exception)
            self.assertEqual(self.spawn(["-n", "--pidfile", str(pidfile)]).wait(20), 1)
            self.assertFalse(pidfile.exists(), "the foreground run left its pid file")


class ReloadTests(TwistdTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.configure({"host_list": "example.com\n", "connection.ini": "[max]\nbytes=26214400\n"})

    def test_sighup_applies_new_config_to_new_sessions(self) -> None:
        """After SIGHUP new sessions see new host_list and connection.ini; open ones keep theirs."""
        proc = self.start_foreground()
        self.assertEqual(rcpt_code(self.port, "carol@newdomain.test"), 550)
        self.assertEqual(ehlo_size(self.port), "26214400")
        with WireClient(self.port) as old:
            self.assertIn(b"SIZE 26214400", old.command("EHLO client.test"))
            write_config(
                self.config,
                {
                    "host_list": "example.com\nnewdomain.test\n",
                    "connection.ini": "[max]\nbytes=12345\n",
                },
            )
            proc.send_signal(signal.SIGHUP)
            # SIGHUP reloads at once; the watcher could not act within one poll interval.
            line = poll(lambda: re.search(r"\[core\] reload: ([^\n]*)", self.output()), 0.9)
            self.assertIsNotNone(line, f"no reload after SIGHUP:\n{self.output()}")
            self.assertIn("host_list", line.group(1))
            self.assertIn("connection.ini", line.group(1))
            self.assertEqual(rcpt_code(self.port, "carol@newdomain.test"), 250)
            self.assertEqual(ehlo_size(self.port), "12345")
            # The session that was open keeps the settings it started with.
            self.assertIn(b"SIZE 26214400", old.command("EHLO client.test"))
            self.assertEqual(reply_code(old.command("QUIT")), 221)
        self.stop(proc)

    def test_sighup_with_a_broken_file_keeps_the_last_good_value(self) -> None:
        """SIGHUP after connection.ini broke: logged with file and line, old value kept."""
        proc = self.start_foreground()
        write_config(self.config, {"connection.ini": "[max\nbytes=5\n"})
        proc.send_signal(signal.SIGHUP)
        warned = poll(lambda: "keeping the last good connection.ini" in self.output(), 15)
        self.assertTrue(warned, self.output())
        self.assertIn("connection.ini:1:", self.output())
        self.assertEqual(ehlo_size(self.port), "26214400")
        self.assertEqual(self.send_message(), {})
        self.stop(proc)

    def test_watcher_applies_host_list_change_without_sighup(self) -> None:
        """Without SIGHUP, an edited host_list applies to new sessions within a few seconds."""
        proc = self.start_foreground()
        self.assertEqual(rcpt_code(self.port, "dave@watched.test"), 550)
        write_config(self.config, {"host_list": "example.com\nwatched.test\n"})
        accepted = poll(lambda: rcpt_code(self.port, "dave@watched.test") == 250, 6, step=0.2)
        self.assertTrue(accepted, f"host_list change not picked up:\n{self.output()}")
        self.assertEqual(rcpt_code(self.port, "bob@example.com"), 250)
        self.stop(proc)


class GracefulShutdownTests(TwistdTestCase):
    def test_open_session_finishes_its_transaction_then_is_closed(self) -> None:
        """SIGTERM mid-transaction: no new connections, the open one finishes, then is closed."""
        self.configure(
            {"smtp.ini": f"[main]\nlisten=127.0.0.1:{self.port}\nforce_shutdown_timeout=2\n"}
        )
        proc = self.start_foreground()
        with WireClient(self.port) as c:
            c.command("EHLO client.test")
            self.assertEqual(reply_code(c.command("MAIL FROM:<alice@x.test>")), 250)
            self.assertEqual(reply_code(c.command("RCPT TO:<bob@example.com>")), 250)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)

            self.assertTrue(
                wait_for_refusal(self.port, 5), "still accepting connections after SIGTERM"
            )
            self.assertEqual(reply_code(c.command("DATA")), 354)
            c.send(MESSAGE + b".\r\n")
            self.assertEqual(reply_code(c.reply()), 250)
            # Then the server closes the session (421), by force_shutdown_timeout at the latest.
            rest = c.quiet(2 + 3)
            self.assertRegex(rest, rb"^421 [^\r\n]*\r\n$")
            self.assertTrue(c.at_eof(1))
            self.assertLess(time.monotonic() - signalled, 2 + 3)
        self.assert_clean_exit(proc, 10)
        self.assertEqual(len(self.stored()), 1)


class PrivilegeDropTests(TwistdTestCase):
    def test_binds_port_25_then_runs_as_nobody(self) -> None:
        """As root: -u nobody -g nogroup binds 127.0.0.1:25, then serves as nobody."""
        spool = self.spool_for_nobody_on_port_25()
        self.configure(
            {"outbound.ini": f"[main]\nqueue_dir={spool / 'queue'}\n"}, listen="127.0.0.1:25"
        )
        proc = self.start_foreground(["-u", "nobody", "-g", "nogroup"], port=25)
        self.assert_runs_as_nobody(proc.pid)
        self.assertEqual(self.send_message(25), {}, self.output())
        stored = self.stored()
        self.assertEqual(len(stored), 1)
        self.assertTrue(stored[0].endswith(MESSAGE))
        (path,) = (self.maildir / "new").iterdir()
        self.assertEqual(path.stat().st_uid, 65534)  # written by nobody, not root
        self.stop(proc)

    def assert_runs_as_nobody(self, pid: int) -> None:
        """Real, effective, saved and filesystem uid and gid all nobody's. The port answers
        from listen(), a moment before twistd drops (before the reactor runs, so no client is
        served as root): on a loaded machine that moment is seen, so the drop is waited for."""
        poll(lambda: ids(pid)[0] != ["0"] * 4 or None, 10)
        uids, gids = ids(pid)
        self.assertEqual(uids, ["65534"] * 4)
        self.assertEqual(gids, ["65534"] * 4)

    def test_smtp_ini_user_and_group_are_the_ones_dropped_to(self) -> None:
        """As root, with Haraka's smtp.ini user= and group= and no -u/-g: the listeners are
        bound, then the process serves as that user and group, and says so."""
        spool = self.spool_for_nobody()
        self.configure(
            {
                "smtp.ini": f"[main]\nlisten=127.0.0.1:{self.port}\nuser=nobody\ngroup=nogroup\n",
                "outbound.ini": f"[main]\nqueue_dir={spool / 'queue'}\n",
            }
        )
        proc = self.start_foreground()
        self.assert_runs_as_nobody(proc.pid)
        self.assertEqual(self.send_message(), {}, self.output())
        (path,) = (self.maildir / "new").iterdir()
        self.assertEqual(path.stat().st_uid, 65534)
        dropping = "dropping to user nobody group nogroup (smtp.ini) once listening"
        self.assertIn(dropping, self.output())
        self.stop(proc)


class HarakaSmtpIniTests(TwistdTestCase):
    """smtp.ini as an operator brings it from Haraka."""

    def test_port_and_listen_host_are_read_as_haraka_reads_them(self) -> None:
        """Haraka's older keys, with no listen=: the server listens on listen_host:port."""
        self.configure({"smtp.ini": f"[main]\nlisten_host=127.0.0.1\nport={self.port}\n"})
        proc = self.start_foreground()
        self.assertEqual(self.send_message(), {}, self.output())
        self.assertIn(f"listening on tcp:{self.port}:interface=127.0.0.1", self.output())
        self.stop(proc)

    def test_a_user_that_does_not_exist_is_one_line(self) -> None:
        """smtp.ini user= naming no user stops start-up with a line that says so."""
        self.configure({"smtp.ini": f"[main]\nlisten=127.0.0.1:{self.port}\nuser=nosuchuser\n"})
        proc = self.spawn(["-n", "--pidfile="])
        self.assertEqual(proc.wait(20), 1)
        self.assertIn("haraka_tw: smtp.ini user: no user named 'nosuchuser'", self.output())
        self.assertNotIn("Traceback", self.output())

    def test_keys_not_read_are_a_warning_naming_the_line(self) -> None:
        """A typo, or a Haraka key handled another way here, is a WARN with file and line
        and what to do instead; the server starts all the same."""
        self.configure(
            {
                "smtp.ini": f"[main]\nlisten=127.0.0.1:{self.port}\nlistn=127.0.0.1:25\n"
                "daemon_log_file=/var/log/haraka.log\ndaemonize=true\n"
            }
        )
        proc = self.start_foreground()
        ini = self.config / "smtp.ini"
        out = poll(lambda: self.output() if "daemon_log_file" in self.output() else None, 5)
        self.assertIsNotNone(out, self.output())
        self.assertIn(f"{ini}:5: daemonize is not read: twistd runs as a daemon unless", out)
        self.assertIn(f"{ini}:4: daemon_log_file is not read: twistd --logfile FILE", out)
        self.assertIn(f"{ini}:3: listn is not read: not a key of smtp.ini", out)
        self.stop(proc)

    def test_a_bad_loglevel_names_its_file(self) -> None:
        """Haraka's LOGINFO names are levels; anything else stops start-up with one line
        naming the file and the levels there are."""
        self.configure({"loglevel": "LOGDEBUG\n"})
        proc = self.start_foreground()
        self.stop(proc)
        self.configure({"loglevel": "loud\n"})
        proc = self.spawn(["-n", "--pidfile="])
        self.assertEqual(proc.wait(20), 1)
        self.assertIn(
            f"haraka_tw: {self.config / 'loglevel'}: unknown log level 'loud' (one of EMERG,",
            self.output(),
        )
