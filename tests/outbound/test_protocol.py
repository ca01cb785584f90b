"""haraka_tw.outbound.protocol.SMTPClientProtocol on a StringTransport: the message body's
writes."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.outbound.protocol import WRITE_SIZE, SMTPClientProtocol


class BodyTests(SynchronousTestCase):
    """send_body writes the stuffed message under the transport's pull, and the ending
    dot goes with its last block."""

    def setUp(self) -> None:
        self.transport = StringTransport()
        self.proto = SMTPClientProtocol(Clock())
        self.proto.makeConnection(self.transport)
        self.writes: list[bytes] = []
        write = self.transport.write
        self.transport.write = lambda data: (self.writes.append(data), write(data))  # type: ignore[method-assign, func-returns-value]

    def pull(self) -> None:
        """What the reactor does: ask the producer for more while it is registered."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def test_small_message_one_write(self) -> None:
        """A message in a few chunks goes out in one write, the ending dot with it."""
        done = self.proto.send_body([b"Subject: x\r\n", b"\r\n", b".dot\r\n"], None)
        self.pull()
        self.assertEqual(self.writes, [b"Subject: x\r\n\r\n..dot\r\n.\r\n"])
        self.assertEqual(self.successResultOf(done), len(self.writes[0]))

    def test_large_message_in_blocks(self) -> None:
        """A message over WRITE_SIZE goes in blocks of that size; the last carries the dot."""
        body = b"x" * 76 + b"\r\n"
        message = body * (2 * WRITE_SIZE // len(body) + 1)
        done = self.proto.send_body([message], None)
        self.pull()
        self.assertEqual([len(w) for w in self.writes[:2]], [WRITE_SIZE, WRITE_SIZE])
        self.assertEqual(len(self.writes), 3)
        self.assertTrue(self.writes[-1].endswith(b"\r\n.\r\n"))
        self.assertEqual(b"".join(self.writes), message + b".\r\n")
        self.successResultOf(done)

    def test_exactly_write_size(self) -> None:
        """A message of exactly WRITE_SIZE: that block, then the dot alone."""
        message = (b"y" * (WRITE_SIZE - 2)) + b"\r\n"
        self.proto.send_body([message], None)
        self.pull()
        self.assertEqual(self.writes, [message, b".\r\n"])

    def test_empty_message(self) -> None:
        """An empty message is just the ending dot."""
        self.proto.send_body([], None)
        self.pull()
        self.assertEqual(self.writes, [b".\r\n"])

    def test_nagle_off(self) -> None:
        """The connection asks for TCP_NODELAY (StringTransport records nothing: the TCP
        transport's setTcpNoDelay is called when it has one)."""
        calls: list[bool] = []
        transport = StringTransport()
        transport.setTcpNoDelay = calls.append  # type: ignore[attr-defined]
        SMTPClientProtocol(Clock()).makeConnection(transport)
        self.assertEqual(calls, [True])
