"""Which worker delivers which queue file: the queue directory split into partitions.

With smtp.ini C{nodes=N}, worker I{i} (0..N-1) delivers the files of partition I{i} only:
those whose stable id (L{QueueName.id<haraka_tw.outbound.qfile.QueueName.id>}: arrival,
pid, random tag, counter, host) hashes to I{i} (CRC-32, modulo N). Nothing is written into
the file or its name for this, so:

- a file keeps its partition for life: a retry renames it, but its id does not change;
- a worker names the files it writes (new mail, split files, DSNs) so that they fall in its
  own partition (L{Partition.owns} decides; the random tag is drawn again until it does);
- a worker that dies leaves its files to its replacement, which has the same index;
- started again with another N, the files are shared out again; Haraka's files and those a
  single process wrote are taken like any other;
- a single process has no partition and takes every file.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["Partition", "partition_of"]


def partition_of(entry_id: str, count: int) -> int:
    """The partition (0..count-1) of the queue file whose stable id is C{entry_id}."""
    return zlib.crc32(entry_id.encode("utf-8", "surrogateescape")) % count


@dataclass(frozen=True)
class Partition:
    """Partition C{index} of C{count}: the part of the queue one worker delivers.

    @raise ValueError: unless 0 <= index < count.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} of {self.count} does not exist")

    def owns(self, entry_id: str) -> bool:
        """Whether the file with this stable id is this partition's."""
        return partition_of(entry_id, self.count) == self.index

    @property
    def lock_name(self) -> str:
        """The file in the queue directory whose flock the partition's worker holds."""
        return f".lock.{self.index}"

    def __str__(self) -> str:
        return f"partition {self.index} of {self.count}"
