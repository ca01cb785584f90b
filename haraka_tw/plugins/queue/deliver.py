"""queue/deliver: send messages on through the built-in outbound queue (MX delivery).

In Haraka this plugin is kept only for old configs: it answers C{queue_outbound} for
relaying clients by handing the message to outbound, which the core now does by itself.
Here:

- C{queue_outbound}: CONT, so the core's built-in outbound queue takes the message (as
  Haraka's core does; listing the plugin changes nothing for relayed mail);
- C{queue} (inbound mail, which Haraka's plugin leaves alone): the message goes into the
  outbound queue too (C{server_notes["outbound"].queue_transaction}), and the answer is
  OK once every queue file is fsynced, DENYSOFT if that fails. The mail is then delivered
  by MX, or where a get_mx plugin routes it. Do not list this plugin for a domain whose
  MX is this server, unless a get_mx plugin routes that domain elsewhere: the mail would
  come back (and be refused once it has 100 Received headers).

A message whose C{queue.wants} note names another queue is left alone (CONT), as is
every message when the server has no outbound queue.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, DENYSOFT, OK
from haraka_tw.interfaces import IPluginContext, IQueueHook, IQueueOutboundHook, IRegistration
from haraka_tw.plugins.queue.forwarding import queue_wants

__all__ = ["Plugin"]


@implementer(IRegistration, IQueueHook, IQueueOutboundHook)
class Plugin:
    """queue/deliver; see the module docstring."""

    name = "queue/deliver"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.server_notes: dict[str, Any] = context.server_notes

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        outbound = self.server_notes.get("outbound")
        if txn is None or not txn.rcpt_to or outbound is None:
            return CONT
        wants = queue_wants(txn.notes)
        if wants and wants not in ("deliver", "outbound"):
            return CONT

        def queued(entries: list[Any]) -> Any:
            connection.loginfo(f"queued for outbound delivery: {len(entries)} files", self.name)
            return OK

        def failed(failure: Any) -> Any:
            connection.logerror(f"outbound queue failed: {failure.getErrorMessage()}", self.name)
            return DENYSOFT, "Temporary storage failure, try again later"

        return outbound.queue_transaction(connection).addCallbacks(queued, failed)

    def hook_queue_outbound(self, connection: Any) -> Any:
        return CONT
