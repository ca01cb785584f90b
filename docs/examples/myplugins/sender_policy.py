"""sender_policy: refuse listed senders, defer (after a pause) senders from chosen domains.

docs/tutorial.md writes this plugin step by step. List it in the plugins file as
``myplugins.sender_policy:SenderPolicy``.

Config files (both re-read when they change):

- ``sender_blocklist``: one address per line; MAIL FROM one of them gets 550 with
  ``reject_message``.
- ``sender_policy.ini``::

    [main]
    ; the 550 text; {sender} is filled in by the core
    reject_message=Mail from {sender} is not accepted here
    ; MAIL FROM these domains gets 450, after tarpit seconds (0: at once)
    defer_domains[]=slow.example
    tarpit=1
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYSOFT, Code
from haraka_tw.interfaces import IMailHook, IPluginContext, IRegistration

__all__ = ["SenderPolicy"]

DEFAULT_REJECT = "Mail from {sender} is not accepted here"
DEFER_MESSAGE = "Mail from {sender} is deferred, please try again later"


@implementer(IRegistration, IMailHook)
class SenderPolicy:
    """Answers the mail hook from a blocklist file and an ini file."""

    def __init__(self, clock: IReactorTime | None = None) -> None:
        # The plugin loader calls the factory with no arguments; a test may pass a Clock.
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        self.clock = clock
        self.blocked: frozenset[str] = frozenset()
        self.defer_domains: frozenset[str] = frozenset()
        self.reject_message = DEFAULT_REJECT
        self.tarpit = 0.0

    # -- IRegistration -----------------------------------------------------------------

    def register(self, context: IPluginContext) -> None:
        """Read the config now, and again whenever one of the two files changes."""
        self.log = context.log
        self.config = context.config
        self.load()  # an exception here stops start-up with a message naming this plugin
        context.config.on_change("sender_blocklist", self.load)
        context.config.on_change("sender_policy.ini", self.load)

    def load(self) -> None:
        """(Re)read sender_blocklist and sender_policy.ini."""
        blocked = frozenset(a.lower() for a in self.config.get_list("sender_blocklist"))
        main = self.config.get_ini("sender_policy.ini")["main"]
        domains = main.get("defer_domains", [])
        if isinstance(domains, str):  # written as defer_domains=x instead of defer_domains[]=x
            domains = [domains]
        tarpit = float(main.get("tarpit", 0))  # raises on a non-number: nothing is changed
        # Everything parsed: only now replace the values in force.
        self.blocked = blocked
        self.defer_domains = frozenset(str(d).lower() for d in domains)
        self.reject_message = str(main.get("reject_message", DEFAULT_REJECT))
        self.tarpit = tarpit
        self.log.info(
            f"{len(self.blocked)} blocked sender(s); deferring "
            f"{', '.join(sorted(self.defer_domains)) or 'no domains'} after {tarpit:g}s"
        )

    # -- IMailHook ---------------------------------------------------------------------

    def hook_mail(self, connection: Any, sender: Any, params: dict[str, str | None]) -> Any:
        """Refuse a listed sender (550), defer a listed domain (450), else let others decide."""
        if sender.is_null:  # MAIL FROM:<> carries bounces: never refuse it here
            return CONT
        if sender.address.lower() in self.blocked:
            self.log.info(f"refusing {sender.format()}", connection)
            return DENY, self.reject_message
        if sender.domain.lower() in self.defer_domains:
            return self.defer(connection, sender)  # a coroutine: the runner waits for it
        return CONT

    async def defer(self, connection: Any, sender: Any) -> tuple[Code, str]:
        """Wait C{tarpit} seconds without blocking other sessions, then answer DENYSOFT."""
        if self.tarpit > 0:
            await deferLater(self.clock, self.tarpit)
        self.log.info(f"deferring {sender.format()}", connection)
        return DENYSOFT, DEFER_MESSAGE
