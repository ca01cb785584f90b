"""Polling for changed config files, on whatever reactor (or ``task.Clock``) is given.

Each tick asks a probe what has changed. A change is acted on only when a later tick sees
the very same change again, i.e. after the files have stayed put for one interval, so an
editor's half-written file is not loaded. Polling rather than inotify keeps one code path
on every platform and under ``task.Clock``; a poll of a few stat calls a second is cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

__all__ = ["ConfigWatcher"]


class ConfigWatcher:
    """Calls ``reload`` once ``probe`` has reported the same pending change twice running.

    ``probe`` returns None when nothing has changed, else a hashable picture of the
    change (which files, in what state). Errors from either callable are logged, never
    raised into the reactor, so one bad tick does not stop the watching.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        probe: Callable[[], Hashable | None],
        reload: Callable[[], object],
        log: Callable[[str], None],
    ) -> None:
        self._interval = interval
        self._probe = probe
        self._reload = reload
        self._log = log
        self._seen: Hashable | None = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return bool(self._loop.running)

    def start(self) -> None:
        """Start polling; the first check is one interval from now."""
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        """Stop polling; a no-op if not running."""
        if self._loop.running:
            self._loop.stop()
        self._seen = None

    def _tick(self) -> None:
        try:
            change = self._probe()
            if change is None or change != self._seen:
                self._seen = change
                return
            self._seen = None
            self._reload()
        except Exception as error:
            self._log(f"config: watching for changes failed: {error!r}")
