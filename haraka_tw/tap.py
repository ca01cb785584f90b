"""twistd's C{haraka} command: options and makeService.

The ServiceMaker itself lives in twisted/plugins/haraka_tw_plugin.py.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import sys
from typing import Any

from twisted.application.app import ServerOptions
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile

from haraka_tw.logging import Level, TwistdLogObserver
from haraka_tw.server import StartupError
from haraka_tw.service import DEFAULT_BACKLOG, HarakaService, parse_listen

__all__ = ["Options", "makeService", "twistd_log_observer"]


class Options(usage.Options):
    synopsis = "[-c DIR] [-l ENDPOINT ...]"
    longdesc = (
        "Run the haraka_tw ESMTP server. Configuration comes from the shipped defaults, "
        "overridden file by file (and ini key by key) by --config DIR. Listeners come from "
        "smtp.ini 'listen' unless --listen is given."
    )
    optParameters = [
        ["config", "c", None, "The config directory (Haraka layout: smtp.ini, plugins, ...)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """A listener: host:port, [v6]:port, or a Twisted endpoint string. Repeatable."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        # twistd's own log observer, unless the operator chose one (--logger, --syslog).
        # Its only hook for that is --logger, a name it imports and calls with nothing,
        # so the choice of file is kept here for the call.
        parent = getattr(self, "parent", None)
        if not isinstance(parent, ServerOptions):  # (twist, or no parent at all)
            return
        if parent.get("logger") is not None or parent.get("syslog"):
            return
        _TWISTD_LOG["logfile"] = parent.get("logfile")
        _TWISTD_LOG["nodaemon"] = bool(parent.get("nodaemon"))
        parent["logger"] = f"{__name__}.twistd_log_observer"


_TWISTD_LOG: dict[str, Any] = {}


def twistd_log_observer() -> ILogObserver:
    """twistd's log, chosen as twistd chooses it (stdout under C{-n} with no
    C{--logfile} or with C{--logfile -}; otherwise the file, C{twistd.log} by default,
    rotated by size and on SIGUSR1), written by L{TwistdLogObserver}. It is meant to be
    named by L{Options.postOptions}, which keeps twistd's choices for it."""
    # The reactor twistd runs (installed by now: --reactor, or the default on first use);
    # with it the observer writes its lines in batches.
    from twisted.internet import reactor

    name = _TWISTD_LOG.get("logfile")
    nodaemon = _TWISTD_LOG.get("nodaemon", False)
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return TwistdLogObserver(sys.stdout, reactor=reactor)
    try:
        log_file = LogFile.fromFullPath(name or "twistd.log")
    except OSError as e:
        sys.stderr.write(f"haraka_tw: --logfile {name or 'twistd.log'}: {e.strerror or e}\n")
        raise SystemExit(1) from None
    if not signal.getsignal(signal.SIGUSR1):  # None or SIG_DFL: nobody else wants it

        def rotate(signum: int, frame: Any) -> None:
            reactor.callFromThread(rotate_or_reopen, log_file)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return TwistdLogObserver(log_file, reactor=reactor)


def rotate_or_reopen(log_file: LogFile) -> None:
    """SIGUSR1: rotate the log (twistd.log becomes twistd.log.1); but if the file at its
    path is gone or is another file (logrotate moved it, someone deleted it), open a new
    one there instead, so that no line is written into a file nobody can find."""
    try:
        in_place = os.path.samestat(os.stat(log_file.path), os.fstat(log_file._file.fileno()))
    except (OSError, ValueError):  # (gone; or the file object closed)
        in_place = False
    if in_place:
        log_file.rotate()
    else:
        log_file.reopen()


def makeService(options: Any) -> HarakaService:
    """Build the service; a configuration problem stops twistd with a clear message."""
    try:
        endpoints = None
        if options["listen"]:
            endpoints = parse_listen(",".join(options["listen"]), backlog=DEFAULT_BACKLOG)
        service = HarakaService.from_directory(
            options["config"], endpoints, owns_process=True, nodes=None
        )
        _user_from_smtp_ini(options, service)
    except (StartupError, ValueError) as e:
        sys.stderr.write(f"haraka_tw: {e}\n")
        raise SystemExit(1) from e
    return service


def _user_from_smtp_ini(options: Any, service: HarakaService) -> None:
    """smtp.ini C{user} and C{group}, as in Haraka: the user and group the process drops to
    once the listeners are bound. twistd does the dropping (the same step as its C{-u} and
    C{-g}, which win over these); they are handed to it here, where it reads them after
    this returns. Not root: a WARN, and the process stays as it is.

    @raise StartupError: for a user or group that does not exist.
    """
    parent = getattr(options, "parent", None)
    smtp = service.server.smtp_ini
    user, group = (str(smtp.get(key) or "").strip() for key in ("user", "group"))
    if not (user or group) or not isinstance(parent, ServerOptions):
        return
    log = service.server.log
    if parent.get("uid") is not None or parent.get("gid") is not None:
        log.log(Level.NOTICE, "smtp.ini user/group not used: twistd -u/-g given")
        return
    uid = _lookup(user, pwd.getpwnam, "user") if user else None
    gid = _lookup(group, grp.getgrnam, "group") if group else None
    if os.getuid() != 0:
        if uid not in (None, os.getuid()) or gid not in (None, os.getgid()):
            log.log(
                Level.WARN,
                f"smtp.ini user={user or '-'} group={group or '-'}: not started as root,"
                f" so staying uid {os.getuid()} gid {os.getgid()}",
            )
        return
    parent["uid"], parent["gid"] = uid, gid
    log.log(
        Level.NOTICE,
        f"dropping to user {user or '-'} group {group or '-'} (smtp.ini) once listening",
    )


def _lookup(name: str, by_name: Any, kind: str) -> int:
    """A user or group id, from a name or a number."""
    if name.isdigit():
        return int(name)
    try:
        return int(by_name(name)[2])
    except KeyError:
        raise StartupError(f"smtp.ini {kind}: no {kind} named {name!r}") from None
