"""DATA over a real socket: large messages byte-exact, smuggling shapes, line and size limits."""

from __future__ import annotations

import mailbox
import random
import re
import smtplib
import socket
import string
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import WireClient, maildir_messages, reply_code, start_server

SAMPLE = "tests.e2e.sample_plugin:Factory"
PLUGINS = f"{SAMPLE}\nrcpt_to.in_host_list\nqueue/maildir\n"

# One Received field, as the server adds it: folded with CRLF TAB, ending in CRLF.
RECEIVED = re.compile(rb"Received: [^\r\n]*(?:\r\n\t[^\r\n]*)*\r\n")
BARE_NEWLINE_REPLY = re.compile(rb"^550 5\.6\.0 Bare LF or CR[^\r\n]*\r\n$")
QUEUED = re.compile(rb"^250 2\.0\.0 Message Queued \([^)]+\)\r\n$")
QUIT_REPLY = re.compile(rb"^221 [^\r\n]*\r\n$")


def big_message(size: int) -> bytes:
    """About C{size} bytes: a header, then random printable 76-character lines, CRLF
    endings, with lines that start with '.' (including '.' and '..' alone) mixed in."""
    alphabet = (string.ascii_letters + string.digits + string.punctuation + " ").encode()
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    rng = random.Random(20240101)
    raw = rng.randbytes(size).translate(table)
    lines = [raw[i : i + 76] for i in range(0, len(raw), 76)]
    for i in range(0, len(lines), 97):
        lines[i] = b"." + lines[i][1:]
    for i in range(50, len(lines), 1001):
        lines[i] = b"."
    for i in range(51, len(lines), 1003):
        lines[i] = b".."
    header = (
        b"From: Alice <alice@x.test>\r\nTo: <bob@example.com>\r\n"
        b"Subject: ten megabytes\r\nMessage-ID: <big@x.test>\r\n\r\n"
    )
    return header + b"\r\n".join(lines) + b"\r\n"


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """The leading Received field of a stored message, and the rest."""
    m = RECEIVED.match(stored)
    assert m is not None, stored[:300]
    return m.group(0), stored[m.end() :]


class LargeMessageTests(unittest.TestCase):
    def test_ten_megabytes_stored_byte_exact(self) -> None:
        """A 10 MB message from smtplib is stored as Received + exactly the original bytes."""
        server, port = start_server(self, {"plugins": PLUGINS})
        maildir = server.base / "maildir"  # type: ignore[attr-defined]
        original = big_message(10 * 1024 * 1024)

        def client() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                return smtp.sendmail("alice@x.test", ["bob@example.com"], original)

        def check(refused: dict[str, Any]) -> None:
            self.assertEqual(refused, {})
            box = mailbox.Maildir(str(maildir), create=False)
            self.assertEqual(len(box), 1)
            stored = box.get_bytes(box.keys()[0])
            received, rest = split_received(stored)
            self.assertIn(b"envelope-from <alice@x.test>", received)
            self.assertEqual(len(rest), len(original))
            self.assertTrue(rest == original, "the stored message differs from the original")

        return deferToThread(client).addCallback(check)


# Each shape would end DATA in a server that accepts a lone LF or CR as a line end.
SMUGGLING_SHAPES = {
    "lf_dot_lf": b"\n.\n",
    "cr_dot_cr": b"\r.\r",
    "lf_dot_crlf": b"\n.\r\n",
    "crlf_dot_lf": b"\r\n.\n",
    "crlf_dot_cr": b"\r\n.\r",
}
SMUGGLED = (
    b"MAIL FROM:<evil@x>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: <evil@x>\r\nSubject: smuggled\r\n\r\nSmuggled body\r\n"
)


def smuggling_session(port: int, shape: bytes, bytewise: bool = False) -> list[bytes]:
    """One transaction whose body hides C{shape} + SMUGGLED in one write after the 354 (or
    one byte per write); then, once the server has stayed silent, the real end and QUIT.
    Returns every reply after the 354, until the server closes."""
    with WireClient(port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert reply_code(c.command("EHLO client.test")) == 250
        assert reply_code(c.command("MAIL FROM:<alice@x.test>")) == 250
        assert reply_code(c.command("RCPT TO:<bob@example.com>")) == 250
        assert reply_code(c.command("DATA")) == 354
        payload = b"From: <alice@x.test>\r\nSubject: innocent\r\n\r\nHello" + shape + SMUGGLED
        if bytewise:
            for i in range(len(payload)):
                c.send(payload[i : i + 1])
        else:
            c.send(payload)
        # Neither the shape nor the embedded commands ended the message: no reply yet.
        early = c.quiet(0.15)
        c.send(b".\r\nQUIT\r\n")
        replies = [early] if early else []
        while True:
            try:
                replies.append(c.reply())
            except ConnectionError:
                return replies


class SmugglingTests(unittest.TestCase):
    """Generated below: each shape, with bare_newline reject (default) and normalise."""

    def check_rejected(self, shape: bytes) -> Any:
        server, port = start_server(self, {"plugins": PLUGINS})
        maildir = server.base / "maildir"  # type: ignore[attr-defined]

        def check(replies: list[bytes]) -> None:
            # One reply for the one message (550 after the real CRLF.CRLF), one for QUIT:
            # the embedded MAIL, RCPT and DATA were never read as commands.
            self.assertEqual(len(replies), 2, replies)
            self.assertRegex(replies[0], BARE_NEWLINE_REPLY)
            self.assertRegex(replies[1], QUIT_REPLY)
            self.assertEqual(maildir_messages(maildir), [])

        return deferToThread(smuggling_session, port, shape).addCallback(check)

    def check_normalised(self, shape: bytes) -> Any:
        files = {"plugins": PLUGINS, "connection.ini": "[main]\nbare_newline=normalise\n"}
        server, port = start_server(self, files)
        maildir = server.base / "maildir"  # type: ignore[attr-defined]

        def check(replies: list[bytes]) -> None:
            self.assertEqual(len(replies), 2, replies)
            self.assertRegex(replies[0], QUEUED)
            self.assertRegex(replies[1], QUIT_REPLY)
            stored = maildir_messages(maildir)
            self.assertEqual(len(stored), 1)  # ONE message, holding the embedded text
            _, message = split_received(stored[0])
            self.assertIn(b"Subject: innocent\r\n", message)
            self.assertIn(b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@example.com>\r\n", message)
            self.assertTrue(message.endswith(b"Smuggled body\r\n"), message)
            # Normalised: every line ends in CRLF, no lone CR or LF is left.
            self.assertEqual(message.count(b"\r"), message.count(b"\r\n"))
            self.assertEqual(message.count(b"\n"), message.count(b"\r\n"))

        return deferToThread(smuggling_session, port, shape).addCallback(check)

    def test_every_shape_sent_a_byte_at_a_time_is_rejected(self) -> None:
        """Each shape, one byte per write, still does not end DATA; each message gets 550."""
        server, port = start_server(self, {"plugins": PLUGINS})
        maildir = server.base / "maildir"  # type: ignore[attr-defined]

        def client() -> dict[bytes, list[bytes]]:
            return {
                shape: smuggling_session(port, shape, bytewise=True)
                for shape in SMUGGLING_SHAPES.values()
            }

        def check(results: dict[bytes, list[bytes]]) -> None:
            for shape, replies in results.items():
                self.assertEqual(len(replies), 2, (shape, replies))
                self.assertRegex(replies[0], BARE_NEWLINE_REPLY)
                self.assertRegex(replies[1], QUIT_REPLY)
            self.assertEqual(maildir_messages(maildir), [])

        return deferToThread(client).addCallback(check)


def _add_smuggling_tests() -> None:
    for name, shape in SMUGGLING_SHAPES.items():

        def rejected(self: SmugglingTests, shape: bytes = shape) -> Any:
            return self.check_rejected(shape)

        def normalised(self: SmugglingTests, shape: bytes = shape) -> Any:
            return self.check_normalised(shape)

        rejected.__name__ = f"test_{name}_rejected_by_default"
        rejected.__doc__ = (
            f"{shape!r} in DATA does not end it; the message gets 550 (bare newline)."
        )
        normalised.__name__ = f"test_{name}_normalised_into_one_message"
        normalised.__doc__ = f"{shape!r} with bare_newline=normalise: one message, text kept."
        setattr(SmugglingTests, rejected.__name__, rejected)
        setattr(SmugglingTests, normalised.__name__, normalised)


_add_smuggling_tests()


class ForgedHeaderTests(unittest.TestCase):
    def test_space_before_the_colon_hides_nothing(self) -> None:
        """A forged "Authentication-Results :" (the obsolete syntax, a space before the
        colon) is renamed like any other, and "Received :" fields count toward the loop
        limit: the header does not end at them."""
        server, port = start_server(self, {"plugins": PLUGINS})
        maildir = server.base / "maildir"  # type: ignore[attr-defined]
        forged = b"Authentication-Results : mx.example.com; dkim=pass\r\nSubject: forged\r\n"
        looping = b"Received :from a\r\n" * 101 + b"Subject: loop\r\n"

        def client() -> list[bytes]:
            replies = []
            with WireClient(port) as c:
                c.command("EHLO client.test")
                for header in (forged, looping):
                    c.command("MAIL FROM:<alice@x.test>")
                    c.command("RCPT TO:<bob@example.com>")
                    assert reply_code(c.command("DATA")) == 354
                    c.send(header + b"\r\nbody\r\n.\r\n")
                    replies.append(c.reply())
                c.command("QUIT")
            return replies

        def check(replies: list[bytes]) -> None:
            self.assertRegex(replies[0], QUEUED)
            self.assertTrue(replies[1].startswith(b"550 5.4.6 Too many received"), replies)
            [stored] = maildir_messages(maildir)
            _, message = split_received(stored)
            self.assertTrue(
                message.startswith(
                    b"Original-Authentication-Results: mx.example.com; dkim=pass\r\n"
                    b"Subject: forged\r\n"
                ),
                message,
            )
            self.assertNotIn(b"\nAuthentication-Results", b"\n" + message)

        return deferToThread(client).addCallback(check)


class LineLimitTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server, self.port = start_server(self, {"plugins": PLUGINS})
        self.maildir = self.server.base / "maildir"  # type: ignore[attr-defined]

    def test_twenty_kilobyte_body_line_is_wrapped_not_run(self) -> None:
        """A 20 KB body line stays in the message (wrapped at 992) and is never a command."""
        long_line = (
            b"MAIL FROM:<evil@x> "
            + b"z" * (16384 - 19)
            + b"RCPT TO:<victim@example.com> DATA "
            + b"y" * 4000
        )
        body = b"Subject: long line\r\n\r\nbefore\r\n" + long_line + b"\r\nafter\r\n"

        def client() -> list[bytes]:
            with WireClient(self.port) as c:
                c.command("EHLO client.test")
                c.command("MAIL FROM:<alice@x.test>")
                c.command("RCPT TO:<bob@example.com>")
                assert reply_code(c.command("DATA")) == 354
                c.send(body + b".\r\nQUIT\r\n")
                return [c.reply(), c.reply()]

        def check(replies: list[bytes]) -> None:
            self.assertRegex(replies[0], QUEUED)
            self.assertRegex(replies[1], QUIT_REPLY)
            stored = maildir_messages(self.maildir)
            self.assertEqual(len(stored), 1)
            _, message = split_received(stored[0])
            lines = message.split(b"\r\n")
            self.assertLessEqual(max(len(line) for line in lines), 992)
            self.assertEqual(message.replace(b"\r\n ", b""), body)
            notes = self.server.notes["sample_plugin.data_post_notes"]
            self.assertEqual(len(notes), 1)
            self.assertIs(notes[0].get("data_line_length_exceeded"), True)

        return deferToThread(client).addCallback(check)

    def test_command_line_of_512_bytes_is_read(self) -> None:
        """A command line of exactly 512 bytes with its CRLF is within max.line_length."""

        def client() -> bytes:
            with WireClient(self.port) as c:
                c.command("EHLO client.test")
                return c.command(b"NOOP " + b"x" * (512 - 7))

        return deferToThread(client).addCallback(self.assertEqual, b"250 2.0.0 OK\r\n")

    def test_command_line_over_512_bytes_gets_521_and_close(self) -> None:
        """A 513-byte command line gets 521 and the connection is closed."""

        def client() -> tuple[bytes, bool]:
            with WireClient(self.port) as c:
                c.command("EHLO client.test")
                reply = c.command(b"MAIL FROM:<" + b"a" * (513 - 21) + b"@x.test>")
                return reply, c.at_eof()

        def check(result: tuple[bytes, bool]) -> None:
            self.assertEqual(result, (b"521 5.5.2 Command line too long\r\n", True))

        return deferToThread(client).addCallback(check)

    def test_unterminated_command_over_512_bytes_gets_521_and_close(self) -> None:
        """600 bytes with no line end yet: 521 and close, without waiting for the LF."""

        def client() -> tuple[bytes, bool]:
            with WireClient(self.port) as c:
                c.command("EHLO client.test")
                c.send(b"RCPT TO:<" + b"b" * 591)
                return c.reply(), c.at_eof()

        def check(result: tuple[bytes, bool]) -> None:
            self.assertEqual(result, (b"521 5.5.2 Command line too long\r\n", True))

        return deferToThread(client).addCallback(check)


class SizeLimitTests(unittest.TestCase):
    def test_max_bytes(self) -> None:
        """max.bytes 10000: SIZE=20000 at MAIL gets 550; a bigger body gets 550 at the dot."""
        files = {"plugins": PLUGINS, "connection.ini": "[max]\nbytes=10000\n"}
        server, port = start_server(self, files)
        maildir = server.base / "maildir"  # type: ignore[attr-defined]
        body = b"Subject: too big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 200

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                self.assertEqual(smtp.esmtp_features.get("size"), "10000")
                self.assertEqual(
                    smtp.mail("alice@x.test", ["SIZE=20000"]), (552, b"5.3.4 Message too big!")
                )
                self.assertEqual(smtp.mail("alice@x.test")[0], 250)
                self.assertEqual(smtp.rcpt("bob@example.com")[0], 250)
                self.assertEqual(smtp.data(body), (552, b"5.3.4 Message too big!"))
                self.assertEqual(smtp.noop()[0], 250)  # the session goes on
                # A message under the limit still goes through.
                self.assertEqual(smtp.sendmail("alice@x.test", ["bob@example.com"], body[:900]), {})

        def check(_: Any) -> None:
            self.assertEqual(len(maildir_messages(maildir)), 1)

        return deferToThread(client).addCallback(check)


class StorageFailureTests(unittest.TestCase):
    def test_spool_lost_under_the_server_gets_451_not_a_drop(self) -> None:
        """The spool directory gone (a file in its place) while the server runs: smtplib
        gets 451 4.3.0 for the message, the connection stays usable and nothing is stored;
        once the directory is back, the same session's next message is queued."""
        files = {
            "plugins": PLUGINS,
            "connection.ini": "[main]\nspool_dir={base}/spool\nspool_after=0\n",
        }
        server, port = start_server(self, files)
        spool = server.base / "spool"  # type: ignore[attr-defined]
        maildir = server.base / "maildir"  # type: ignore[attr-defined]
        spool.write_text("not a directory")  # (once the server runs: it checked at start)
        message = b"Subject: spooled\r\n\r\nbody\r\n"

        def client() -> tuple[Any, Any]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                try:
                    c.sendmail("alice@x.test", ["bob@example.com"], message)
                except smtplib.SMTPDataError as e:
                    first: Any = (e.smtp_code, e.smtp_error)
                else:
                    first = None
                spool.unlink()
                second = c.sendmail("alice@x.test", ["bob@example.com"], message)
                return first, second

        def check(result: tuple[Any, Any]) -> None:
            first, second = result
            self.assertEqual(first, (451, b"4.3.0 Temporary storage failure, try again later"))
            self.assertEqual(second, {})
            [stored] = maildir_messages(maildir)
            self.assertTrue(stored.endswith(message))

        return deferToThread(client).addCallback(check)


class PostmasterTests(unittest.TestCase):
    def test_bare_postmaster_is_taken_other_bare_names_are_not(self) -> None:
        """RCPT TO:<postmaster> (any case, no domain) is accepted with the shipped
        rcpt_to.in_host_list, as RFC 5321 4.5.1 requires, and the message is stored;
        another name without a domain is no path at all (501)."""
        server, port = start_server(self, {"plugins": PLUGINS})
        maildir = server.base / "maildir"  # type: ignore[attr-defined]

        def client() -> tuple[Any, Any, Any]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.ehlo("client.test")
                c.mail("alice@x.test")
                taken = c.rcpt("<Postmaster>")
                other = c.rcpt("<abuse>")
                data = c.data(b"Subject: to the postmaster\r\n\r\nhello\r\n")
                return taken, other, data

        def check(replies: tuple[Any, Any, Any]) -> None:
            taken, other, data = replies
            self.assertEqual(taken[0], 250, taken)
            self.assertEqual(other[0], 501, other)  # (a path needs a domain)
            self.assertEqual(data[0], 250, data)
            [stored] = maildir_messages(maildir)
            self.assertTrue(stored.endswith(b"Subject: to the postmaster\r\n\r\nhello\r\n"))

        return deferToThread(client).addCallback(check)
