"""The client's wire functions: replies, capabilities, command lines, SASL answers."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from haraka_tw.outbound.wire import (
    Capabilities,
    ReplyError,
    ReplyReader,
    choose_mechanism,
    mail_command,
    needs_smtputf8,
    rcpt_command,
    sasl_answer,
    sasl_initial,
)
from haraka_tw.smtp.replies import Reply

EHLO = (
    b"250-mx.example hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
    b"250-AUTH=LOGIN\r\n250-auth plain cram-md5\r\n250-STARTTLS\r\n250 DSN\r\n"
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class ReplyReaderTests(unittest.TestCase):
    def test_one_line(self) -> None:
        """A single-line reply with an enhanced code is split into code, enhanced, text."""
        [reply] = ReplyReader().feed(b"250 2.1.0 sender OK\r\n")
        self.assertEqual(reply, Reply(250, "2.1.0", ("sender OK",)))

    def test_multi_line_strips_repeated_enhanced_code(self) -> None:
        """Continuation lines form one reply; the enhanced code is taken from each line."""
        [reply] = ReplyReader().feed(b"550-5.1.1 no such\r\n550 5.1.1 user here\r\n")
        self.assertEqual(reply, Reply(550, "5.1.1", ("no such", "user here")))

    def test_enhanced_code_of_the_wrong_class_is_text(self) -> None:
        """An enhanced code whose class differs from the reply's stays in the text."""
        [reply] = ReplyReader().feed(b"250 5.0.0 odd\r\n")
        self.assertEqual(reply, Reply(250, None, ("5.0.0 odd",)))

    def test_code_alone_and_bare_lf(self) -> None:
        """A bare code is a reply with empty text; LF alone is accepted as a line end."""
        self.assertEqual(
            ReplyReader().feed(b"250\n354 go\r\n"),
            [
                Reply(250, None, ("",)),
                Reply(354, None, ("go",)),
            ],
        )

    def test_partial_reply_is_held(self) -> None:
        """Nothing comes out until the final line is complete; idle says so."""
        reader = ReplyReader()
        self.assertEqual(reader.feed(b"250-a\r\n250 b"), [])
        self.assertFalse(reader.idle)
        self.assertEqual(len(reader.feed(b"\r\n")), 1)
        self.assertTrue(reader.idle)

    def test_malformed_lines(self) -> None:
        """Text that is not a reply line, or a code change mid-reply, is an error."""
        for data in (b"hello\r\n", b"25 x\r\n", b"250x\r\n", b"150 x\r\n", b"250-a\r\n251 b\r\n"):
            self.assertRaises(ReplyError, ReplyReader().feed, data)

    def test_last_reply_before_tls(self) -> None:
        """With last=True only the first reply comes out; what follows it is discarded."""
        reader = ReplyReader()
        got = reader.feed(b"220 2.0.0 go\r\n250 injected\r\ngarbage", last=True)
        self.assertEqual(got, [Reply(220, "2.0.0", ("go",))])
        self.assertTrue(reader.idle)

    def test_overlong_line(self) -> None:
        """A line past the limit is an error, even before its end arrives."""
        self.assertRaises(ReplyError, ReplyReader(max_line=10).feed, b"250 " + b"x" * 20)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(EHLO)), max_size=10))
    def test_chunking_does_not_matter(self, cuts: list[int]) -> None:
        """Replies are the same however the bytes are cut."""
        data = EHLO + b"221 2.0.0 bye\r\n"
        whole = ReplyReader().feed(data)
        reader = ReplyReader()
        got = []
        start = 0
        for cut in [*sorted(cuts), len(data)]:
            got += reader.feed(data[start:cut])
            start = cut
        self.assertEqual(got, whole)
        self.assertEqual(len(whole), 2)


class CapabilitiesTests(unittest.TestCase):
    def test_keywords(self) -> None:
        """Keywords are upper-cased; SIZE, AUTH (both forms) and flags are read."""
        [reply] = ReplyReader().feed(EHLO)
        caps = Capabilities.from_reply(reply)
        for keyword in ("PIPELINING", "8BITMIME", "STARTTLS", "DSN", "pipelining"):
            self.assertIn(keyword, caps)
        self.assertNotIn("SMTPUTF8", caps)
        self.assertEqual(caps.size_limit, 1000)
        self.assertEqual(caps.auth, frozenset({"LOGIN", "PLAIN", "CRAM-MD5"}))

    def test_size_without_limit(self) -> None:
        """SIZE with no number or 0 means no declared limit."""
        for line in ("250 SIZE", "250 SIZE 0"):
            caps = Capabilities.from_reply(Reply(250, None, ("hi", line[4:])))
            self.assertIn("SIZE", caps)
            self.assertIsNone(caps.size_limit)

    def test_helo_reply_has_none(self) -> None:
        """A one-line reply advertises nothing."""
        self.assertEqual(Capabilities.from_reply(Reply(250, None, ("hi",))).keywords, {})

    def test_mechanism_preference(self) -> None:
        """CRAM-MD5 before PLAIN before LOGIN; None when nothing usable is offered."""
        self.assertEqual(choose_mechanism(frozenset({"LOGIN", "PLAIN", "CRAM-MD5"})), "CRAM-MD5")
        self.assertEqual(choose_mechanism(frozenset({"LOGIN", "PLAIN"})), "PLAIN")
        self.assertEqual(choose_mechanism(frozenset({"LOGIN", "XOAUTH2"})), "LOGIN")
        self.assertIsNone(choose_mechanism(frozenset({"GSSAPI"})))


class CommandTests(unittest.TestCase):
    def test_mail_with_params(self) -> None:
        """MAIL FROM renders parameters in order, a None value as a bare keyword."""
        line = mail_command("a@x.test", {"SIZE": "12", "SMTPUTF8": None, "RET": "HDRS"})
        self.assertEqual(line, b"MAIL FROM:<a@x.test> SIZE=12 SMTPUTF8 RET=HDRS\r\n")

    def test_null_sender(self) -> None:
        """An empty sender is the null path."""
        self.assertEqual(mail_command("", {}), b"MAIL FROM:<>\r\n")

    def test_rcpt_utf8(self) -> None:
        """A UTF-8 address is written as UTF-8 and flagged as needing SMTPUTF8."""
        line = rcpt_command("jösé@x.test", {"NOTIFY": "NEVER"})
        self.assertEqual(line, "RCPT TO:<jösé@x.test> NOTIFY=NEVER\r\n".encode())
        self.assertTrue(needs_smtputf8("a@x", "jösé@x.test"))
        self.assertFalse(needs_smtputf8("a@x", ""))

    def test_injection_refused(self) -> None:
        """CR, LF, angle brackets in a path, or bad parameters never reach the wire."""
        self.assertRaises(ValueError, rcpt_command, "a@x\r\nDATA", {})
        self.assertRaises(ValueError, rcpt_command, "a>@x", {})
        self.assertRaises(ValueError, rcpt_command, "", {})
        self.assertRaises(ValueError, mail_command, "a@x", {"SIZE": "1\r\nRSET"})
        self.assertRaises(ValueError, mail_command, "a@x", {"BAD KEY": "1"})


class SASLTests(unittest.TestCase):
    def test_plain(self) -> None:
        """PLAIN sends its initial response; an empty 334 gets it again."""
        token = base64.b64encode(b"\0user\0pass")
        self.assertEqual(sasl_initial("PLAIN", "user", "pass"), b"AUTH PLAIN " + token + b"\r\n")
        self.assertEqual(sasl_answer("PLAIN", 0, "", "user", "pass"), token + b"\r\n")

    def test_login(self) -> None:
        """LOGIN answers the user name, then the password."""
        self.assertEqual(sasl_initial("LOGIN", "u", "p"), b"AUTH LOGIN\r\n")
        self.assertEqual(sasl_answer("LOGIN", 0, b64("Username:"), "u", "p"), b"dQ==\r\n")
        self.assertEqual(sasl_answer("LOGIN", 1, b64("Password:"), "u", "p"), b"cA==\r\n")
        self.assertRaises(ValueError, sasl_answer, "LOGIN", 2, "", "u", "p")

    def test_cram_md5_rfc2195_example(self) -> None:
        """CRAM-MD5 gives RFC 2195's example answer."""
        challenge = b64("<1896.697170952@postoffice.reston.mci.net>")
        answer = sasl_answer("CRAM-MD5", 0, challenge, "tim", "tanstaaftanstaaf")
        expected = b64("tim b913a602c7eda7a495b4e6e7334d3890").encode() + b"\r\n"
        self.assertEqual(answer, expected)

    def test_bad_challenge(self) -> None:
        """A challenge that is not base64, or an unknown mechanism, is refused."""
        self.assertRaises(ValueError, sasl_answer, "CRAM-MD5", 0, "not base64!", "u", "p")
        self.assertRaises(ValueError, sasl_initial, "GSSAPI", "u", "p")
