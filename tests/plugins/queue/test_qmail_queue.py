"""queue/qmail-queue with a fake qmail-queue written by the test, over a real server."""

from __future__ import annotations

import smtplib
import sys
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.codes import DENY, DENYSOFT, OK
from haraka_tw.plugins.queue.qmail_queue import answer_for, envelope
from haraka_tw.server import StartupError
from tests.support import start_server, temp_dir

BODY = b"Subject: q\r\n\r\nline one\r\n.dot line\r\nline two\r\n"

# Reads the message (fd 0) and the envelope (fd 1) as qmail-queue does, keeps them, and
# exits with the code in the file "code" (0 without one); "kill" makes it die by SIGKILL.
FAKE = """#!{python}
import os, signal, sys
out = {out!r}
def read_all(fd):
    parts = []
    while True:
        piece = os.read(fd, 65536)
        if not piece:
            return b"".join(parts)
        parts.append(piece)
message = read_all(0)
env = read_all(1)
open(os.path.join(out, "message"), "wb").write(message)
open(os.path.join(out, "envelope"), "wb").write(env)
wanted = os.path.join(out, "code")
code = open(wanted).read().strip() if os.path.exists(wanted) else "0"
if code == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(code))
"""


def send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        s.rcpt("bob@example.com")
        s.rcpt("carol@example.com")
        return s.data(BODY)


class QmailQueueTests(TestCase):
    def start(self, code: str | None = None) -> Path:
        out = temp_dir(self)
        script = out / "qmail-queue"
        script.write_text(FAKE.format(python=sys.executable, out=str(out)))
        script.chmod(0o755)
        if code is not None:
            (out / "code").write_text(code)
        _, self.port = start_server(
            self,
            {
                "plugins": "rcpt_to.in_host_list\nqueue/qmail-queue\n",
                "qmail-queue.path": f"{script}\n",
            },
        )
        return out

    async def send(self) -> tuple[int, bytes]:
        result: tuple[int, bytes] = await deferToThread(send, self.port)
        return result

    async def test_message_and_envelope_as_qmail_wants(self) -> None:
        """Exit 0 is a 250; the message came on fd 0 with LF line ends, the envelope on fd 1."""
        out = self.start()
        code, _ = await self.send()
        self.assertEqual(code, 250)
        message = (out / "message").read_bytes()
        self.assertTrue(message.startswith(b"Received: from "))
        self.assertTrue(message.endswith(BODY.replace(b"\r\n", b"\n")))
        self.assertNotIn(b"\r", message)
        self.assertEqual(
            (out / "envelope").read_bytes(),
            b"Falice@client.test\0Tbob@example.com\0Tcarol@example.com\0\0",
        )

    async def test_permanent_exit_code_is_5xx(self) -> None:
        """Exit 31 (11..40 are permanent): 554 naming the code and its meaning."""
        self.start("31")
        code, text = await self.send()
        self.assertEqual(code, 554)
        self.assertIn(b"permanently refuses", text)
        self.assertIn(b"(31)", text)

    async def test_temporary_exit_code_is_4xx(self) -> None:
        """Exit 53 (write error): 451, the client retries."""
        self.start("53")
        code, text = await self.send()
        self.assertEqual(
            (code, text), (451, b"4.3.0 qmail-queue: write error (e.g. disk full) (53)")
        )

    async def test_killed_is_4xx(self) -> None:
        """qmail-queue killed by a signal: 451."""
        self.start("kill")
        code, _ = await self.send()
        self.assertEqual(code, 451)

    def test_missing_program_stops_start_up(self) -> None:
        """A qmail-queue.path that cannot be run stops the server from starting."""
        with self.assertRaises(StartupError):
            start_server(
                self,
                {"plugins": "queue/qmail-queue\n", "qmail-queue.path": "/nonexistent/qq\n"},
            )


class UnitTests(SynchronousTestCase):
    def test_envelope_format(self) -> None:
        """F<sender>NUL, T<rcpt>NUL each, NUL; the null sender is an empty F."""
        self.assertEqual(envelope("", ["a@b"]), b"F\0Ta@b\0\0")

    def test_exit_code_classes(self) -> None:
        """0 OK; 11 to 40 DENY; everything else (and a signal) DENYSOFT."""
        self.assertEqual(answer_for(0).code, OK)
        self.assertEqual([answer_for(c).code for c in (11, 40)], [DENY, DENY])
        self.assertEqual([answer_for(c).code for c in (10, 41, 71, 91)], [DENYSOFT] * 4)
        self.assertEqual(answer_for(None, 9).code, DENYSOFT)
