"""queue/test: save each message to <tmpdir>/mail.eml (overwritten each time), for tests.

test_queue.ini C{[main] path} sets another file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.internet.threads import deferToThread
from zope.interface import implementer

from haraka_tw.codes import OK, Code
from haraka_tw.interfaces import IPluginContext, IQueueHook, IRegistration

__all__ = ["Plugin"]


@implementer(IRegistration, IQueueHook)
class Plugin:
    def register(self, context: IPluginContext) -> None:
        ini = context.config.get_ini("test_queue.ini")
        self.path = str(ini["main"].get("path") or os.path.join(tempfile.gettempdir(), "mail.eml"))

    def hook_queue(self, connection: Any) -> Any:
        stream = connection.transaction.message_stream

        def write() -> Code:  # the session waits for this, so nothing else reads the stream
            with open(self.path, "wb") as f:
                for chunk in stream.chunks():
                    f.write(chunk)
            return OK

        return deferToThread(write)
