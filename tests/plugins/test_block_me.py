"""block_me: a permitted user's message to the drop box blocks the sender it quotes."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.config import ConfigDirectory
from haraka_tw.interfaces import IConnectHook, IPluginContext, IRegistration
from haraka_tw.paths import default_config_dir
from haraka_tw.plugins.block_me import Plugin, append_address, from_line_address
from tests.plugins.loading import Loaded, accepting, load, session
from tests.support import Session, maildir_messages, reply_codes, start_server, temp_dir

FILES = {"block_me.recipient": "Spam@Example.com\n", "block_me.senders": "boss@example.com\n"}
SPAM = (
    "Subject: Fwd: offer\r\n\r\nlook at this\r\n\r\n"
    "---------- Forwarded message ---------\r\n"
    "From: Cheap Pills <Sales@Pills.Test>\r\nSubject: offer\r\n\r\nbuy\r\n.\r\n"
)


@implementer(IRegistration, IConnectHook)
class Relay:
    """Lets every client relay (for the plugins file of the socket test)."""

    def register(self, context: IPluginContext) -> None:
        pass

    def hook_connect(self, connection: Any) -> None:
        connection.relaying = True


class BlockMeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stored: list[bytes] = []

    def loaded(self, **files: str) -> Loaded:
        return load(self, ["block_me"], {**FILES, **files})

    def send(
        self, loaded: Loaded, sender: str, rcpts: list[str], relay: bool = True
    ) -> tuple[Session, str]:
        """Send the forwarded spam; the session and the reply to the end of the message."""
        plugins: list[tuple[str, object]] = [("relay", Relay())] if relay else []
        s = session(*plugins, *loaded.pairs(), accepting(self.stored))
        s.send(f"EHLO client.test\r\nMAIL FROM:<{sender}>\r\n")
        s.send("".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n")
        return s, s.send(SPAM)

    def blocklist(self, loaded: Loaded) -> str:
        path = loaded.directory / "mail_from.blocklist"
        return path.read_text() if path.exists() else ""

    def test_blocks_quoted_sender_and_consumes_message(self) -> None:
        """The quoted From: address is blocked and the message is consumed with a 250."""
        loaded = self.loaded()
        _, reply = self.send(loaded, "Boss@Example.com", ["spam@example.com"])
        self.assertTrue(reply.startswith("250 2.0.0 Message Queued"), reply)
        self.assertEqual(self.blocklist(loaded), "sales@pills.test\n")
        self.assertEqual(self.stored, [])

    def test_already_listed_is_not_added_twice(self) -> None:
        """An address already in the block list is not appended again."""
        loaded = self.loaded(**{"mail_from.blocklist": "other@x.test\nsales@pills.test\n"})
        self.send(loaded, "boss@example.com", ["spam@example.com"])
        self.assertEqual(self.blocklist(loaded), "other@x.test\nsales@pills.test\n")

    def test_forwarded_twice_before_a_reload_is_added_once(self) -> None:
        """The same spam forwarded again before the config watcher has re-read the list
        (within a second or two) is not appended a second time."""
        loaded = self.loaded()
        for _ in range(3):
            self.send(loaded, "boss@example.com", ["spam@example.com"])
        self.assertEqual(self.blocklist(loaded), "sales@pills.test\n")

    def test_an_address_the_operator_took_out_can_be_blocked_again(self) -> None:
        """Once the list has been re-read with the address in it, and the operator then
        takes it out, forwarding the spam again appends it again."""
        loaded = self.loaded()
        self.send(loaded, "boss@example.com", ["spam@example.com"])
        loaded.write("mail_from.blocklist", "sales@pills.test\n")  # (the reload sees it)
        loaded.write("mail_from.blocklist", "")  # (the operator takes it out)
        self.send(loaded, "boss@example.com", ["spam@example.com"])
        self.assertEqual(self.blocklist(loaded), "sales@pills.test\n")

    def test_sender_not_allowed(self) -> None:
        """A sender not in block_me.senders gets 550 and nothing is blocked."""
        loaded = self.loaded()
        _, reply = self.send(loaded, "intern@example.com", ["spam@example.com"])
        self.assertEqual(
            reply, "550 5.7.1 You are not allowed to block mail, <intern@example.com>\r\n"
        )
        self.assertEqual(self.blocklist(loaded), "")

    def test_other_messages_pass(self) -> None:
        """Not relaying, another recipient, or a second recipient: delivered as usual."""
        loaded = self.loaded()
        for rcpts, relay in (
            (["spam@example.com"], False),
            (["user@example.com"], True),
            (["spam@example.com", "user@example.com"], True),
        ):
            _, reply = self.send(loaded, "boss@example.com", rcpts, relay)
            self.assertEqual(reply_codes(reply), [250])
        self.assertEqual(len(self.stored), 3)
        self.assertEqual(self.blocklist(loaded), "")

    def test_never_writes_the_shipped_directory(self) -> None:
        """With only the shipped config there is nowhere to write: nothing is."""
        plugin = Plugin()
        plugin.config = ConfigDirectory([default_config_dir()])
        self.assertIsNone(plugin.blocklist_path())
        plugin.config = ConfigDirectory([default_config_dir(), temp_dir(self)])
        self.assertEqual(
            plugin.blocklist_path(), Path(plugin.config.directories[-1]) / "mail_from.blocklist"
        )

    def test_from_line_and_append(self) -> None:
        """The first From: <address> is found across chunks; appends start on a new line."""
        body = [b"hello\r\nFro", b"m: A <X@Y.test>\r\n", b"From: B <b@z.test>\r\n"]
        self.assertEqual(from_line_address(body), "x@y.test")
        self.assertIsNone(from_line_address([b"From: nobody\r\n"]))
        self.assertIsNone(from_line_address([b"From: x <not an address>\r\n"]))
        path = temp_dir(self) / "list"
        path.write_bytes(b"a@b.test")
        append_address(path, "c@d.test")
        self.assertEqual(path.read_bytes(), b"a@b.test\nc@d.test\n")


class BlockMeServerTests(TestCase):
    @inlineCallbacks
    def test_drop_box_over_a_socket(self) -> Deferred[None]:
        """Over a socket: 250, the sender lands in mail_from.blocklist, nothing delivered."""
        server, port = start_server(
            self,
            {
                **FILES,
                "plugins": "tests.plugins.test_block_me:Relay\nblock_me\nqueue/maildir\n",
            },
        )
        base: Path = server.base  # type: ignore[attr-defined]

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("boss@example.com", ["spam@example.com"], SPAM[:-3].encode())

        yield deferToThread(send)
        self.assertEqual(
            (base / "config" / "mail_from.blocklist").read_text(), "sales@pills.test\n"
        )
        self.assertEqual(maildir_messages(base / "maildir"), [])
