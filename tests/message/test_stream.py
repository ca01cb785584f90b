"""The message stream: memory first, a spool file past spool_after, read back in order."""

from __future__ import annotations

import os
from pathlib import Path

from haraka_tw.message.header import Header
from haraka_tw.message.stream import MessageStream


def test_memory_only(tmp_path: Path) -> None:
    """spool_after=-1 keeps the body in memory."""
    s = MessageStream(Header.parse(b"A: 1\r\n"), str(tmp_path), -1)
    for _ in range(100):
        s.write(b"x" * 1000)
    assert not s.spooled
    assert s.get_bytes() == b"A: 1\r\n" + b"x" * 100_000
    assert s.size == 100_006


def test_spools_past_threshold_and_cleans_up(tmp_path: Path) -> None:
    """Past spool_after the body moves to a file in spool_dir; close() removes it."""
    s = MessageStream(Header(), str(tmp_path), 1000)
    s.write(b"a" * 600)
    assert not s.spooled
    s.write(b"b" * 600)
    assert s.spooled and s.spool_path is not None
    assert os.path.dirname(s.spool_path) == str(tmp_path)
    s.write(b"c" * 10)
    assert b"".join(s.body_chunks(size=100)) == b"a" * 600 + b"b" * 600 + b"c" * 10
    path = s.spool_path
    s.close()
    assert not os.path.exists(path)


def test_spool_always(tmp_path: Path) -> None:
    """spool_after=0 spools from the first byte, and not before (no file per MAIL)."""
    s = MessageStream(Header(), str(tmp_path), 0)
    assert not s.spooled and list(tmp_path.iterdir()) == []
    s.write(b"hello")
    assert s.spooled
    assert s.get_bytes() == b"hello"
    s.close()


def test_header_changes_show_in_chunks(tmp_path: Path) -> None:
    """Reading back gives the current header, with fields added after the body arrived."""
    h = Header.parse(b"Subject: x\r\n")
    s = MessageStream(h, str(tmp_path), -1)
    s.write(b"\r\nbody\r\n")
    h.add("Received", "by me")
    assert s.get_bytes() == b"Received: by me\r\nSubject: x\r\n\r\nbody\r\n"


def test_read_options(tmp_path: Path) -> None:
    """read(): LF line endings, or dot-stuffed with the final dot, across chunks."""
    s = MessageStream(Header.parse(b"A: 1\r\n"), str(tmp_path), 0)
    s.write(b"\r\n.dot\r\nplain\r\n")
    assert b"".join(s.read(line_endings="\n")) == b"A: 1\n\n.dot\nplain\n"
    stuffed = b"".join(s.read(dot_stuffed=True, ending_dot=True))
    assert stuffed == b"A: 1\r\n\r\n..dot\r\nplain\r\n.\r\n"
    s.close()
