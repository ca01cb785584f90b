"""The plugin contract over a real socket: every code, answered every way, at four hooks.

The sample plugin (tests/e2e/sample_plugin.py) sits in the plugins file ahead of
rcpt_to.in_host_list and queue/maildir. For MAIL, RCPT, data_post and queue, each code
(DENY, DENYSOFT, DENYDISCONNECT, DENYSOFTDISCONNECT, OK, CONT) answered each way (sync,
Deferred, coroutine) must give the reply haraka_tw.hooks.table declares (and the numbers
Haraka gives, written out here independently), close the connection for the DISCONNECT
codes, and leave the rest of the chain working behind a CONT.
"""

from __future__ import annotations

import mailbox
import re
import smtplib
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from haraka_tw.codes import Code
from haraka_tw.hooks.table import outcome
from tests.e2e.sample_plugin import CODES, MODES
from tests.support import (
    WireClient,
    maildir_messages,
    reply_code,
    start_server,
)

SAMPLE = "tests.e2e.sample_plugin:Factory"
PLUGINS = f"{SAMPLE}\nrcpt_to.in_host_list\nqueue/maildir\n"

# Haraka's numbers for each refusal (reference: haraka-behaviour.md sections 1 and 8),
# written out rather than read from the table, so a wrong table row fails here.
REFUSALS: dict[str, dict[str, int]] = {
    "mail": {"deny": 550, "denysoft": 450, "denydisconnect": 550, "denysoftdisconnect": 450},
    "rcpt": {"deny": 550, "denysoft": 450, "denydisconnect": 550, "denysoftdisconnect": 450},
    "data_post": {
        "deny": 550,
        "denysoft": 450,
        "denydisconnect": 550,
        "denysoftdisconnect": 450,
    },
    "queue": {"deny": 550, "denysoft": 450, "denydisconnect": 550, "denysoftdisconnect": 450},
}
CLOSES = frozenset({"denydisconnect", "denysoftdisconnect"})
QUEUED = re.compile(rb"^250 2\.0\.0 Message Queued \([0-9A-F-]+\.\d+\)\r\n$")


def table_reply(hook: str, word: str, **fields: str) -> bytes:
    """The wire bytes the table gives for C{hook} answered with C{word} (EHLO client).

    Built from the row's code, enhanced code and text alone, placeholders filled here.
    """
    row = outcome(hook, CODES[word])
    assert row.reply is not None
    reply = row.reply
    assert len(reply.lines) == 1, reply
    text = reply.lines[0]
    for name, value in fields.items():
        text = text.replace("{" + name + "}", value)
    prefix = f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} "
    return f"{prefix}{text}\r\n".encode()


def message(subject: str, body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: <alice@x.test>\r\nTo: <bob@example.com>\r\nSubject: {subject}\r\n\r\n{body}"
    ).encode()


def send_data(client: WireClient, data: bytes) -> bytes:
    """DATA, the message (not dot-stuffed: callers send none), the final dot; the reply."""
    reply = client.command("DATA")
    assert reply_code(reply) == 354, reply
    client.send(data + b".\r\n")
    return client.reply()


def deliver_plain(client: WireClient, subject: str = "plain") -> bytes:
    """A whole ordinary transaction on an open session; the end-of-data reply."""
    assert reply_code(client.command("MAIL FROM:<alice@x.test>")) == 250
    assert reply_code(client.command("RCPT TO:<bob@example.com>")) == 250
    return send_data(client, message(subject))


class PluginContractTests(unittest.TestCase):
    """Generated below: one test per hook, code and mode."""

    def setUp(self) -> None:
        self.server, self.port = start_server(self, {"plugins": PLUGINS})
        self.maildir = self.server.base / "maildir"  # type: ignore[attr-defined]

    def stored(self) -> list[bytes]:
        return maildir_messages(self.maildir)

    def run_client(self, script: Any) -> Any:
        def session() -> None:
            with WireClient(self.port) as client:
                reply = client.command("EHLO client.test")
                assert reply_code(reply) == 250, reply
                script(client)

        return deferToThread(session)

    def assert_closed(self, client: WireClient) -> None:
        self.assertTrue(client.at_eof(5), "the server did not close the connection")

    def assert_refused(self, hook: str, word: str, reply: bytes, **fields: str) -> None:
        self.assertEqual(reply_code(reply), REFUSALS[hook][word])
        self.assertEqual(reply, table_reply(hook, word, **fields))

    # -- MAIL ----------------------------------------------------------------------------

    def check_mail(self, word: str, mode: str) -> Any:
        sender = f"<{word}.{mode}@x.test>"

        def script(client: WireClient) -> None:
            reply = client.command(f"MAIL FROM:{sender}")
            if word in REFUSALS["mail"]:
                self.assert_refused("mail", word, reply, sender=sender)
                if word in CLOSES:
                    self.assert_closed(client)
                    return
                # The transaction was dropped; the session goes on.
                self.assertEqual(reply_code(client.command("RCPT TO:<bob@example.com>")), 503)
                self.assertTrue(QUEUED.match(deliver_plain(client)))
            else:
                self.assertEqual(reply, table_reply("mail", word, sender=sender))
                self.assertEqual(reply, f"250 2.1.0 sender {sender} OK\r\n".encode())
                self.assertEqual(reply_code(client.command("RCPT TO:<bob@example.com>")), 250)
                self.assertTrue(QUEUED.match(send_data(client, message("after mail"))))
            self.assertEqual(reply_code(client.command("QUIT")), 221)

        def check(_: Any) -> None:
            expected = 0 if word in CLOSES else 1
            self.assertEqual(len(self.stored()), expected)

        return self.run_client(script).addCallback(check)

    # -- RCPT ----------------------------------------------------------------------------

    def check_rcpt(self, word: str, mode: str) -> Any:
        local = f"<{word}.{mode}@example.com>"
        remote = f"<{word}.{mode}@elsewhere.test>"

        def script(client: WireClient) -> None:
            self.assertEqual(reply_code(client.command("MAIL FROM:<alice@x.test>")), 250)
            reply = client.command(f"RCPT TO:{local}")
            if word in REFUSALS["rcpt"]:
                self.assert_refused("rcpt", word, reply, recipient=local)
                if word in CLOSES:
                    self.assert_closed(client)
                    return
                # The recipient was dropped: DATA has nobody to deliver to.
                self.assertEqual(client.command("DATA"), b"503 5.5.1 RCPT required first\r\n")
                self.assertEqual(reply_code(client.command("RCPT TO:<bob@example.com>")), 250)
            else:
                accepted = f"250 2.1.5 recipient {local} OK\r\n".encode()
                self.assertEqual(reply, accepted)
                self.assertEqual(reply, table_reply("rcpt_ok", "ok", recipient=local))
                other = client.command(f"RCPT TO:{remote}")
                if word == "ok":  # the plugin accepts it before in_host_list is asked
                    self.assertEqual(other, f"250 2.1.5 recipient {remote} OK\r\n".encode())
                else:  # CONT: in_host_list refuses a domain not in host_list
                    self.assertEqual(
                        other, f"550 5.7.1 I cannot deliver mail for {remote}\r\n".encode()
                    )
                    self.assertEqual(other, table_reply("rcpt", "cont", recipient=remote))
            self.assertTrue(QUEUED.match(send_data(client, message("after rcpt"))))
            self.assertEqual(reply_code(client.command("QUIT")), 221)

        def check(_: Any) -> None:
            self.assertEqual(len(self.stored()), 0 if word in CLOSES else 1)

        return self.run_client(script).addCallback(check)

    # -- data_post and queue -------------------------------------------------------------

    def check_message_hook(self, hook: str, word: str, mode: str) -> Any:
        subject = f"{hook}={word}.{mode} test"

        def script(client: WireClient) -> None:
            self.assertEqual(reply_code(client.command("MAIL FROM:<alice@x.test>")), 250)
            self.assertEqual(reply_code(client.command("RCPT TO:<bob@example.com>")), 250)
            reply = send_data(client, message(subject))
            if word in REFUSALS[hook]:
                self.assert_refused(hook, word, reply)
                if word in CLOSES:
                    self.assert_closed(client)
                    return
                # The transaction is over; the session goes on.
                self.assertEqual(reply_code(client.command("RCPT TO:<bob@example.com>")), 503)
                self.assertEqual(client.command("NOOP"), b"250 2.0.0 OK\r\n")
            else:
                self.assertTrue(QUEUED.match(reply), reply)
            self.assertEqual(reply_code(client.command("QUIT")), 221)

        def check(_: Any) -> None:
            stored = self.stored()
            # Only CONT at either hook, or OK at data_post, reaches queue/maildir; OK at queue
            # means the sample plugin took the message and the chain stopped there.
            if word == "cont" or (hook == "data_post" and word == "ok"):
                self.assertEqual(len(stored), 1)
                self.assertIn(f"Subject: {subject}\r\n".encode(), stored[0])
            else:
                self.assertEqual(stored, [])

        return self.run_client(script).addCallback(check)


def _add_tests() -> None:
    for word in CODES:
        for mode in MODES:
            cases = {
                "mail": lambda self, w=word, m=mode: self.check_mail(w, m),
                "rcpt": lambda self, w=word, m=mode: self.check_rcpt(w, m),
                "data_post": lambda self, w=word, m=mode: self.check_message_hook(
                    "data_post", w, m
                ),
                "queue": lambda self, w=word, m=mode: self.check_message_hook("queue", w, m),
            }
            for hook, test in cases.items():
                code = Code[word.upper()]
                test.__name__ = f"test_{hook}_{word}_{mode}"
                test.__doc__ = f"{hook} answered {code.name} ({mode}) gives the table's reply."
                setattr(PluginContractTests, test.__name__, test)


_add_tests()


class ChainBehindTests(unittest.TestCase):
    """With the sample plugin answering CONT, the built-in plugins behind it decide."""

    def setUp(self) -> None:
        self.server, self.port = start_server(self, {"plugins": PLUGINS})
        self.maildir = self.server.base / "maildir"  # type: ignore[attr-defined]

    def test_plain_mail_reaches_in_host_list_and_maildir(self) -> None:
        """Mail with no directive is judged by in_host_list and stored by queue/maildir."""
        body = message("through the chain", "Line one.\r\n.dotted line\r\n")

        def client() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                refused = smtp.sendmail(
                    "alice@x.test", ["bob@example.com", "carol@elsewhere.test"], body
                )
                return refused

        def check(refused: dict[str, Any]) -> None:
            self.assertEqual(list(refused), ["carol@elsewhere.test"])
            self.assertEqual(refused["carol@elsewhere.test"][0], 550)
            box = mailbox.Maildir(str(self.maildir), create=False)
            keys = box.keys()
            self.assertEqual(len(keys), 1)
            stored = box.get_bytes(keys[0])
            self.assertTrue(stored.startswith(b"Received: from "))
            self.assertTrue(stored.endswith(body), stored)
            self.assertEqual(box[keys[0]]["Subject"], "through the chain")

        return deferToThread(client).addCallback(check)
