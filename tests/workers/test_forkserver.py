"""The fork server's pieces that act on the process itself, each run in a subprocess:
putting a new worker's descriptors in place, and giving it a reactor of its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from haraka_tw.logging import HarakaLog
from haraka_tw.workers import forkserver, launcher
from haraka_tw.workers.forkserver import ForkServer, drop_privileges
from tests.support import REPO_ROOT


def run_python(code: str) -> str:
    """Run C{code} in a fresh interpreter (the repository importable); its stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_place_puts_descriptors_where_the_worker_expects_them() -> None:
    """The first descriptor becomes 0, the second 1 and 2, the rest 3, 4, ...; every other
    descriptor is closed, even when a given one sits on a target's number."""
    out = run_python(
        """
        import json, os
        from haraka_tw.workers.forkserver import place

        out = os.dup(1)
        control_r, control_w = os.pipe()
        os.dup2(control_r, 4)          # the control channel arrives on fd 4: a target
        first = os.open("/dev/null", os.O_RDONLY)
        second = os.open("/proc/self/status", os.O_RDONLY)
        stray = os.open("/dev/zero", os.O_RDONLY)
        ino = lambda fd: os.fstat(fd).st_ino
        want = {0: ino(4), 1: ino(out), 2: ino(out), 3: ino(first), 4: ino(second)}
        place([4, out, first, second])
        got = {}
        for fd in range(64):
            try:
                got[fd] = os.fstat(fd).st_ino
            except OSError:
                pass
        os.write(1, json.dumps({"want": want, "got": got}).encode())
        """
    )
    report = json.loads(out)
    assert report["got"] == report["want"]


def test_install_reactor_replaces_the_stand_in_everywhere() -> None:
    """Preloading installs a stand-in reactor (twisted.mail.smtp takes one at import); a
    worker's install_reactor() puts a real one in its place, in module globals and in
    default arguments."""
    out = run_python(
        """
        from haraka_tw.workers.forkserver import install_reactor, preload
        preload(["twisted.mail.smtp"])
        import twisted.mail.smtp as smtp
        print(type(smtp.reactor).__name__)
        install_reactor()
        from twisted.internet import reactor
        print(smtp.reactor is reactor, type(reactor).__name__ != "MemoryReactorClock")
        print(reactor in smtp.sendmail.__defaults__)
        """
    )
    assert out.split("\n")[:3] == ["MemoryReactorClock", "True True", "True"]


def test_drop_privileges_to_oneself_is_nothing() -> None:
    """Dropping to this process's own user and group changes nothing (and needs no root)."""
    drop_privileges(os.getuid(), os.getgid(), os.getgroups())
    assert os.getuid() == os.geteuid()


def _server_and_master() -> tuple[ForkServer, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return ForkServer(theirs), ours


def test_no_worker_is_forked_before_the_credentials() -> None:
    """A spawn request before the master's credentials is refused: a worker must never run
    with privileges the master has given up."""
    server, master = _server_and_master()
    with master, server.channel:
        server.handle({"op": "spawn", "index": 0, "role": "{}"}, [])
        reply = json.loads(master.recv(4096))
        assert reply == {"op": "error", "index": 0, "message": "spawn before credentials"}
        assert server.children == {}


def test_credentials_that_cannot_be_taken_end_the_fork_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the drop to the master's user fails, the fork server says why and exits, rather
    than fork workers as root later."""

    def refuse(uid: int, gid: int, groups: list[int]) -> None:
        raise PermissionError("setuid refused")

    monkeypatch.setattr(forkserver, "drop_privileges", refuse)
    monkeypatch.setattr(forkserver.gc, "freeze", lambda: None)
    server, master = _server_and_master()
    with master, server.channel:
        message = {"op": "credentials", "uid": 65534, "gid": 65534, "groups": [], "modules": []}
        with pytest.raises(SystemExit):
            server.handle(message, [])
        reply = json.loads(master.recv(4096))
        assert reply["op"] == "error" and "setuid refused" in reply["message"]
        assert not server.credentials_applied


def test_credentials_sent_are_the_effective_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under twistd --euid the real uid stays 0: the fork server is told the effective ids."""
    monkeypatch.setattr(launcher.os, "geteuid", lambda: 65534)
    monkeypatch.setattr(launcher.os, "getegid", lambda: 65533)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        sender = launcher.ForkServerLauncher(None, HarakaLog(), [], [], 1, lambda why: None)
        sender._channel = ours
        sender.send_credentials()
        sent = json.loads(theirs.recv(1 << 20))
        assert (sent["op"], sent["uid"], sent["gid"]) == ("credentials", 65534, 65533)
