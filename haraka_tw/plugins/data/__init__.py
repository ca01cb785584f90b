"""Haraka's C{data.*} plugins (C{data.signatures} is C{haraka_tw.plugins.data.signatures}),
and the streaming body search they and other content plugins share.

L{BodySearch} looks for a pattern in a message body handed over in chunks
(C{transaction.message_stream.body_chunks()}), without joining the chunks into one copy of
the message: a match that straddles two chunks is found by searching the seam again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["BodySearch", "search_body"]


class BodySearch:
    """Finds the first match of one pattern in a body fed chunk by chunk.

    @ivar match: the first match found, or None. Its positions are relative to the piece of
        the body it was found in, so use its text (C{match.group(0)}), not its offsets.
    """

    def __init__(self, pattern: re.Pattern[bytes], longest: int) -> None:
        """
        @param pattern: what to look for.
        @param longest: the length in bytes of the longest text C{pattern} can match. A
            match longer than this that straddles two chunks is missed.
        """
        if longest < 1:
            raise ValueError(f"longest must be at least 1, not {longest}")
        self.pattern = pattern
        self.match: re.Match[bytes] | None = None
        self._keep = longest - 1
        self._tail = b""

    @property
    def found(self) -> bool:
        return self.match is not None

    def feed(self, chunk: bytes) -> bool:
        """Search the next chunk (and the seam with the one before); True once found."""
        if self.match is not None:
            return True
        keep = self._keep
        if keep and self._tail:
            self.match = self.pattern.search(self._tail + chunk[:keep])
            if self.match is not None:
                return True
        self.match = self.pattern.search(chunk)
        if self.match is not None:
            return True
        if keep:
            self._tail = chunk[-keep:] if len(chunk) >= keep else (self._tail + chunk)[-keep:]
        return False


def search_body(chunks: Iterable[bytes], *searches: BodySearch) -> None:
    """Feed C{chunks} to every search; stop reading once all of them have found a match."""
    for chunk in chunks:
        if all([search.feed(chunk) for search in searches]):
            return
