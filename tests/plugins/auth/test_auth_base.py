"""auth_base through auth/flat_file: the EHLO keyword, every mechanism, every refusal, the
failure delay and limit, and constrain_sender, as transcripts."""

from __future__ import annotations

import base64

from twisted.cred.credentials import IUsernamePassword
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides

from haraka_tw.logging import Level
from haraka_tw.plugins.auth.auth_base import (
    IAuthorizingChecker,
    domain_allowed,
    failure_delay,
    read_settings,
)
from haraka_tw.plugins.auth.sasl import MECHANISMS
from tests.plugins.auth.support import USERS_INI, AuthSession, b64, cram_answer, plain
from tests.support import reply_codes


def ini(core: str = "", users: str = "matt=test\nuser@example.com=secret\n") -> dict[str, str]:
    return {"auth_flat_file.ini": f"[core]\n{core}\n[users]\n{users}"}


class AdvertiseTests(SynchronousTestCase):
    def test_advertised_after_tls(self) -> None:
        """On a TLS connection EHLO lists AUTH PLAIN LOGIN CRAM-MD5."""
        s = AuthSession(self)
        self.assertRegex(s.ehlo_reply, r"\r\n250[ -]AUTH PLAIN LOGIN CRAM-MD5\r\n")

    def test_not_advertised_in_cleartext(self) -> None:
        """Without TLS, and allow_cleartext not set, EHLO does not list AUTH."""
        s = AuthSession(self, tls=False)
        self.assertNotIn("AUTH", s.ehlo_reply)

    def test_cleartext_allowed(self) -> None:
        """allow_cleartext=true lists AUTH without TLS."""
        s = AuthSession(self, ini("allow_cleartext=true"), tls=False)
        self.assertIn("AUTH PLAIN LOGIN CRAM-MD5", s.ehlo_reply)

    def test_methods(self) -> None:
        """[core] methods chooses (and orders) the mechanisms listed."""
        s = AuthSession(self, ini("methods=CRAM-MD5, plain"))
        self.assertRegex(s.ehlo_reply, r"\r\n250[ -]AUTH CRAM-MD5 PLAIN\r\n")


class PlainTests(SynchronousTestCase):
    def test_initial_response(self) -> None:
        """AUTH PLAIN <initial>: 235 2.7.0, relaying, auth_user and auth_passwd noted."""
        s = AuthSession(self)
        self.assertEqual(
            s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n"),
            "235 2.7.0 Authentication successful\r\n",
        )
        c = s.connection
        self.assertTrue(c.relaying)
        self.assertEqual(c.notes["auth_user"], "matt")
        self.assertEqual(c.notes["auth_passwd"], "test")
        self.assertEqual(c.notes["auth_method"], "PLAIN")
        self.assertTrue(c.results.has("auth", "pass", "auth/flat_file"))
        self.assertEqual(c.results.get("auth")["user"], "matt")
        self.assertTrue(c.results.has("relay", "pass", "auth/flat_file"))

    def test_empty_challenge(self) -> None:
        """AUTH PLAIN alone gets '334 ' and the response on the next line."""
        s = AuthSession(self)
        self.assertEqual(s.send("AUTH PLAIN\r\n"), "334 \r\n")
        self.assertEqual(s.codes(plain("matt", "test") + "\r\n"), [235])

    def test_authzid_same_as_user(self) -> None:
        """An authzid equal to the username is fine."""
        s = AuthSession(self)
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('matt', 'test', 'matt')}\r\n"), [235])

    def test_authzid_of_someone_else(self) -> None:
        """Acting as another user is refused (flat_file allows no proxy auth): 535."""
        s = AuthSession(self)
        self.assertEqual(s.send(f"AUTH PLAIN {plain('matt', 'test', 'boss')}\r\n"), "")
        self.assertEqual(s.wait(1), "535 5.7.8 Authentication failed\r\n")
        self.assertNotIn("auth_user", s.connection.notes)

    def test_authzid_allowed_by_checker(self) -> None:
        """A checker providing IAuthorizingChecker may let a user act as another."""
        s = AuthSession(self)
        checker = s.plugin.portal.checkers[IUsernamePassword]
        alsoProvides(checker, IAuthorizingChecker)
        checker.may_act_as = lambda user, authzid: (user, authzid) == (b"matt", b"boss")
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('matt', 'test', 'boss')}\r\n"), [235])
        self.assertEqual(s.connection.notes["auth_user"], "boss")
        other = AuthSession(self)
        checker = other.plugin.portal.checkers[IUsernamePassword]
        alsoProvides(checker, IAuthorizingChecker)
        checker.may_act_as = lambda user, authzid: False
        other.send(f"AUTH PLAIN {plain('matt', 'test', 'boss')}\r\n")
        self.assertEqual(reply_codes(other.wait(1)), [535])

    def test_relaying_after_auth(self) -> None:
        """After AUTH the client may relay: a foreign recipient is accepted by the core."""
        s = AuthSession(self, names=["auth/flat_file"])
        s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n")
        out = s.send("MAIL FROM:<matt@client.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
        self.assertEqual(reply_codes(out), [250, 250])

    def test_pipelined_after_auth(self) -> None:
        """Commands pipelined behind AUTH are answered after the 235, in order."""
        s = AuthSession(self)
        out = s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\nMAIL FROM:<m@client.test>\r\n")
        self.assertEqual(reply_codes(out), [235, 250])


class LoginTests(SynchronousTestCase):
    def test_two_prompts(self) -> None:
        """AUTH LOGIN prompts Username: then Password: (base64), then 235."""
        s = AuthSession(self)
        self.assertEqual(s.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n")
        self.assertEqual(s.send(b64("matt") + "\r\n"), "334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.send(b64("test") + "\r\n"), "235 2.7.0 Authentication successful\r\n")
        self.assertEqual(s.connection.notes["auth_user"], "matt")

    def test_initial_username(self) -> None:
        """AUTH LOGIN <username> prompts only for the password."""
        s = AuthSession(self)
        self.assertEqual(s.send(f"AUTH LOGIN {b64('matt')}\r\n"), "334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.codes(b64("test") + "\r\n"), [235])

    def test_responses_are_not_commands(self) -> None:
        """What the client sends after a 334 is never run as a command."""
        s = AuthSession(self)
        s.send("AUTH LOGIN\r\n")
        self.assertEqual(s.send("QUIT\r\n"), "334 UGFzc3dvcmQ6\r\n")  # a username, not QUIT
        self.assertEqual(s.send("RSET\r\n"), "")  # a wrong password
        self.assertEqual(s.wait(1), "535 5.7.8 Authentication failed\r\n")
        self.assertFalse(s.closed)

    def test_whole_exchange_in_one_write(self) -> None:
        """A client that sends the whole exchange at once is answered in order."""
        s = AuthSession(self)
        out = s.send(f"AUTH LOGIN\r\n{b64('matt')}\r\n{b64('test')}\r\nNOOP\r\n")
        self.assertEqual(reply_codes(out), [334, 334, 235, 250])


class CramMD5Tests(SynchronousTestCase):
    def test_challenge_and_answer(self) -> None:
        """CRAM-MD5: a challenge naming the server; the right HMAC gets 235."""
        s = AuthSession(self)
        line = s.send("AUTH CRAM-MD5\r\n")
        self.assertTrue(line.startswith("334 "), line)
        self.assertRegex(base64.b64decode(line[4:]).decode(), r"^<\d+\.\d+@mx\.test>$")
        self.assertEqual(s.codes(cram_answer(line, "matt", "test") + "\r\n"), [235])
        self.assertEqual(s.connection.notes["auth_user"], "matt")
        self.assertNotIn("auth_passwd", s.connection.notes)  # no password to keep

    def test_wrong_password(self) -> None:
        """An HMAC made with another password gets 535 after the delay."""
        s = AuthSession(self)
        line = s.send("AUTH CRAM-MD5\r\n")
        self.assertEqual(s.send(cram_answer(line, "matt", "nope") + "\r\n"), "")
        self.assertEqual(s.wait(1), "535 5.7.8 Authentication failed\r\n")

    def test_initial_response_refused(self) -> None:
        """CRAM-MD5 with an initial response (the server speaks first): 501 5.5.2."""
        s = AuthSession(self)
        self.assertEqual(s.codes(f"AUTH CRAM-MD5 {b64('matt 00')}\r\n"), [501])


class RefusalTests(SynchronousTestCase):
    def test_cancel(self) -> None:
        """'*' in answer to a challenge: 501 5.7.0 Authentication aborted."""
        s = AuthSession(self)
        s.send("AUTH LOGIN\r\n")
        s.send(b64("matt") + "\r\n")
        self.assertEqual(s.send("*\r\n"), "501 5.7.0 Authentication aborted\r\n")
        self.assertEqual(s.codes("NOOP\r\n"), [250])
        self.assertNotIn("auth_fails", s.connection.notes)

    def test_malformed_base64(self) -> None:
        """A response that is not base64: 501 5.5.2."""
        s = AuthSession(self)
        s.send("AUTH PLAIN\r\n")
        self.assertEqual(
            s.send("not base64!\r\n"), "501 5.5.2 Cannot decode the authentication response\r\n"
        )

    def test_missing_nuls(self) -> None:
        """A PLAIN message without its two NULs: 501 5.5.2."""
        s = AuthSession(self)
        self.assertEqual(s.codes(f"AUTH PLAIN {b64('matt test')}\r\n"), [501])
        self.assertIn("5.5.2", s.send(f"AUTH PLAIN {b64('x')}\r\n"))

    def test_unknown_mechanism(self) -> None:
        """A mechanism not offered: 504 5.5.4."""
        s = AuthSession(self, ini("methods=PLAIN"))
        self.assertEqual(
            s.send("AUTH GSSAPI\r\n"), "504 5.5.4 Unrecognized authentication type\r\n"
        )
        self.assertEqual(s.codes("AUTH LOGIN\r\n"), [504])

    def test_no_mechanism(self) -> None:
        """AUTH alone, or with too many words: 501 5.5.4."""
        s = AuthSession(self)
        self.assertEqual(s.codes("AUTH\r\n"), [501])
        self.assertEqual(s.codes("AUTH PLAIN a b\r\n"), [501])

    def test_already_authenticated(self) -> None:
        """A second AUTH after success: 503 5.5.1."""
        s = AuthSession(self)
        s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n")
        self.assertEqual(
            s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n"),
            "503 5.5.1 Already authenticated\r\n",
        )

    def test_inside_transaction(self) -> None:
        """AUTH after MAIL: 503 5.5.1."""
        s = AuthSession(self)
        s.send("MAIL FROM:<a@client.test>\r\n")
        self.assertEqual(
            s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n"),
            "503 5.5.1 AUTH not permitted during a mail transaction\r\n",
        )

    def test_before_ehlo(self) -> None:
        """AUTH after HELO (no ESMTP): 503."""
        s = AuthSession(self, ehlo="HELO client.test\r\n")
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('matt', 'test')}\r\n"), [503])

    def test_cleartext_refused(self) -> None:
        """AUTH on a cleartext connection where it is not allowed: 538 5.7.11."""
        s = AuthSession(self, tls=False)
        self.assertEqual(
            s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n"),
            "538 5.7.11 Encryption required for requested authentication mechanism\r\n",
        )
        self.assertFalse(s.connection.relaying)

    def test_other_commands_pass(self) -> None:
        """Verbs other than AUTH are left to the core (500 unrecognized)."""
        s = AuthSession(self)
        self.assertEqual(s.codes("XYZZY\r\n"), [500])

    def test_client_leaves_mid_exchange(self) -> None:
        """A client gone while a 334 waits for its answer: no error is logged."""
        s = AuthSession(self)
        s.send("AUTH LOGIN\r\n")
        s.session.lose()
        s.clock.advance(1)
        self.assertEqual(s.session.log.messages(Level.ERROR), [])
        self.assertEqual(s.session.log.messages(Level.CRIT), [])


class FailureTests(SynchronousTestCase):
    def fail_once(self, s: AuthSession) -> str:
        return s.send(f"AUTH PLAIN {plain('matt', 'wrong')}\r\n")

    def test_delay_doubles(self) -> None:
        """Each failure on a connection waits twice as long: 1 s, 2 s, then 4 s."""
        s = AuthSession(self, ini("max_failures=0"))
        for delay in (1, 2, 4):
            self.assertEqual(self.fail_once(s), "")
            self.assertEqual(s.wait(delay - 0.01), "")
            self.assertEqual(s.wait(0.01), "535 5.7.8 Authentication failed\r\n")
        self.assertEqual(s.connection.notes["auth_fails"], 3)
        self.assertFalse(s.closed)

    def test_delay_capped(self) -> None:
        """max_delay caps the doubling."""
        s = AuthSession(self, ini("max_failures=0\nmax_delay=2"))
        for delay in (1, 2, 2, 2):
            self.fail_once(s)
            self.assertEqual(s.wait(delay - 0.01), "")
            self.assertEqual(reply_codes(s.wait(0.01)), [535])

    def test_delay_kept_under_plugin_timeout(self) -> None:
        """The delay stays a second below the plugin's timeout, as in Haraka."""
        files = {**ini("max_failures=0"), "auth/flat_file.timeout": "3\n"}
        s = AuthSession(self, files)
        for delay in (1, 2, 2):
            self.fail_once(s)
            self.assertEqual(reply_codes(s.wait(delay)), [535])

    def test_disconnect_after_max_failures(self) -> None:
        """The third failure (the default max_failures) gets 535, then 421 and close."""
        s = AuthSession(self)
        for delay in (1, 2):
            self.fail_once(s)
            self.assertEqual(reply_codes(s.wait(delay)), [535])
        self.fail_once(s)
        self.assertEqual(
            s.wait(4),
            "535 5.7.8 Authentication failed\r\n"
            "421 4.7.0 Too many failed authentication attempts, closing connection\r\n",
        )
        self.assertTrue(s.closed)

    def test_failure_recorded(self) -> None:
        """A failure is counted in notes and results; the client is not relaying."""
        s = AuthSession(self)
        self.fail_once(s)
        s.wait(1)
        self.assertEqual(s.connection.notes["auth_fails"], 1)
        self.assertTrue(s.connection.results.has("auth", "fail", "auth/flat_file/PLAIN"))
        self.assertFalse(s.connection.relaying)

    def test_unknown_user(self) -> None:
        """A user not in the file fails like a wrong password."""
        s = AuthSession(self)
        s.send(f"AUTH PLAIN {plain('nobody', 'test')}\r\n")
        self.assertEqual(s.wait(1), "535 5.7.8 Authentication failed\r\n")

    def test_success_after_failure(self) -> None:
        """A failure does not stop a later success on the same connection."""
        s = AuthSession(self)
        self.fail_once(s)
        s.wait(1)
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('matt', 'test')}\r\n"), [235])


class SecretsTests(SynchronousTestCase):
    def test_password_never_logged(self) -> None:
        """At every log level, neither the password nor the base64 responses appear."""
        s = AuthSession(self)
        s.send("AUTH LOGIN\r\n")
        s.send(b64("matt") + "\r\n")
        s.send(b64("test") + "\r\n")
        other = AuthSession(self)
        other.send("AUTH PLAIN\r\n")
        other.send(plain("user@example.com", "secret") + "\r\n")
        self.assertEqual(other.connection.notes["auth_user"], "user@example.com")
        logged = s.log_text() + other.log_text()
        for secret in ("secret", b64("test"), plain("user@example.com", "secret")):
            self.assertNotIn(secret, logged)
        self.assertIn("user='matt'", logged)

    def test_failures_never_log_the_password(self) -> None:
        """A failed attempt logs the user and the reason, not what was tried."""
        s = AuthSession(self)
        s.send(f"AUTH PLAIN {plain('matt', 'guess-me')}\r\n")
        s.wait(1)
        messages = "\n".join(r.message for r in s.log_records())
        self.assertIn("user='matt' failed", messages)
        self.assertNotIn("guess-me", messages)

    def test_blankout_password(self) -> None:
        """blankout_password=true keeps no auth_passwd."""
        s = AuthSession(self, ini("blankout_password=true"))
        s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n")
        self.assertEqual(s.connection.notes["auth_user"], "matt")
        self.assertNotIn("auth_passwd", s.connection.notes)


class ConstrainSenderTests(SynchronousTestCase):
    def authed(self, core: str = "") -> AuthSession:
        s = AuthSession(self, ini(core))
        s.send(f"AUTH PLAIN {plain('user@example.com', 'secret')}\r\n")
        return s

    def test_own_domain(self) -> None:
        """user@example.com may send from example.com and its subdomains."""
        s = self.authed()
        self.assertEqual(s.codes("MAIL FROM:<a@Example.COM>\r\n"), [250])
        self.assertEqual(s.codes("MAIL FROM:<a@mail.example.com>\r\n"), [250])

    def test_other_domain(self) -> None:
        """... but not from another domain: 550 5.7.1."""
        s = self.authed()
        self.assertEqual(
            s.send("MAIL FROM:<a@evil.test>\r\n"),
            "550 5.7.1 Envelope domain 'evil.test' doesn't match AUTH domain 'example.com'\r\n",
        )
        self.assertEqual(s.codes("MAIL FROM:<a@notexample.com>\r\n"), [550])

    def test_null_sender(self) -> None:
        """The null sender is not constrained."""
        self.assertEqual(self.authed().codes("MAIL FROM:<>\r\n"), [250])

    def test_switched_off(self) -> None:
        """constrain_sender=false lets any domain through."""
        self.assertEqual(
            self.authed("constrain_sender=false").codes("MAIL FROM:<a@evil.test>\r\n"), [250]
        )

    def test_user_without_domain(self) -> None:
        """A username without a domain is not constrained."""
        s = AuthSession(self)
        s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n")
        self.assertEqual(s.codes("MAIL FROM:<a@evil.test>\r\n"), [250])

    def test_not_authenticated(self) -> None:
        """Without AUTH nothing is constrained."""
        s = AuthSession(self)
        self.assertEqual(s.codes("MAIL FROM:<a@evil.test>\r\n"), [250])


class PolicyTests(SynchronousTestCase):
    def test_failure_delay(self) -> None:
        """1, 2, 4, 8 ... capped; none before the first failure."""
        self.assertEqual([failure_delay(n, 16) for n in range(7)], [0, 1, 2, 4, 8, 16, 16])
        self.assertEqual(failure_delay(10**6, 5), 5)

    def test_domain_allowed(self) -> None:
        """The same domain (any case, trailing dot) or a subdomain of it."""
        self.assertTrue(domain_allowed("EXAMPLE.com.", "example.com"))
        self.assertTrue(domain_allowed("a.b.example.com", "example.com"))
        self.assertFalse(domain_allowed("example.com", "mail.example.com"))
        self.assertFalse(domain_allowed("badexample.com", "example.com"))
        self.assertFalse(domain_allowed("example.com", ""))

    def test_read_settings(self) -> None:
        """[core] keys, with defaults; an unknown method or a bad number is an error."""
        s = read_settings({}, supported=MECHANISMS, default_methods=MECHANISMS)
        self.assertEqual((s.methods, s.allow_cleartext, s.max_failures), (MECHANISMS, False, 3))
        s = read_settings(
            {"methods": "login,PLAIN,login", "max_delay": 0.5},
            supported=MECHANISMS,
            default_methods=MECHANISMS,
        )
        self.assertEqual((s.methods, s.max_delay), (("LOGIN", "PLAIN"), 0.5))
        for core in ({"methods": "PLAIN,NTLM"}, {"max_failures": "x"}, {"max_failures": -1}):
            with self.assertRaises(ValueError):
                read_settings(core, supported=MECHANISMS, default_methods=MECHANISMS)

    def test_shipped_ini_has_no_users(self) -> None:
        """The shipped auth_flat_file.ini enables nobody."""
        s = AuthSession(self, {"auth_flat_file.ini": "[core]\n"})
        self.assertEqual(len(s.plugin.portal.checkers), 2)
        s.send(f"AUTH PLAIN {plain('matt', 'test')}\r\n")
        self.assertEqual(reply_codes(s.wait(1)), [535])
        self.assertIn("matt=test", USERS_INI)  # the test users come from the tests only


class CredentialLeakTests(SynchronousTestCase):
    def test_prevent_credential_leaks_sees_the_password(self) -> None:
        """auth_user and auth_passwd let prevent_credential_leaks refuse a message that
        gives them away."""
        s = AuthSession(self, names=["auth/flat_file", "prevent_credential_leaks"])
        s.send(f"AUTH PLAIN {plain('user@example.com', 'secret')}\r\n")
        s.send("MAIL FROM:<user@example.com>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\n")
        out = s.send("Subject: hi\r\n\r\nmy login is user and secret\r\n.\r\n")
        self.assertIn("550 5.7.1 Credential leak detected", out)
