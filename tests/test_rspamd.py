"""The rspamd client's reading of answers and making of requests, from bytes (the
plugin's tests, tests/plugins/test_rspamd.py, ask real and stand-in rspamds)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.rspamd import RspamdError, parse_answer, request_head

VERDICT = b'{"action":"no action","score":0.5}'


class AnswerTests(SynchronousTestCase):
    def test_bodies_by_length_by_chunks_and_to_the_end(self) -> None:
        """A Content-Length body is cut to its length, a chunked one joined (extensions
        ignored), one with neither read to the end of the connection."""
        by_length = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%sjunk" % (
            len(VERDICT),
            VERDICT,
        )
        chunked = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"5;x=y\r\n" + VERDICT[:5] + b"\r\n"
            + b"%x\r\n" % (len(VERDICT) - 5) + VERDICT[5:] + b"\r\n0\r\n\r\n"
        )  # fmt: skip
        to_the_end = b"HTTP/1.0 200 OK\r\n\r\n" + VERDICT
        for answer in (by_length, chunked, to_the_end):
            self.assertEqual(parse_answer(answer), {"action": "no action", "score": 0.5})

    def test_the_message_after_the_verdict_is_left(self) -> None:
        """With the body_block flag rspamd puts the message after its JSON, and says where
        in Message-Offset: the verdict is read up to there."""
        answer = b"HTTP/1.1 200 OK\r\nMessage-Offset: %d\r\n\r\n%sSubject: x\r\n\r\nhi" % (
            len(VERDICT),
            VERDICT,
        )
        self.assertEqual(parse_answer(answer)["action"], "no action")

    def test_what_is_no_verdict(self) -> None:
        for answer, said in (
            (b"", "closed the connection without answering"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", "ended inside its header"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}", "cut short (2 of 50"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}", "Content-Length is no number"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{}", "cut short"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed"),
            (b"HTTP/1.1 404 Not Found\r\n\r\nnope", "rspamd answered 404 Not Found"),
            (b"HTTP/1.1 200 OK\r\n\r\nnull", "answer is empty"),
            (b'HTTP/1.1 200 OK\r\n\r\n"x"', "not a JSON object"),
            (b"ICAP/1.0 200 OK\r\n\r\n{}", "not HTTP"),
            (b"HTTP/1.1 200 OK\r\n\r\n" + b"[" * 100_000, "not JSON"),
            (b"HTTP/1.1 200 OK\r\nCompression: zstd\r\n\r\n(\xb5/\xfd", "is compressed (zstd)"),
        ):
            with self.assertRaises(RspamdError) as caught:
                parse_answer(answer)
            self.assertIn(said, str(caught.exception))


class RequestTests(SynchronousTestCase):
    def test_values_cannot_end_their_line(self) -> None:
        """A CR, LF or other control character in a value becomes a space; a value that
        is empty then is left out; a name that is no token is refused."""
        head = request_head(
            "/checkv2",
            "127.0.0.1:11333",
            10,
            [("Helo", "a\r\nIP: 6.6.6.6"), ("From", "\x00\r\n"), ("Rcpt", "b@c")],
        )
        self.assertEqual(
            head,
            b"POST /checkv2 HTTP/1.1\r\nHost: 127.0.0.1:11333\r\nConnection: close\r\n"
            b"Content-Length: 10\r\nHelo: a IP: 6.6.6.6\r\nRcpt: b@c\r\n\r\n",
        )
        with self.assertRaises(ValueError):
            request_head("/", "h", 0, [("Bad Name", "x")])
