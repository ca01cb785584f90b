"""haraka_tw.archive against the real bsdtar: a deadline that passes while bsdtar reads,
and a cancel (the hook runner's own timeout), each stopping the process it waits on.
bsdtar is kept busy for ever by a named pipe nothing writes to."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, DeferredSemaphore, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from haraka_tw import archive
from tests.support import temp_dir

BSDTAR = shutil.which("bsdtar")


def bsdtar_children() -> list[int]:
    """The bsdtar processes this test process has started and not yet reaped."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, rest = stat.split(" (", 1)[1].split(") ", 1)
        if name == "bsdtar" and int(rest.split()[1]) == os.getpid():
            found.append(int(pid))
    return found


class BoundsTests(TestCase):
    def setUp(self) -> None:
        if BSDTAR is None:
            raise SkipTest("bsdtar is not installed (libarchive-tools)")
        self.work = temp_dir(self)
        self.stall = self.work / "stall.zip"
        os.mkfifo(self.stall)
        self.slots = DeferredSemaphore(1)

    def budget(self, seconds: float) -> archive.Budget:
        return archive.Budget(
            entries=100,
            bytes=1 << 40,
            deadline=reactor.seconds() + seconds,
            max_depth=3,
            extensions=frozenset({"zip"}),
            slots=self.slots,
        )

    def inspect(self, budget: archive.Budget) -> Any:
        assert BSDTAR is not None
        return ensureDeferred(
            archive.inspect(reactor, BSDTAR, self.stall, "stall.zip", budget, self.work)
        )

    async def test_the_deadline_kills_bsdtar(self) -> None:
        with self.assertRaises(archive.TimedOut):
            await self.inspect(self.budget(0.2))
        await self.reaped()
        self.assertEqual(self.slots.tokens, 1)

    async def test_a_cancel_kills_bsdtar(self) -> None:
        """Cancelled while bsdtar reads: CancelledError, the process killed and reaped,
        its slot given back, nothing logged as unhandled (trial fails on that)."""
        looking = self.inspect(self.budget(60))
        for _ in range(100):
            if bsdtar_children():
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(bsdtar_children()), 1)
        looking.cancel()
        with self.assertRaises(CancelledError):
            await looking
        await self.reaped()

    async def reaped(self) -> None:
        """No bsdtar left (reaped once the reactor sees it end), its slot given back."""
        for _ in range(100):
            if not bsdtar_children():
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(bsdtar_children(), [])
        self.assertEqual(self.slots.tokens, 1)
