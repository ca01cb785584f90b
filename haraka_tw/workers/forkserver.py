"""The fork server: the small process that forks the workers (smtp.ini nodes).

The master starts it (C{python -P -m haraka_tw.workers.forkserver}) while it is still
privileged, before twistd's C{-u/-g} drop. It imports the worker's code at once, and the
rest of the standard library the master has loaded when the master sends its credentials;
then it drops to the master's user, group and groups, and from then on forks a worker
whenever the master asks. So a worker is a fork of a process that has imported everything
and started nothing (no reactor, no thread): it needs neither root nor the right to run
the Python interpreter (which the C{-u} user may lack, as with a Python installed under
/root), and it starts in milliseconds, the first time and after a crash alike.

Messages are JSON objects, one per packet of a C{SOCK_SEQPACKET} socket (the fork server's
descriptor 0); descriptors travel with them (C{SCM_RIGHTS})::

    master -> fork server
      {"op": "credentials", "uid": U, "gid": G, "groups": [..], "modules": [..]}
      {"op": "spawn", "index": I, "role": "<WorkerRole JSON>"}   descriptors: place()
      {"op": "signal", "pid": P, "signal": S}
    fork server -> master
      {"op": "spawned", "index": I, "pid": P}
      {"op": "exited", "pid": P, "code": C}           C: exit status, or -(signal number)
      {"op": "error", "index": I or null, "message": "..."}

When the master's end closes (the master stopped or died), the fork server exits; its
workers see their own channels to the master close, and stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import json
import os
import pkgutil
import select
import signal
import socket
import sys
import traceback
import types
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

__all__ = ["ForkServer", "exit_now", "install_reactor", "main", "place", "preload"]

#: What every worker runs: imported once, here, before the privileges are dropped.
WORKER_MODULES = (
    "haraka_tw.workers.worker",
    # install_reactor's: a worker may not be able to read the installation after the drop
    # (a checkout in a 0700 directory, as mktemp -d makes; Python under /root).
    "twisted.internet.default",
    "twisted.internet.epollreactor",
    "twisted.internet.pollreactor",
    "twisted.internet.selectreactor",
    "twisted.python.threadpool",
    "twisted.internet.threads",
)
_MAX_DESCRIPTORS = 256
_MAX_MESSAGE = 1 << 20


def preload(names: Iterable[str]) -> list[str]:
    """Import C{names} and every built-in plugin; the names that failed (a module one
    platform lacks, say).

    Importing Twisted's SMTP module installs the global reactor; so a stand-in that holds
    no descriptor (a C{MemoryReactorClock}) is installed first, and each worker replaces
    it with a reactor of its own (L{install_reactor}).
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet.main import installReactor
        from twisted.internet.testing import MemoryReactorClock

        installReactor(MemoryReactorClock())
    failed: list[str] = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name)
    import haraka_tw.plugins

    for found in pkgutil.walk_packages(haraka_tw.plugins.__path__, "haraka_tw.plugins."):
        try:
            importlib.import_module(found.name)
        except Exception:
            failed.append(found.name)
    return failed


def install_reactor() -> None:
    """In a new worker: the platform's reactor in place of the fork server's stand-in,
    and every reference to the stand-in that importing left (a module's C{reactor}, a
    default argument, as in C{twisted.mail.smtp}) pointed at it."""
    import twisted.internet
    from twisted.internet import default

    stand_in = sys.modules.pop("twisted.internet.reactor", None)
    if hasattr(twisted.internet, "reactor"):
        del twisted.internet.reactor
    default.install()
    from twisted.internet import reactor

    if stand_in is None:
        return
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is stand_in:
                namespace[name] = reactor
            elif isinstance(value, type):
                for member in vars(value).values():
                    _repoint_defaults(member, stand_in, reactor)
            else:
                _repoint_defaults(value, stand_in, reactor)


def _repoint_defaults(function: object, old: object, new: object) -> None:
    defaults = getattr(function, "__defaults__", None)
    if isinstance(function, types.FunctionType) and defaults and any(d is old for d in defaults):
        function.__defaults__ = tuple(new if d is old else d for d in defaults)


def place(descriptors: Sequence[int]) -> None:
    """In a new worker: the descriptors received with its spawn message, put where the
    worker expects them, and every other descriptor closed.

    The first becomes 0 (the control channel from the master), the second 1 and 2 (the
    output channel to the master), the rest 3, 4, ... in order (the listeners, then the
    queue lock: L{WorkerRole<haraka_tw.workers.WorkerRole>} names them).
    """
    if len(descriptors) < 2:
        raise ValueError("a worker needs at least its two channels")
    targets = [0, 1, *range(3, 3 + len(descriptors) - 2)]
    # Move everything above every target first, so no dup2 overwrites one still needed.
    floor = max([*targets, *descriptors]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in descriptors]
    for fd in descriptors:
        os.close(fd)
    for source, target in zip(moved, targets, strict=True):
        os.dup2(source, target)
    os.dup2(moved[1], 2)
    os.closerange(targets[-1] + 1, _max_fd())


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 65536


def drop_privileges(uid: int, gid: int, groups: Sequence[int]) -> None:
    """Become C{uid}/C{gid} with C{groups}, for good (as twistd's -u/-g does).

    @raise PermissionError: when that needs root and this process is not.
    """
    if os.getuid() == uid and os.geteuid() == uid and os.getgid() == gid:
        return
    os.setgroups(list(groups))
    os.setgid(gid)
    os.setuid(uid)


class ForkServer:
    """The fork server's loop: messages from the master, children's exits."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.children: dict[int, int] = {}  # pid -> worker index
        self.credentials_applied = False  # no worker is forked before the drop
        self._wake_r, self._wake_w = os.pipe()

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the master is gone: serve() ends on EOF
            self.channel.send(json.dumps(message).encode())

    def serve(self) -> int:
        """Run until the master's end closes; the exit status."""
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        # The master decides what a signal means for the workers; a terminal's ^C or a
        # hangup reaches this process too (its process group) and is not its business.
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        while True:
            watched: list[Any] = [self.channel, self._wake_r]
            ready, _, _ = select.select(watched, [], [])
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 512):
                        pass
            self.reap()
            if self.channel in ready:
                data, fds, _flags, _address = socket.recv_fds(
                    self.channel, _MAX_MESSAGE, _MAX_DESCRIPTORS
                )
                if not data:
                    return 0
                try:
                    self.handle(json.loads(data), fds)
                except Exception as e:
                    self.send({"op": "error", "index": None, "message": f"{e!r}"})
                finally:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)

    def handle(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "credentials":
            preload(message.get("modules", ()))  # best effort: what the master had loaded
            # What is loaded now lives as long as every worker: their collections need not
            # walk it, and leaving it untouched keeps its pages shared with the fork server.
            gc.freeze()
            try:
                drop_privileges(int(message["uid"]), int(message["gid"]), message["groups"])
            except Exception as e:
                # Never go on to fork workers with the privileges the master gave up.
                self.send({"op": "error", "index": None, "message": f"credentials: {e!r}"})
                raise SystemExit(1) from e
            self.credentials_applied = True
        elif op == "spawn":
            index = int(message["index"])
            if not self.credentials_applied:
                self.send({"op": "error", "index": index, "message": "spawn before credentials"})
                return
            try:
                pid = os.fork()
            except OSError as e:
                self.send({"op": "error", "index": index, "message": f"fork: {e}"})
                return
            if pid == 0:
                self._become_worker(str(message["role"]), fds)
            self.children[pid] = index
            self.send({"op": "spawned", "index": index, "pid": pid})
        elif op == "signal":
            pid = int(message["pid"])
            if pid in self.children:  # never a pid already reaped, and perhaps reused
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, int(message["signal"]))
        else:
            raise ValueError(f"unknown op {op!r}")

    def reap(self) -> None:
        """Report every child that has exited."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.pop(pid, None)
            self.send({"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def _become_worker(self, role: str, fds: list[int]) -> NoReturn:
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            # A SIGHUP the master passes on before the service takes it over must not kill
            # the worker; the config it is about to read is the new one anyway.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            # Twisted takes over SIGINT only from Python's own handler.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.channel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            place(fds)
            install_reactor()
            from haraka_tw.workers import WorkerRole
            from haraka_tw.workers.worker import run

            code = run(WorkerRole.from_json(role))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            exit_now(code)


def exit_now(status: int) -> NoReturn:
    """End the process with C{status} at once (no exit handlers, no interpreter teardown),
    what is buffered on stdout and stderr written first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def main() -> int:
    channel = socket.socket(fileno=0)
    failed = preload(WORKER_MODULES)
    if "haraka_tw.workers.worker" in failed:
        importlib.import_module("haraka_tw.workers.worker")  # raises: says why
    return ForkServer(channel).serve()


if __name__ == "__main__":
    sys.exit(main())
