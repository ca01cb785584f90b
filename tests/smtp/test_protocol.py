"""Session transcripts on StringTransport: what the client sends, what comes back.

Each stock twisted.mail ESMTP defect the protocol replaces is pinned here too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw import __version__
from haraka_tw.codes import (
    CONT,
    DENY,
    DENYDISCONNECT,
    DENYSOFT,
    DENYSOFTDISCONNECT,
    HOOK_NEXT,
    OK,
    Code,
)
from haraka_tw.logging import Level
from haraka_tw.smtp.connection import State
from haraka_tw.smtp.settings import SessionSettings
from tests.support import Session, plugin_with, reply_codes

ACCEPT_ALL = ("accept", plugin_with({"rcpt": lambda c, r, p: OK, "queue": lambda c: OK}))
ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.com>\r\n"


def storing(stored: list[bytes]) -> tuple[str, object]:
    """A plugin that accepts every recipient and keeps each queued message's bytes."""

    def queue(c: Any) -> Any:
        stored.append(c.transaction.message_stream.get_bytes())
        return OK

    return ("store", plugin_with({"rcpt": lambda c, r, p: OK, "queue": queue}))


def session(*plugins: tuple[str, object], **kw: Any) -> Session:
    return Session(plugins or (ACCEPT_ALL,), **kw)


class ReferenceReplyTests(SynchronousTestCase):
    """The "Replies to match" table of the reference, section 2."""

    def test_mail_before_helo(self) -> None:
        """MAIL before HELO/EHLO: 503 Use EHLO/HELO before MAIL."""
        s = session()
        self.assertIn("503 Use EHLO/HELO before MAIL", s.send("MAIL FROM:<a@b.c>\r\n"))

    def test_rcpt_before_mail(self) -> None:
        """RCPT before MAIL: 503 Use MAIL before RCPT."""
        s = session()
        self.assertIn("503 5.5.1 Use MAIL before RCPT", s.send("EHLO x\r\nRCPT TO:<a@b.c>\r\n"))

    def test_data_errors(self) -> None:
        """DATA with an argument 501; without MAIL 503; without RCPT 503 (554 if pipelined)."""
        s = session()
        s.send("EHLO x\r\n")
        self.assertIn("501 5.5.4 Syntax error", s.send("DATA now\r\n"))
        self.assertIn("503 5.5.1 MAIL required first", s.send("DATA\r\n"))
        s.send("MAIL FROM:<a@b.c>\r\n")
        self.assertIn("503 5.5.1 RCPT required first", s.send("DATA\r\n"))
        self.assertIn("554 5.5.1 No valid recipients", s.send("DATA\r\nSubject: x\r\n"))

    def test_quit_rset_with_arguments(self) -> None:
        """QUIT or RSET with arguments: 501."""
        s = session()
        self.assertEqual(s.codes("RSET x\r\nQUIT now\r\n"), [501, 501])
        self.assertFalse(s.closed)

    def test_helo_without_argument(self) -> None:
        """HELO/EHLO without a domain: 501 ... requires domain/address."""
        s = session()
        self.assertIn("501 HELO requires domain/address", s.send("HELO\r\n"))
        self.assertIn("501 EHLO requires domain/address", s.send("EHLO \r\n"))

    def test_params_after_helo(self) -> None:
        """MAIL parameters after plain HELO: 555 Invalid command parameters."""
        s = session()
        s.send("HELO x\r\n")
        self.assertIn("555 Invalid command parameters", s.send("MAIL FROM:<a@b.c> SIZE=10\r\n"))

    def test_bad_parameters_are_5_5_4_not_address_errors(self) -> None:
        """A malformed, repeated, valueless (SIZE, BODY, NOTIFY) or valued (SMTPUTF8)
        parameter: 501 5.5.4, naming the parameter; the address itself was fine."""
        s = session()
        s.send("EHLO x\r\n")
        for command, text in (
            ("MAIL FROM:<a@b.c> BODY=7BIT BODY=8BITMIME", "Duplicate parameter BODY"),
            ("MAIL FROM:<a@b.c> SIZE", "SIZE needs a value"),
            ("MAIL FROM:<a@b.c> BODY", "BODY needs a value"),
            ("MAIL FROM:<a@b.c> SMTPUTF8=yes", "SMTPUTF8 takes no value"),
            ("MAIL FROM:<a@b.c> =x", "Invalid parameter"),
        ):
            out = s.send(f"{command}\r\n")
            self.assertTrue(out.startswith("501 5.5.4 "), (command, out))
            self.assertIn(text, out)
        s.send("MAIL FROM:<a@b.c>\r\n")
        for command, text in (
            ("RCPT TO:<d@e.f> NOTIFY", "NOTIFY needs a value"),
            ("RCPT TO:<d@e.f> NOTIFY=NEVER NOTIFY=NEVER", "Duplicate parameter NOTIFY"),
        ):
            out = s.send(f"{command}\r\n")
            self.assertTrue(out.startswith("501 5.5.4 "), (command, out))
            self.assertIn(text, out)
        self.assertIn("250 2.1.0", s.send("MAIL FROM:<a@b.c> SIZE=10 SMTPUTF8\r\n"))

    def test_bare_postmaster_needs_no_plugin_but_a_plugin_may_refuse_it(self) -> None:
        """With every rcpt plugin answering CONT, RCPT TO:<postmaster> is accepted (RFC 5321
        4.5.1); a plugin's DENY still refuses it."""
        s = Session([("cont", plugin_with({"rcpt": lambda c, r, p: None}))])
        s.send("EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        self.assertIn("250 2.1.5", s.send("RCPT TO:<postMaster>\r\n"))
        self.assertIn("550 5.7.1", s.send("RCPT TO:<someone@elsewhere.test>\r\n"))
        s = Session([("deny", plugin_with({"rcpt": lambda c, r, p: DENY}))])
        s.send("EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        self.assertIn("550 5.7.1", s.send("RCPT TO:<postmaster>\r\n"))

    def test_size_over_limit(self) -> None:
        """MAIL SIZE= over max.bytes: 552 Message too big! (RFC 1870)"""
        s = session(settings=SessionSettings(me="mx.test", max_bytes=1000))
        s.send("EHLO x\r\n")
        self.assertIn("552 5.3.4 Message too big!", s.send("MAIL FROM:<a@b.c> SIZE=1001\r\n"))
        self.assertIn("250 2.1.0", s.send("MAIL FROM:<a@b.c> SIZE=1000\r\n"))

    def test_bad_addresses(self) -> None:
        """Unparseable addresses: 501 Invalid MAIL FROM / RCPT TO address."""
        s = session()
        s.send("EHLO x\r\n")
        self.assertIn("501 5.1.7 Invalid MAIL FROM address", s.send("MAIL FROM:<a b@c>\r\n"))
        s.send("MAIL FROM:<a@b.c>\r\n")
        self.assertIn("501 5.1.3 Invalid RCPT TO address", s.send("RCPT TO:unknown\r\n"))

    def test_rcpt_not_local(self) -> None:
        """RCPT that no plugin accepts, from a client that does not relay: 550."""
        s = Session()
        out = s.send(ENVELOPE)
        self.assertIn("550 5.7.1 I cannot deliver mail for <b@example.com>", out)
        self.assertEqual(s.connection.rcpt_count.reject, 1)

    def test_rcpt_cont_with_relaying(self) -> None:
        """RCPT that no plugin accepts, from a relaying client: accepted (rcpt_ok runs)."""
        seen: list[Any] = []
        s = Session([("ok", plugin_with({"rcpt_ok": lambda c, r: seen.append(r.address)}))])
        s.connection.relaying = True
        self.assertIn("250 2.1.5 recipient <b@example.com> OK", s.send(ENVELOPE))
        self.assertEqual(seen, ["b@example.com"])

    def test_helo_greeting_without_enhanced_codes(self) -> None:
        """A HELO client gets no enhanced status codes (RFC 2034); an EHLO client does."""
        s = session()
        self.assertRegex(s.send("HELO x\r\n"), r"^250 mx.test Hello")
        self.assertRegex(s.send("MAIL FROM:<a@b.c>\r\n"), r"^250 sender <a@b.c> OK")
        s.send("EHLO x\r\n")
        self.assertRegex(s.send("MAIL FROM:<a@b.c>\r\n"), r"^250 2.1.0 sender <a@b.c> OK")


class HookReplyTests(SynchronousTestCase):
    """Hook results turn into the replies of the reference table."""

    def test_connect_deny_loops(self) -> None:
        """connect DENY: 554 banner, every command but QUIT gets it, QUIT closes."""
        s = Session([("c", plugin_with({"connect": lambda c: DENY}))], greet=False)
        self.assertTrue(s.banner.startswith("554 Your mail is not welcome here"), s.banner)
        self.assertEqual(s.codes("EHLO x\r\nMAIL FROM:<a@b.c>\r\n"), [554, 554])
        self.assertEqual(s.connection.state, State.LOOP)
        self.assertEqual(s.codes("QUIT\r\n"), [221])
        self.assertTrue(s.closed)

    def test_connect_denysoft_and_disconnects(self) -> None:
        """connect DENYSOFT: 421 loop; DENYDISCONNECT 554 and DENYSOFTDISCONNECT 421 close."""
        s = Session([("c", plugin_with({"connect": lambda c: DENYSOFT}))], greet=False)
        self.assertTrue(s.banner.startswith("421 Come back later"))
        self.assertFalse(s.closed)
        s = Session(
            [("c", plugin_with({"connect": lambda c: (DENYDISCONNECT, "bye")}))], greet=False
        )
        self.assertEqual(s.banner, "554 bye\r\n")
        self.assertTrue(s.closed)
        s = Session([("c", plugin_with({"connect": lambda c: DENYSOFTDISCONNECT}))], greet=False)
        self.assertTrue(s.banner.startswith("421 ") and s.closed)

    def test_lookup_rdns_names_client(self) -> None:
        """lookup_rdns OK with a hostname sets remote.host; connect sees it."""
        seen: list[str] = []
        s = Session(
            [
                (
                    "r",
                    plugin_with(
                        {
                            "lookup_rdns": lambda c: (OK, "named.example"),
                            "connect": lambda c: seen.append(c.remote.host),
                        }
                    ),
                )
            ]
        )
        self.assertEqual(seen, ["named.example"])
        self.assertIn("named.example [192.0.2.10]", s.send("EHLO x\r\n"))

    def test_core_rdns_from_hosts(self) -> None:
        """Without a lookup_rdns plugin the core names the client from the hosts table."""
        s = session()
        self.assertEqual(s.connection.remote.host, "client.example")

    def test_helo_hook(self) -> None:
        """helo DENY 550 and clears hello; DENYSOFT 450; EHLO gets plugin capabilities."""
        s = Session([("h", plugin_with({"helo": lambda c, h: DENY if h == "bad" else CONT}))])
        self.assertIn("550 HELO rejected", s.send("HELO bad\r\n"))
        self.assertIsNone(s.connection.hello.host)
        s = Session([("h", plugin_with({"ehlo": lambda c, h: (DENYSOFT, "slow down")}))])
        self.assertIn("450 4.7.1 slow down", s.send("EHLO x\r\n"))
        s = Session([("h", plugin_with({"capabilities": lambda c: c.capabilities.append("XFOO")}))])
        self.assertIn("250 XFOO\r\n", s.send("EHLO x\r\n"))

    def test_mail_hook(self) -> None:
        """mail DENY 550 drops the transaction; DENYSOFT 450; default 250 sender OK."""
        s = Session(
            [("m", plugin_with({"mail": lambda c, f, p: DENY if f.local == "bad" else CONT}))]
        )
        s.send("EHLO x\r\n")
        self.assertIn("550 5.7.1 sender <bad@b.c> denied", s.send("MAIL FROM:<bad@b.c>\r\n"))
        self.assertIsNone(s.connection.transaction)
        self.assertIn("503", s.send("RCPT TO:<a@b.c>\r\n"))
        s = Session([("m", plugin_with({"mail": lambda c, f, p: (DENYSOFT, "greylisted")}))])
        s.send("EHLO x\r\n")
        self.assertIn("450 4.7.1 greylisted", s.send("MAIL FROM:<a@b.c>\r\n"))

    def test_mail_passes_address_and_params(self) -> None:
        """hook_mail gets the parsed address and upper-cased parameters."""
        seen: list[Any] = []
        s = Session([("m", plugin_with({"mail": lambda c, f, p: seen.append((f.address, p))}))])
        s.send("EHLO x\r\nMAIL FROM:<a@b.c> size=10 BODY=8BITMIME\r\n")
        self.assertEqual(seen, [("a@b.c", {"SIZE": "10", "BODY": "8BITMIME"})])

    def test_second_mail_resets_transaction(self) -> None:
        """A second MAIL resets the open transaction (reset_transaction runs); uuids count up."""
        resets: list[str] = []
        s = Session(
            [("r", plugin_with({"reset_transaction": lambda c: resets.append(c.transaction.uuid)}))]
        )
        s.send("EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        first = s.connection.transaction.uuid
        s.send("MAIL FROM:<d@e.f>\r\n")
        self.assertEqual(resets, [first])
        self.assertEqual(first, f"{s.connection.uuid}.1")
        self.assertEqual(s.connection.transaction.uuid, f"{s.connection.uuid}.2")

    def test_rcpt_deny_and_rcpt_ok_deny(self) -> None:
        """rcpt DENY drops the recipient and counts a reject; rcpt_ok DENYSOFT drops it too."""
        s = Session(
            [
                (
                    "r",
                    plugin_with(
                        {
                            "rcpt": lambda c, r, p: DENY if r.local == "no" else OK,
                            "rcpt_ok": lambda c, r: DENYSOFT if r.local == "later" else CONT,
                        }
                    ),
                )
            ]
        )
        s.send("EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        self.assertEqual(
            s.codes("RCPT TO:<no@b.c>\r\nRCPT TO:<later@b.c>\r\nRCPT TO:<yes@b.c>\r\n"),
            [550, 450, 250],
        )
        self.assertEqual([r.address for r in s.connection.transaction.rcpt_to], ["yes@b.c"])
        counts = s.connection.rcpt_count
        self.assertEqual((counts.accept, counts.tempfail, counts.reject), (1, 1, 1))

    def test_data_hook(self) -> None:
        """data DENYSOFTDISCONNECT: 451 and close; DENY 554."""
        s = session(ACCEPT_ALL, ("d", plugin_with({"data": lambda c: DENYSOFTDISCONNECT})))
        s.send(ENVELOPE)
        self.assertIn("451 4.7.1", s.send("DATA\r\n"))
        self.assertTrue(s.closed)
        s = session(ACCEPT_ALL, ("d", plugin_with({"data": lambda c: DENY})))
        s.send(ENVELOPE)
        self.assertIn("554 5.7.1", s.send("DATA\r\n"))

    def _message(self, queue_answer: Any, hook: str = "queue") -> Session:
        s = Session(
            [
                ("r", plugin_with({"rcpt": lambda c, r, p: OK})),
                ("q", plugin_with({hook: lambda c: queue_answer})),
            ]
        )
        s.send(ENVELOPE + b"DATA\r\n")
        return s

    def test_queue_results(self) -> None:
        """queue OK 250 Message Queued; DENY 550; DENYSOFT 450; CONT 451; DENYDISCONNECT closes."""
        expect = {
            OK: "250 2.0.0 Message Queued (",
            DENY: "550 5.3.0",
            DENYSOFT: "450 4.3.0",
            CONT: "451 4.3.0 Queuing declined or disabled, try later",
            DENYDISCONNECT: "550 5.3.0",
        }
        for answer, text in expect.items():
            s = self._message(answer)
            out = s.send("Subject: t\r\n\r\nbody\r\n.\r\n")
            self.assertIn(text, out, answer)
            self.assertEqual(s.closed, answer is DENYDISCONNECT, answer)
            self.assertIsNone(s.connection.transaction)
        self.assertEqual(s.connection.msg_count.reject, 1)

    def test_queue_ok_hook_and_uuid(self) -> None:
        """queue_ok runs with the reply text; the 250 names the transaction uuid."""
        seen: list[str] = []
        s = Session(
            [
                ("r", plugin_with({"rcpt": lambda c, r, p: OK, "queue": lambda c: OK})),
                ("k", plugin_with({"queue_ok": lambda c, msg: seen.append(msg)})),
            ]
        )
        s.send(ENVELOPE + b"DATA\r\n")
        uuid = s.connection.transaction.uuid
        out = s.send("hello\r\n.\r\n")
        self.assertEqual(out, f"250 2.0.0 Message Queued ({uuid})\r\n")
        self.assertEqual(seen, [f"Message Queued ({uuid})"])

    def test_queue_reply_without_queue_ok_plugin(self) -> None:
        """Without a queue_ok plugin the 250 still names the transaction uuid."""
        s = Session([("r", plugin_with({"rcpt": lambda c, r, p: OK, "queue": lambda c: OK}))])
        s.send(ENVELOPE + b"DATA\r\n")
        uuid = s.connection.transaction.uuid
        self.assertEqual(s.send("hello\r\n.\r\n"), f"250 2.0.0 Message Queued ({uuid})\r\n")

    def test_data_post_deny(self) -> None:
        """data_post DENY: 550 and the queue hook does not run."""
        queued: list[int] = []
        s = Session(
            [
                (
                    "r",
                    plugin_with(
                        {
                            "rcpt": lambda c, r, p: OK,
                            "data_post": lambda c: (DENY, "spam"),
                            "queue": lambda c: queued.append(1),
                        }
                    ),
                ),
            ]
        )
        s.send(ENVELOPE + b"DATA\r\n")
        self.assertIn("550 5.7.1 spam", s.send("x\r\n.\r\n"))
        self.assertEqual(queued, [])

    def test_relaying_goes_to_queue_outbound(self) -> None:
        """A relaying client's message goes to queue_outbound, not queue."""
        hooks: list[str] = []
        s = Session(
            [
                (
                    "q",
                    plugin_with(
                        {
                            "queue": lambda c: hooks.append("queue"),
                            "queue_outbound": lambda c: (hooks.append("queue_outbound"), OK)[1],
                        }
                    ),
                )
            ]
        )
        s.connection.relaying = True
        s.send(ENVELOPE + b"DATA\r\n")
        self.assertIn("250 2.0.0 Message Queued", s.send("x\r\n.\r\n"))
        self.assertEqual(hooks, ["queue_outbound"])

    def test_max_data_exceeded(self) -> None:
        """Over max.bytes: max_data_exceeded runs at the final dot; default 550 Message too big!"""
        s = Session([ACCEPT_ALL], settings=SessionSettings(me="mx.test", max_bytes=100))
        s.send(ENVELOPE + b"DATA\r\n")
        self.assertIn(
            "552 5.3.4 Message too big!", s.send(b"x" * 50 + b"\r\n" + b"y" * 80 + b"\r\n.\r\n")
        )
        s = Session(
            [ACCEPT_ALL, ("m", plugin_with({"max_data_exceeded": lambda c: DENYSOFT}))],
            settings=SessionSettings(me="mx.test", max_bytes=100),
        )
        s.send(ENVELOPE + b"DATA\r\n")
        self.assertIn("450 4.3.4", s.send(b"x" * 200 + b"\r\n.\r\n"))

    def test_vrfy_noop_help(self) -> None:
        """VRFY 252 by default, OK 250, DENY 550; NOOP 250, DENY 500; HELP 214 (stock: 500)."""
        s = session()
        self.assertEqual(s.codes("VRFY x\r\nNOOP\r\nHELP\r\n"), [252, 250, 214])
        s = Session(
            [
                (
                    "v",
                    plugin_with(
                        {
                            "vrfy": lambda c: OK if c.current_command.argument == "ok" else DENY,
                            "noop": lambda c: DENY,
                        }
                    ),
                )
            ]
        )
        self.assertEqual(s.codes("VRFY ok\r\nVRFY no\r\nNOOP\r\n"), [250, 550, 500])

    def test_unrecognized_command(self) -> None:
        """Unknown verbs: 500 and errors++; a plugin may answer OK itself, or HOOK_NEXT."""
        s = session()
        self.assertIn("500 Unrecognized command", s.send("XYZZY foo\r\n"))
        self.assertEqual(s.connection.errors, 1)

        def xstatus(c: Any, verb: str, arg: str) -> Any:
            if verb == "XSTATUS":
                c.respond(211, ["all good", f"arg={arg}"])
                return OK
            if verb == "XNOOP":
                return HOOK_NEXT, "noop"
            return CONT

        s = Session([("x", plugin_with({"unrecognized_command": xstatus}))])
        self.assertEqual(s.send("XSTATUS now\r\n"), "211-all good\r\n211 arg=now\r\n")
        s.send("EHLO x\r\n")
        self.assertEqual(s.send("XNOOP\r\n"), "250 2.0.0 OK\r\n")

    def test_quit_hook_once(self) -> None:
        """Two QUITs: the quit hook fires once, one 221, then close."""
        quits: list[int] = []
        s = Session([("q", plugin_with({"quit": lambda c: quits.append(1)}))])
        self.assertEqual(s.codes("QUIT\r\nQUIT\r\n"), [221])
        self.assertEqual(quits, [1])
        self.assertTrue(s.closed)

    def test_disconnect_hooks(self) -> None:
        """On close, reset_transaction (if one is open) then disconnect run, then a summary line."""
        order: list[str] = []
        s = Session(
            [
                (
                    "d",
                    plugin_with(
                        {
                            "rcpt": lambda c, r, p: OK,
                            "reset_transaction": lambda c: order.append("reset"),
                            "disconnect": lambda c: order.append("disconnect"),
                        }
                    ),
                )
            ]
        )
        s.send(ENVELOPE)
        s.lose()
        self.assertEqual(order, ["reset", "disconnect"])
        self.assertTrue(
            any(r.message == "disconnect" and r.fields["rcpts"] == "1/0/0" for r in s.log.records)
        )

    def test_hook_exception_keeps_session(self) -> None:
        """A plugin raising in hook_mail is treated as CONT; the session carries on."""

        def boom(c: Any, f: Any, p: Any) -> None:
            raise KeyError("x")

        s = Session([("b", plugin_with({"mail": boom}))])
        self.assertIn("250 2.1.0", s.send("EHLO x\r\nMAIL FROM:<a@b.c>\r\n"))


class OrderAndDefectTests(SynchronousTestCase):
    """Stock ESMTP's defects (twisted-mail-notes.md), each pinned."""

    def test_pipelined_replies_in_order_with_slow_hooks(self) -> None:
        """Async hooks answering out of order still give replies in command order (#8126)."""
        pending: list[Deferred[Any]] = []

        def slow(c: Any, r: Any, p: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        s = Session([("slow", plugin_with({"rcpt": slow}))])
        s.send("EHLO x\r\n")
        out = s.send(
            "MAIL FROM:<a@b.c>\r\nRCPT TO:<r1@b.c>\r\nRCPT TO:<r2@b.c>\r\n"
            "RCPT TO:<r3@b.c>\r\nNOOP\r\n"
        )
        self.assertEqual(reply_codes(out), [250])
        self.assertEqual(len(pending), 1)  # one command at a time
        pending[0].callback((DENY, "r1 no"))
        self.assertEqual(s.read(), "550 5.7.1 r1 no\r\n")
        pending[1].callback(OK)
        pending[2].callback((DENYSOFT, "r3 later"))
        self.assertEqual(
            s.read(), "250 2.1.5 recipient <r2@b.c> OK\r\n450 4.7.1 r3 later\r\n250 2.0.0 OK\r\n"
        )

    def test_replies_of_a_batch_in_one_write(self) -> None:
        """Replies to a synchronously answered pipelined batch go out in a single write."""
        s = session()
        s.send("EHLO x\r\n")
        writes: list[bytes] = []
        original = s.transport.write
        s.transport.write = lambda data: (writes.append(data), original(data))[1]  # type: ignore[method-assign]
        s.send(ENVELOPE[18:] + b"RCPT TO:<c@example.com>\r\nNOOP\r\n")
        self.assertEqual(len(writes), 1)
        self.assertEqual(reply_codes(writes[0].decode()), [250, 250, 250, 250])

    def test_overlong_data_line_is_not_smuggling(self) -> None:
        """A 20 KB body line stays in the body; SMTP commands after it are body text."""
        stored: list[bytes] = []
        s = Session([storing(stored)])
        s.send(ENVELOPE + b"DATA\r\n")
        body = (
            b"A" * 20000 + b"\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nevil\r\n"
        )
        out = s.send(body + b".\r\n")
        self.assertEqual(reply_codes(out), [250])
        self.assertEqual(len(stored), 1)
        self.assertIn(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@example.com>", stored[0])
        self.assertTrue(s.connection.msg_count.accept == 1)

    def test_smuggling_shapes_do_not_end_data(self) -> None:
        """No smuggling shape (\\n.\\n, \\r.\\r, ...) ends DATA; bare LF/CR is rejected."""
        for shape in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"):
            queued: list[int] = []
            s = Session(
                [
                    (
                        "q",
                        plugin_with(
                            {
                                "rcpt": lambda c, r, p: OK,
                                "queue": lambda c, q=queued: (q.append(1), OK)[1],
                            }
                        ),
                    )
                ]
            )
            s.send(ENVELOPE + b"DATA\r\n")
            out = s.send(
                b"Subject: t\r\n\r\nbody"
                + shape
                + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nevil\r\n"
            )
            self.assertEqual(out, "", shape)
            out = s.send(b".\r\n")
            self.assertIn("550 5.6.0 Bare LF or CR", out, shape)
            self.assertEqual(queued, [], shape)

    def test_bare_newline_normalised(self) -> None:
        """With bare_newline=normalise the message is accepted once, with CRLF line ends."""
        stored: list[bytes] = []
        from haraka_tw.smtp.data import BareNewline

        s = Session(
            [storing(stored)],
            settings=SessionSettings(me="mx.test", bare_newline=BareNewline.NORMALISE),
        )
        s.send(ENVELOPE + b"DATA\r\n")
        out = s.send(b"Subject: t\r\n\r\nline1\nline2\n.\nMAIL FROM:<evil@x>\r\n.\r\n")
        self.assertEqual(reply_codes(out), [250])
        self.assertTrue(
            stored[0].endswith(b"\r\n\r\nline1\r\nline2\r\n.\r\nMAIL FROM:<evil@x>\r\n"), stored
        )

    def test_starttls_plaintext_injection(self) -> None:
        """STARTTLS with pipelined plaintext: no TLS here, so 500 then NOOP in the clear;
        stock ext_STARTTLS never runs."""
        s = session()
        out = s.send("EHLO x\r\nSTARTTLS\r\nNOOP\r\n")
        self.assertEqual(reply_codes(out)[-2:], [500, 250])
        self.assertNotIn("STARTTLS", out.split("\r\n500")[0])

    def test_non_ascii_verb(self) -> None:
        """A non-ASCII verb gets 501, not a dropped connection (stock: UnicodeDecodeError)."""
        s = session()
        self.assertEqual(s.codes(b"\xc3\xa9HLO x\r\n\xff\r\nNOOP\r\n"), [501, 501, 250])
        self.assertFalse(s.closed)

    def test_control_bytes_in_command(self) -> None:
        """NUL or control bytes in a command: 501."""
        s = session()
        self.assertEqual(s.codes(b"NOOP\x00\r\nHELO a\x07b\r\n"), [501, 501])

    def test_line_too_long(self) -> None:
        """A command line over max.line_length (512): 521 and close, with or without its LF."""
        s = session()
        self.assertIn("521 Command line too long", s.send(b"NOOP " + b"x" * 600 + b"\r\n"))
        self.assertTrue(s.closed)
        s = session()
        self.assertIn("521", s.send(b"x" * 1000))
        self.assertTrue(s.closed)

    def test_inactivity_timeout(self) -> None:
        """After inactivity_timeout seconds of silence: 421 and close."""
        s = Session([ACCEPT_ALL], settings=SessionSettings(me="mx.test", inactivity_timeout=10))
        s.clock.advance(9)
        s.send("NOOP\r\n")
        s.clock.advance(9)
        self.assertFalse(s.closed)
        s.clock.advance(2)
        self.assertIn("421 timeout", s.read())
        self.assertTrue(s.closed)

    def test_early_talker(self) -> None:
        """Input before the banner marks early_talker and is answered after the banner."""
        pending: Deferred[Any] = Deferred()
        s = Session([("slow", plugin_with({"connect": lambda c: pending}))], greet=False)
        self.assertEqual(s.banner, "")
        self.assertEqual(s.send("NOOP\r\n"), "")
        self.assertTrue(s.connection.early_talker)
        pending.callback(None)
        out = s.read()
        self.assertTrue(out.startswith("220 "))
        self.assertIn("250 OK", out)

    def test_utf8_address_needs_smtputf8(self) -> None:
        """A UTF-8 address needs SMTPUTF8 on MAIL (553); with it, it is accepted."""
        s = session()
        s.send("EHLO x\r\n")
        self.assertIn("553", s.send("MAIL FROM:<jos\u00e9@b.c>\r\n".encode()))
        self.assertIn("250", s.send("MAIL FROM:<jos\u00e9@b.c> SMTPUTF8\r\n".encode()))

    def test_received_header_and_auth_results(self) -> None:
        """A Received header goes on top; Authentication-Results becomes Original-..."""
        stored: list[bytes] = []
        s = Session([storing(stored)])
        s.send(ENVELOPE + b"DATA\r\n")
        uuid = s.connection.transaction.uuid
        s.send(b"Authentication-Results: forged; pass\r\nSubject: t\r\n\r\nbody\r\n.\r\n")
        msg = stored[0]
        self.assertTrue(
            msg.startswith(
                b"Received: from client.test (client.example [192.0.2.10])\r\n\tby mx.test"
            ),
            msg,
        )
        self.assertIn(f"with ESMTP id {uuid}".encode(), msg)
        self.assertIn(b"envelope-from <a@client.test>", msg)
        self.assertIn(
            b"\r\nOriginal-Authentication-Results: forged; pass\r\nSubject: t\r\n\r\nbody\r\n", msg
        )

    def test_fields_added_before_data_are_kept(self) -> None:
        """Header fields a plugin adds at MAIL or RCPT (before the message exists) are in
        the stored message, above the Received field, in the order added."""
        stored: list[bytes] = []

        def mail(c: Any, sender: Any, params: Any) -> Any:
            c.transaction.add_leading_header("X-Second", "at mail")
            c.transaction.add_leading_header("X-First", "at mail")

        def rcpt(c: Any, recipient: Any, params: Any) -> Any:
            c.transaction.add_header("X-Third", "at rcpt")

        early = ("early", plugin_with({"mail": mail, "rcpt": rcpt}))
        s = Session([early, storing(stored)])
        s.send(ENVELOPE + b"DATA\r\n")
        s.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
        head = stored[0].split(b"\r\n\r\n")[0]
        names = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in b" \t"]
        self.assertEqual(names, [b"X-First", b"X-Second", b"X-Third", b"Received", b"Subject"])

    def test_a_body_that_cannot_be_stored_gets_451(self) -> None:
        """A spool write that fails (here the spool directory is a file's child) is a
        451 4.3.0 at the end of data, logged; the session goes on and no hook queues it."""
        stored: list[bytes] = []
        settings = SessionSettings(me="mx.test", spool_dir="/dev/null/spool", spool_after=0)
        for verb in (b"DATA\r\n", None):
            s = Session([storing(stored)], settings=settings)
            if verb:
                s.send(ENVELOPE + verb)
                out = s.send(b"Subject: t\r\n\r\nbody\r\n.\r\nNOOP\r\n")
            else:
                s.send(ENVELOPE)
                out = s.send(b"BDAT 17 LAST\r\nSubject: t\r\n\r\nbody\r\nNOOP\r\n")
            self.assertIn("451 4.3.0 Temporary storage failure", out)
            self.assertTrue(out.endswith("250 2.0.0 OK\r\n"), out)
            self.assertIsNone(s.connection.transaction)
            errors = s.log.messages(Level.ERROR)
            self.assertTrue(any(m.startswith("cannot store the message") for m in errors))
        self.assertEqual(stored, [])


class ContractFixTests(SynchronousTestCase):
    """Places where the code once disagreed with its own contract (found writing docs/)."""

    def test_braces_never_break_a_reply(self) -> None:
        """Braces in plugin text or in an address are sent as they are; placeholders fill once."""
        s = Session([("m", plugin_with({"mail": lambda c, f, p: (DENY, "{sender} {odd} {")}))])
        s.send("EHLO x\r\n")
        out = s.send("MAIL FROM:<a{sender}b@c.d>\r\n")
        self.assertEqual(out, "550 5.7.1 <a{sender}b@c.d> {odd} {\r\n")

    def test_lookup_rdns_ok_without_name_still_greets(self) -> None:
        """lookup_rdns OK without a hostname, or STOP, still runs connect and greets."""
        for answer, host in ((OK, None), (Code.STOP, "client.example")):
            s = Session([("r", plugin_with({"lookup_rdns": lambda c, a=answer: a}))])
            self.assertTrue(s.banner.startswith("220 "), answer)
            self.assertEqual(s.connection.remote.host, host)  # only OK skips the core lookup

    def test_connect_text_replaces_banner(self) -> None:
        """connect OK with a message: that message is the 220 banner."""
        s = Session([("c", plugin_with({"connect": lambda c: (OK, "welcome, friend")}))])
        self.assertEqual(s.banner, "220 welcome, friend\r\n")

    def test_banner_carries_each_connection_uuid(self) -> None:
        """The banner ends with banner_chars of this connection's uuid, new per connection."""
        first, second = Session([]), Session([])
        for s in (first, second):
            self.assertEqual(
                s.banner,
                f"220 mx.test ESMTP Haraka_tw/{__version__} ready ({s.connection.uuid[:6]})\r\n",
            )
        self.assertNotEqual(first.banner, second.banner)

    def test_banner_follows_its_settings(self) -> None:
        """Settings with the same name but another greeting or version flag change the banner."""
        lines = SessionSettings(me="mx.test", greeting=("at your service", "second line"))
        s = Session([], settings=lines, greet=False)  # (the harness expects one line)
        self.assertEqual(
            s.banner, f"220-at your service ({s.connection.uuid[:6]})\r\n220 second line\r\n"
        )
        quiet = Session([], settings=SessionSettings(me="mx.test", show_version=False))
        self.assertEqual(
            quiet.banner, f"220 mx.test ESMTP Haraka_tw ready ({quiet.connection.uuid[:6]})\r\n"
        )

    def test_banner_without_uuid(self) -> None:
        """banner_chars=0 shows no uuid."""
        bare = Session([], settings=SessionSettings(me="mx.test", banner_chars=0))
        self.assertEqual(bare.banner, f"220 mx.test ESMTP Haraka_tw/{__version__} ready\r\n")

    def test_helo_denysoft_clears_greeting(self) -> None:
        """After a refused HELO (even DENYSOFT) MAIL needs a new greeting."""
        s = Session([("h", plugin_with({"helo": lambda c, h: DENYSOFT}))])
        self.assertEqual(s.codes("HELO x\r\nMAIL FROM:<a@b.c>\r\n"), [450, 503])

    def test_data_denial_resets_transaction(self) -> None:
        """data DENY ends the transaction: RCPT afterwards needs a new MAIL."""
        s = session(ACCEPT_ALL, ("d", plugin_with({"data": lambda c: DENY})))
        s.send(ENVELOPE)
        self.assertEqual(s.codes("DATA\r\nRCPT TO:<c@example.com>\r\n"), [554, 503])

    def test_capabilities_every_plugin_runs(self) -> None:
        """Every capabilities plugin adds its keyword, even after one answers OK."""
        s = Session(
            [
                (
                    "a",
                    plugin_with({"capabilities": lambda c: (c.capabilities.append("XA"), OK)[1]}),
                ),
                ("b", plugin_with({"capabilities": lambda c: c.capabilities.append("XB")})),
            ]
        )
        out = s.send("EHLO x\r\n")
        self.assertIn("250-XA\r\n", out)
        self.assertIn("250 XB\r\n", out)

    def test_hook_next_runs_core_command(self) -> None:
        """HOOK_NEXT naming a core command runs that command with the same argument."""
        s = Session(
            [
                (
                    "x",
                    plugin_with(
                        {
                            "unrecognized_command": lambda c, v, a: (
                                (HOOK_NEXT, "HELO") if v == "HI" else CONT
                            ),
                        }
                    ),
                )
            ]
        )
        self.assertIn("250 mx.test Hello", s.send("HI there.example\r\n"))
        self.assertEqual(s.connection.hello.host, "there.example")
