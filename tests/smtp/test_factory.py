"""The server factory: the sessions it builds and the reactor their timeouts run on."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.protocols.policies import TimeoutMixin

from haraka_tw.hooks.runner import HookRunner
from haraka_tw.logging import HarakaLog
from haraka_tw.smtp.factory import HarakaSMTPFactory
from haraka_tw.smtp.rdns import ReverseLookup
from haraka_tw.smtp.settings import SessionSettings


def factory(clock: Clock | None) -> HarakaSMTPFactory:
    log = HarakaLog()
    runner = HookRunner([], clock or reactor, log)
    rdns = ReverseLookup(clock or reactor, hosts={})
    return HarakaSMTPFactory(runner, SessionSettings(), log, reactor=clock, rdns=rdns)


def test_sessions_time_out_on_the_factory_reactor() -> None:
    """With another reactor (a Clock), a session's callLater is that reactor's."""
    clock = Clock()
    proto = factory(clock).buildProtocol(None)
    call = proto.callLater(5, lambda: None)  # type: ignore[no-untyped-call]
    assert clock.getDelayedCalls() == [call]


def test_sessions_keep_no_callLater_of_their_own() -> None:
    """A session's timers go to its factory's reactor through a method of the class (no
    bound method stored per session, no import per call as TimeoutMixin's does)."""
    for clock in (None, Clock()):
        built = factory(clock)
        proto = built.buildProtocol(None)
        assert "callLater" not in vars(proto)
        call = proto.callLater(5, lambda: None)  # type: ignore[no-untyped-call]
        assert call in built.reactor.getDelayedCalls()  # type: ignore[attr-defined]
        call.cancel()
    assert type(proto).callLater is not TimeoutMixin.callLater
