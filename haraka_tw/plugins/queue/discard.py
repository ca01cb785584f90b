"""queue/discard: accept every message and throw it away (OK on queue and queue_outbound).

A message whose C{transaction.notes["queue.wants"]} names another queue plugin is left to
that plugin (CONT). Haraka's discard also requires a discard note or an environment
variable; listing the plugin is taken here as the operator's intent.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from haraka_tw.codes import CONT, OK, Code
from haraka_tw.interfaces import IQueueHook, IQueueOutboundHook

__all__ = ["Plugin"]


@implementer(IQueueHook, IQueueOutboundHook)
class Plugin:
    def hook_queue(self, connection: Any) -> Code:
        notes = connection.transaction.notes
        wants = notes.get("queue.wants") or notes.get_path("queue.wants")
        if wants and wants != "discard":
            return CONT
        return OK

    hook_queue_outbound = hook_queue
