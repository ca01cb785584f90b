"""An operator's Haraka config directory, read as Haraka reads it: the idioms of Haraka's
shipped files (an empty C{hosts[] =}, C{[message] helo} and C{close} as the text after the
reply's domain), over a real socket with smtplib."""

from __future__ import annotations

import smtplib

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import start_server

# The parts of Haraka's shipped connection.ini this test is about, as an operator has them.
HARAKA_CONNECTION_INI = """\
[haproxy]
hosts[] =

[message]
helo=Haraka is at your service.
close=closing connection. Have a jolly good day.
"""


class HarakaConnectionIniTests(TestCase):
    @inlineCallbacks
    def test_helo_ehlo_and_quit_replies_begin_with_the_domain(self) -> Deferred[None]:
        """[message] helo and close are the text after "<me> Hello <remote>, " and "<me> ",
        as in Haraka: the reply's first word is the server's domain (RFC 5321 4.1.1.1),
        and the empty proxy host is skipped, not an error at start."""
        _, port = start_server(self, {"connection.ini": HARAKA_CONNECTION_INI})

        def talk() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                replies = [s.ehlo("client.test"), s.helo("client.test")]
                replies.append(s.docmd("QUIT"))
                s.close()
                return replies

        ehlo, helo, quit_ = yield deferToThread(talk)
        hello = b"mx.test Hello localhost [127.0.0.1], Haraka is at your service."
        self.assertEqual(ehlo[0], 250)
        self.assertEqual(ehlo[1].split(b"\n")[0], hello)
        self.assertIn(b"PIPELINING", ehlo[1])
        self.assertEqual(helo, (250, hello))
        self.assertEqual(quit_, (221, b"mx.test closing connection. Have a jolly good day."))

    @inlineCallbacks
    def test_a_text_with_placeholders_is_the_whole_line(self) -> Deferred[None]:
        """haraka_tw's own form: a text that names {me} or {remote} is the line as written."""
        ini = "[message]\nhelo={me} greets {remote}\nclose=bye from {me}\n"
        _, port = start_server(self, {"connection.ini": ini})

        def talk() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                replies = [s.helo("client.test"), s.docmd("QUIT")]
                s.close()
                return replies

        helo, quit_ = yield deferToThread(talk)
        self.assertEqual(helo, (250, b"mx.test greets localhost [127.0.0.1]"))
        self.assertEqual(quit_, (221, b"bye from mx.test"))  # (after HELO: no 2.0.0)
