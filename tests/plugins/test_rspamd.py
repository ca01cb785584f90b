"""rspamd over sockets: messages sent with smtplib, scanned by a real rspamd on loopback
(GTUBE for reject; a forged X-Spam header and no Message-ID for "add header"; a per-request
Settings header for "rewrite subject"), and by a stand-in rspamd for the answers a real
one does not give at will (soft reject, milter edits that try to inject, errors, silence),
over TCP, a Unix socket and TLS."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from haraka_tw.codes import CONT, OK
from haraka_tw.interfaces import IConnectHook, IMailHook, IQueueHook, IQueueOutboundHook
from haraka_tw.server import StartupError
from tests.rspamd_server import GTUBE, RspamdServer
from tests.standin import StandIn, stand_in
from tests.support import data_reply, free_port, start_server, temp_dir
from tests.tls_certs import pki

KEPT: list[tuple[bytes, dict[str, Any] | None]] = []
SCANNED = "[check]\nlocal_ip=true\nprivate_ip=true\n"  # (the tests' clients are on loopback)


def message(body: str = "Hello, see you at noon.", *, extra: str = "", ids: bool = True) -> bytes:
    dated = "Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n"
    return (
        "From: Ann <ann@sender.example>\r\nTo: Bob <bob@example.com>\r\nSubject: lunch\r\n"
        f"{dated if ids else ''}{extra}\r\n{body}\r\n"
    ).encode()


@implementer(IQueueHook, IQueueOutboundHook)
class Keep:
    """Test plugin: keeps each message as queued, and its rspamd results."""

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        KEPT.append((txn.message_stream.get_bytes(), txn.results.get("rspamd")))
        return OK

    hook_queue_outbound = hook_queue


@implementer(IMailHook)
class SpfSays:
    """Test plugin: the spf plugin's result for the sender is C{result}."""

    result = "Pass"

    def hook_mail(self, connection: Any, sender: Any, params: Any) -> Any:
        connection.transaction.results.add("spf", scope="mfrom", result=self.result)
        return CONT


@implementer(IConnectHook)
class LoggedIn:
    """Test plugin: every client counts as authenticated (as AUTH would note it)."""

    def hook_connect(self, connection: Any) -> Any:
        connection.notes.auth_user = "ann"
        return CONT


def send(port: int, data: bytes, to: tuple[str, ...] = ("bob@example.com",)) -> Any:
    """Send C{data}; the reply to the end of DATA."""
    return data_reply(port, "ann@sender.example", list(to), data)


def header_of(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode()


def server(case: TestCase, ini: str, plugins: str = "", **files: str) -> int:
    KEPT.clear()
    _, port = start_server(
        case,
        {
            "plugins": f"{plugins}rspamd\nrcpt_to.in_host_list\n{__name__}:Keep\n",
            "rspamd.ini": ini,
            "host_list": "example.com\n",
            **files,
        },
    )
    return port


class RealRspamdTests(TestCase):
    """Against rspamd's own normal worker."""

    rspamd: RspamdServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.rspamd = RspamdServer().start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.rspamd.stop()

    def server(self, ini: str = "", check: str = SCANNED, plugins: str = "") -> int:
        main = f"host=127.0.0.1\nport={self.rspamd.port}\n"
        return server(self, main + ini + check, plugins)

    @inlineCallbacks
    def test_gtube_is_refused_with_rspamds_message(self) -> Deferred[None]:
        """rspamd says reject for GTUBE: 550 5.7.1 with its smtp_message."""
        port = self.server()
        got = yield send(port, message(GTUBE))
        self.assertEqual(got, (550, b"5.7.1 Gtube pattern"))
        self.assertEqual(KEPT, [])

    @inlineCallbacks
    def test_loopback_and_private_clients_are_not_scanned_by_default(self) -> Deferred[None]:
        """As in Haraka, mail from loopback and private addresses is not scanned unless
        [check] says so: GTUBE is queued, both reasons are in the results."""
        port = self.server(check="")
        got = yield send(port, message(GTUBE))
        self.assertEqual(got[0], 250)
        results = KEPT[0][1]
        assert results is not None
        self.assertEqual(results["skip"], ["local_ip", "private_ip"])
        self.assertNotIn("action", results)

    @inlineCallbacks
    def test_spam_gets_the_fields_and_loses_its_forged_flag(self) -> Deferred[None]:
        """A forged "X-Spam: yes" and no Message-ID or Date score "add header": the bar,
        report and score fields are added (the bar one + per point), and rspamd's milter
        edit removes the client's X-Spam field; the symbols are in the results."""
        port = self.server()
        got = yield send(port, message(extra="X-Spam: yes\r\n", ids=False))
        self.assertEqual(got[0], 250)
        data, results = KEPT[0]
        assert results is not None
        self.assertEqual(results["action"], "add header")
        self.assertIn("SPAM_FLAG", results["symbols"])
        self.assertEqual(results["symbols"]["SPAM_FLAG"]["score"], 5.0)
        header = header_of(data)
        self.assertNotIn("X-Spam:", header)
        score = results["score"]
        self.assertIn(f"\r\nX-Rspamd-Score: {score:g}\r\n", header + "\r\n")
        self.assertIn(f"\r\nX-Rspamd-Bar: {'+' * int(score)}\r\n", header)
        report = re.search(r"\r\nX-Rspamd-Report: (.*?)\r\n(?! )", header + "\r\n", re.S)
        assert report is not None
        self.assertIn("SPAM_FLAG(5)", report.group(1))
        self.assertNotIn("ARC_NA", report.group(1))  # (a symbol that scored 0)

    @inlineCallbacks
    def test_ham_goes_on_untouched_unless_fields_always(self) -> Deferred[None]:
        """An ordinary message gets "no action": no fields under add_headers=sometimes,
        the fields with always (always_add_headers=true, Haraka's old key, works too),
        none with never even for spam."""
        port = self.server()
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        data, results = KEPT[0]
        assert results is not None
        self.assertEqual(results["action"], "no action")
        self.assertNotIn("X-Rspamd", header_of(data))
        for ini in ("add_headers=always\n", "always_add_headers=true\n"):
            port = self.server(ini)
            yield send(port, message())
            self.assertIn("\r\nX-Rspamd-Bar: /\r\n", header_of(KEPT[0][0]))
        port = self.server("add_headers=never\n")
        yield send(port, message(extra="X-Spam: yes\r\n", ids=False))
        data, results = KEPT[0]
        assert results is not None
        self.assertEqual(results["action"], "add header")
        self.assertNotIn("X-Rspamd", header_of(data))

    @inlineCallbacks
    def test_rewrite_subject_and_rejects_turned_off(self) -> Deferred[None]:
        """rspamd's "rewrite subject" (thresholds from the [request] settings header)
        puts its subject in place of the old one; with [reject] spam=false GTUBE is queued,
        marked with the fields (add_headers=sometimes)."""
        port = self.server('[request]\nsettings={"actions":{"rewrite subject":-5}}\n')
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        data, results = KEPT[0]
        assert results is not None
        self.assertEqual(results["action"], "rewrite subject")
        header = header_of(data)
        self.assertEqual(re.findall(r"\r\nSubject: ([^\r]*)", header), ["*** SPAM *** lunch"])
        port = self.server("[reject]\nspam=false\n")
        got = yield send(port, message(GTUBE))
        self.assertEqual(got[0], 250)
        data, results = KEPT[0]
        assert results is not None
        self.assertEqual(results["action"], "reject")
        self.assertIn("\r\nX-Rspamd-Score: 15\r\n", header_of(data) + "\r\n")


def http_complete(request: bytes) -> bool:
    """Whether an HTTP request with a Content-Length has all its body."""
    head, sep, body = request.partition(b"\r\n\r\n")
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    return bool(sep) and length is not None and len(body) >= int(length.group(1))


def answer(data: Any, status: str = "200 OK") -> bytes:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return (
        f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def fake(case: TestCase, data: Any, status: str = "200 OK", unix: str = "") -> StandIn:
    """A stand-in rspamd answering C{data} (as JSON; never, for None)."""
    return stand_in(case, None if data is None else answer(data, status), http_complete, unix)


def head_fields(request: bytes) -> list[tuple[str, str]]:
    head = request.partition(b"\r\n\r\n")[0].decode()
    return [tuple(line.split(": ", 1)) for line in head.split("\r\n")[1:]]  # type: ignore[misc]


NO_ACTION = {"action": "no action", "score": 0.5, "required_score": 15.0, "symbols": {}}


class StandInTests(TestCase):
    def serve(
        self, stand: StandIn, ini: str = "", check: str = SCANNED, plugins: str = "", **files: str
    ) -> int:
        main = f"host=127.0.0.1\nport={stand.port}\n"
        return server(self, f"{main}{ini}{check}", plugins, **files)

    @inlineCallbacks
    def test_request_as_rspamd_reads_it(self) -> Deferred[None]:
        """POST /checkv2 with the exact Content-Length and Connection: close; the
        envelope in rspamd's headers (a Rcpt per recipient, Deliver-To only for one);
        [request] headers before it, [auth] and [request_headers] after it (one header
        of a name, as rspamd reads only the first: [request_headers] over [auth], both
        over [request] and the envelope); the spf plugin's result as the JSON rspamd
        reads; the message as it is queued."""
        stand = fake(self, NO_ACTION)
        ini = (
            "[request]\nsettings_id=inbound\npass_all=true\nflags=ext_urls, milter\n"
            "milter=true\ngroups=true\n[auth]\nbasic_user=haraka\nbasic_pass=s3cret\n"
            "header=X-Key\nvalue=1\n"
            "[request_headers]\nIP=192.0.2.7\nMTA-Name=mx.test\nX-Key=2\nsettings-id=outbound\n"
        )
        port = self.serve(stand, ini, plugins=f"{__name__}:SpfSays\n")
        SpfSays.result = "Pass"
        got = yield send(port, message(), ("bob@example.com", "carol@example.com"))
        self.assertEqual(got[0], 250)
        request = stand.requests[0]
        self.assertTrue(request.startswith(b"POST /checkv2 HTTP/1.1\r\nHost: 127.0.0.1:"))
        sent = request.partition(b"\r\n\r\n")[2]
        fields = head_fields(request)
        self.assertIn(("Content-Length", str(len(sent))), fields)
        self.assertIn(("Connection", "close"), fields)
        names = [name for name, _ in fields]
        self.assertEqual(names[:4], ["Host", "Connection", "Content-Length", "Pass"])
        self.assertIn(("Flags", "ext_urls,milter,groups"), fields)
        self.assertEqual([v for n, v in fields if n.lower() == "settings-id"], ["outbound"])
        self.assertEqual([v for n, v in fields if n == "X-Key"], ["2"])
        self.assertIn(("SPF", '{"result": "pass"}'), fields)
        self.assertIn(("Helo", "[127.0.0.1]"), fields)
        self.assertIn(("From", "ann@sender.example"), fields)
        self.assertEqual(
            [v for n, v in fields if n == "Rcpt"], ["bob@example.com", "carol@example.com"]
        )
        self.assertNotIn("Deliver-To", names)
        self.assertEqual([v for n, v in fields if n == "IP"], ["192.0.2.7"])
        self.assertIn(("Authorization", "Basic aGFyYWthOnMzY3JldA=="), fields)
        self.assertEqual(names[-5:], ["Authorization", "X-Key", "IP", "MTA-Name", "settings-id"])
        self.assertTrue(sent.startswith(b"Received: from "), sent[:40])
        self.assertTrue(sent.endswith(b"\r\n\r\nHello, see you at noon.\r\n"))
        self.assertEqual(KEPT[0][1]["action"], "no action")  # type: ignore[index]
        SpfSays.result = "TempError"  # (rspamd then checks for itself)
        got = yield send(port, message())
        fields = head_fields(stand.requests[1])
        self.assertIn(("Deliver-To", "bob@example.com"), fields)
        self.assertNotIn("SPF", [name for name, _ in fields])
        queue_id = [v for n, v in fields if n == "Queue-Id"]
        self.assertEqual(len(queue_id), 1)
        self.assertRegex(queue_id[0], r"^[0-9A-F-]{36}\.1$")

    @inlineCallbacks
    def test_errors_pass_unscanned_or_defer(self) -> Deferred[None]:
        """rspamd's own error answer (500, error and error_domain, which Haraka took for a
        clean scan), a body that is not JSON, an empty object, a JSON list, an answer cut
        short: the message goes on with the error in the results, or 450 4.7.1 Rspamd scan
        error under [defer] error=true."""
        cases = [
            (answer({"error": "invalid command", "error_domain": "protocol-error"}, "500 x"),
             "rspamd answered 500 x: invalid command"),
            (answer(b"<html>"), "not JSON"),
            (answer({}), "answer is empty"),
            (answer([1, 2]), "not a JSON object"),
            (answer({"error": "out of memory"}), "rspamd: out of memory"),
            (answer(b"{}")[:-1] + b"", "answer was cut short"),
            (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "not HTTP"),
        ]  # fmt: skip
        for raw, error in cases:
            stand = stand_in(self, raw, http_complete)
            port = self.serve(stand)
            got = yield send(port, message())
            self.assertEqual(got[0], 250, error)
            results = KEPT[0][1]
            assert results is not None
            self.assertIn(error, results["err"][0])
            port = self.serve(stand, "[defer]\nerror=true\n")
            got = yield send(port, message())
            self.assertEqual(got, (450, b"4.7.1 Rspamd scan error"))

    @inlineCallbacks
    def test_silence_and_absence(self) -> Deferred[None]:
        """An rspamd that never answers: the scan ends at [main] timeout (450 4.7.1
        Rspamd scan timeout with [defer] timeout=true, else on); one that is not there
        is an error."""
        stand = fake(self, None)
        port = self.serve(stand, "timeout=0.5\n[defer]\ntimeout=true\n")
        started = reactor.seconds()  # type: ignore[attr-defined]
        got = yield send(port, message())
        self.assertEqual(got, (450, b"4.7.1 Rspamd scan timeout"))
        self.assertLess(reactor.seconds() - started, 3)  # type: ignore[attr-defined]
        port = self.serve(stand, "timeout=0.5\n")
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        self.assertIn("did not answer within 0.5 s", KEPT[0][1]["err"][0])  # type: ignore[index]
        dead = free_port()
        port = server(self, f"host=127.0.0.1\nport={dead}\n[defer]\nerror=true\n{SCANNED}")
        got = yield send(port, message())
        self.assertEqual(got, (450, b"4.7.1 Rspamd scan error"))

    @inlineCallbacks
    def test_the_scan_ends_under_the_hook_timeout(self) -> Deferred[None]:
        """With the hook's own timeout at 2 s (rspamd.timeout), a silent rspamd is a scan
        timeout a second under it, as [defer] says, not the runner's "plugin timeout"."""
        stand = fake(self, None)
        port = self.serve(stand, "[defer]\ntimeout=true\n", **{"rspamd.timeout": "2"})
        got = yield send(port, message())
        self.assertEqual(got, (450, b"4.7.1 Rspamd scan timeout"))

    @inlineCallbacks
    def test_soft_reject_and_reply_text(self) -> Deferred[None]:
        """soft reject: 451 4.7.1 with rspamd's smtp_message made one printable line
        (a CR LF in it cannot start a reply of its own); [soft_reject] message without
        one; turned off, the message is queued with the fields."""
        said = {"smtp_message": "Try again later\r\n250 2.0.0 OK caf\u00e9"}
        verdict = {"action": "soft reject", "score": 3.0, "messages": said, "symbols": {}}
        port = self.serve(fake(self, verdict))
        got = yield send(port, message())
        self.assertEqual(got, (451, b"4.7.1 Try again later 250 2.0.0 OK caf?"))
        quiet = {"action": "soft reject", "score": 3.0, "symbols": {}}
        port = self.serve(fake(self, quiet), "[soft_reject]\nmessage=Not now\n")
        got = yield send(port, message())
        self.assertEqual(got, (451, b"4.7.1 Not now"))
        port = self.serve(fake(self, verdict), "[soft_reject]\nenabled=false\n")
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        self.assertIn("\r\nX-Rspamd-Bar: +++\r\n", header_of(KEPT[0][0]))

    @inlineCallbacks
    def test_authenticated_clients(self) -> Deferred[None]:
        """A client that authenticated is not scanned unless [check] authenticated; then
        its rejects are refused only with [reject] authenticated."""
        gtube = {"action": "reject", "score": 15.0, "symbols": {}}
        stand = fake(self, gtube)
        logged_in = f"{__name__}:LoggedIn\n"
        port = server(self, f"host=127.0.0.1\nport={stand.port}\n{SCANNED}", logged_in)
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        self.assertEqual(KEPT[0][1]["skip"], ["authed"])  # type: ignore[index]
        self.assertEqual(stand.requests, [])
        ini = f"host=127.0.0.1\nport={stand.port}\n{SCANNED}authenticated=true\n"
        port = server(self, ini, logged_in)
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        self.assertIn(("User", "ann"), head_fields(stand.requests[0]))
        port = server(self, ini + "[reject]\nauthenticated=true\n", logged_in)
        got = yield send(port, message())
        self.assertEqual(got, (550, b"5.7.1 Detected as spam"))

    @inlineCallbacks
    def test_milter_edits_and_dkim_signature(self) -> Deferred[None]:
        """remove_headers as a milter counts (0: all, 1: the first, -1: the last), before
        rspamd's DKIM-Signature goes on top (so removing DKIM-Signature spares it);
        add_headers at the end, or at its order (0: the top), one per list entry; a value
        that tries to start a field of its own is folded into its field, a non-ASCII one
        encoded, and a name that is none skipped."""
        verdict = {
            "action": "no action",
            "score": -2.7,
            "symbols": {"A": {"name": "A", "score": -2.7}},
            "dkim-signature": "v=1; a=rsa-sha256; d=example.com;\r\n\tb=abc",
            "milter": {
                "remove_headers": {"X-Two": 1, "X-Three": -1, "X-All": 0, "DKIM-Signature": 0},
                "add_headers": {
                    "X-Spamd-Result": {"value": "default: False [-2.70 / 15.00]", "order": 0},
                    "X-Listed": ["one", {"value": "two"}, None],
                    "X-Evil": "ok\r\nBcc: thief@elsewhere.example\r\n\r\nbody",
                    "X-Utf": "caf\u00e9",
                    "Bad Name": "x",
                },
            },
        }
        extra = "X-Two: 1\r\nX-Two: 2\r\nX-Three: 1\r\nX-Three: 2\r\nX-All: 1\r\nX-All: 2\r\n"
        port = self.serve(fake(self, verdict), "add_headers=always\n")
        got = yield send(port, message(extra=extra))
        self.assertEqual(got[0], 250)
        header = header_of(KEPT[0][0])
        lines = header.split("\r\n")
        self.assertEqual(lines[0], "X-Spamd-Result: default: False [-2.70 / 15.00]")
        self.assertEqual(
            lines[1:3], ["DKIM-Signature: v=1; a=rsa-sha256; d=example.com;", "\tb=abc"]
        )
        self.assertEqual(re.findall(r"X-Two: (\d)", header), ["2"])
        self.assertEqual(re.findall(r"X-Three: (\d)", header), ["1"])
        self.assertNotIn("X-All", header)
        self.assertIn("\r\nX-Listed: one\r\nX-Listed: two\r\n", header)
        self.assertIn("\r\nX-Evil: ok\r\n Bcc: thief@elsewhere.example\r\n body\r\n", header)
        self.assertNotIn("\r\nBcc:", header)
        self.assertIn("\r\nX-Utf: =?utf-8?b?Y2Fmw6k=?=\r\n", header)
        self.assertNotIn("Bad Name", header)
        self.assertIn("\r\nX-Rspamd-Bar: --\r\n", header)
        self.assertIn("\r\nX-Rspamd-Report: A(-2.7)\r\nX-Rspamd-Score: -2.7", header)

    @inlineCallbacks
    def test_a_verdict_that_cannot_be_followed_changes_nothing(self) -> Deferred[None]:
        """A verdict asking for a field value over 16 KB, a word no header line can hold,
        or more than 100 fields: nothing of it is done (not even the edits it asked for
        before), the error is in the results, and [defer] error decides."""
        removal = {"remove_headers": {"Subject": 0}}
        for milter, error in (
            ({**removal, "add_headers": {"X-Big": "a " * 9000}}, "a value of 18000"),
            ({**removal, "add_headers": {"X-Word": "a" * 2000}}, "too long for a header"),
            ({**removal, "add_headers": {"X-Many": ["v"] * 101}}, "more than 100 fields"),
        ):
            verdict = {"action": "add header", "score": 7.0, "symbols": {}, "milter": milter}
            stand = fake(self, verdict)
            port = self.serve(stand)
            got = yield send(port, message())
            self.assertEqual(got[0], 250)
            data, results = KEPT[0]
            assert results is not None
            self.assertIn(error, results["err"][0])
            self.assertNotIn("action", results)
            header = header_of(data)
            self.assertIn("\r\nSubject: lunch\r\n", header)
            self.assertNotIn("X-Rspamd", header)
            port = self.serve(stand, "[defer]\nerror=true\n")
            got = yield send(port, message())
            self.assertEqual(got, (450, b"4.7.1 Rspamd scan error"))

    @inlineCallbacks
    def test_odd_milter_indexes_and_orders(self) -> Deferred[None]:
        """A remove_headers index that is no whole number (1.0, "1", true, null) removes
        nothing, where a list of them removes each; an order past the end, however large,
        puts the field at the end; a negative one, or one that is no number, too."""
        verdict = {
            "action": "no action",
            "symbols": {},
            "milter": {
                "remove_headers": {
                    "Subject": 1.0, "From": "1", "To": True, "Date": None, "X-A": [1, -1],
                },
                "add_headers": {
                    "X-Far": {"value": "far", "order": 10**30},
                    "X-Neg": {"value": "neg", "order": -1},
                    "X-Str": {"value": "str", "order": "0"},
                },
            },
        }  # fmt: skip
        port = self.serve(fake(self, verdict))
        got = yield send(port, message(extra="X-A: 1\r\nX-A: 2\r\nX-A: 3\r\n"))
        self.assertEqual(got[0], 250)
        header = header_of(KEPT[0][0])
        for kept in ("Subject: lunch", "From: Ann", "To: Bob", "Date: Sat", "X-A: 2"):
            self.assertIn(f"\r\n{kept}", header)
        self.assertNotIn("X-A: 1", header)
        self.assertNotIn("X-A: 3", header)
        self.assertTrue(header.endswith("\r\nX-Far: far\r\nX-Neg: neg\r\nX-Str: str"), header)

    @inlineCallbacks
    def test_subject_template_with_an_8bit_subject(self) -> Deferred[None]:
        """rewrite subject without rspamd's own subject: [main] subject with the old one
        in place of %s, as it is ($& stays $&); an 8-bit Subject the client sent raw
        comes out encoded, with U+FFFD for the bytes that are not UTF-8."""
        verdict = {"action": "rewrite subject", "score": 6.0, "symbols": {}}
        port = self.serve(fake(self, verdict), "subject=[SUSPECT] %s\n")
        raw = message().replace(b"Subject: lunch", b"Subject: 50% off $& caf\xe9")
        got = yield send(port, raw)
        self.assertEqual(got[0], 250)
        subjects = re.findall(r"\r\nSubject: ([^\r]*)", header_of(KEPT[0][0]))
        self.assertEqual(len(subjects), 1)
        from email.header import decode_header, make_header

        self.assertEqual(
            str(make_header(decode_header(subjects[0]))), "[SUSPECT] 50% off $& caf\ufffd"
        )

    @inlineCallbacks
    def test_unix_socket(self) -> Deferred[None]:
        """unix_socket: the same request over a Unix socket (Host: localhost)."""
        path = os.path.join(temp_dir(self), "rspamd.sock")
        stand = fake(self, NO_ACTION, unix=path)
        port = server(self, f"unix_socket={path}\n{SCANNED}")
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        self.assertIn(("Host", "localhost"), head_fields(stand.requests[0]))

    @inlineCallbacks
    def test_https(self) -> Deferred[None]:
        """scheme=https: the certificate is checked against [tls] ca_file and the name
        (servername, else host); a name it does not hold is an error (450 under [defer]
        error); reject_unauthorized=false takes any certificate."""
        certs = pki()
        factory = StandIn(answer(NO_ACTION), http_complete)
        context = ssl.DefaultOpenSSLContextFactory(str(certs.mx.key), str(certs.mx.cert))
        listening = reactor.listenSSL(  # type: ignore[attr-defined]
            0, factory, context, interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        factory.port = listening.getHost().port
        tls = f"scheme=https\n{SCANNED}[tls]\nca_file={certs.ca}\n"
        port = self.serve(factory, tls)
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        self.assertEqual(KEPT[0][1]["action"], "no action")  # type: ignore[index]
        port = self.serve(factory, tls + "servername=other.test\n[defer]\nerror=true\n")
        got = yield send(port, message())
        self.assertEqual(got, (450, b"4.7.1 Rspamd scan error"))
        port = self.serve(factory, f"scheme=https\n{SCANNED}[tls]\nreject_unauthorized=false\n")
        got = yield send(port, message())
        self.assertEqual(KEPT[0][1]["action"], "no action")  # type: ignore[index]
        self.assertEqual(len(factory.requests), 2)


class ConfigTests(TestCase):
    def test_bad_settings_stop_startup_naming_them(self) -> None:
        for ini, named in (
            ("port=0\n", "rspamd.ini [main] port: 0 is not a positive number"),
            ("port=70000\n", "rspamd.ini [main] port must be 1-65535"),
            ("add_headers=often\n", "add_headers must be always, never or sometimes"),
            ("path=checkv2\n", "path must start with /"),
            ("[header]\nbar=X Bar\n", "[header] bar: 'X Bar' is not a header field name"),
            ("[request_headers]\nBad:Name=1\n", "is not an HTTP header name"),
            ("scheme=https\n[tls]\nca_file=/nonexistent.pem\n", "[tls] ca_file: cannot read"),
            ("[request]\nzstd=true\n", "the zstd flag is not supported"),
            ("[request]\nflags=ZSTD\n", "the zstd flag is not supported"),
        ):
            with self.assertRaises(StartupError) as caught:
                server(self, ini)
            self.assertIn(named, str(caught.exception))
