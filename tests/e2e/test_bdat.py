"""BDAT over a real socket: 1 byte to 20 MB, mixed with pipelined commands, byte-exact."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import WireClient, maildir_messages, reply_code, start_server


def text_bytes(size: int) -> bytes:
    """About C{size} random bytes in lines of 998 (no CR or LF but the CRLF between)."""
    raw = os.urandom(size).translate(bytes.maketrans(b"\r\n", b"rn"))
    return b"\r\n".join(raw[i : i + 998] for i in range(0, len(raw), 998))


class BdatTests(TestCase):
    timeout = 120

    def test_sizes_byte_exact(self) -> Deferred[None]:
        """Messages of 1 B, 64 KiB and 20 MB sent in BDAT chunks are stored byte-exact."""
        server, port = start_server(self, {"plugins": "rcpt_to.in_host_list\nqueue/maildir\n"})
        maildir = server.base / "maildir"  # type: ignore[attr-defined]
        header = b"Subject: bdat\r\n\r\n"
        # (random bytes, but CR and LF only as CRLF: bare ones are refused, as in DATA)
        bodies = [b"x", text_bytes(65536), text_bytes(20 * 1024 * 1024)]

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

    def test_bare_newlines_refused_as_in_data(self) -> Deferred[None]:
        """A bare LF in one chunk, or a CR ending the last chunk, gets 550 5.6.0 and is not
        stored; a CRLF split between two chunks is fine; the session goes on."""
        server, port = start_server(self, {"plugins": "rcpt_to.in_host_list\nqueue/maildir\n"})
        maildir = server.base / "maildir"  # type: ignore[attr-defined]
        envelope = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.com>\r\n"

        def run() -> list[str]:
            replies = []
            with WireClient(port) as c:
                c.command("EHLO client.test")
                for chunks in (
                    [b"A: b\r\n\r\nc\nd\r\n"],
                    [b"A: b\r\n", b"\r\nc\r"],
                    [b"A: b\r", b"\n\r\nc\r\n"],
                ):
                    wire = b"".join(
                        b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if chunk is chunks[-1] else b"")
                        + chunk
                        for chunk in chunks
                    )
                    c.send(envelope + wire)
                    replies += [c.reply().decode() for _ in range(wire.count(b"BDAT") + 2)][2:]
                c.command("QUIT")
            return replies

        def check(replies: list[str]) -> None:
            self.assertTrue(replies[0].startswith("550 5.6.0 Bare LF or CR"), replies)
            self.assertTrue(replies[1].startswith("250 2.0.0 6 octets"), replies)
            self.assertTrue(replies[2].startswith("550 5.6.0 Bare LF or CR"), replies)
            self.assertTrue(replies[3].startswith("250 2.0.0 5 octets"), replies)
            self.assertTrue(replies[4].startswith("250 2.0.0 Message Queued"), replies)
            [stored] = maildir_messages(maildir)
            self.assertTrue(stored.endswith(b"\r\nA: b\r\n\r\nc\r\n"), stored)

        d: Deferred[Any] = deferToThread(run)
        return d.addCallback(check)
