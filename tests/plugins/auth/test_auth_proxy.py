"""auth/auth_proxy and auth/auth_bridge with a stand-in for the remote servers: routing by
domain, trying the next host, 454 when none answers, and what the bridge keeps."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.hooks.loader import PluginLoadError
from haraka_tw.plugins.auth.auth_proxy import read_domains
from haraka_tw.plugins.auth.remote_smtp import Endpoint, RemoteError
from tests.plugins.auth.support import AuthSession, b64, plain
from tests.plugins.loading import load
from tests.support import reply_codes

PROXY_INI = """
[domains]
example.com = mx1.example.com:587, mx2.example.com
Example.NET = [2001:db8::25]:2525
"""


class FakeRemote:
    """Answers check(endpoint, user, password) from a table; records the calls."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, bytes, bytes]] = []

    def check(self, endpoint: Endpoint, username: bytes, password: bytes) -> Deferred[bool]:
        self.calls.append((str(endpoint), username, password))
        answer = self.answers.get(str(endpoint), RemoteError("connection refused"))
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(bool(answer) and password == b"secret")


def proxied(case: SynchronousTestCase, answers: dict[str, Any], core: str = "") -> Any:
    """An AuthSession on auth_proxy whose remote checks go to a FakeRemote."""
    files = {"auth_proxy.ini": f"[core]\n{core}\n{PROXY_INI}"}
    s = AuthSession(case, files, names=["auth/auth_proxy"], ehlo=None)
    remote = FakeRemote(answers)
    s.plugin.authenticator = lambda ini: remote
    s.plugin.load()
    s.remote = remote
    s.ehlo_reply = s.send("EHLO client.test\r\n")
    return s


class AuthProxyTests(SynchronousTestCase):
    def test_advertises_plain_and_login(self) -> None:
        """auth_proxy offers PLAIN and LOGIN only (it needs the password to pass on)."""
        s = proxied(self, {})
        self.assertRegex(s.ehlo_reply, r"250[ -]AUTH PLAIN LOGIN\r\n")
        self.assertEqual(s.codes("AUTH CRAM-MD5\r\n"), [504])

    def test_cram_md5_cannot_be_configured(self) -> None:
        """methods=CRAM-MD5 stops start-up."""
        with self.assertRaises(PluginLoadError):
            load(self, ["auth/auth_proxy"], {"auth_proxy.ini": "[core]\nmethods=CRAM-MD5\n"})

    def test_accepted_by_first_host(self) -> None:
        """The domain's first host accepting: 235, and the second is not asked."""
        s = proxied(self, {"mx1.example.com:587": True, "mx2.example.com:25": True})
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('user@example.com', 'secret')}\r\n"), [235])
        self.assertEqual(s.remote.calls, [("mx1.example.com:587", b"user@example.com", b"secret")])
        self.assertEqual(s.connection.notes["auth_user"], "user@example.com")

    def test_next_host_when_first_gives_no_answer(self) -> None:
        """A host that gives no answer passes the turn to the next."""
        s = proxied(self, {"mx2.example.com:25": True})
        s.send("AUTH LOGIN\r\n")
        s.send(b64("user@example.com") + "\r\n")
        self.assertEqual(s.codes(b64("secret") + "\r\n"), [235])
        self.assertEqual(
            [c[0] for c in s.remote.calls], ["mx1.example.com:587", "mx2.example.com:25"]
        )

    def test_refused_is_final(self) -> None:
        """A host that refuses is believed: 535, the next host is not asked."""
        s = proxied(self, {"mx1.example.com:587": False, "mx2.example.com:25": True})
        s.send(f"AUTH PLAIN {plain('user@example.com', 'secret')}\r\n")
        self.assertEqual(reply_codes(s.wait(1)), [535])
        self.assertEqual(len(s.remote.calls), 1)

    def test_no_host_answers(self) -> None:
        """When no host answers: 454 4.7.0 at once, not counted as a failure."""
        s = proxied(self, {})
        self.assertEqual(
            s.send(f"AUTH PLAIN {plain('user@example.com', 'secret')}\r\n"),
            "454 4.7.0 Temporary authentication failure\r\n",
        )
        self.assertNotIn("auth_fails", s.connection.notes)
        self.assertTrue(s.connection.results.has("auth", "err", "auth/auth_proxy/PLAIN"))

    def test_unknown_domain_and_bare_user(self) -> None:
        """A user whose domain is not listed, or with no domain, fails (535)."""
        s = proxied(self, {"mx1.example.com:587": True}, "max_failures=0")
        for user in ("user@other.test", "user"):
            s.send(f"AUTH PLAIN {plain(user, 'secret')}\r\n")
            self.assertEqual(reply_codes(s.wait(4)), [535])
        self.assertEqual(s.remote.calls, [])

    def test_domain_case(self) -> None:
        """Domains match without regard to case."""
        s = proxied(self, {"[2001:db8::25]:2525": True})
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('u@EXAMPLE.net', 'secret')}\r\n"), [235])

    def test_constrain_sender_off_by_default(self) -> None:
        """As in Haraka, auth_proxy does not constrain the sender unless told to."""
        s = proxied(self, {"mx1.example.com:587": True})
        s.send(f"AUTH PLAIN {plain('user@example.com', 'secret')}\r\n")
        self.assertEqual(s.codes("MAIL FROM:<a@elsewhere.test>\r\n"), [250])
        s = proxied(self, {"mx1.example.com:587": True}, "constrain_sender=true")
        s.send(f"AUTH PLAIN {plain('user@example.com', 'secret')}\r\n")
        self.assertEqual(s.codes("MAIL FROM:<a@elsewhere.test>\r\n"), [550])

    def test_read_domains(self) -> None:
        """[domains] parses into lower-case domains and endpoints; a bad entry is an error."""
        self.assertEqual(
            read_domains({"A.test.": "h1 h2:26"}), {"a.test": [Endpoint("h1"), Endpoint("h2", 26)]}
        )
        for bad in ({"a.test": True}, {"a.test": "h:x"}):
            self.assertRaises(ValueError, read_domains, bad)

    def test_bad_timeout(self) -> None:
        """A timeout that is not a positive number stops start-up."""
        with self.assertRaises(PluginLoadError):
            load(self, ["auth/auth_proxy"], {"auth_proxy.ini": "[core]\ntimeout=soon\n"})


def bridged(case: SynchronousTestCase, answer: Any, smtp_bridge: str | None = None) -> Any:
    files = {
        "auth_bridge.ini": "[core]\n",
        "smtp_bridge.ini": smtp_bridge or "[main]\nhost=relay.example.com\nport=587\n",
    }
    s = AuthSession(case, files, names=["auth/auth_bridge"], ehlo=None)
    remote = FakeRemote({"relay.example.com:587": answer})
    s.plugin.authenticator = lambda ini: remote
    s.plugin.load()
    s.remote = remote
    s.send("EHLO client.test\r\n")
    return s


class AuthBridgeTests(SynchronousTestCase):
    def test_keeps_credentials(self) -> None:
        """On success the bridge host and the credentials are kept in notes.auth_bridge."""
        s = bridged(self, True)
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('anyone', 'secret')}\r\n"), [235])
        self.assertEqual(
            s.connection.notes["auth_bridge"],
            {
                "host": "relay.example.com",
                "port": 587,
                "user": "anyone",
                "password": "secret",
                "method": "PLAIN",
            },
        )
        self.assertEqual(s.remote.calls, [("relay.example.com:587", b"anyone", b"secret")])

    def test_refused(self) -> None:
        """Refused by the bridge host: 535 and nothing kept."""
        s = bridged(self, False)
        s.send(f"AUTH PLAIN {plain('anyone', 'secret')}\r\n")
        self.assertEqual(reply_codes(s.wait(1)), [535])
        self.assertNotIn("auth_bridge", s.connection.notes)

    def test_host_with_port(self) -> None:
        """host=name:port works without port=."""
        s = bridged(self, True, "[main]\nhost=relay.example.com:587\n")
        self.assertEqual(s.codes(f"AUTH PLAIN {plain('anyone', 'secret')}\r\n"), [235])

    def test_host_required(self) -> None:
        """Without smtp_bridge.ini host the plugin does not start."""
        with self.assertRaises(PluginLoadError) as caught:
            load(self, ["auth/auth_bridge"], {"smtp_bridge.ini": "[main]\n"})
        self.assertIn("host", str(caught.exception))
