"""karma over sockets: clients (their addresses given by a PROXY header from loopback)
scored, tarpitted and refused, their history kept in a real redis-server, another plugin's
denial (dns-list, against a real DNS server on loopback) taken over; and the rules, awards
and tarpit delays as units."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haraka_tw.codes import CONT, DENY, DENYSOFT, OK, Code
from haraka_tw.config import ConfigDirectory
from haraka_tw.config.ini import parse_ini
from haraka_tw.paths import default_config_dir
from haraka_tw.plugins.karma import HEADER, Plugin, Rule, Settings, Tarpit, read_settings
from haraka_tw.smtp.address import Address
from haraka_tw.smtp.connection import Connection, Local, Remote, Transaction
from tests.dnsserver import serve
from tests.haproxy import proxied
from tests.plugins.test_dns_list import FULL_ZONE, until
from tests.redis_server import (
    plugin_redis_connected,
    redis_command,
    start_redis,
    stop_with_the_test,
)
from tests.support import ListLog, free_port, maildir_messages, start_server, temp_dir, write_config


def talk(
    port: int, client_ip: str, *commands: str, message: bool = False, header: bytes = b""
) -> list[bytes]:
    """Connect as C{client_ip} and send C{commands}, then (when C{message}) a message
    (with C{header} fields on top) after a 354: the banner and every reply, the
    connection closed with QUIT."""
    with proxied(port, client_ip) as client:
        replies = [client.banner] + [client.command(c) for c in commands]
        if message and replies[-1][:3] == b"354":
            client.send(header + b"Subject: karma\r\n\r\nHello.\r\n.\r\n")
            replies.append(client.reply())
        client.command("QUIT")
    return replies


def envelope(helo: str = "EHLO client.example") -> list[str]:
    return [helo, "MAIL FROM:<joe@sender.example>", "RCPT TO:<you@example.com>", "DATA"]


class KarmaServerTests(TestCase):
    @inlineCallbacks
    def server(
        self, ini: str, plugins: str = "", redis: bool = True, tarpit: str = "0", **files: str
    ) -> Deferred[int]:
        """A server with karma (C{ini} over the shipped karma.ini, the tarpit's C{max} as
        given: off unless a test wants it) and a redis-server (or a closed port), once
        karma's Redis is connected (a client arriving sooner would have no history)."""
        self.redis_port = start_redis(self).port if redis else free_port()
        self.server_, port = start_server(
            self,
            {
                "plugins": f"{plugins}karma\nrcpt_to.in_host_list\nqueue/maildir\n",
                "karma.ini": f"{ini}\n[tarpit]\nmax={tarpit}\n",
                "redis.ini": f"[server]\nport={self.redis_port}\ntimeout=2\n",
                "host_list": "example.com\n",
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                **files,
            },
        )
        stop_with_the_test(self, self.server_)
        if redis:
            yield plugin_redis_connected(self.server_, "karma")
        return port

    def stored(self) -> list[bytes]:
        return maildir_messages(Path(self.server_.base) / "maildir")  # type: ignore[attr-defined]

    def redis_command(self, *args: Any) -> Deferred[Any]:
        return redis_command(self.redis_port, *args)

    @inlineCallbacks
    def history(self, ip: str) -> Deferred[dict[bytes, bytes]]:
        reply = yield self.redis_command("HGETALL", f"karma|{ip}")
        return dict(zip(reply[::2], reply[1::2], strict=True))

    @inlineCallbacks
    def recorded(self, ip: str, verdict: bytes) -> Deferred[None]:
        """Wait until the history of C{ip} counts one C{verdict} (written at disconnect)."""
        deadline = time.monotonic() + 10
        while (yield self.history(ip)).get(verdict) != b"1":
            self.assertLess(time.monotonic(), deadline, f"{ip}: no {verdict!r} recorded")
            yield deferLater(reactor, 0.02, lambda: None)

    @inlineCallbacks
    def test_unrecognized_commands_until_refused(self) -> Deferred[None]:
        """Each unrecognized command costs a point; at the threshold karma refuses it and
        then the message at DATA, with its message and the score. A client from a private
        network is not scored: its commands and message go through."""
        port = yield self.server("[thresholds]\nnegative=-3\n[deny]\nmessage=bad karma {score}\n")
        replies = yield deferToThread(
            talk, port, "1.2.3.4", "EHLO client.example", "FOO", "BAR", "BAZ", *envelope()[1:]
        )
        self.assertEqual([r[:3] for r in replies[2:4]], [b"500", b"500"])
        self.assertEqual(replies[4], b"500 5.5.1 bad karma -3\r\n")
        self.assertEqual([r[:3] for r in replies[5:7]], [b"250", b"250"])
        self.assertEqual(replies[7], b"554 5.7.1 bad karma -3\r\n")
        private = yield deferToThread(
            talk,
            port,
            "10.1.2.3",
            "EHLO c.example",
            "FOO",
            "BAR",
            "BAZ",
            "QUX",
            *envelope()[1:],
            message=True,
        )
        self.assertEqual([r[:3] for r in private[2:6]], [b"500"] * 4)
        self.assertEqual(private[-1][:3], b"250")
        self.assertNotIn(HEADER.encode(), self.stored()[0])

    @inlineCallbacks
    def test_history_kept_in_redis(self) -> Deferred[None]:
        """A connection that ends below 0 counts as bad in its address's history, one above
        positive as good; the next connection from a bad address has its history in the
        results, where a rule scores it, and is refused at DATA. The keys expire."""
        port = yield self.server(
            "[thresholds]\nnegative=-3\npositive=1\n[awards]\nesmtp=2\n"
            "[result_awards]\n001 = karma | history | lt | 0 | -5 | a bad name\n"
        )
        yield deferToThread(talk, port, "1.2.3.4", "HELO client.example", "FOO")
        yield self.recorded("1.2.3.4", b"bad")
        self.assertEqual(
            (yield self.history("1.2.3.4")), {b"good": b"0", b"bad": b"1", b"connections": b"1"}
        )
        ttl = yield self.redis_command("TTL", "karma|1.2.3.4")
        self.assertTrue(60 * 86400 - 60 < ttl <= 60 * 86400, ttl)
        again = yield deferToThread(talk, port, "1.2.3.4", *envelope())
        self.assertEqual(again[-1], b"554 5.7.1 very bad karma score: -3\r\n")
        self.assertEqual((yield self.history("1.2.3.4"))[b"connections"], b"2")

        good = yield deferToThread(talk, port, "5.6.7.8", *envelope(), message=True)
        self.assertEqual(good[-1][:3], b"250")
        yield self.recorded("5.6.7.8", b"good")
        [stored] = self.stored()
        header = stored.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
        self.assertIn(b"X-Haraka-Karma: score: 2, pass:esmtp", header)

    @inlineCallbacks
    def test_another_plugins_denial_taken_over(self) -> Deferred[None]:
        """dns-list refuses a listed client at connect; with karma the session goes on,
        the denial costs 2 points and dns-list's result 5 more (a rule), so the message is
        refused at DATA. With dns-list excluded, its refusal stands."""
        dns = serve(self, FULL_ZONE)
        rules = (
            "[thresholds]\nnegative=-6\n[result_awards]\n010 = dns-list | fail | exists | | -5\n"
        )
        files = {
            "dns-list.ini": "[main]\nzones=bl.test\n",
            "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns.port}\ntimeout=2\nattempts=1\n",
        }
        port = yield self.server(rules, plugins="dns-list\n", **files)
        dns_list = next(p.plugin for p in self.server_.runner.plugins if p.name == "dns-list")
        yield until(lambda: not dns_list._checking)
        listed = yield deferToThread(talk, port, "1.2.3.5", *envelope())
        self.assertEqual([r[:3] for r in listed], [b"220", b"250", b"250", b"250", b"554"])
        self.assertEqual(listed[-1], b"554 5.7.1 very bad karma score: -7\r\n")
        clean = yield deferToThread(talk, port, "1.2.3.9", *envelope(), message=True)
        self.assertEqual(clean[-1][:3], b"250")

        (Path(self.server_.base) / "config" / "karma.ini").write_text(  # type: ignore[attr-defined]
            rules + "[deny_excludes]\nplugins=dns-list\n", encoding="utf-8"
        )
        self.server_.config.reload()
        refused = yield deferToThread(talk, port, "1.2.3.5", "EHLO client.example")
        self.assertEqual(refused[0][:3], b"554")
        self.assertIn(b"listed on bl.test", refused[0])

    @inlineCallbacks
    def test_tarpit_holds_replies_of_a_negative_score(self) -> Deferred[None]:
        """With [tarpit], a client whose score is below 0 waits before each reply (a
        second a point, here at most 1 s); at 0 or above it does not."""
        port = yield self.server("", tarpit="1")

        def timed() -> list[float]:
            with proxied(port, "1.2.3.4") as client:
                client.command("EHLO client.example")
                took = []
                for line in ("NOOP", "FOO", "NOOP"):
                    start = time.monotonic()
                    client.command(line)
                    took.append(time.monotonic() - start)
                return took

        noop, unknown, slowed = yield deferToThread(timed)
        self.assertLess(noop, 0.5)
        self.assertGreater(unknown, 0.9)  # (the unrecognized command's own reply waits)
        self.assertGreater(slowed, 0.9)

    @inlineCallbacks
    def test_redis_away_scores_without_history(self) -> Deferred[None]:
        """With no Redis answering, clients are still scored and refused, clean mail goes
        through, and the missing history is in the results (the header), not an error to
        the client."""
        port = yield self.server("[thresholds]\nnegative=-2\n", redis=False)
        replies = yield deferToThread(talk, port, "1.2.3.4", "EHLO c.example", "FOO", "BAR")
        self.assertEqual(replies[-1], b"500 5.5.1 very bad karma score: -2\r\n")
        good = yield deferToThread(talk, port, "5.6.7.8", *envelope(), message=True)
        self.assertEqual(good[-1][:3], b"250")
        [stored] = self.stored()
        self.assertIn(b"err:redis history: ", stored)

    @inlineCallbacks
    def test_spammy_sender_domain(self) -> Deferred[None]:
        """The longest listed suffix of the sender's domain scores; the header says so,
        and a header of that name the client wrote is removed."""
        port = yield self.server("[spammy_tlds]\nxyz=-3\nbad.xyz=-1\n")
        replies = yield deferToThread(
            talk,
            port,
            "1.2.3.4",
            "EHLO c.example",
            "MAIL FROM:<a@mail.bad.xyz>",
            "RCPT TO:<you@example.com>",
            "DATA",
            message=True,
            header=b"X-Haraka-Karma: score: 100\r\n",
        )
        self.assertEqual(replies[-1][:3], b"250")
        [stored] = self.stored()
        self.assertIn(b"X-Haraka-Karma: score: -1, fail:spammy.bad.xyz\r\n", stored)
        self.assertEqual(stored.count(b"X-Haraka-Karma"), 1)

    @inlineCallbacks
    def test_a_long_good_history(self) -> Deferred[None]:
        """An address with more than five good connections and no bad one is all_good,
        for the rules; the key read at connect is given its expiry again (here it had
        none)."""
        port = yield self.server("")
        yield self.redis_command("HSET", "karma|1.2.3.4", "good", 6, "bad", 0, "connections", 6)
        replies = yield deferToThread(talk, port, "1.2.3.4", *envelope(), message=True)
        self.assertEqual(replies[-1][:3], b"250")
        [stored] = self.stored()
        header = stored.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
        self.assertIn(b"history: 6", header)
        self.assertIn(b"pass:all_good", header)
        ttl = yield self.redis_command("TTL", "karma|1.2.3.4")
        self.assertGreater(ttl, 86400)


# -- units --------------------------------------------------------------------------------


def connection(ip: str = "1.2.3.4", port: int = 25) -> Connection:
    conn = Connection(Remote(ip), Local("192.0.2.1", port))
    conn.transaction = Transaction("t1", None, -1)
    return conn


def plugin(settings: Settings | None = None) -> Plugin:
    karma = Plugin()
    karma.settings = settings or Settings()
    karma.clock = Clock()
    karma.log = ListLog()
    return karma


def scored(karma: Plugin, conn: Connection) -> Connection:
    """C{conn} with karma's connect_init run (no Redis: no history)."""
    assert karma.hook_connect_init(conn) is not CONT
    return conn


class RuleTests(SynchronousTestCase):
    def rule(self, text: str) -> Rule:
        return Rule.parse("001", text)

    def test_operators(self) -> None:
        """equals (loose, and 'true' for any true value), match (any case), lt and gt
        (numbers only: a word never matches), length (of the list), exists."""
        cases = [
            ("p | x | equals | 5", [5.0], True),
            ("p | x | eq | Pass", ["Fail"], False),
            ("p | x | equal | true", [True], True),
            ("p | x | equals | true", [""], False),
            ("p | x | match | ^ZEN", ["a", "zen.example"], True),
            ("p | x | gt | 5", ["many"], False),
            ("p | x | gt | 5", ["5.5"], True),
            ("p | x | lt | 0", [0], False),
            ("p | x | length | gt 1", ["a", "b"], True),
            ("p | x | length | equals 1", ["a", "b"], False),
            ("p | x | exists | ", ["a"], True),
            ("p | x | exists | ", [], False),
        ]
        for text, values, expected in cases:
            self.assertEqual(self.rule(f"{text} | -1").matches(values), expected, text)

    def test_bad_rules_named(self) -> None:
        """A rule that cannot be read names the file, section and rule."""
        for text in (
            "p | x | like | y | -1",
            "p | x | equals | y",
            "p | x | gt | many | -1",
            "p | x | match | ( | -1",
            "p | x | length | about 3 | -1",
            "p | x | equals | y | lots",
        ):
            with self.assertRaises(ValueError) as caught:
                self.rule(text)
            self.assertIn("karma.ini [result_awards] 001", str(caught.exception))

    def test_bad_settings_named(self) -> None:
        """Each bad value names its section and key."""
        for text, where in (
            ("[thresholds]\nnegative=low\n", "[thresholds] negative"),
            ("[deny]\nhooks=data, capabilities\n", "[deny] hooks"),
            ("[tarpit]\nmax=-1\n", "[tarpit] max"),
            ("[redis]\nexpire_days=0\n", "[redis] expire_days"),
            ("[awards]\nrelaying=6 if about 3\n", "[awards] relaying"),
            ("[spammy_tlds]\nxyz=very\n", "[spammy_tlds] xyz"),
        ):
            with self.assertRaises(ValueError) as caught:
                read_settings(parse_ini(text, "karma.ini"))
            self.assertIn(f"karma.ini {where}", str(caught.exception))

    def test_shipped_file_reads(self) -> None:
        """The shipped karma.ini is valid, with history recorded and a tarpit."""
        text = (default_config_dir() / "karma.ini").read_text(encoding="utf-8")
        settings = read_settings(parse_ini(text, "karma.ini"))
        self.assertEqual((settings.negative, settings.positive), (-8, 2))
        self.assertTrue(settings.record_history)
        self.assertEqual(settings.tarpit, Tarpit(0, 5, 2))
        self.assertIn("dns-list", settings.rules)

    def test_reload_keeps_the_last_good_settings(self) -> None:
        """A karma.ini that no longer reads leaves the plugin as it was."""
        directory = write_config(temp_dir(self) / "c", {"karma.ini": "[thresholds]\nnegative=-3\n"})
        karma = plugin()
        karma.config = ConfigDirectory([default_config_dir(), directory])
        karma.load()
        karma.config.on_change("karma.ini", karma.load)
        (directory / "karma.ini").write_text("[thresholds]\nnegative=low\n", encoding="utf-8")
        karma.config.reload()
        self.assertEqual(karma.settings.negative, -3)


class AwardTests(SynchronousTestCase):
    def settings(self, awards: str = "", rules: str = "") -> Settings:
        return read_settings(parse_ini(f"[awards]\n{awards}\n[result_awards]\n{rules}\n", "k"))

    def test_locations_and_conditions(self) -> None:
        """Awards read connection attributes, notes (the transaction's first) and results
        (a dotted plugin name), each once, when its condition first holds."""
        karma = plugin(
            self.settings(
                "relaying=6\n"
                "notes.spf.result@fail=-2\n"
                "results.helo.checks.fail=-1 if length gt 1\n"
                "results.rcpt_to.in_host_list.pass=1 if in rcpt_to\n"
                "notes.size=-1 if gt 1000\n"
            )
        )
        conn = scored(karma, connection())
        txn = conn.transaction
        assert txn is not None
        conn.relaying = True
        conn.notes.spf = {"result": "pass"}
        txn.notes.spf = {"result": "fail"}
        conn.results.add("helo.checks", fail="dynamic")
        txn.results.add("rcpt_to.in_host_list", **{"pass": "rcpt_to"})
        conn.notes.size = 10
        self.assertEqual(karma.hook_helo(conn, "h"), CONT)
        entry = conn.results.get("karma")
        assert entry is not None
        self.assertEqual(entry["score"], 6 - 2 + 1)
        self.assertEqual(entry["pass"], ["relaying", "in_host_list.pass"])
        self.assertEqual(entry["fail"], ["spf.result"])
        conn.results.add("helo.checks", fail="big_co")
        conn.notes.size = 2000
        karma.hook_helo(conn, "h")
        self.assertEqual(entry["score"], 5 - 1 - 1)
        karma.hook_helo(conn, "h")
        self.assertEqual(entry["score"], 3)

    def test_result_rules_once_each(self) -> None:
        """A rule scores once per connection, from the connection's or the transaction's
        results; a transaction's results count before the transaction ends."""
        karma = plugin(
            self.settings(
                rules="1 = spf | result | equals | Fail | -3\n2 = greylist | pass | exists | | 1\n"
            )
        )
        conn = scored(karma, connection())
        txn = conn.transaction
        assert txn is not None
        txn.results.add("spf", result="Fail")
        karma.hook_reset_transaction(conn)  # (no karma hook ran while it was open)
        entry = conn.results.get("karma")
        assert entry is not None
        self.assertEqual(entry["score"], -3)
        conn.transaction = Transaction("t2", None, -1)
        conn.transaction.results.add("spf", result="Fail")
        conn.transaction.results.add("greylist", **{"pass": "whitelisted"})
        karma.hook_data(conn)
        self.assertEqual((entry["score"], entry["awards"]), (-2, ["1", "2"]))

    def test_lists_read_as_they_grow(self) -> None:
        """A rule over a list sees the items added since it last looked (and all of a
        list that was reset); karma's own labels are recorded once however often a client
        repeats them."""
        karma = plugin(
            self.settings(
                rules="1 = helo.checks | fail | equals | late | -2\n"
                "2 = greylist | fail | equals | greylisted | -1\n"
            )
        )
        conn = scored(karma, connection())
        for item in ("a", "b", "late"):
            conn.results.add("helo.checks", fail=item)
            karma.hook_helo(conn, "h")
        entry = conn.results.get("karma")
        assert entry is not None and conn.transaction is not None
        self.assertEqual(entry["score"], -2)
        conn.transaction.results.add("greylist", fail="other")
        conn.transaction.results.add("greylist", fail="other")
        karma.hook_data(conn)
        karma.hook_reset_transaction(conn)
        conn.transaction = Transaction("t2", None, -1)
        for item in ("greylisted", "other", "other"):  # (a new list, longer: read it all)
            conn.transaction.results.add("greylist", fail=item)
        karma.hook_data(conn)
        self.assertEqual(entry["score"], -3)
        conn.transaction.mail_from = Address("joe", "a.example")
        for _ in range(50):
            karma.hook_rcpt(conn, Address("joe", "b.example"), {})
        self.assertEqual(entry["fail"], ["env_user_match"])


class DecisionTests(SynchronousTestCase):
    def test_deny_takeover(self) -> None:
        """Another plugin's denial is taken over (OK) at 2 points; a hard one makes
        karma's own refusal hard from then on, a soft one soft until a hard one. Excluded
        plugins and hooks, karma's own denials and outbound's hooks are left alone."""
        karma = plugin(Settings(negative=-3, deny_hooks=frozenset({"data"})))
        conn = scored(karma, connection())
        self.assertEqual(
            karma.hook_deny(conn, DENYSOFT, "x", "greylist", "hook_mail", (), "mail"), OK
        )
        self.assertEqual(karma.hook_data(conn), CONT)  # -2: not yet
        self.assertEqual(karma.hook_deny(conn, DENYSOFT, "x", "spf", "hook_mail", (), "mail"), OK)
        self.assertEqual(karma.hook_data(conn), (DENYSOFT, "very bad karma score: -4"))
        karma.hook_deny(conn, Code.DENYDISCONNECT, "x", "dns-list", "hook_connect", (), "connect")
        karma.hook_deny(conn, DENYSOFT, "x", "spf", "hook_mail", (), "mail")
        self.assertEqual(karma.hook_data(conn)[0], DENY)
        for args in (("access", "mail"), ("spf", "rcpt"), ("karma", "data")):
            self.assertEqual(karma.hook_deny(conn, DENY, "x", args[0], "m", (), args[1]), CONT)
        self.assertEqual(karma.hook_deny(object(), DENY, "x", "spf", "m", (), "send_email"), CONT)
        entry = conn.results.get("karma")
        assert entry is not None
        self.assertEqual(entry["msg"], ["deny:greylist", "deny:spf", "deny:dns-list"])  # once each

    def test_policy_denials_stand_by_default(self) -> None:
        """The refusals of the plugins that enforce a policy (an auth plugin's
        constrain_sender, a credential leak, XCLIENT from a stranger) are not taken over,
        by the defaults and by the shipped file; a pattern names a family, either spelling."""
        text = (default_config_dir() / "karma.ini").read_text(encoding="utf-8")
        for settings in (Settings(), read_settings(parse_ini(text, "karma.ini"))):
            karma = plugin(settings)
            conn = scored(karma, connection())
            for name in ("auth/flat_file", "auth.auth_proxy", "prevent_credential_leaks",
                         "xclient", "data.signatures", "block_me"):  # fmt: skip
                self.assertEqual(karma.hook_deny(conn, DENY, "x", name, "m", (), "mail"), CONT)
            self.assertEqual(karma.hook_deny(conn, DENY, "x", "spf", "m", (), "mail"), OK)

    def test_tls_scores_once(self) -> None:
        """[tls] counts at the first MAIL FROM only: MAIL and RSET again earn nothing."""
        karma = plugin(Settings(tls_unset=2, negative=-100))
        conn = scored(karma, connection())
        for _ in range(3):
            karma.hook_mail(conn, Address("a", "b.example"), {})
        entry = conn.results.get("karma")
        assert entry is not None
        self.assertEqual(entry["score"], 2)

    def test_history_under_the_ipv4_address(self) -> None:
        """A client of a dual-stack listener (::ffff:1.2.3.4) has the history of 1.2.3.4."""
        karma = plugin()
        conn = scored(karma, connection("::ffff:1.2.3.4"))
        state = karma._state(conn)
        assert state is not None
        self.assertEqual(karma._key(state), "karma|1.2.3.4")

    def test_tarpit_under_the_hook_limit(self) -> None:
        """The tarpit waits a second less than the hook's time limit (karma.timeout)."""
        directory = write_config(temp_dir(self) / "c", {"karma.timeout": "3\n"})
        karma = plugin(Settings(tarpit=Tarpit(delay=10), negative=-100))
        karma.config = ConfigDirectory([default_config_dir(), directory])
        conn = scored(karma, connection())
        state = karma._state(conn)
        assert state is not None
        state.score = -1
        self.assertEqual(karma._delay(conn, state, "mail"), 2)

    def test_tarpit_delays(self) -> None:
        """A fixed delay when set; else a second a point, at most max, or max_msa at
        connect and EHLO on the submission ports (2 s less for a good history). Never for
        a score of 0 or more, or at queue."""
        cases = [
            (Tarpit(delay=3), -1, 25, "mail", None, 3),
            (Tarpit(max=5), -2, 25, "mail", None, 2),
            (Tarpit(max=5), -9, 25, "mail", None, 5),
            (Tarpit(max=5), 0, 25, "mail", None, 0),
            (Tarpit(max=5), -9, 25, "queue", None, 0),
            (Tarpit(max_msa=2), -9, 587, "ehlo", None, 2),
            (Tarpit(max_msa=2), -3, 587, "connect", 1, 1),
            (Tarpit(max_msa=2), -9, 587, "mail", None, 5),
            (Tarpit(max=0), -9, 587, "ehlo", None, 0),
            (Tarpit(max=0), -9, 25, "mail", None, 0),
        ]
        for tarpit, score, port, hook, history, expected in cases:
            karma = plugin(Settings(tarpit=tarpit, negative=-100))
            conn = scored(karma, connection(port=port))
            state = karma._state(conn)
            assert state is not None
            state.score, state.history = score, history
            answer = karma._decide(conn, hook)
            if not expected:
                self.assertEqual(answer, CONT)
                continue
            self.assertIsInstance(answer, Deferred)
            fired: list[Any] = []
            answer.addCallback(fired.append)
            karma.clock.advance(expected - 0.01)
            self.assertEqual(fired, [], (tarpit, score, port, hook))
            karma.clock.advance(0.01)
            self.assertEqual(fired, [CONT])

    def test_private_and_disabled_not_scored(self) -> None:
        """Loopback and private clients, and a connection noted disable_karma, have no
        karma: no results, no refusal."""
        karma = plugin(Settings(negative=-1))
        for conn in (connection("127.0.0.1"), connection("10.0.0.1"), connection()):
            if conn.remote.ip == "1.2.3.4":
                conn.notes.disable_karma = True
            self.assertEqual(karma.hook_connect_init(conn), CONT)
            self.assertEqual(karma.hook_unrecognized_command(conn, "FOO", ""), CONT)
            self.assertIsNone(conn.results.get("karma"))

    def test_commands_named_safely(self) -> None:
        """An unrecognized command is named in the results cut to printable ASCII, the
        first ten only; STARTTLS and AUTH are other plugins' and cost nothing. The
        header's value is folded and printable."""
        karma = plugin(Settings(negative=-100))
        conn = scored(karma, connection())
        karma.hook_unrecognized_command(conn, "STARTTLS", "")
        karma.hook_unrecognized_command(conn, "AUTH", "PLAIN")
        for n in range(12):
            karma.hook_unrecognized_command(conn, f"X\x1b[{n}m\u00e9", "")
        entry = conn.results.get("karma")
        assert entry is not None
        self.assertEqual(entry["score"], -12)
        self.assertEqual(len(entry["fail"]), 10)
        self.assertEqual(entry["fail"][0], "cmd:X?[0m?")
        summary = karma._summary(conn)
        lines = summary.split("\n\t")
        self.assertTrue(all(len(line) <= 76 and line.isprintable() for line in lines), lines)
        self.assertTrue(summary.startswith("score: -12, fail:cmd:X?[0m?"))

    def test_sender_checks(self) -> None:
        """MAIL: the longest listed suffix of the sender's domain; TLS set/unset; the
        command's form. RCPT: the sender's and recipient's user alike."""
        karma = plugin(
            Settings(spammy_tlds={"xyz": -3, "mail.xyz": -1}, tls_unset=-1, negative=-100)
        )
        conn = scored(karma, connection())
        karma.hook_mail(conn, Address("a", "Mail.XYZ"), {})
        entry = conn.results.get("karma")
        assert entry is not None and conn.transaction is not None
        self.assertEqual((entry["score"], entry["fail"]), (-2, ["spammy.mail.xyz"]))
        conn.transaction.mail_from = Address("Joe", "a.example")
        karma.hook_rcpt(conn, Address("joe", "b.example"), {})
        self.assertEqual(entry["fail"][-1], "env_user_match")
