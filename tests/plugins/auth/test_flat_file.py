"""auth/flat_file: the users file, its checker, and reloading it."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.hooks.loader import PluginLoadError
from haraka_tw.plugins.auth.auth_base import AuthRealm, IAuthenticatedUser
from haraka_tw.plugins.auth.flat_file import FlatFileChecker, read_users
from haraka_tw.plugins.auth.sasl import CramMD5Credentials, PasswordCredentials
from tests.plugins.auth.support import AuthSession, plain
from tests.plugins.loading import load
from tests.support import reply_codes


class ReadUsersTests(SynchronousTestCase):
    def test_values(self) -> None:
        """Numbers become text; bare keys (no password) and empty values are left out."""
        users = read_users({"a": "pw", "b": 1234, "c": True, "d": "", "e": 1.5})
        self.assertEqual(users, {"a": "pw", "b": "1234", "e": "1.5"})


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.portal = Portal(AuthRealm(), [FlatFileChecker({"matt": "test", "jö": "pässword"})])

    def login(self, credentials: object) -> Any:
        """The avatar of a successful login."""
        d = self.portal.login(credentials, None, IAuthenticatedUser)  # type: ignore[arg-type]
        return self.successResultOf(d)[1]

    def test_password(self) -> None:
        """The right password logs in as the user; a wrong one or an unknown user does not."""
        user = self.login(PasswordCredentials(b"matt", b"test"))
        self.assertEqual(user.name, "matt")
        for creds in (PasswordCredentials(b"matt", b"Test"), PasswordCredentials(b"x", b"test")):
            self.failureResultOf(
                self.portal.login(creds, None, IAuthenticatedUser), UnauthorizedLogin
            )

    def test_utf8(self) -> None:
        """Names and passwords are UTF-8."""
        user = self.login(PasswordCredentials("jö".encode(), "pässword".encode()))
        self.assertEqual(user.name, "jö")

    def test_cram_md5(self) -> None:
        """A CRAM-MD5 digest is checked against the stored password."""
        creds = CramMD5Credentials("mx.test")
        digest = hmac.new(b"test", creds.challenge, hashlib.md5).hexdigest()
        creds.set_response(b"matt " + digest.encode())
        self.assertEqual(self.login(creds).name, "matt")
        creds.set_response(b"nobody " + digest.encode())
        self.failureResultOf(self.portal.login(creds, None, IAuthenticatedUser), UnauthorizedLogin)


class ConfigTests(SynchronousTestCase):
    def test_reload_on_change(self) -> None:
        """A user added to the file can log in once the config reloads."""
        s = AuthSession(self)
        self.assertIn(
            "auth_flat_file.ini",
            s.loaded.write("auth_flat_file.ini", "[users]\nmatt=test\nnew=pw\n"),
        )
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('new', 'pw')}\r\n"), [235])

    def test_removed_user(self) -> None:
        """A user taken out of the file can no longer log in."""
        s = AuthSession(self)
        s.loaded.write("auth_flat_file.ini", "[users]\nother=pw\n")
        s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n")
        self.assertEqual(reply_codes(s.wait(1)), [535])

    def test_bad_reload_keeps_last_good(self) -> None:
        """A reload with an unknown method keeps the users and methods in force."""
        s = AuthSession(self)
        s.loaded.write("auth_flat_file.ini", "[core]\nmethods=NTLM\n[users]\n")
        self.assertEqual(s.plugin.settings.methods, ("PLAIN", "LOGIN", "CRAM-MD5"))
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('matt', 'test')}\r\n"), [235])

    def test_bad_method_stops_start(self) -> None:
        """An unknown method at start-up is a load error naming the plugin."""
        with self.assertRaises(PluginLoadError) as caught:
            load(self, ["auth/flat_file"], {"auth_flat_file.ini": "[core]\nmethods=NTLM\n"})
        self.assertIn("NTLM", str(caught.exception))

    def test_auth_base_is_not_a_plugin(self) -> None:
        """auth/auth_base cannot be loaded by itself."""
        with self.assertRaises(PluginLoadError):
            load(self, ["auth/auth_base"])
