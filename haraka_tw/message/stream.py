"""The message body store: in memory, spooled to a file past C{spool_after} bytes.

Haraka's C{spool_after}: -1 keeps the message in memory, 0 always spools, N spools once the
message passes N bytes. Reading back yields the current header (with whatever plugins
added) followed by the body, in chunks, so a large message is never held whole.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from haraka_tw.message.header import Header

__all__ = ["MessageStream"]

CHUNK = 64 * 1024


class MessageStream:
    """The body bytes of one message, and the L{Header} they belong to."""

    def __init__(self, header: Header, spool_dir: str | None = None, spool_after: int = -1) -> None:
        self.header = header
        self.spool_dir = spool_dir
        self.spool_after = spool_after
        self.body_size = 0
        self._memory: list[bytes] | None = []
        self._file: BinaryIO | None = None
        self.spool_path: str | None = None

    @property
    def spooled(self) -> bool:
        """Whether the body lives in a spool file."""
        return self._file is not None

    def write(self, data: bytes) -> None:
        """Append body bytes."""
        if not data:
            return
        self.body_size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        assert self._memory is not None
        self._memory.append(data)
        if self.spool_after >= 0 and self.body_size > self.spool_after:
            self._spool()  # made on the first byte past the limit, not before

    def _spool(self) -> None:
        if self.spool_dir:
            os.makedirs(self.spool_dir, exist_ok=True)
        fd, self.spool_path = tempfile.mkstemp(
            prefix="haraka_tw-", suffix=".spool", dir=self.spool_dir
        )
        self._file = os.fdopen(fd, "w+b")
        for piece in self._memory or ():
            self._file.write(piece)
        self._memory = None

    def flush(self) -> None:
        """Push what is buffered to the spool file (an OSError here is a full disk)."""
        if self._file is not None:
            self._file.flush()

    def body_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The body, in order."""
        if self._file is None:
            assert self._memory is not None
            if len(self._memory) > 1:  # join once so later reads are cheap
                self._memory = [b"".join(self._memory)]
            yield from self._memory
            return
        self._file.flush()
        assert self.spool_path is not None
        with open(self.spool_path, "rb") as f:
            while True:
                piece = f.read(size)
                if not piece:
                    return
                yield piece

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The whole message: the current header, then the body."""
        yield self.header.to_bytes()
        yield from self.body_chunks(size)

    def read(
        self, *, line_endings: str = "\r\n", dot_stuffed: bool = False, ending_dot: bool = False
    ) -> Iterator[bytes]:
        """The message in chunks, as a plugin that hands it on wants it (Haraka's
        message_stream options): "\n" line endings for a local program, dot-stuffed with a
        final "." for an SMTP peer."""
        from haraka_tw.message.read import read_message

        return read_message(
            self, line_endings=line_endings, dot_stuffed=dot_stuffed, ending_dot=ending_dot
        )

    def get_bytes(self) -> bytes:
        """The whole message in memory: for small messages and tests."""
        return b"".join(self.chunks())

    @property
    def size(self) -> int:
        """Bytes of the whole message as L{chunks} yields it."""
        return len(self.header.to_bytes()) + self.body_size

    def close(self) -> None:
        """Drop the body and remove the spool file."""
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spool_path or "")
            self._file = None
        self._memory = []
