"""The server factory: what a Twisted application listens with instead of ESMTPFactory."""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IReactorTime

from haraka_tw.hooks.runner import HookRunner
from haraka_tw.logging import HarakaLog
from haraka_tw.smtp.protocol import HarakaESMTP, SessionCore
from haraka_tw.smtp.rdns import ReverseLookup
from haraka_tw.smtp.settings import SessionSettings

__all__ = ["HarakaSMTPFactory"]


class HarakaSMTPFactory(protocol.ServerFactory):
    """Builds L{HarakaESMTP} sessions that share one hook runner and settings.

    @ivar settings: the L{SessionSettings} new sessions start with (replaced on reload).
    @ivar sessions: the open sessions, for graceful shutdown.
    @ivar outbound: the outbound queue for relayed mail (C{queue_transaction(connection)}
        returning a Deferred), or None.
    """

    protocol = HarakaESMTP  # type: ignore[assignment]

    def __init__(
        self,
        runner: HookRunner,
        settings: SessionSettings,
        log: HarakaLog,
        *,
        reactor: IReactorTime | None = None,
        server_notes: dict[str, Any] | None = None,
        rdns: ReverseLookup | None = None,
        outbound: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        assert reactor is not None
        self.runner = runner
        self.settings = settings
        self.log = log
        self.server_notes = server_notes if server_notes is not None else {}
        self.rdns = rdns if rdns is not None else ReverseLookup(reactor)
        self.outbound = outbound
        self.sessions: set[SessionCore] = set()
        self.reactor = reactor

    def buildProtocol(self, addr: Any) -> HarakaESMTP:  # type: ignore[override]
        """A session whose timeouts run on this factory's reactor (a task.Clock in tests)."""
        proto = HarakaESMTP()
        proto.factory = self
        return proto
