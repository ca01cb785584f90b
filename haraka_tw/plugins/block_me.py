"""block_me: users forward spam to one address, and its sender is added to a block list.

Config:

- C{block_me.recipient}: the drop box address, for example C{spam@example.com};
- C{block_me.senders}: the addresses allowed to send to it, one per line.

At data_post, for a relaying client (authenticated users) whose message goes to the drop box
alone:

- a sender not in C{block_me.senders} is refused: DENY "You are not allowed to block mail,
  <sender>" (550 5.7.1);
- otherwise the first C{From: Name <address>} line in the body (the forwarded spam's header)
  names the address to block. It is appended to the C{mail_from.blocklist} file of the
  operator's config directory (the highest one; never the shipped defaults), unless it is
  listed there already, and the message is consumed: the queue hook answers OK without
  storing it. A body without such a line is delivered as usual, with an error logged.

The block list is system-wide. C{mail_from.blocklist} is the file Haraka's
C{mail_from.blocklist} plugin reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, OK, Code
from haraka_tw.interfaces import (
    IDataPostHook,
    IPluginContext,
    IQueueHook,
    IQueueOutboundHook,
    IRegistration,
)
from haraka_tw.paths import default_config_dir
from haraka_tw.plugins.data import BodySearch, search_body
from haraka_tw.smtp.connection import Connection

__all__ = ["BLOCKLIST", "Plugin", "append_address", "from_line_address"]

BLOCKLIST = "mail_from.blocklist"
_FROM_LINE = re.compile(rb"\bFrom:[^<\n]*<([^>\n]*)>")
_LONGEST_LINE = 4096  # the core wraps DATA lines far below this
_MAILBOX = re.compile(r"[^\s<>@]+@[^\s<>@]+")


def from_line_address(chunks: Iterable[bytes]) -> str | None:
    """The address of the first C{From: ... <address>} line in C{chunks} (an iterable of
    body bytes), lower-cased; None when there is none or it is not a plain mailbox."""
    search = BodySearch(_FROM_LINE, _LONGEST_LINE)
    search_body(chunks, search)
    if search.match is None:
        return None
    address = search.match.group(1).decode("utf-8", "replace").strip().lower()
    return address if _MAILBOX.fullmatch(address) else None


def append_address(path: Path, address: str) -> None:
    """Append C{address} as a line of the list file C{path}, starting a new line if the file
    does not end with one. Blocking, but one short append."""
    with open(path, "a+b") as f:
        size = f.seek(0, 2)
        prefix = b""
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                prefix = b"\n"
        f.write(prefix + address.encode("utf-8") + b"\n")


@implementer(IRegistration, IDataPostHook, IQueueHook, IQueueOutboundHook)
class Plugin:
    name = "block_me"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self._appended: set[str] = set()  # appended, not yet read back from the file
        context.config.on_change(BLOCKLIST, self._read_back)

    def _read_back(self) -> None:
        """The block list was re-read: what it holds is no longer only in C{_appended}
        (so an address the operator takes out later can be blocked again)."""
        self._appended -= {a.lower() for a in self.config.get_list(BLOCKLIST)}

    def blocklist_path(self) -> Path | None:
        """Where new addresses go: the operator's directory, or None if there is none."""
        directories = list(self.config.directories)
        if not directories:
            return None
        top = Path(directories[-1])
        try:
            shipped = default_config_dir().resolve()
        except FileNotFoundError:
            shipped = None
        if top.resolve() == shipped:
            return None
        return top / BLOCKLIST

    def hook_data_post(self, connection: Connection) -> Code | tuple[Code, str]:
        txn = connection.transaction
        if txn is None or not connection.relaying or len(txn.rcpt_to) != 1:
            return CONT
        dropbox = str(self.config.get_value("block_me.recipient", "")).strip().lower()
        if not dropbox or txn.rcpt_to[0].address.lower() != dropbox:
            return CONT
        sender = txn.mail_from.address.lower() if txn.mail_from is not None else ""
        allowed = {s.lower() for s in self.config.get_list("block_me.senders")}
        if sender not in allowed:
            txn.results.add(self.name, fail="sender not allowed")
            return DENY, "You are not allowed to block mail, {sender}"
        address = from_line_address(txn.message_stream.body_chunks())
        if address is None:
            connection.logerror("no From: <address> line found in the body", self.name)
            return CONT
        txn.notes["block_me"] = True
        # (the file as read, and what this process appended that the config cache has not
        # read back yet: it sees an append at the next reload, a second or two later)
        listed = {a.lower() for a in self.config.get_list(BLOCKLIST)} | self._appended
        if address in listed:
            connection.loginfo(f"{address} is already blocked", self.name)
            return CONT
        path = self.blocklist_path()
        if path is None:
            connection.logerror(
                f"not blocking {address}: no config directory of the operator's to write "
                f"{BLOCKLIST} in",
                self.name,
            )
            return CONT
        try:
            append_address(path, address)
        except OSError as e:
            connection.logerror(f"cannot append {address} to {path}: {e}", self.name)
            return CONT
        self._appended.add(address)
        txn.results.add(self.name, **{"pass": f"blocked {address}"})
        connection.loginfo(f"blocking new sender: {address}", self.name)
        return CONT

    def hook_queue(self, connection: Connection) -> Code:
        """A drop box message is consumed: pretend it was queued."""
        txn = connection.transaction
        if txn is not None and txn.notes.get("block_me"):
            return OK
        return CONT

    hook_queue_outbound = hook_queue
