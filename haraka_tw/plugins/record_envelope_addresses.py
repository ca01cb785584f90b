"""record_envelope_addresses: write the envelope into the message header.

At data_post, adds C{X-Envelope-From: <sender>} and one C{X-Envelope-To: <recipient>} per
accepted recipient, in the order they were accepted. C{X-Envelope-*} fields the client sent
are removed first, so the fields always tell the envelope this server received. The null
sender is written as C{<>}.

Haraka adds the fields at MAIL and RCPT time, so a refused recipient is recorded too; here
only the recipients that were accepted appear.

The fields reveal Bcc recipients to whoever reads the message: do not use this plugin on a
server that relays outbound mail.

No config. Answers CONT.
"""

from __future__ import annotations

from zope.interface import implementer

from haraka_tw.codes import CONT, Code
from haraka_tw.interfaces import IDataPostHook
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection

__all__ = ["Plugin"]


def _shown(address: Address | None) -> str:
    if address is None or address.is_null:
        return "<>"
    return address.address


@implementer(IDataPostHook)
class Plugin:
    def hook_data_post(self, connection: Connection) -> Code:
        txn = connection.transaction
        if txn is None:
            return CONT
        txn.remove_header("X-Envelope-From")
        txn.remove_header("X-Envelope-To")
        txn.add_header("X-Envelope-From", _shown(txn.mail_from))
        for recipient in txn.rcpt_to:
            txn.add_header("X-Envelope-To", _shown(recipient))
        return CONT
