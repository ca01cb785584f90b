"""BDAT over a real socket: 1 byte to 20 MB, mixed with pipelined commands, byte-exact."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import WireClient, maildir_messages, reply_code, start_server


class BdatTests(TestCase):
    timeout = 120

    def test_sizes_byte_exact(self) -> Deferred[None]:
        """Messages of 1 B, 64 KiB and 20 MB sent in BDAT chunks are stored byte-exact."""
        server, port = start_server(self, {"plugins": "rcpt_to.in_host_list\nqueue/maildir\n"})
        maildir = server.base / "maildir"  # type: ignore[attr-defined]
        header = b"Subject: bdat\r\n\r\n"
        bodies = [b"x", os.urandom(65536), os.urandom(20 * 1024 * 1024)]

        def run() -> list[int]:
            codes = []
            with WireClient(port) as c:
                c.command("EHLO client.test")
                for body in bodies:
                    message = header + body
                    chunk = 3 * 1024 * 1024
                    pieces = [message[i : i + chunk] for i in range(0, len(message), chunk)]
                    # MAIL, RCPT and every chunk in one pipelined stream, replies read after
                    wire = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.com>\r\n"
                    for i, piece in enumerate(pieces):
                        last = b" LAST" if i == len(pieces) - 1 else b""
                        wire += b"BDAT %d%s\r\n" % (len(piece), last) + piece
                    c.send(wire)
                    for _ in range(2 + len(pieces)):
                        codes.append(reply_code(c.reply()))
                c.command("QUIT")
            return codes

        def check(codes: list[int]) -> None:
            self.assertEqual(set(codes), {250})
            stored = maildir_messages(maildir)
            self.assertEqual(len(stored), 3)
            for body in bodies:
                self.assertTrue(
                    any(m.endswith(header + body) for m in stored), f"{len(body)} bytes not found"
                )

        d: Deferred[Any] = deferToThread(run)
        return d.addCallback(check)
