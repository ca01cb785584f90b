"""Connection ids: version 4 UUIDs, upper case, unique, and fresh in a forked child."""

from __future__ import annotations

import os
import re
import uuid

import pytest

from haraka_tw import ids
from haraka_tw.ids import new_uuid

_FORM = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}")


def test_form_version_and_variant() -> None:
    """Upper-case 8-4-4-4-12 hex, version 4, RFC variant: what uuid.UUID reads back."""
    for _ in range(2000):  # more than one 4 KiB pool
        text = new_uuid()
        assert _FORM.fullmatch(text), text
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_the_bits_are_the_uuid_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """From given bytes, exactly what uuid.UUID(bytes=..., version=4) makes of them: the
    random bits kept are the same 122 (none repeated in the variant digit)."""
    raws = [bytes(range(i, i + 16)) for i in range(0, 256, 16)]
    raws += [b"\xff" * 16, b"\x00" * 16, bytes([0x9C] * 16), os.urandom(16)]
    for raw in raws:
        monkeypatch.setattr(ids, "_pool", raw)
        monkeypatch.setattr(ids, "_next", 0)
        assert new_uuid() == str(uuid.UUID(bytes=raw, version=4)).upper()


def test_unique() -> None:
    """20,000 ids, no two alike."""
    made = [new_uuid() for _ in range(20000)]
    assert len(set(made)) == len(made)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # (3.12+, with threads)
def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    """A nodes worker is forked: it must not hand out the bytes left in its parent's pool."""
    new_uuid()  # the pool is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave at once, whatever happens
        try:
            os.write(write, " ".join(new_uuid() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_uuid() for _ in range(10)]
    assert len(child) == 10
    assert not set(child) & set(parent)
