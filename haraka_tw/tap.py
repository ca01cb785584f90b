"""twistd's C{haraka} command: options and makeService.

The ServiceMaker itself lives in twisted/plugins/haraka_tw_plugin.py.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from haraka_tw.server import StartupError
from haraka_tw.service import DEFAULT_BACKLOG, HarakaService, parse_listen

__all__ = ["Options", "makeService"]


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


def makeService(options: Any) -> HarakaService:
    """Build the service; a configuration problem stops twistd with a clear message."""
    try:
        endpoints = None
        if options["listen"]:
            endpoints = parse_listen(",".join(options["listen"]), backlog=DEFAULT_BACKLOG)
        return HarakaService.from_directory(
            options["config"], endpoints, owns_process=True, nodes=None
        )
    except (StartupError, ValueError) as e:
        sys.stderr.write(f"haraka_tw: {e}\n")
        raise SystemExit(1) from e
