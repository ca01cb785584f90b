"""A haraka_tw plugin for the outbound scenario: ``XBENCH <count> <domains> <size>`` queues
<count> messages of <size> bytes through ``OutboundService.send_email`` (the API plugins
use), one recipient each, spread round-robin over <domains> destination domains
(``d0.bench.test`` ...), and answers 250 once every queue file is on disk (fsynced).

Listed in the bench's plugins file as ``bench.peers.outbound_load:Plugin``; the bench runs
the server with the repository root on PYTHONPATH.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from haraka_tw.codes import CONT, OK
from haraka_tw.interfaces import IPluginContext, IRegistration, IUnrecognizedCommandHook


def message(size: int, serial: int, rcpt: str) -> bytes:
    """A plain message of about C{size} body bytes, CRLF lines of 78 characters."""
    header = (
        f"From: <bench@client.test>\r\nTo: <{rcpt}>\r\nSubject: bench {serial}\r\n"
        f"Message-Id: <bench.{serial}.{time.time()}@client.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line) + 1)
    return header + body[:size] + b"\r\n"


@implementer(IRegistration, IUnrecognizedCommandHook)
class Plugin:
    def register(self, context: IPluginContext) -> None:
        self.notes = context.server_notes

    def hook_unrecognized_command(self, connection: Any, verb: str, argument: str) -> Any:
        if verb != "XBENCH":
            return CONT
        count, domains, size = (int(x) for x in argument.split())
        outbound = self.notes["outbound"]
        started = time.monotonic()
        queued = []
        for i in range(count):
            rcpt = f"user{i}@d{i % domains}.bench.test"
            queued.append(outbound.send_email("bench@client.test", [rcpt], message(size, i, rcpt)))

        def done(_: Any) -> Any:
            took = time.monotonic() - started
            connection.respond(250, f"queued {count} in {took:.3f}s", "2.0.0")
            return OK

        def failed(failure: Any) -> Any:
            connection.respond(451, f"queueing failed: {failure.getErrorMessage()}", "4.3.0")
            return OK

        d = defer.gatherResults(queued, consumeErrors=True)
        return d.addCallbacks(done, failed)
