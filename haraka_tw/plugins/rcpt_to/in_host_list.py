"""rcpt_to.in_host_list: accept recipients whose domain is in host_list (or host_list_regex).

- MAIL: a sender in a local domain sets C{transaction.notes.local_sender}.
- RCPT: a local domain answers OK; a relaying client sending from a local domain may send
  anywhere (OK); anything else is CONT, which the core refuses unless the client relays.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, OK, Code
from haraka_tw.interfaces import IMailHook, IPluginContext, IRcptHook, IRegistration
from haraka_tw.plugins.rcpt_to.host_list_base import HostList

__all__ = ["Plugin"]


@implementer(IRegistration, IMailHook, IRcptHook)
class Plugin:
    name = "rcpt_to.in_host_list"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.hosts = HostList(context.config, context.log)

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Code:
        txn = connection.transaction
        if not sender.is_null and sender.domain in self.hosts:
            txn.notes["local_sender"] = True
            txn.results.add(self.name, **{"pass": "mail_from"})
        return CONT

    def hook_rcpt(self, connection: Any, recipient: Any, params: Any) -> Code:
        txn = connection.transaction
        if not recipient.domain:
            txn.results.add(self.name, fail="rcpt!domain")
            return CONT
        if recipient.domain in self.hosts:
            txn.results.add(self.name, **{"pass": "rcpt_to"})
            return OK
        if connection.relaying and txn.notes.get("local_sender"):
            txn.results.add(self.name, **{"pass": "relaying local_sender"})
            return OK
        txn.results.add(self.name, msg="rcpt!local")
        return CONT
