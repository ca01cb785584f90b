"""haraka_tw.clamd without a clamd: its answers parsed, its requests framed (the real
exchange is tested in tests/plugins/test_clamd.py, against ClamAV's clamd)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw import clamd
from haraka_tw.exchange import ServiceError


class AnswerTests(SynchronousTestCase):
    def test_answers(self) -> None:
        """OK, FOUND (with ExtendedDetectionInfo's hash and size dropped), the size
        limit; an ERROR or anything else is a ServiceError."""
        self.assertTrue(clamd.parse_answer(b"stream: OK\0").clean)
        self.assertEqual(clamd.parse_answer(b"stream: Eicar-Sig FOUND\0").virus, "Eicar-Sig")
        found = clamd.parse_answer(b"stream: Eicar-Sig(44d88612fea8a8f36de82e1278abb02f:68) FOUND")
        self.assertEqual(found.virus, "Eicar-Sig")
        self.assertTrue(clamd.parse_answer(b"INSTREAM size limit exceeded. ERROR\0").size_limit)
        for bad in (b"stream: lstat() failed ERROR\0", b"", b"UNKNOWN COMMAND\0"):
            self.assertRaises(ServiceError, clamd.parse_answer, bad)

    @given(st.binary(max_size=200))
    def test_any_bytes_are_an_answer_or_a_service_error(self, data: bytes) -> None:
        """Whatever a peer sends, parse_answer gives an answer, whose name is 0x21-0x7E
        only, or says why not; never another exception."""
        try:
            answer = clamd.parse_answer(data)
        except ServiceError:
            return
        if answer.virus is not None:
            self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in answer.virus), answer.virus)


class FramingTests(SynchronousTestCase):
    def test_chunks_of_64_kb_and_an_end(self) -> None:
        """zINSTREAM, the Received line's chunk, the message in chunks of at most 64 KB
        (empty pieces send none), a chunk of length 0."""
        frames = list(clamd._frames([b"a" * 70_000, b"", b"b"]))
        self.assertEqual(frames[0], b"zINSTREAM\0")
        sizes = [struct.unpack("!I", frame[:4])[0] for frame in frames[1:]]
        self.assertEqual(sizes, [len(clamd.PREDATA), 65536, 70_000 - 65536, 1, 0])
