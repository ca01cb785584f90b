"""Tests for haraka_tw.config.overlay: one name read through the directory stack."""

from __future__ import annotations

from typing import Any

import pytest

from haraka_tw.config import ConfigError
from haraka_tw.config.bundle import BundleReader
from haraka_tw.config.overlay import Kind, Request, merge, read_layered
from haraka_tw.config.snapshot import SnapshotReader

from .layers import Layers


def read(layers: Layers, name: str, kind: Kind, *booleans: str) -> tuple[bool, Any]:
    request = Request(name, kind, booleans)
    directories = [layers.defaults, layers.operator]
    return read_layered(directories, request, SnapshotReader(), BundleReader())


def test_merge_dicts_recursively() -> None:
    """Dicts merge key by key at every depth; the higher side wins on conflicts."""
    lower = {"a": {"x": 1, "y": {"p": 1}}, "b": 2}
    higher = {"a": {"y": {"q": 2}}, "c": 3}
    assert merge(lower, higher) == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": 2, "c": 3}


def test_merge_non_dicts_replaced() -> None:
    """Lists and scalars are replaced whole, not concatenated."""
    assert merge({"l": [1, 2]}, {"l": [3]}) == {"l": [3]}
    assert merge([1], {"a": 1}) == {"a": 1}


def test_ini_merges_key_by_key(layers: Layers) -> None:
    """An operator's ini overrides the defaults' keys one by one, per section."""
    layers.write(layers.defaults, "p.ini", "toplevel1=foo\ntoplevel2=bar\n[sub]\nsub1=x\n")
    layers.write(layers.operator, "p.ini", "toplevel2=blee\n[sub]\nsub2=y\n")
    assert read(layers, "p.ini", Kind.INI) == (
        True,
        {"main": {"toplevel1": "foo", "toplevel2": "blee"}, "sub": {"sub1": "x", "sub2": "y"}},
    )


def test_ini_operator_omitting_boolean_keeps_lower_value(layers: Layers) -> None:
    """A boolean set in the defaults survives an operator file that does not mention it."""
    layers.write(layers.defaults, "p.ini", "[tls]\nenabled=true\n")
    layers.write(layers.operator, "p.ini", "[tls]\nother=1\n")
    _, value = read(layers, "p.ini", Kind.INI, "-tls.enabled")
    assert value["tls"] == {"enabled": True, "other": 1}


def test_ini_missing_everywhere_has_defaults(layers: Layers) -> None:
    """A missing ini is not found but still yields main and the boolean defaults."""
    assert read(layers, "none.ini", Kind.INI, "+main.on") == (False, {"main": {"on": True}})


def test_json_merges_objects(layers: Layers) -> None:
    """JSON objects merge key by key across layers."""
    layers.write(layers.defaults, "x.json", '{"a": 1, "o": {"p": 1, "q": 2}}')
    layers.write(layers.operator, "x.json", '{"o": {"q": 3}}')
    assert read(layers, "x.json", Kind.JSON) == (True, {"a": 1, "o": {"p": 1, "q": 3}})


def test_json_falls_back_to_yaml(layers: Layers) -> None:
    """Without x.json, a directory's x.yaml is read in its place, as Haraka does."""
    pytest.importorskip("yaml")
    layers.write(layers.defaults, "x.json", '{"a": 1, "b": 1}')
    layers.write(layers.operator, "x.yaml", "b: 2\n")
    assert read(layers, "x.json", Kind.JSON) == (True, {"a": 1, "b": 2})


def test_yaml_merges_mappings(layers: Layers) -> None:
    """YAML mappings merge key by key across layers."""
    pytest.importorskip("yaml")
    layers.write(layers.defaults, "x.yaml", "a: 1\nm:\n  k: v\n")
    layers.write(layers.operator, "x.yaml", "m:\n  j: w\n")
    assert read(layers, "x.yaml", Kind.YAML) == (True, {"a": 1, "m": {"k": "v", "j": "w"}})


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (Kind.VALUE, "operator"),
        (Kind.LIST, ["operator"]),
        (Kind.DATA, ["operator"]),
        (Kind.BINARY, b"operator\n"),
    ],
)
def test_flat_files_replaced_whole(layers: Layers, kind: Kind, expected: object) -> None:
    """value, list, data and binary files are replaced whole by the higher layer."""
    layers.write(layers.defaults, "f", "default\nmore\n")
    layers.write(layers.operator, "f", "operator\n")
    assert read(layers, "f", kind) == (True, expected)


def test_lower_layer_used_when_higher_lacks_file(layers: Layers) -> None:
    """A file only in the defaults is read from there."""
    layers.write(layers.defaults, "plugin_timeout", "30\n")
    assert read(layers, "plugin_timeout", Kind.VALUE) == (True, 30)


def test_missing_everywhere_not_found(layers: Layers) -> None:
    """A file in no layer is reported as not found."""
    assert read(layers, "absent", Kind.LIST) == (False, None)


def test_subdirectory_names(layers: Layers) -> None:
    """Names may include subdirectories."""
    layers.write(layers.operator, "tls/example.com.pem", b"-----BEGIN\n")
    assert read(layers, "tls/example.com.pem", Kind.BINARY) == (True, b"-----BEGIN\n")


def test_malformed_layer_raises(layers: Layers) -> None:
    """A malformed file in any layer raises a ConfigError naming that file."""
    bad = layers.write(layers.defaults, "p.ini", "ok=1\n[broken\n")
    layers.write(layers.operator, "p.ini", "ok=2\n")
    with pytest.raises(ConfigError) as caught:
        read(layers, "p.ini", Kind.INI)
    assert (caught.value.path, caught.value.line) == (str(bad), 2)


def test_bundle_entry_replaces_file_in_same_layer(layers: Layers) -> None:
    """An smtp.json entry replaces the file of that name in the same directory."""
    layers.write(layers.operator, "plugins", "from_file\n")
    layers.write(layers.operator, "smtp.json", '{"!plugins": ["from_bundle"]}')
    assert read(layers, "plugins", Kind.LIST) == (True, ["from_bundle"])


def test_bundle_ini_merges_with_lower_file(layers: Layers) -> None:
    """A higher layer's smtp.json entry for an ini merges over the lower file key by key."""
    layers.write(layers.defaults, "smtp.ini", "listen=[::0]:25\nnodes=1\n[x]\nenabled=yes\n")
    layers.write(layers.operator, "smtp.json", '{"!smtp.ini": {"main": {"nodes": "cpus"}}}')
    assert read(layers, "smtp.ini", Kind.INI, "x.enabled") == (
        True,
        {"main": {"listen": "[::0]:25", "nodes": "cpus"}, "x": {"enabled": True}},
    )


def test_lower_bundle_overridden_by_higher_file(layers: Layers) -> None:
    """A higher directory's plain file overrides a lower directory's bundle entry."""
    layers.write(layers.defaults, "smtp.json", '{"me": "bundle.example"}')
    layers.write(layers.operator, "me", "file.example\n")
    assert read(layers, "me", Kind.VALUE) == (True, "file.example")


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        (Kind.VALUE, '"25"', 25),
        (Kind.VALUE, "30", 30),
        (Kind.VALUE, "1.5", "1.5"),
        (Kind.VALUE, "null", None),
        (Kind.LIST, '"a\\n# c\\nb"', ["a", "b"]),
        (Kind.LIST, '["a", 2]', ["a", "2"]),
        (Kind.DATA, '"a\\n\\nb\\n"', ["a", "", "b"]),
        (Kind.BINARY, '"pem"', b"pem"),
        (Kind.JSON, "[1, 2]", [1, 2]),
        (Kind.INI, '{"top": 1, "s": {"k": "v"}}', {"main": {"top": 1}, "s": {"k": "v"}}),
    ],
)
def test_bundle_entries_shaped_by_kind(
    layers: Layers, kind: Kind, raw: str, expected: object
) -> None:
    """Bundle entries take the shape the file they stand for would have parsed to."""
    layers.write(layers.operator, "smtp.json", '{"!f": ' + raw + "}")
    assert read(layers, "f", kind) == (True, expected)


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        (Kind.VALUE, "[1]"),
        (Kind.VALUE, "true"),
        (Kind.LIST, "[[1]]"),
        (Kind.INI, "[]"),
        (Kind.BINARY, "1"),
    ],
)
def test_bundle_entry_of_wrong_shape(layers: Layers, kind: Kind, raw: str) -> None:
    """A bundle entry of the wrong shape is a ConfigError naming the bundle and entry."""
    bundle = layers.write(layers.operator, "smtp.json", '{"!f": ' + raw + "}")
    with pytest.raises(ConfigError) as caught:
        read(layers, "f", kind)
    assert caught.value.path == str(bundle)
    assert "'f'" in caught.value.message
