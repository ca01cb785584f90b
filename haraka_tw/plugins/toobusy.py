"""toobusy: refuse new connections while the reactor lags.

A C{LoopingCall} runs every C{check_interval} milliseconds; how late it runs is the lag.
As in toobusy-js (which Haraka's plugin uses), each check counts for a third of the
smoothed lag. While the smoothed lag is above C{maxlag}, the connect hook answers
DENYSOFTDISCONNECT "Too busy; please try again later": the client gets
C{421 4.7.0 Too busy; please try again later} and is disconnected before the banner. The
first refusal of a busy spell is logged at CRIT.

toobusy.ini::

    [main]
    ; milliseconds of smoothed lag above which new connections are refused
    maxlag=70
    ; milliseconds between two checks
    check_interval=500

Haraka's C{toobusy.maxlag} value file is read too, and wins when present. Both files are
re-read when they change.

The connect hook runs at priority -100, ahead of other connect plugins. Monitoring starts
when the service starts (init_master) or at the first connection, whichever comes first;
L{Plugin.stop} ends it.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from haraka_tw.codes import CONT, DENYSOFTDISCONNECT, Code
from haraka_tw.interfaces import (
    IConnectHook,
    IInitMasterHook,
    IPluginContext,
    IRegistration,
    IShutdown,
)
from haraka_tw.smtp.connection import Connection

__all__ = ["MESSAGE", "SMOOTHING", "LagMonitor", "Plugin"]

MESSAGE = "Too busy; please try again later"
SMOOTHING = 1 / 3  # the weight of the newest check in the smoothed lag (toobusy-js)
DEFAULT_MAXLAG_MS = 70
DEFAULT_INTERVAL_MS = 500


class LagMonitor:
    """Measures how late a periodic call runs on C{clock}: the reactor's lag, in seconds."""

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self.lag = 0.0
        self._last = 0.0
        self._call: LoopingCall | None = None

    @property
    def running(self) -> bool:
        return self._call is not None and self._call.running

    def start(self) -> None:
        """Start checking (again); a no-op if running with this interval."""
        if self._call is not None:
            if self._call.running and self._call.interval == self.interval:
                return
            self.stop()
        call = LoopingCall(self._check)
        call.clock = self.clock
        self._call = call
        self._last = self.clock.seconds()
        call.start(self.interval, now=False)

    def stop(self) -> None:
        if self._call is not None and self._call.running:
            self._call.stop()
        self._call = None

    def _check(self) -> None:
        now = self.clock.seconds()
        late = max(0.0, now - self._last - self.interval)
        self._last = now
        self.lag = SMOOTHING * late + (1 - SMOOTHING) * self.lag


def _milliseconds(value: Any, what: str) -> float:
    """A positive number of milliseconds, as seconds."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of milliseconds, not {value!r}") from None
    if not 0 < number < math.inf:
        raise ValueError(f"{what} must be above 0 and finite, not {value!r}")
    return number / 1000


@implementer(IRegistration, IInitMasterHook, IConnectHook, IShutdown)
class Plugin:
    name = "toobusy"

    def __init__(self, clock: IReactorTime | None = None) -> None:
        # The plugin loader calls the factory with no arguments; a test passes a Clock.
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.maxlag = DEFAULT_MAXLAG_MS / 1000
        self.monitor = LagMonitor(clock, DEFAULT_INTERVAL_MS / 1000)
        self.was_busy = False

    @property
    def clock(self) -> IReactorTime:
        """The reactor whose lag is measured (settable until monitoring starts)."""
        return self.monitor.clock

    @clock.setter
    def clock(self, clock: IReactorTime) -> None:
        self.monitor.clock = clock

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.load()
        context.config.on_change("toobusy.ini", self.load)
        context.config.on_change("toobusy.maxlag", self.load)
        context.set_priority("connect", -100)

    def load(self) -> None:
        """(Re)read toobusy.ini and toobusy.maxlag; a bad value raises and changes nothing."""
        main = self.config.get_ini("toobusy.ini")["main"]
        maxlag = self.config.get_value("toobusy.maxlag", None)
        where = "the toobusy.maxlag file"
        if maxlag is None:
            maxlag, where = main.get("maxlag", DEFAULT_MAXLAG_MS), "toobusy.ini maxlag"
        seconds = _milliseconds(maxlag, where)
        interval = _milliseconds(
            main.get("check_interval", DEFAULT_INTERVAL_MS), "toobusy.ini check_interval"
        )
        self.maxlag = seconds
        if interval != self.monitor.interval:
            self.monitor.interval = interval
            if self.monitor.running:
                self.monitor.start()

    @property
    def busy(self) -> bool:
        """Whether the smoothed lag is above maxlag now."""
        return self.monitor.lag > self.maxlag

    def start(self) -> None:
        """Start measuring the lag."""
        self.monitor.start()

    def stop(self) -> None:
        """Stop measuring (the last lag measured stays in force)."""
        self.monitor.stop()

    shutdown = stop  # IShutdown: the service stops the LoopingCall on stop

    def hook_init_master(self, server: Any) -> Code:
        self.start()
        return CONT

    def hook_connect(self, connection: Connection) -> Code | tuple[Code, str]:
        if not self.monitor.running:
            self.start()
        if not self.busy:
            self.was_busy = False
            return CONT
        if not self.was_busy:
            self.was_busy = True
            self.log.crit(
                f"deferring connections: lag={self.monitor.lag * 1000:.0f}ms "
                f"max={self.maxlag * 1000:.0f}ms",
                connection,
            )
        connection.results.add(self.name, fail="busy")
        return DENYSOFTDISCONNECT, MESSAGE
