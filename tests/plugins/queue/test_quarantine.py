"""queue/quarantine: copies of the messages plugins mark, over a real loopback server."""

from __future__ import annotations

import datetime
import os
import smtplib
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.interfaces import IDataPostHook
from haraka_tw.plugins.queue.quarantine import STALE_TMP, subdirectory, to_lf
from tests.support import maildir_messages, start_server, temp_dir

PLUGINS = (
    "rcpt_to.in_host_list\n"
    "tests.plugins.queue.test_quarantine:Marker\n"
    "queue/quarantine\n"
    "queue/maildir\n"
)


@implementer(IDataPostHook)
class Marker:
    """A test plugin: X-Quarantine and X-Quarantine-Action headers become the notes."""

    def hook_data_post(self, connection: Any) -> None:
        txn = connection.transaction
        for header, note in (("X-Quarantine", "quarantine"), ("X-Action", "quarantine_action")):
            value = txn.header.get(header).strip()
            if value:
                txn.notes[note] = True if value == "yes" else value


def send(port: int, headers: str) -> tuple[int, bytes]:
    body = f"{headers}Subject: q\r\n\r\nline one\r\nline two\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        s.rcpt("bob@example.com")
        return s.data(body)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


class QuarantineTests(TestCase):
    def start(self, **files: str) -> Path:
        server, self.port = start_server(
            self,
            {
                "plugins": PLUGINS,
                "quarantine.ini": "[main]\nquarantine_path={base}/quarantine\n",
                **files,
            },
        )
        self.base: Path = server.base  # type: ignore[attr-defined]
        return self.base / "quarantine"

    async def send(self, headers: str) -> tuple[int, bytes]:
        result: tuple[int, bytes] = await deferToThread(send, self.port, headers)
        return result

    async def test_copy_saved_with_lf_and_message_goes_on(self) -> None:
        """A marked message is saved as YYYYMMDD/<uuid> with LF ends, then goes on (CONT)."""
        path = self.start()
        code, _ = await self.send("X-Quarantine: yes\r\n")
        self.assertEqual(code, 250)
        [saved] = files_under(path)
        today = datetime.date.today().strftime("%Y%m%d")
        self.assertEqual(saved.parent, path / today)
        [delivered] = maildir_messages(self.base / "maildir")
        self.assertEqual(saved.read_bytes(), delivered.replace(b"\r\n", b"\n"))
        self.assertTrue(saved.name.endswith(".1"))  # the transaction uuid

    async def test_sub_directory_from_the_note(self) -> None:
        """A note naming a sub-directory saves under <path>/<sub>/YYYYMMDD/."""
        path = self.start()
        await self.send("X-Quarantine: corpus/spam\r\n")
        [saved] = files_under(path)
        today = datetime.date.today().strftime("%Y%m%d")
        self.assertEqual(saved.parent, path / "corpus" / "spam" / today)

    async def test_action_ok_holds_the_message(self) -> None:
        """quarantine_action OK: the client gets 250 and no other queue plugin runs."""
        path = self.start()
        code, _ = await self.send("X-Quarantine: yes\r\nX-Action: OK\r\n")
        self.assertEqual(code, 250)
        self.assertEqual(len(files_under(path)), 1)
        self.assertEqual(maildir_messages(self.base / "maildir"), [])

    async def test_action_deny_refuses(self) -> None:
        """quarantine_action DENY: the copy is kept and the client gets 550."""
        path = self.start()
        code, _ = await self.send("X-Quarantine: yes\r\nX-Action: DENY\r\n")
        self.assertEqual(code, 550)
        self.assertEqual(len(files_under(path)), 1)

    async def test_unmarked_message_not_saved(self) -> None:
        """No note: nothing saved, the message goes on."""
        path = self.start()
        code, _ = await self.send("")
        self.assertEqual(code, 250)
        self.assertEqual(files_under(path) if path.exists() else [], [])
        self.assertEqual(len(maildir_messages(self.base / "maildir")), 1)

    async def test_unwritable_quarantine_is_4xx(self) -> None:
        """A copy that cannot be written: 450, never a 250 without the copy."""
        path = self.start()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a file where the directory should be")
        code, _ = await self.send("X-Quarantine: yes\r\n")
        self.assertEqual(code, 450)
        self.assertEqual(maildir_messages(self.base / "maildir"), [])

    def test_leftovers_removed_at_load(self) -> None:
        """Files an interrupted save left in tmp/ (older than STALE_TMP) are removed when
        the plugin loads; a recent one, which may be a save in progress in another process
        (a worker; a server the CLI was pointed at), is left alone."""
        base = temp_dir(self)
        (base / "tmp").mkdir()
        torn, saving = base / "tmp" / "torn", base / "tmp" / "saving"
        torn.write_bytes(b"half")
        old = time.time() - STALE_TMP - 60
        os.utime(torn, (old, old))
        saving.write_bytes(b"in progress")
        start_server(
            self, {"plugins": PLUGINS, "quarantine.ini": f"[main]\nquarantine_path={base}\n"}
        )
        self.assertEqual(list((base / "tmp").iterdir()), [saving])


class UnitTests(SynchronousTestCase):
    @given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=10))
    def test_to_lf_any_chunking(self, data: bytes, cuts: list[int]) -> None:
        """to_lf turns every CRLF into LF, wherever the chunks are cut."""
        points = sorted({min(c, len(data)) for c in cuts})
        pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
        self.assertEqual(b"".join(to_lf(pieces)), data.replace(b"\r\n", b"\n"))

    def test_sub_directory_cannot_climb_out(self) -> None:
        """A sub-directory note with .. or an absolute path is refused."""
        day = datetime.date(2024, 5, 17)
        self.assertEqual(subdirectory(1, day), "20240517")
        self.assertEqual(subdirectory("a/b", day), "a/b/20240517")
        for bad in ("../etc", "/etc", "a/../../b"):
            with self.assertRaises(ValueError):
                subdirectory(bad, day)
