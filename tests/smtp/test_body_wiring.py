"""parse_body, attachment hooks, body filters, banners and max.mime_parts, end to end
through a session (the MIME parser itself is tested in tests/message/test_body.py)."""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.smtp.settings import SessionSettings
from tests.smtp.test_protocol import ENVELOPE, storing
from tests.support import Session, plugin_with


def mime_message(parts: int = 1) -> bytes:
    msg = EmailMessage()
    msg["Subject"] = "report"
    msg.set_content("Hello, here is the report.\n")
    for i in range(parts):
        msg.add_attachment(
            b"\x00\x01binary" * 100,
            maintype="application",
            subtype="octet-stream",
            filename=f"r{i}.bin",
        )
    raw = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return raw.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n"


class BodyWiringTests(SynchronousTestCase):
    def test_parse_body_gives_tree_and_attachments(self) -> None:
        """A plugin that asks at DATA gets the MIME tree and each attachment's bytes."""
        seen: list[Any] = []

        class Collect:
            def __init__(self) -> None:
                self.buf = b""

            def data(self, chunk: bytes) -> None:
                self.buf += chunk

            def end(self, info: Any) -> None:
                seen.append((info.filename, info.size, self.buf))

        def data_hook(c: Any) -> None:
            c.transaction.attachment_hooks(lambda info: Collect())

        def data_post(c: Any) -> None:
            body = c.transaction.body
            seen.append(("text", body.children[0].bodytext))

        stored: list[bytes] = []
        s = Session(
            [("p", plugin_with({"data": data_hook, "data_post": data_post})), storing(stored)]
        )
        s.send(ENVELOPE + b"DATA\r\n")
        out = s.send(mime_message(2))
        self.assertIn("250 2.0.0 Message Queued", out)
        self.assertEqual([n for n, *_ in seen[:2]], ["r0.bin", "r1.bin"])
        self.assertEqual(seen[0][2], b"\x00\x01binary" * 100)
        self.assertEqual(seen[2][0], "text")
        self.assertIn("Hello, here is the report.", seen[2][1])
        self.assertEqual(s.connection.msg_count.accept, 1)

    def test_banner_rewrites_stored_message(self) -> None:
        """set_banner: the stored message's text part ends with the banner."""
        stored: list[bytes] = []
        s = Session(
            [
                ("b", plugin_with({"data": lambda c: c.transaction.set_banner("-- scanned")})),
                storing(stored),
            ]
        )
        s.send(ENVELOPE + b"DATA\r\n")
        s.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        self.assertIn(b"hello\r\n", stored[0])
        self.assertIn(b"-- scanned", stored[0])

    def test_too_many_mime_parts(self) -> None:
        """Over max.mime_parts: 554 and the connection is closed."""
        s = Session(
            [
                ("p", plugin_with({"data": lambda c: setattr(c.transaction, "parse_body", True)})),
                storing([]),
            ],
            settings=SessionSettings(me="mx.test", max_mime_parts=3),
        )
        s.send(ENVELOPE + b"DATA\r\n")
        out = s.send(mime_message(5))
        self.assertIn("554 5.6.0 Too many MIME parts", out)
        self.assertTrue(s.closed)

    def test_no_parsing_unless_asked(self) -> None:
        """Without parse_body the body is not parsed (no tree)."""
        seen: list[Any] = []
        s = Session(
            [
                ("p", plugin_with({"data_post": lambda c: seen.append(c.transaction.body)})),
                storing([]),
            ]
        )
        s.send(ENVELOPE + b"DATA\r\n")
        s.send(mime_message(1))
        self.assertEqual(seen, [None])
