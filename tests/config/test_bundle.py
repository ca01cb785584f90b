"""Tests for haraka_tw.config.bundle: the single-file smtp.json / smtp.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from haraka_tw.config import ConfigError
from haraka_tw.config.bundle import BundleReader
from haraka_tw.config.snapshot import SnapshotReader


def entry(directory: Path, name: str, bundles: BundleReader | None = None) -> object:
    found = (bundles or BundleReader()).entry(directory, name, SnapshotReader())
    return None if found is None else found[1]


def test_bang_prefixed_key(tmp_path: Path) -> None:
    """Haraka's '!name' keys hold the contents of the file 'name'."""
    (tmp_path / "smtp.json").write_text('{"!plugins": ["a", "b"]}')
    assert entry(tmp_path, "plugins") == ["a", "b"]


def test_bare_key(tmp_path: Path) -> None:
    """A key without '!' is accepted as a file name too."""
    (tmp_path / "smtp.json").write_text('{"me": "mx.example.com"}')
    assert entry(tmp_path, "me") == "mx.example.com"


def test_bang_key_wins_over_bare(tmp_path: Path) -> None:
    """With both spellings present, the '!' key is used."""
    (tmp_path / "smtp.json").write_text('{"me": "bare", "!me": "bang"}')
    assert entry(tmp_path, "me") == "bang"


def test_no_bundle_no_entry(tmp_path: Path) -> None:
    """Without smtp.json or smtp.yaml there are no entries."""
    assert entry(tmp_path, "plugins") is None


def test_name_absent_from_bundle(tmp_path: Path) -> None:
    """A name the bundle does not mention has no entry."""
    (tmp_path / "smtp.json").write_text('{"!plugins": []}')
    assert entry(tmp_path, "me") is None


def test_bundle_files_are_not_bundle_entries(tmp_path: Path) -> None:
    """smtp.json itself is never looked up inside a bundle."""
    (tmp_path / "smtp.json").write_text('{"!smtp.json": {"a": 1}}')
    assert entry(tmp_path, "smtp.json") is None


def test_non_object_bundle_has_no_entries(tmp_path: Path) -> None:
    """An smtp.json that is not an object is not a bundle."""
    (tmp_path / "smtp.json").write_text('["plugins"]')
    assert entry(tmp_path, "plugins") is None


def test_json_preferred_over_yaml(tmp_path: Path) -> None:
    """When smtp.json exists, smtp.yaml is not consulted."""
    (tmp_path / "smtp.json").write_text('{"!me": "json"}')
    (tmp_path / "smtp.yaml").write_text("'!me': yaml\n'!plugins': [x]\n")
    assert entry(tmp_path, "me") == "json"
    assert entry(tmp_path, "plugins") is None


def test_yaml_bundle(tmp_path: Path) -> None:
    """Without smtp.json, smtp.yaml is the bundle."""
    pytest.importorskip("yaml")
    (tmp_path / "smtp.yaml").write_text("'!plugins':\n  - queue/smtp_forward\n")
    assert entry(tmp_path, "plugins") == ["queue/smtp_forward"]


def test_malformed_bundle_names_file_and_line(tmp_path: Path) -> None:
    """A malformed smtp.json is a ConfigError naming it and the line."""
    (tmp_path / "smtp.json").write_text('{\n"!me": \n}')
    with pytest.raises(ConfigError) as caught:
        entry(tmp_path, "me")
    assert (caught.value.path, caught.value.line) == (str(tmp_path / "smtp.json"), 3)


def test_entries_are_copies(tmp_path: Path) -> None:
    """Changing a returned entry does not change the next one."""
    (tmp_path / "smtp.json").write_text('{"!plugins": ["a"]}')
    bundles = BundleReader()
    first = entry(tmp_path, "plugins", bundles)
    assert isinstance(first, list)
    first.append("b")
    assert entry(tmp_path, "plugins", bundles) == ["a"]


def test_edited_bundle_reparsed(tmp_path: Path) -> None:
    """An edited bundle is parsed again; the cached parse is only for equal content."""
    bundle = tmp_path / "smtp.json"
    bundle.write_text('{"!me": "one"}')
    bundles = BundleReader()
    assert entry(tmp_path, "me", bundles) == "one"
    bundle.write_text('{"!me": "two"}')
    assert entry(tmp_path, "me", bundles) == "two"
