"""An existing Twisted application with haraka_tw embedded (docs/embedding.md).

The application serves a web page; haraka_tw adds an SMTP listener, and the page lists the
messages it accepted. Two ways to build the SMTP side:

- L{build}: L{HarakaService} from a config directory, as C{twistd haraka} does, with the
  plugins named in its C{plugins} file (here C{embed_app:Inbox});
- L{factory_by_hand}: a L{HarakaSMTPFactory} with plugin objects and settings made in
  code, no config directory at all.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from haraka_tw.codes import CONT, OK, Code
from haraka_tw.hooks.runner import HookRunner, LoadedPlugin
from haraka_tw.interfaces import IPluginContext, IQueueHook, IRcptHook, IRegistration
from haraka_tw.logging import HarakaLog
from haraka_tw.service import HarakaService
from haraka_tw.smtp.factory import HarakaSMTPFactory
from haraka_tw.smtp.settings import SessionSettings

__all__ = ["AcceptDomain", "Inbox", "InboxPage", "build", "factory_by_hand"]


@implementer(IRegistration, IQueueHook)
class Inbox:
    """A queue plugin that keeps one line per accepted message in a list.

    A real queue plugin answers OK only once the message is stored durably; this one
    keeps a summary in memory, which is all the page needs.
    """

    def __init__(self, messages: list[str] | None = None) -> None:
        self.messages = messages if messages is not None else []

    def register(self, context: IPluginContext) -> None:
        # Loaded by name from a plugins file: share the list through the server notes.
        self.messages = context.server_notes.setdefault("inbox", self.messages)

    def hook_queue(self, connection: Any) -> Code:
        txn = connection.transaction
        to = ", ".join(r.format() for r in txn.rcpt_to)
        subject = txn.header.get_decoded("Subject")
        self.messages.append(f"{txn.mail_from.format()} -> {to}: {subject}")
        return OK


@implementer(IRcptHook)
class AcceptDomain:
    """Accept recipients in one domain (what rcpt_to.in_host_list does from host_list)."""

    def __init__(self, domain: str) -> None:
        self.domain = domain.lower()

    def hook_rcpt(self, connection: Any, recipient: Any, params: Any) -> Code:
        return OK if recipient.domain.lower() == self.domain else CONT


class InboxPage(Resource):
    """The application's page: the accepted messages, one per line."""

    isLeaf = True

    def __init__(self, messages: list[str]) -> None:
        super().__init__()
        self.messages = messages

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return "".join(f"{line}\n" for line in self.messages).encode("utf-8")


def build(config_dir: str, smtp: str, web: str) -> MultiService:
    """The whole application: the SMTP service from C{config_dir} and the web page.

    @param smtp: the SMTP listener, a Twisted endpoint string.
    @param web: the web listener, a Twisted endpoint string.
    """
    from twisted.internet import reactor

    root = MultiService()
    mail = HarakaService.from_directory(config_dir, [smtp])
    mail.setServiceParent(root)
    # The Inbox plugin registered while the service was built; its list is in the notes.
    page = InboxPage(mail.server.notes.setdefault("inbox", []))
    web_service = StreamServerEndpointService(serverFromString(reactor, web), Site(page))
    web_service.setServiceParent(root)
    return root


def factory_by_hand(
    messages: list[str],
    domain: str = "example.com",
    me: str = "mx.example.com",
    reactor: IReactorTime | None = None,
) -> HarakaSMTPFactory:
    """An SMTP factory with plugin objects made here: no config directory, no plugins file."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor  # type: ignore[assignment]
    assert reactor is not None
    log = HarakaLog()
    plugins = [
        LoadedPlugin("accept_domain", AcceptDomain(domain)),
        LoadedPlugin("inbox", Inbox(messages)),
    ]
    runner = HookRunner(plugins, reactor, log, plugin_timeout=30)
    # SessionSettings() holds the shipped defaults (spool_after=1048576, ...); set what differs.
    settings = SessionSettings(me=me)
    return HarakaSMTPFactory(runner, settings, log, reactor=reactor)
