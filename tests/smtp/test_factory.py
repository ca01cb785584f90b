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


def test_sessions_of_the_global_reactor_keep_no_callLater_of_their_own() -> None:
    """On the global reactor a session uses TimeoutMixin's callLater (the global reactor):
    no bound method is stored per session."""
    built = factory(None)
    assert built.reactor is reactor
    proto = built.buildProtocol(None)
    assert "callLater" not in vars(proto)
    assert type(proto).callLater is TimeoutMixin.callLater
    assert proto.factory is built
