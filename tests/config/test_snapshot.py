"""Tests for haraka_tw.config.snapshot: noticing that a config file changed."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest

from haraka_tw.config import ConfigError
from haraka_tw.config import snapshot as snapshot_module
from haraka_tw.config.snapshot import SnapshotReader, check_snapshot


def read(path: Path) -> tuple[bytes | None, snapshot_module.FileSnapshot]:
    reader = SnapshotReader()
    content = reader.read(path)
    return content, reader.snapshots[path]


def test_unchanged_file_is_current(tmp_path: Path) -> None:
    """A file left alone checks as unchanged."""
    path = tmp_path / "me"
    path.write_text("mx.example.com\n")
    content, snapshot = read(path)
    assert content == b"mx.example.com\n"
    assert check_snapshot(path, snapshot) is not None


def test_edit_is_a_change(tmp_path: Path) -> None:
    """Rewriting a file, even at once and with the same size, is a change."""
    path = tmp_path / "me"
    path.write_text("one\n")
    _, snapshot = read(path)
    path.write_text("two\n")
    assert check_snapshot(path, snapshot) is None


def test_missing_then_created_is_a_change(tmp_path: Path) -> None:
    """A file missing at the read and created later counts as a change."""
    path = tmp_path / "sub" / "plugins"
    content, snapshot = read(path)
    assert content is None
    assert check_snapshot(path, snapshot) is not None
    path.parent.mkdir()
    path.write_text("")
    assert check_snapshot(path, snapshot) is None


def test_deleted_is_a_change(tmp_path: Path) -> None:
    """Deleting a file that was read counts as a change."""
    path = tmp_path / "plugins"
    path.write_text("x\n")
    _, snapshot = read(path)
    path.unlink()
    assert check_snapshot(path, snapshot) is None


def test_racy_file_compared_by_content(tmp_path: Path) -> None:
    """A recently modified file with an unchanged stat is confirmed by its content."""
    path = tmp_path / "plugins"
    path.write_text("x\n")
    _, snapshot = read(path)
    assert snapshot.racy
    assert check_snapshot(path, replace(snapshot, digest=b"something else")) is None


def test_settled_file_trusted_by_stat(tmp_path: Path) -> None:
    """A file modified long before it was read is judged by its stat alone."""
    path = tmp_path / "plugins"
    path.write_text("x\n")
    _, snapshot = read(path)
    settled = replace(snapshot, digest=b"not checked", racy=False)
    assert check_snapshot(path, settled) is settled


def test_racy_snapshot_ages_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once out of the racy window, an unchanged file's snapshot stops being racy."""
    path = tmp_path / "plugins"
    path.write_text("x\n")
    _, snapshot = read(path)
    monkeypatch.setattr(snapshot_module, "RACY_WINDOW_NS", -(10**18))
    refreshed = check_snapshot(path, snapshot)
    assert refreshed is not None and not refreshed.racy


def test_directory_or_fifo_is_config_error(tmp_path: Path) -> None:
    """A directory or a FIFO where a file is expected is a ConfigError naming it (an
    operator's mistake, not a file to fall back from to the defaults)."""
    fifo = tmp_path / "smtp.ini"
    os.mkfifo(fifo)
    for path, kind in ((tmp_path, "a directory"), (fifo, "not a regular file")):
        with pytest.raises(ConfigError) as caught:
            SnapshotReader().read(path)
        assert caught.value.path == str(path)
        assert kind in str(caught.value)


def test_dangling_link_is_config_error(tmp_path: Path) -> None:
    """A link whose target is gone is a ConfigError naming the target; a file that is
    simply absent, or under a file where a directory should be, reads as missing."""
    link = tmp_path / "plugins"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"a link to .*gone, which does not exist"):
        SnapshotReader().read(link)
    for path in (tmp_path / "absent", link / "below"):
        content, snapshot = read(path)
        assert content is None and snapshot.signature is None


def test_unreadable_file_is_config_error(tmp_path: Path) -> None:
    """A file that cannot be read is a ConfigError naming it, and its state is kept."""
    path = tmp_path / "tls.pem"
    path.symlink_to(path)  # a loop: opening it fails with ELOOP, even for root
    reader = SnapshotReader()
    with pytest.raises(ConfigError) as caught:
        reader.read(path)
    assert caught.value.path == str(path)
    assert check_snapshot(path, reader.snapshots[path]) is not None


def test_a_directory_it_may_not_enter_is_named_not_the_file(tmp_path: Path) -> None:
    """Permission denied because the directory may not be searched: the error names the
    directory, not the first file name tried in it (smtp.json for smtp.ini, say). (As
    root nothing is denied, so the refusal is made here.)"""

    def denied(*args: object) -> int:
        raise PermissionError(13, "Permission denied")

    with (
        mock.patch.object(snapshot_module.os, "open", denied),
        mock.patch.object(snapshot_module.os, "access", lambda *a: False),
        pytest.raises(ConfigError) as caught,
    ):
        SnapshotReader().read(tmp_path / "smtp.json")
    assert caught.value.path == str(tmp_path)
    assert "cannot read the directory" in str(caught.value)
    with mock.patch.object(snapshot_module.os, "open", denied), pytest.raises(ConfigError) as c2:
        SnapshotReader().read(tmp_path / "smtp.ini")  # (the directory is fine: the file)
    assert c2.value.path == str(tmp_path / "smtp.ini")
