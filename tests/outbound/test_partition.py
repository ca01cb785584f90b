"""The outbound queue split among worker processes: which file is whose, and a store that
keeps to its partition (names, scans, clean-ups, listings, locks)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from haraka_tw.outbound.partition import Partition, partition_of
from haraka_tw.outbound.qfile import QueueName, QueueRecipient, Todo
from haraka_tw.outbound.store import QueueStore

MESSAGE = b"From: a@x.test\r\nTo: b@example.com\r\nSubject: t\r\n\r\nbody\r\n"
NOW = 1_700_000_000.0


def todo(domain: str = "example.com") -> Todo:
    return Todo(domain, "a@x.test", [QueueRecipient(f"b@{domain}")], "UUID", NOW)


def store(path: Path, partition: Partition | None = None) -> QueueStore:
    lines: list[str] = []
    s = QueueStore(path, now=lambda: NOW, fsync=False, log=lines.append, partition=partition)
    s.lines = lines  # type: ignore[attr-defined]
    return s


def fill(path: Path, count: int) -> list[str]:
    """C{count} queue files written by a single process (no partition); their ids."""
    whole = store(path)
    return [whole.add(todo(), [MESSAGE]).id for _ in range(count)]


# -- which file is whose -------------------------------------------------------------------


def test_partition_of_is_crc32_of_the_id() -> None:
    """A file's partition is CRC-32 of its stable id modulo the count: the same in every
    process and every run."""
    entry_id = "1700000000000_4242_aB3dE9_1_mx.test"
    assert partition_of(entry_id, 2) == 3191006641 % 2
    assert partition_of(entry_id, 7) == 3191006641 % 7
    assert partition_of(entry_id, 1) == 0


@given(st.text(min_size=1, max_size=80), st.integers(min_value=1, max_value=64))
def test_every_id_has_exactly_one_owner(entry_id: str, count: int) -> None:
    """Of the N partitions, exactly one owns any id (a surrogate-escaped name too)."""
    owners = [i for i in range(count) if Partition(i, count).owns(entry_id)]
    assert len(owners) == 1


def test_partitions_share_files_evenly() -> None:
    """Fresh names spread over the partitions about evenly."""
    names = [QueueName.new(NOW, hostname="mx.test").id for _ in range(4000)]
    counts = Counter(partition_of(name, 4) for name in names)
    assert sorted(counts) == [0, 1, 2, 3]
    assert min(counts.values()) > 800


def test_a_partition_must_exist() -> None:
    """Index outside 0..count-1 is refused."""
    with pytest.raises(ValueError):
        Partition(2, 2)
    with pytest.raises(ValueError):
        Partition(-1, 2)
    assert str(Partition(1, 2)) == "partition 1 of 2"
    assert Partition(1, 2).lock_name == ".lock.1"


# -- a store in its partition --------------------------------------------------------------


def test_new_files_fall_in_the_writers_partition(tmp_path: Path) -> None:
    """add() and split() name every file so that it is the writing partition's."""
    for index in range(3):
        mine = store(tmp_path / "q", Partition(index, 3))
        for _ in range(10):
            entry = mine.add(todo(), [MESSAGE])
            assert partition_of(entry.id, 3) == index
        entry = mine.add(todo(), [MESSAGE])
        entry.todo.rcpt_to.append(QueueRecipient("c@example.com"))
        part = mine.split(entry, [QueueRecipient("c@example.com")])
        assert partition_of(part.id, 3) == index


def test_scan_and_listing_see_only_the_partition(tmp_path: Path) -> None:
    """Each partition's scan takes its own files; together they take every file once."""
    ids = fill(tmp_path / "q", 30)
    seen: list[str] = []
    for index in range(2):
        part = Partition(index, 2)
        entries = store(tmp_path / "q", part).scan()
        assert all(part.owns(e.id) for e in entries)
        assert {e.id for e in store(tmp_path / "q", part).listing().entries} == {
            e.id for e in entries
        }
        seen += [e.id for e in entries]
    assert sorted(seen) == sorted(ids)
    assert len(store(tmp_path / "q").scan()) == 30  # a single process takes them all


def test_a_partition_leaves_other_partitions_writes_alone(tmp_path: Path) -> None:
    """A scan removes only its partition's leftovers in tmp/ and its own orphan sidecars:
    another worker's file being written, or its sidecar written before the file (a split),
    is not touched."""
    q = tmp_path / "q"
    zero, one = Partition(0, 2), Partition(1, 2)
    writer_one = store(q, one)
    writer_one.ensure_dirs()
    theirs = writer_one._new_name(NOW, NOW)
    ours = store(q, zero)._new_name(NOW, NOW)
    (q / "tmp" / f"{theirs.format()}.TOKEN.1.2.3.tag").write_bytes(b"half")
    (q / "tmp" / f"{ours.format()}.TOKEN.1.2.3.tag").write_bytes(b"half")
    (q / "tmp" / f"{theirs.id}.json.TOKEN.1.2.3.tag").write_bytes(b"{}")
    (q / "tmp" / "0000-abc-flush.json.TOKEN.1.2.3.tag").write_bytes(b"{}")  # a tool's
    (q / "state" / f"{theirs.id}.json").write_bytes(b"{}")
    (q / "state" / f"{ours.id}.json").write_bytes(b"{}")
    store(q, zero).scan()
    left = sorted(p.name for p in (q / "tmp").iterdir())
    assert left == sorted(
        [
            f"{theirs.format()}.TOKEN.1.2.3.tag",
            f"{theirs.id}.json.TOKEN.1.2.3.tag",
            "0000-abc-flush.json.TOKEN.1.2.3.tag",
        ]
    )
    assert [p.name for p in (q / "state").iterdir()] == [f"{theirs.id}.json"]
    store(q).scan()  # a single process cleans everything
    assert list((q / "tmp").iterdir()) == []
    assert list((q / "state").iterdir()) == []


def test_torn_files_are_set_aside_by_their_partition(tmp_path: Path) -> None:
    """A file that cannot be read is renamed error.<name> by the partition it belongs to,
    and listed as set aside by that partition only."""
    q = tmp_path / "q"
    one = Partition(1, 2)
    name = store(q, one)._new_name(NOW, NOW).format()
    q.mkdir(parents=True, exist_ok=True)
    (q / name).write_bytes(b"\x00\x00")
    store(q, Partition(0, 2)).scan()
    assert (q / name).exists()
    store(q, one).scan()
    assert (q / f"error.{name}").exists()
    assert store(q, one).listing().set_aside == [q / f"error.{name}"]
    assert store(q, Partition(0, 2)).listing().set_aside == []


def test_find_keeps_to_the_partition(tmp_path: Path) -> None:
    """find() answers only for the partition's own files."""
    (entry_id,) = fill(tmp_path / "q", 1)
    owner = partition_of(entry_id, 2)
    assert store(tmp_path / "q", Partition(owner, 2)).find(entry_id) is not None
    assert store(tmp_path / "q", Partition(1 - owner, 2)).find(entry_id) is None


def test_partition_locks_are_separate(tmp_path: Path) -> None:
    """Partition i locks .lock.<i>: each partition has one holder, and none of them holds
    the server's .lock."""
    q = tmp_path / "q"
    zero, zero_again = store(q, Partition(0, 2)), store(q, Partition(0, 2))
    one, whole = store(q, Partition(1, 2)), store(q)
    assert zero.lock()
    assert not zero_again.lock()
    assert one.lock()
    assert whole.lock()
    assert (q / ".lock.0").exists() and (q / ".lock.1").exists()
    for s in (zero, one, whole):
        s.unlock()


def test_a_copy_of_the_lock_descriptor_keeps_the_lock(tmp_path: Path) -> None:
    """The master passes .lock's descriptor to its workers: the lock stays held until the
    last copy is closed."""
    q = tmp_path / "q"
    master = store(q)
    assert master.lock()
    assert master.lock_fd is not None
    copy = os.dup(master.lock_fd)
    master.unlock()
    assert master.lock_fd is None
    tool = store(q)
    assert not tool.lock()
    os.close(copy)
    assert tool.lock()
    tool.unlock()


def test_haraka_leftovers_are_removed_by_their_partition(tmp_path: Path) -> None:
    """Haraka's __tmp__.<name> files go with the partition of <name>."""
    q = tmp_path / "q"
    name = store(q, Partition(1, 2))._new_name(NOW, NOW).format()
    q.mkdir(parents=True, exist_ok=True)
    (q / f"__tmp__.{name}").write_bytes(b"x")
    store(q, Partition(0, 2)).scan()
    assert (q / f"__tmp__.{name}").exists()
    store(q, Partition(1, 2)).scan()
    assert not (q / f"__tmp__.{name}").exists()
