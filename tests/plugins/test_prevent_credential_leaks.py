"""prevent_credential_leaks: an authenticated user's own username and password in the body
get the message refused."""

from __future__ import annotations

import base64
import smtplib
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.interfaces import IConnectHook
from haraka_tw.plugins.prevent_credential_leaks import user_part
from tests.plugins.loading import ENVELOPE, accepting, load, session
from tests.support import plugin_with, start_server

TEXT = "Credential leak detected: never give out your username/password to anyone!"
LEAK = f"550 5.7.1 {TEXT}\r\n"


@implementer(IConnectHook)
class Authenticated:
    """Marks every client as having authenticated as alice@example.com (for the socket test)."""

    def hook_connect(self, connection: Any) -> None:
        connection.notes.auth_user = "alice@example.com"
        connection.notes.auth_passwd = "s3cret!"


class PreventCredentialLeaksTests(SynchronousTestCase):
    def reply(
        self,
        body: str,
        user: str | None = "alice@example.com",
        header: str = "Subject: re: verify your account\r\n",
        password: str = "s3cret!",
    ) -> str:
        def connect(connection: Any) -> None:
            if user is not None:
                connection.notes.auth_user = user
                connection.notes.auth_passwd = password

        auth = ("auth", plugin_with({"connect": connect}))
        s = session(auth, *load(self, ["prevent_credential_leaks"]).pairs(), accepting())
        s.send(ENVELOPE + "DATA\r\n")
        return s.send(f"{header}\r\n{body}\r\n.\r\n")

    def test_encoded_parts_are_searched_decoded(self) -> None:
        """As Haraka does: the decoded text of each part counts, so quoted-printable (a
        password with '=' is always '=3D' there) and base64 do not hide the credentials;
        a username in another case counts beyond ASCII too."""
        qp = "Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        self.assertEqual(
            self.reply("login alice, pass S3cret=3Dpw!", header=qp, password="S3cret=pw!"), LEAK
        )
        b64 = "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n"
        encoded = base64.b64encode(b"user alice, password s3cret!").decode()
        self.assertEqual(self.reply(encoded, header=b64), LEAK)
        self.assertEqual(
            self.reply("ich bin JÜRGEN, s3cret!", user="jürgen@example.com", header=qp), LEAK
        )

    def test_username_and_password_refused(self) -> None:
        """The local part of the username (any case) and the password in the body: 550."""
        self.assertEqual(self.reply("my login is ALICE and my password is s3cret!"), LEAK)
        self.assertEqual(self.reply("alice@example.com / s3cret!"), LEAK)

    def test_one_of_them_is_not_a_leak(self) -> None:
        """Only the username, only the password, or the password in another case: accepted."""
        for body in ("regards, alice", "s3cret!", "alice: S3CRET!"):
            self.assertTrue(self.reply(body).startswith("250 "), body)

    def test_unauthenticated_client_not_checked(self) -> None:
        """Without auth notes nothing is checked."""
        self.assertTrue(self.reply("alice s3cret!", user=None).startswith("250 "))

    def test_user_part(self) -> None:
        """A qualified username needs only its local part; others are used whole."""
        self.assertEqual(user_part("alice@example.com"), "alice")
        self.assertEqual(user_part("alice"), "alice")
        self.assertEqual(user_part("@example.com"), "@example.com")


class PreventCredentialLeaksServerTests(TestCase):
    @inlineCallbacks
    def test_leak_refused_over_a_socket(self) -> Deferred[None]:
        """Over a real socket with smtplib: the leaking message is refused with 550."""
        _, port = start_server(
            self,
            {
                "plugins": "tests.plugins.test_prevent_credential_leaks:Authenticated\n"
                "prevent_credential_leaks\nrcpt_to.in_host_list\nqueue/maildir\n",
                "host_list": "example.com\n",
            },
        )

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                try:
                    client.sendmail("a@client.test", ["b@example.com"], b"\r\nalice s3cret!\r\n")
                except smtplib.SMTPDataError as e:
                    return e.smtp_code, e.smtp_error
            return None

        self.assertEqual(
            (yield deferToThread(send)),
            (550, f"5.7.1 {TEXT}".encode()),
        )
