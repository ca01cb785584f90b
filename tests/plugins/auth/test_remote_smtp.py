"""The client auth_proxy and auth_bridge log in to remote servers with: host lists, reply
parsing, and the dialogue, on a StringTransport."""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.plugins.auth.remote_smtp import (
    Endpoint,
    RemoteAuthenticator,
    RemoteError,
    RemoteReply,
    ReplyParser,
    SMTPLineClient,
    TLSPolicy,
    converse,
    parse_endpoint,
    parse_endpoints,
)

EHLO_PLAIN = b"250-remote.test hello\r\n250-PIPELINING\r\n250 AUTH LOGIN PLAIN\r\n"
EHLO_LOGIN = b"250-remote.test hello\r\n250 AUTH LOGIN\r\n"


class EndpointTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """host, host:port, [v6]:port, [v6] and a bare v6 address; 25 by default."""
        self.assertEqual(parse_endpoint("mx.test"), Endpoint("mx.test", 25))
        self.assertEqual(parse_endpoint(" mx.test:587 "), Endpoint("mx.test", 587))
        self.assertEqual(parse_endpoint("[2001:db8::1]:587"), Endpoint("2001:db8::1", 587))
        self.assertEqual(parse_endpoint("[2001:db8::1]"), Endpoint("2001:db8::1", 25))
        self.assertEqual(parse_endpoint("2001:db8::1"), Endpoint("2001:db8::1", 25))
        self.assertEqual(parse_endpoint("mx.test", 2525), Endpoint("mx.test", 2525))
        self.assertEqual(str(Endpoint("2001:db8::1", 25)), "[2001:db8::1]:25")

    def test_bad(self) -> None:
        """No host, a bad port or a broken bracket is an error; so is a host with a space
        or a ';' (a comment after the value, which Haraka's ini files do not have: it
        would be looked up in DNS with every message)."""
        for text in ("", ":25", "mx.test:x", "mx.test:0", "mx.test:70000", "[::1", "[::1]x"):
            self.assertRaises(ValueError, parse_endpoint, text)
        for text in ("127.0.0.1 ; the next hop", "mx test", "mx.test;", "[::1;]:25"):
            with self.assertRaisesRegex(ValueError, "bad host"):
                parse_endpoint(text)
        self.assertEqual(parse_endpoint("[fe80::1%eth0]:25"), Endpoint("fe80::1%eth0", 25))

    def test_list(self) -> None:
        """Hosts separated by spaces, commas or semicolons, in order."""
        self.assertEqual(
            parse_endpoints("a:587, b;c  d"),
            [Endpoint("a", 587), Endpoint("b"), Endpoint("c"), Endpoint("d")],
        )


class ReplyParserTests(SynchronousTestCase):
    def test_multi_line(self) -> None:
        """Continuation lines collect until the final line; EHLO keywords are read off."""
        p = ReplyParser()
        self.assertIsNone(p.feed(b"250-remote.test"))
        self.assertIsNone(p.feed(b"250-STARTTLS"))
        reply = p.feed(b"250 auth plain  LOGIN")
        self.assertEqual(reply, RemoteReply(250, ("remote.test", "STARTTLS", "auth plain  LOGIN")))
        assert reply is not None
        self.assertEqual(reply.keywords, {"STARTTLS": "", "AUTH": "plain  LOGIN"})
        self.assertEqual(p.feed(b"235"), RemoteReply(235, ("",)))

    def test_garbage(self) -> None:
        """A line that is not a reply, or a code that changes mid-reply, is an error."""
        self.assertRaises(RemoteError, ReplyParser().feed, b"hello")
        p = ReplyParser()
        p.feed(b"250-a")
        self.assertRaises(RemoteError, p.feed, b"251 b")

    @given(st.lists(st.binary(max_size=40), max_size=10))
    def test_any_lines(self, lines: list[bytes]) -> None:
        """Any lines give replies or RemoteError, nothing else."""
        p = ReplyParser()
        for line in lines:
            try:
                p.feed(line)
            except RemoteError:
                p = ReplyParser()


class Dialogue:
    """A client on a StringTransport running converse()."""

    def __init__(self, case: SynchronousTestCase, strip_domain: bool = False, **kw: Any) -> None:
        self.case = case
        self.client = SMTPLineClient()
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.result: Deferred[bool] = Deferred.fromCoroutine(
            converse(
                self.client,
                kw.get("user", b"user@example.com"),
                b"secret",
                helo="mx.test",
                tls=kw.get("tls", TLSPolicy(enabled=False)),
                host="remote.test",
                strip_domain=strip_domain,
            )
        )

    def server(self, data: bytes) -> bytes:
        """The server sends C{data}; what the client wrote back."""
        self.client.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out


def plain_token(user: bytes) -> bytes:
    return base64.b64encode(b"\x00" + user + b"\x00secret")


class ConverseTests(SynchronousTestCase):
    def test_plain_accepted(self) -> None:
        """Greeting, EHLO, AUTH PLAIN, 235: True, and QUIT."""
        d = Dialogue(self)
        self.assertEqual(d.server(b"220 remote.test ESMTP\r\n"), b"EHLO mx.test\r\n")
        self.assertEqual(
            d.server(EHLO_PLAIN), b"AUTH PLAIN " + plain_token(b"user@example.com") + b"\r\n"
        )
        self.assertEqual(d.server(b"235 2.7.0 ok\r\n"), b"QUIT\r\n")
        self.assertTrue(self.successResultOf(d.result))
        self.assertTrue(d.transport.disconnecting)

    def test_login(self) -> None:
        """Without PLAIN, LOGIN: username and password in answer to the two 334s."""
        d = Dialogue(self)
        d.server(b"220 hi\r\n")
        self.assertEqual(d.server(EHLO_LOGIN), b"AUTH LOGIN\r\n")
        self.assertEqual(
            d.server(b"334 VXNlcm5hbWU6\r\n"), base64.b64encode(b"user@example.com") + b"\r\n"
        )
        self.assertEqual(d.server(b"334 UGFzc3dvcmQ6\r\n"), base64.b64encode(b"secret") + b"\r\n")
        d.server(b"235 ok\r\n")
        self.assertTrue(self.successResultOf(d.result))

    def test_refused(self) -> None:
        """A 535 is a plain no."""
        d = Dialogue(self)
        d.server(b"220 hi\r\n")
        d.server(EHLO_PLAIN)
        self.assertEqual(d.server(b"535 5.7.8 no\r\n"), b"QUIT\r\n")
        self.assertFalse(self.successResultOf(d.result))

    def test_strip_domain(self) -> None:
        """With strip_domain, a refused user@domain is tried again as user (Haraka)."""
        d = Dialogue(self, strip_domain=True)
        d.server(b"220 hi\r\n")
        d.server(EHLO_PLAIN)
        self.assertEqual(d.server(b"535 no\r\n"), b"AUTH PLAIN " + plain_token(b"user") + b"\r\n")
        d.server(b"235 ok\r\n")
        self.assertTrue(self.successResultOf(d.result))

    def test_no_auth_offered(self) -> None:
        """A server that offers no PLAIN or LOGIN gives no answer: RemoteError."""
        d = Dialogue(self)
        d.server(b"220 hi\r\n")
        d.server(b"250-remote.test\r\n250 AUTH CRAM-MD5\r\n")
        self.failureResultOf(d.result, RemoteError)

    def test_temporary_failure(self) -> None:
        """A 454 to AUTH is no answer (try another host), not a refusal."""
        d = Dialogue(self)
        d.server(b"220 hi\r\n")
        d.server(EHLO_PLAIN)
        d.server(b"454 4.7.0 try later\r\n")
        self.failureResultOf(d.result, RemoteError)

    def test_bad_greeting_and_ehlo(self) -> None:
        """A 554 greeting, or EHLO refused: RemoteError."""
        d = Dialogue(self)
        d.server(b"554 go away\r\n")
        self.failureResultOf(d.result, RemoteError)
        d = Dialogue(self)
        d.server(b"220 hi\r\n")
        d.server(b"500 what\r\n")
        self.failureResultOf(d.result, RemoteError)

    def test_connection_lost(self) -> None:
        """The server hanging up mid-dialogue: RemoteError."""
        d = Dialogue(self)
        d.server(b"220 hi\r\n")
        d.transport.loseConnection()
        d.client.connectionLost()
        self.failureResultOf(d.result, RemoteError)

    def test_nonsense(self) -> None:
        """A line that is not SMTP aborts: RemoteError."""
        d = Dialogue(self)
        d.server(b"HTTP/1.1 400 Bad Request\r\n")
        d.client.connectionLost()
        self.failureResultOf(d.result, RemoteError)

    def test_tls_verify_needs_starttls(self) -> None:
        """tls_verify with a server that offers no STARTTLS: RemoteError, no credentials sent."""
        d = Dialogue(self, tls=TLSPolicy(enabled=True, verify=True))
        d.server(b"220 hi\r\n")
        self.assertEqual(d.server(EHLO_PLAIN), b"")
        self.failureResultOf(d.result, RemoteError)

    def test_protocol_log_hides_credentials(self) -> None:
        """The protocol log shows AUTH PLAIN ****, never the token."""
        lines: list[str] = []
        client = SMTPLineClient(lines.append)
        client.makeConnection(StringTransport())
        Deferred.fromCoroutine(
            converse(client, b"u", b"pw", helo="h", tls=TLSPolicy(enabled=False), host="r")
        )
        client.dataReceived(b"220 hi\r\n" + EHLO_PLAIN + b"235 ok\r\n")
        self.assertIn("C: AUTH PLAIN ****", lines)
        self.assertNotIn(plain_token(b"u").decode(), "\n".join(lines))


class AuthenticatorTests(SynchronousTestCase):
    def test_timeout(self) -> None:
        """A host that never answers is a RemoteError after the timeout."""
        reactor = MemoryReactorClock()
        auth = RemoteAuthenticator(reactor, helo="mx.test", timeout=5)
        d = auth.check(Endpoint("192.0.2.1", 25), b"u", b"p")
        self.assertNoResult(d)
        reactor.advance(5)
        failure = self.failureResultOf(d, RemoteError)
        self.assertIn("5s", failure.getErrorMessage())
