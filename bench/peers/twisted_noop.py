"""Stock twisted.mail ESMTP with a no-op delivery: every sender and recipient accepted,
every message thrown away. Run: python twisted_noop.py PORT (the project venv's python).

This is what a Twisted programmer writes with twisted.mail alone, so it is the floor cost
of Twisted's own SMTP engine that haraka_tw's hook framework is measured against. It
listens with a backlog of 1024 (haraka_tw's and smtp-sink's), not Twisted's default of 50,
which would have 100 concurrent clients measure SYN retransmission timers instead.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class DiscardedMessage:
    """Drops every line; acknowledges the end at once."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class AcceptEverything:
    """Every sender and recipient is fine; no Received header."""

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return DiscardedMessage


class NoopESMTPFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        p.delivery = AcceptEverything()
        p.challengers = {}
        return p


def main() -> None:
    port = int(sys.argv[1])
    reactor.listenTCP(port, NoopESMTPFactory(), backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
