"""data.signatures: refuse a message whose body contains a known spam signature.

The C{data.signatures} list file holds one string per line (blank lines and lines starting
with C{#} or C{;} are skipped). At data_post the body is searched, chunk by chunk, for
each of them; the first match answers DENY ("Mail body matched a known spam signature",
550 5.7.1). The list is re-read when it changes.

Haraka searches the decoded text of each MIME part; this plugin searches the body as
received (after the header, before any transfer decoding), so a signature inside a base64
or quoted-printable part is only found as it appears on the wire.
"""

from __future__ import annotations

import re

from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, Code
from haraka_tw.interfaces import IDataPostHook, IPluginContext, IRegistration
from haraka_tw.plugins.data import BodySearch, search_body
from haraka_tw.smtp.connection import Connection

__all__ = ["MESSAGE", "Plugin"]

MESSAGE = "Mail body matched a known spam signature"


@implementer(IRegistration, IDataPostHook)
class Plugin:
    name = "data.signatures"

    def __init__(self) -> None:
        self.pattern: re.Pattern[bytes] | None = None
        self.longest = 0

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.load()
        context.config.on_change("data.signatures", self.load)

    def load(self) -> None:
        """(Re)read the data.signatures list."""
        signatures = sorted(
            {s.encode("utf-8") for s in self.config.get_list("data.signatures") if s},
            key=len,
            reverse=True,
        )
        if not signatures:
            self.pattern, self.longest = None, 0
            return
        self.pattern = re.compile(b"|".join(re.escape(s) for s in signatures))
        self.longest = len(signatures[0])
        self.log.info(f"{len(signatures)} signatures loaded")

    def hook_data_post(self, connection: Connection) -> Code | tuple[Code, str]:
        txn = connection.transaction
        pattern = self.pattern
        if txn is None or pattern is None:
            return CONT
        search = BodySearch(pattern, self.longest)
        search_body(txn.message_stream.body_chunks(), search)
        if search.match is None:
            txn.results.add(self.name, **{"pass": "signatures"})
            return CONT
        signature = search.match.group(0).decode("utf-8", "replace")
        txn.results.add(self.name, fail=f"signature: {signature}")
        connection.loginfo(f"body matched the signature {signature!r}", self.name)
        return DENY, MESSAGE
