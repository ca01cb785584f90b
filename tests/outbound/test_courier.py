"""haraka_tw.outbound.courier: how an attempt reads its message from the queue."""

from __future__ import annotations

from collections.abc import Iterator

from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.outbound import courier
from haraka_tw.outbound.qfile import QueueRecipient, Todo
from haraka_tw.outbound.queue import MemoryQueue, QueueEntry


class _CountingQueue(MemoryQueue):
    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    def load_message(self, entry: QueueEntry) -> Iterator[bytes]:
        self.loads += 1
        return super().load_message(entry)


class MessageTests(SynchronousTestCase):
    """The client reads the message twice (8-bit check, then sending); the file once."""

    def entry(self, queue: MemoryQueue, message: bytes) -> QueueEntry:
        todo = Todo(
            domain="b.test",
            mail_from="a@a.test",
            rcpt_to=[QueueRecipient("c@b.test")],
            uuid="U1",
            queue_time=0,
        )
        return self.successResultOf(queue.add(todo, [message]))

    def test_small_message_read_once(self) -> None:
        """A message up to KEEP_IN_MEMORY is read from the queue once per attempt."""
        queue = _CountingQueue()
        message = b"Subject: hi\r\n\r\nbody\r\n"
        read = courier._Message(queue, self.entry(queue, message))
        self.assertEqual([b"".join(read()) for _ in range(3)], [message] * 3)
        self.assertEqual(queue.loads, 1)

    def test_large_message_streamed_each_time(self) -> None:
        """A bigger message is streamed from the queue each time it is read."""
        queue = _CountingQueue()
        message = b"x" * 78 + b"\r\n"
        message *= courier.KEEP_IN_MEMORY // len(message) + 1
        read = courier._Message(queue, self.entry(queue, message))
        self.assertEqual([b"".join(read()) for _ in range(2)], [message] * 2)
        self.assertEqual(queue.loads, 2)
