"""What plugins ask of the session (respond, read_line, restart) and hostile-input guards."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.codes import CONT, OK
from haraka_tw.smtp.connection import State
from tests.smtp.test_protocol import ENVELOPE, storing
from tests.support import Session, plugin_with, reply_codes


def exchange_plugin(seen: list[bytes]) -> tuple[str, object]:
    """XAUTH: a two-step exchange like AUTH LOGIN, answered with read_line()."""

    async def command(c: Any, verb: str, arg: str) -> Any:
        if verb != "XAUTH":
            return CONT
        c.respond(334, "VXNlcm5hbWU6")
        seen.append(await c.read_line())
        c.respond(334, "UGFzc3dvcmQ6")
        seen.append(await c.read_line())
        c.respond(235, "ok", "2.7.0")
        return OK

    return ("xauth", plugin_with({"unrecognized_command": command}))


class SessionControlTests(SynchronousTestCase):
    def test_multi_step_exchange(self) -> None:
        """respond() is written at once; read_line() takes raw lines, not commands."""
        seen: list[bytes] = []
        s = Session([exchange_plugin(seen)])
        s.send(b"EHLO x\r\n")
        self.assertEqual(s.send(b"XAUTH\r\n"), "334 VXNlcm5hbWU6\r\n")
        s.clock.advance(0)
        self.assertEqual(s.send(b"QUIT\r\n"), "334 UGFzc3dvcmQ6\r\n")  # a line, not QUIT
        s.clock.advance(0)
        self.assertEqual(s.send(b"c2VjcmV0\r\nNOOP\r\n"), "235 2.7.0 ok\r\n250 2.0.0 OK\r\n")
        self.assertEqual(seen, [b"QUIT", b"c2VjcmV0"])
        self.assertFalse(s.closed)

    def test_exchange_pipelined_in_one_write(self) -> None:
        """A client that sends the whole exchange at once is answered in order."""
        seen: list[bytes] = []
        s = Session([exchange_plugin(seen)])
        s.send(b"EHLO x\r\n")
        out = s.send(b"XAUTH\r\nuser\r\npass\r\nNOOP\r\n")
        s.clock.advance(0)
        out += s.read()
        self.assertEqual(reply_codes(out), [334, 334, 235, 250])
        self.assertEqual(seen, [b"user", b"pass"])

    def test_restart_for_xclient(self) -> None:
        """restart(): new uuid, relaying off, new address, connect hooks again, new banner."""
        calls: list[str] = []

        def xclient(c: Any, verb: str, arg: str) -> Any:
            if verb != "XCLIENT":
                return CONT
            return c.restart(arg.split("=")[1], 4242, None).addCallback(lambda _: OK)

        s = Session(
            [
                (
                    "x",
                    plugin_with(
                        {
                            "unrecognized_command": xclient,
                            "lookup_rdns": lambda c: (
                                OK,
                                "named.example",
                            ),  # no real PTR lookups here
                            "connect": lambda c: calls.append(c.remote.ip),
                        }
                    ),
                )
            ]
        )
        first = s.connection.uuid
        s.connection.relaying = True
        s.send(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        out = s.send(b"XCLIENT ADDR=198.51.100.7\r\n")
        self.assertTrue(out.startswith("220 mx.test ESMTP"), out)
        conn = s.connection
        self.assertNotEqual(conn.uuid, first)
        self.assertEqual((conn.remote.ip, conn.remote.port), ("198.51.100.7", 4242))
        self.assertFalse(conn.relaying)
        self.assertIsNone(conn.transaction)
        self.assertIsNone(conn.hello.host)
        self.assertEqual(calls, ["192.0.2.10", "198.51.100.7"])


class HostileInputTests(SynchronousTestCase):
    def test_non_ascii_digits_in_size(self) -> None:
        """SIZE=² (a Unicode digit) is a 501, not an exception."""
        s = Session()
        s.send(b"EHLO x\r\n")
        self.assertIn("501", s.send("MAIL FROM:<a@b.c> SIZE=\u00b2 SMTPUTF8\r\n".encode()))
        self.assertFalse(s.closed)

    def test_refused_data_body_never_runs(self) -> None:
        """A body pipelined behind a refused DATA is swallowed, not run as commands."""
        stored: list[bytes] = []
        s = Session([storing(stored)])
        s.send(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        out = s.send(b"DATA\r\nRSET\r\nMAIL FROM:<evil@x>\r\n.\r\nNOOP\r\n")
        self.assertEqual(reply_codes(out), [554, 250])
        self.assertEqual(s.connection.tran_count, 1)

    def test_client_not_reading_stops_us_reading(self) -> None:
        """When the transport's buffer fills we stop parsing (and reading) until it drains."""
        s = Session()
        s.proto.pauseProducing()  # what the transport does when the client does not read
        self.assertEqual(s.send(b"NOOP\r\n" * 100), "")
        self.assertEqual(s.transport.producerState, "paused")
        s.proto.resumeProducing()
        self.assertEqual(reply_codes(s.read()), [250] * 100)
        self.assertEqual(s.transport.producerState, "producing")

    def test_closing_aborts_a_client_that_never_reads(self) -> None:
        """After QUIT the socket is aborted if the client has not gone within 10 s."""
        s = Session()
        s.send(b"QUIT\r\n")
        aborted: list[bool] = []
        s.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        s.clock.advance(10.1)
        self.assertEqual(aborted, [True])

    def test_no_reply_after_close(self) -> None:
        """Nothing is written after the session decided to close."""
        s = Session()
        out = s.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(reply_codes(out), [221])

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.binary(max_size=200)
            | st.sampled_from(
                [
                    b"EHLO x\r\n",
                    b"MAIL FROM:<a@b.c>\r\n",
                    b"RCPT TO:<d@e.f>\r\n",
                    b"DATA\r\n",
                    b"BDAT 5\r\n",
                    b"BDAT 3 LAST\r\n",
                    b".\r\n",
                    b"RSET\r\n",
                    b"\r\n.\r\n",
                    b"MAIL FROM:<a@b.c> SIZE=\xc2\xb2\r\n",
                    b"\r\n\r\n\x00\r\nQUIT\n",
                ]
            ),
            max_size=25,
        )
    )
    def test_any_input_never_raises(self, chunks: list[bytes]) -> None:
        """Whatever a client sends, in whatever reads, no exception escapes the protocol."""
        s = Session([storing([])])
        for chunk in chunks:
            s.proto.dataReceived(chunk)  # raises if anything escapes
        s.clock.advance(400)
        self.assertFalse(any("internal error" in m for m in s.log.messages()))
        self.assertIn(s.connection.state, set(State))


class PlaintextPortTests(SynchronousTestCase):
    def test_tls_client_hello_on_plaintext_port(self) -> None:
        """A TLS ClientHello on a plaintext port gets a clear 554 and a close."""
        s = Session()
        out = s.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.assertEqual(out, "554 TLS on a plaintext port; use STARTTLS or the SMTPS port\r\n")
        self.assertTrue(s.closed)

    def test_auth_results_header(self) -> None:
        """Plugins' auth_results() end up in one Authentication-Results header on top."""
        stored: list[bytes] = []

        def mail(c: Any, sender: Any, params: Any) -> None:
            c.auth_results("auth=pass smtp.auth=alice")
            c.transaction.auth_results("spf=pass smtp.mailfrom=b.c")

        s = Session([("a", plugin_with({"mail": mail})), storing(stored)])
        s.send(ENVELOPE + b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        self.assertTrue(
            stored[0].startswith(
                b"Authentication-Results: mx.test; auth=pass smtp.auth=alice;"
                b" spf=pass smtp.mailfrom=b.c\r\n"
            ),
            stored[0][:200],
        )


class ConnectionLimitTests(SynchronousTestCase):
    def test_total_connection_limit(self) -> None:
        """Past smtp.ini max_connections a new client gets 421 and is closed at once."""
        from haraka_tw.smtp.settings import SessionSettings

        first = Session(settings=SessionSettings(me="mx.test", max_connections=1))
        other = first.factory.buildProtocol(first.transport.getPeer())
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        other.makeConnection(transport)
        self.assertEqual(transport.value(), b"421 Too many connections, try again later\r\n")
        self.assertTrue(transport.disconnecting)


class AuthStateTests(SynchronousTestCase):
    def test_cancelled_read_line_gives_lines_back_to_commands(self) -> None:
        """A read_line() cancelled by a hook timeout leaves the next line to be a command."""

        def waiter(c: Any, verb: str, arg: str) -> Any:
            return c.read_line() if verb == "XWAIT" else CONT

        s = Session([("w", plugin_with({"unrecognized_command": waiter}))], plugin_timeout=2)
        s.send(b"EHLO x\r\n")
        self.assertEqual(s.send(b"XWAIT\r\n"), "")
        s.clock.advance(2.1)
        self.assertIn("450", s.read())
        self.assertEqual(s.send(b"NOOP\r\n"), "250 2.0.0 OK\r\n")

    def test_auth_forgotten_on_restart(self) -> None:
        """XCLIENT's restart drops AUTH notes and the relaying they gave."""
        s = Session([("r", plugin_with({"lookup_rdns": lambda c: OK}))])
        conn = s.connection
        conn.notes["auth_user"] = "alice"
        conn.relaying = True
        conn.restart("198.51.100.9", None, None)
        self.assertNotIn("auth_user", conn.notes)
        self.assertFalse(conn.relaying)

    def test_auth_argument_not_logged(self) -> None:
        """The PROTOCOL log shows AUTH's mechanism, never its initial response."""
        s = Session()
        s.send(b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
        lines = [m for m in s.log.messages() if m.startswith("C: AUTH")]
        self.assertEqual(lines, ["C: AUTH PLAIN [redacted]"])

    def test_credentials_after_an_abandoned_auth_are_not_logged(self) -> None:
        """An AUTH line keeps a known mechanism name only, however its words are split
        and whatever comes before the verb, and nothing in place of a name it does not
        know; one-word lines that are not commands and follow an AUTH (answers to an
        exchange the server did not run: no AUTH plugin here, or one that gave up) are not
        shown; commands are, the core's and the plugins' (STARTTLS)."""
        s = Session()
        s.send(b"EHLO x\r\nAUTH\tPLAIN\tAGFsaWNlAHNlY3JldA==\r\n")
        s.send(b"AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nNOOP\r\nWHATEVER\r\n")
        s.send(b"AUTH AGFsaWNlAHNlY3JldA==\r\nSTARTTLS\r\n")  # (no mechanism; STARTTLS)
        s.send(b"\x00AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
        lines = [m for m in s.log.messages() if m.startswith("C: ")]
        self.assertEqual(
            lines,
            [
                "C: EHLO x",
                "C: AUTH PLAIN [redacted]",
                "C: AUTH LOGIN",
                "C: [redacted: a line after AUTH]",
                "C: [redacted: a line after AUTH]",
                "C: NOOP",
                "C: WHATEVER",
                "C: AUTH [redacted]",
                "C: STARTTLS",
                "C: AUTH PLAIN [redacted]",
            ],
        )
        for secret in ("c2VjcmV0", "AGFsaWNlAHNlY3JldA"):
            self.assertNotIn(secret, " ".join(s.log.messages()))


class IdleMemoryTests(SynchronousTestCase):
    def test_idle_session_stays_under_the_shared_keys_limit(self) -> None:
        """A greeted session sets fewer than 30 attributes: CPython (3.11) gives instances
        with more a whole dict of their own (about 1.3 KB more per idle connection)."""
        s = Session()
        self.assertLess(len(vars(s.proto)), 30)


class FailingStepTests(SynchronousTestCase):
    """A step that raises after a synchronous hook chain is answered as after an
    asynchronous one: 451, and the session goes on; nothing escapes to Twisted."""

    def test_end_of_data_step_raising_answers_451(self) -> None:
        """queue answers synchronously, then the step after it raises: 451, not a dropped
        connection, and the next command is still answered."""
        stored: list[bytes] = []
        s = Session([storing(stored)])

        def broken(*args: Any) -> Any:
            raise RuntimeError("bug after the queue hook")

        s.proto._queue_answered = broken
        s.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(reply_codes(s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")), [451])
        self.assertEqual(reply_codes(s.send(b"NOOP\r\n")), [250])
        self.assertFalse(s.closed)
        self.assertTrue(any("bug after the queue hook" in m for m in s.log.messages()))

    def test_transaction_that_cannot_close_keeps_the_250(self) -> None:
        """Releasing the transaction fails (a spool file that cannot be removed): the
        message was queued, so the client gets its 250 and only the log hears of it."""
        stored: list[bytes] = []
        s = Session([storing(stored)])
        s.send(ENVELOPE + b"DATA\r\n")
        txn = s.connection.transaction

        def close() -> None:
            raise OSError(28, "No space left on device")

        txn.close = close
        self.assertEqual(reply_codes(s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")), [250])
        self.assertEqual(len(stored), 1)
        self.assertEqual(reply_codes(s.send(b"QUIT\r\n")), [221])
        self.assertIn(
            "closing the transaction failed: OSError(28, 'No space left on device')",
            s.log.messages(),
        )

    def test_connection_lost_with_a_failing_close_still_runs_disconnect(self) -> None:
        """The client goes mid-transaction and the transaction cannot close: the disconnect
        hooks still run."""
        seen: list[str] = []
        s = Session(
            [
                storing([]),
                ("watch", plugin_with({"disconnect": lambda c: seen.append("disconnect")})),
            ]
        )
        s.send(ENVELOPE)

        def close() -> None:
            raise OSError(5, "I/O error")

        s.connection.transaction.close = close
        s.lose()
        self.assertEqual(seen, ["disconnect"])


class SessionLifetimeTests(SynchronousTestCase):
    """An ended session is freed by reference counting: no cycle is left to the collector."""

    def setUp(self) -> None:
        gc.disable()
        self.addCleanup(gc.enable)

    def assert_freed_after(self, *chunks: bytes) -> None:
        """Open a message, send C{chunks}, lose the client: the session and the intake are
        gone as soon as the test lets go of them."""
        s = Session([storing([])])
        s.send(ENVELOPE + b"DATA\r\n")
        intake = weakref.ref(s.proto._intake)
        for chunk in chunks:
            s.send(chunk)
        s.lose()
        protocol = weakref.ref(s.proto)
        del s
        self.assertIsNone(intake())
        self.assertIsNone(protocol())

    def test_ended_session_and_its_message_are_freed(self) -> None:
        """After QUIT and the disconnect hooks, nothing but references keeps them alive."""
        self.assert_freed_after(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")

    def test_message_abandoned_mid_data_is_freed(self) -> None:
        """A client gone in the middle of DATA leaves no cycle either."""
        self.assert_freed_after(b"Subject: x\r\n\r\npart of a body\r\n")

    def test_kept_connection_answers_as_a_closed_one(self) -> None:
        """A connection a plugin kept past the end: actions do nothing, or fail."""
        s = Session()
        s.send(b"QUIT\r\n")
        s.lose()
        conn, transport = s.connection, s.transport
        conn.respond(250, "nobody hears this")
        conn.disconnect()
        self.assertEqual(transport.value(), b"")
        self.failureResultOf(conn.read_line(), ConnectionError)
        self.assertRaises(RuntimeError, conn.start_tls, None)
        self.assertRaises(RuntimeError, conn.restart)
