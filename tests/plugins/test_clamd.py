"""clamd over sockets: messages sent with smtplib, scanned by a real clamd on loopback (with
test signatures of its own), and by a stand-in clamd for the answers a real one does not
give at will (an error, a size limit, silence, a name with control characters)."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw import clamd
from haraka_tw.codes import OK
from haraka_tw.interfaces import IQueueHook
from haraka_tw.plugins.clamd import Excludes
from haraka_tw.server import StartupError
from tests.clamd_server import EICAR, PHISH, ClamdServer
from tests.standin import StandIn, stand_in
from tests.support import data_reply, free_port, start_server

KEPT: list[tuple[bytes, dict[str, Any] | None]] = []
VIRUS = "Haraka-Test-EICAR.UNOFFICIAL"


@implementer(IQueueHook)
class Keep:
    """Test plugin: keeps each message as queued, and its clamd results."""

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        KEPT.append((txn.message_stream.get_bytes(), txn.results.get("clamd")))
        return OK


def message(text: str = "See you at noon.", *, attached: str | None = None) -> bytes:
    """A message whose text is C{text}, with C{attached} as an attachment if given."""
    head = "From: ann@sender.example\r\nTo: bob@example.com\r\nSubject: lunch\r\n"
    if attached is None:
        return f"{head}\r\n{text}\r\n".encode()
    return (
        f'{head}MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
        f"--B\r\nContent-Type: text/plain\r\n\r\n{text}\r\n"
        "--B\r\nContent-Type: application/octet-stream\r\n"
        f'Content-Disposition: attachment; filename="x.bin"\r\n\r\n{attached}\r\n--B--\r\n'
    ).encode()


def send(port: int, data: bytes) -> Deferred[tuple[int, bytes]]:
    """Send C{data} to bob@example.com; the reply to the end of DATA."""
    return data_reply(port, "ann@sender.example", ["bob@example.com"], data)


def server(case: TestCase, ini: str, **files: str) -> int:
    KEPT.clear()
    _, port = start_server(
        case,
        {
            "plugins": f"clamd\nrcpt_to.in_host_list\n{__name__}:Keep\n",
            "clamd.ini": ini,
            "host_list": "example.com\n",
            **files,
        },
    )
    return port


def header_of(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode()


def instream_complete(request: bytes) -> bool:
    """Whether a zINSTREAM request has reached its zero-length chunk."""
    at = len(b"zINSTREAM\0")
    while at + 4 <= len(request):
        (size,) = struct.unpack("!I", request[at : at + 4])
        if size == 0:
            return True
        at += 4 + size
    return False


def unframed(request: bytes) -> bytes:
    """The data of a zINSTREAM request, its chunks joined."""
    at, out = len(b"zINSTREAM\0"), b""
    while True:
        (size,) = struct.unpack("!I", request[at : at + 4])
        if size == 0:
            return out
        out += request[at + 4 : at + 4 + size]
        at += 4 + size


def fake_clamd(case: TestCase, answer: bytes | None) -> StandIn:
    return stand_in(case, answer, instream_complete)


class RealClamdTests(TestCase):
    """Against ClamAV's own clamd, with the test signatures of tests/clamd_server.py."""

    clamd: ClamdServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.clamd = ClamdServer().start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.clamd.stop()

    def server(self, ini: str = "", **files: str) -> int:
        return server(self, f"[main]\nclamd_socket=127.0.0.1:{self.clamd.port}\n{ini}", **files)

    @inlineCallbacks
    def test_a_virus_is_refused_a_clean_message_passes(self) -> Deferred[None]:
        """A message carrying the test virus is refused with 550 5.7.1 naming it and
        nothing is queued; a clean one is queued, with pass: clean."""
        port = self.server()
        got = yield send(port, message(attached=EICAR))
        self.assertEqual(got, (550, f"5.7.1 Message is infected with {VIRUS}".encode()))
        self.assertEqual(KEPT, [])
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        results = KEPT[0][1]
        assert results is not None
        self.assertEqual(results["pass"], ["clean"])

    @inlineCallbacks
    def test_categories_and_excludes_let_through_with_a_field(self) -> Deferred[None]:
        """[reject] UNOFFICIAL=false lets an unofficial signature through, with
        X-Haraka-Virus; a Phishing one then too (Phishing is let through by default),
        but not with Phishing=true; an exclude with wildcards (any case) lets one
        through; a ! exclude refuses it even when its category is let through, unless
        [reject] virus is off, which lets everything through with the field."""
        port = self.server("[reject]\nUNOFFICIAL=false\n")
        for text in (EICAR, PHISH):
            got = yield send(port, message(attached=text))
            self.assertEqual(got[0], 250, got)
        found = [header_of(data).rsplit("X-Haraka-Virus: ", 1)[1] for data, _ in KEPT]
        self.assertEqual(found, [VIRUS, "Heuristics.Phishing.Haraka-Test.UNOFFICIAL"])
        ini = "[reject]\nPhishing=true\nUNOFFICIAL=false\n"
        port = self.server(ini, **{"clamd.excludes": "haraka-*-eicar.*\n"})
        got = yield send(port, message(attached=EICAR))
        self.assertEqual(got[0], 250, got)
        got = yield send(port, message(attached=PHISH))
        self.assertEqual(got[0], 550, got)
        port = self.server("[reject]\nUNOFFICIAL=false\n", **{"clamd.excludes": "!/EICAR/\n"})
        got = yield send(port, message(attached=EICAR))
        self.assertEqual(got[0], 550, got)
        port = self.server("[reject]\nvirus=false\n", **{"clamd.excludes": "!/EICAR/\n"})
        got = yield send(port, message(attached=EICAR))
        self.assertEqual(got[0], 250, got)
        self.assertIn(f"\r\nX-Haraka-Virus: {VIRUS}", header_of(KEPT[0][0]))

    @inlineCallbacks
    def test_only_with_attachments(self) -> Deferred[None]:
        """With only_with_attachments, a message without an attachment is not scanned
        (the virus in its text passes, skip: no attachments); with one, it is."""
        port = self.server("only_with_attachments=true\n")
        got = yield send(port, message(EICAR))
        self.assertEqual(got[0], 250)
        results = KEPT[0][1]
        assert results is not None
        self.assertEqual(results["skip"], ["no attachments"])
        got = yield send(port, message(attached=EICAR))
        self.assertEqual(got[0], 550)

    @inlineCallbacks
    def test_hosts_tried_in_turn(self) -> Deferred[None]:
        """A dead host first, or one that answers with an error: the next one scans
        (a message of several 64 KB chunks here), and a trailing comma adds no host."""
        error = fake_clamd(self, b"stream: Can't allocate memory ERROR\0")
        for first in (f"127.0.0.1:{free_port()}", f"127.0.0.1:{error.port}"):
            port = self.server(f"clamd_socket={first}, 127.0.0.1:{self.clamd.port},\n")
            got = yield send(port, message("x" * 200_000, attached=EICAR))
            self.assertEqual(got[0], 550)
        self.assertEqual(error.connections, 1)


class StandInTests(TestCase):
    @inlineCallbacks
    def test_request_framing(self) -> Deferred[None]:
        """zINSTREAM, then the Received line and the message as it will be queued, in
        chunks, then a chunk of length 0."""
        fake = fake_clamd(self, b"stream: OK\0")
        port = server(self, f"clamd_socket=127.0.0.1:{fake.port}\n")
        yield send(port, message())
        request = fake.requests[0]
        self.assertTrue(request.startswith(b"zINSTREAM\0"))
        self.assertTrue(request.endswith(b"\0\0\0\0"))
        self.assertEqual(unframed(request), clamd.PREDATA + KEPT[0][0])

    @inlineCallbacks
    def test_failures_defer_or_pass(self) -> Deferred[None]:
        """No clamd, an error answer, silence: 450 4.7.1 with the matching text ([reject]
        error is on by default), else on with the error recorded."""
        dead = f"clamd_socket=127.0.0.1:{free_port()}\n"
        port = server(self, dead)
        got = yield send(port, message())
        self.assertEqual(got, (450, b"4.7.1 Error connecting to virus scanner"))
        fake = fake_clamd(self, b"stream: Can't allocate memory ERROR\0")
        port = server(self, f"clamd_socket=127.0.0.1:{fake.port}\n")
        got = yield send(port, message())
        self.assertEqual(got, (450, b"4.7.1 Error running virus scanner"))
        fake = fake_clamd(self, None)
        port = server(self, f"clamd_socket=127.0.0.1:{fake.port}\ntimeout=0.5\n")
        got = yield send(port, message())
        self.assertEqual(got, (450, b"4.7.1 Virus scanner timed out"))
        port = server(self, dead + "[reject]\nerror=false\n")
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        results = KEPT[0][1]
        assert results is not None
        self.assertIn("cannot reach clamd", results["err"][0])

    @inlineCallbacks
    def test_size_limits_pass_unscanned(self) -> Deferred[None]:
        """A stream over max_size is not sent; one clamd refuses as over its
        StreamMaxLength goes on too (as in Haraka), each recorded as a skip."""
        fake = fake_clamd(self, b"INSTREAM size limit exceeded. ERROR\0")
        port = server(self, f"clamd_socket=127.0.0.1:{fake.port}\nmax_size=100\n")
        got = yield send(port, message())
        self.assertEqual((got[0], fake.connections), (250, 0))
        results = KEPT[0][1]
        assert results is not None
        self.assertTrue(results["skip"][0].startswith("exceeds max size"), results)
        port = server(self, f"clamd_socket=127.0.0.1:{fake.port}\n")
        got = yield send(port, message())
        self.assertEqual(got[0], 250)
        results = KEPT[0][1]
        assert results is not None
        self.assertIn("StreamMaxLength", results["skip"][0])

    @inlineCallbacks
    def test_a_name_is_printable_ascii(self) -> Deferred[None]:
        """A signature name with control characters reaches the reply with each as ?."""
        fake = fake_clamd(self, b"stream: Bad\x01Name\x7f FOUND\0")
        port = server(self, f"clamd_socket=127.0.0.1:{fake.port}\n")
        got = yield send(port, message())
        self.assertEqual(got, (550, b"5.7.1 Message is infected with Bad?Name?"))


class UnitTests(SynchronousTestCase):
    def test_excludes(self) -> None:
        """Wildcards over the whole name, every one of them, any case; /regex/ searched;
        ! first; a bad regex names its line."""
        excludes = Excludes.parse(["*.Test.*-?", "/phish/", "!Bad.*", "Win.*"])
        self.assertIs(excludes.verdict("Win.Test.EICAR-1"), False)
        self.assertIsNone(excludes.verdict("X.Win.Test.EICAR-12"))
        self.assertIsNone(excludes.verdict("X.Win.y"))
        self.assertIs(excludes.verdict("Heuristics.PHISHING.x"), False)
        self.assertIs(excludes.verdict("bad.Test.x-1"), True)
        with self.assertRaises(ValueError) as caught:
            Excludes.parse(["ok", "/(/"])
        self.assertIn("clamd.excludes entry 2", str(caught.exception))

    def test_bad_settings_stop_startup(self) -> None:
        """A clamd_socket that is no address, a timeout that is no number: start-up
        stops naming the file and key."""
        for ini, named in (
            ("clamd_socket=host:port\n", "clamd.ini [main] clamd_socket"),
            ("timeout=soon\n", "clamd.ini [main] timeout"),
        ):
            with self.assertRaises(StartupError) as caught:
                server(self, ini)  # type: ignore[arg-type]
            self.assertIn(named, str(caught.exception))
