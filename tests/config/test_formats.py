"""Tests for haraka_tw.config.formats: the flat, JSON and YAML parsers."""

from __future__ import annotations

import sys

import pytest

from haraka_tw.config import ConfigError
from haraka_tw.config.formats import (
    decode,
    ini_number,
    parse_data,
    parse_json,
    parse_list,
    parse_value,
    parse_yaml,
    split_lines,
    to_int,
    to_number,
)


def test_value_is_first_non_blank_line_stripped() -> None:
    """A value file yields its first non-blank, non-comment line, stripped."""
    assert parse_value("\n# the host name\n  mx.example.com  \nignored\n") == "mx.example.com"


def test_value_digits_become_int() -> None:
    """An all-digit value, optionally negative, is an int."""
    assert parse_value("30\n") == 30
    assert parse_value("-5") == -5


def test_value_decimal_stays_string() -> None:
    """A decimal value stays a string (the value type is str or int)."""
    assert parse_value("1.5") == "1.5"


def test_value_empty_is_none() -> None:
    """A file with nothing but blanks and comments has no value."""
    assert parse_value("\n  \n# only a comment\n") is None


def test_list_skips_blanks_and_comments() -> None:
    """A list keeps stripped lines and skips blank, '#' and ';' comment lines."""
    text = "# plugins\nrcpt_to.in_host_list\n\n  ; old\n  queue/smtp_forward  \r\nlast"
    assert parse_list(text) == ["rcpt_to.in_host_list", "queue/smtp_forward", "last"]


def test_list_keeps_hash_inside_a_line() -> None:
    """Only whole-line comments are skipped; a '#' later in the line is kept."""
    assert parse_list("a # not a comment") == ["a # not a comment"]


def test_data_keeps_every_line() -> None:
    """A data file keeps comments, blanks and whitespace; only line breaks go."""
    assert parse_data("# c\n\n  x  \r\ny\rz\n") == ["# c", "", "  x  ", "y", "z"]


def test_data_without_trailing_newline() -> None:
    """The last line counts even without a final line break; an empty file is no lines."""
    assert parse_data("a\nb") == ["a", "b"]
    assert parse_data("") == []


def test_split_lines_only_on_line_breaks() -> None:
    """Lines split on CRLF, CR and LF, not on form feeds or other separators."""
    assert split_lines("a\x0cb\u2028c\r\nd") == ["a\x0cb\u2028c", "d"]


def test_decode_drops_bom_and_replaces_bad_bytes() -> None:
    """Files decode as UTF-8 with a leading BOM dropped and bad bytes replaced."""
    assert decode(b"\xef\xbb\xbfkey=\xff") == "key=\ufffd"


def test_to_int_leaves_huge_numbers_as_text() -> None:
    """Digit strings beyond Python's conversion limit stay strings instead of raising."""
    digits = "9" * 5000
    assert to_int(digits) == digits


def test_to_number_decimals() -> None:
    """Plain decimals become floats; exponents, bare dots and overflow stay strings."""
    assert to_number("0.25") == 0.25
    assert to_number("-2.5") == -2.5
    assert to_number("1e3") == "1e3"
    assert to_number(".5") == ".5"
    huge = "9" * 400 + ".5"
    assert to_number(huge) == huge


def test_ini_number_reads_numbers_and_defaults() -> None:
    """Numbers (as the ini reader gives them, or as text) are floats; empty or missing is
    the default."""
    assert ini_number({"t": 2}, "t", 5.0, zero_ok=False) == 2.0
    assert ini_number({"t": "2.5"}, "t", 5.0, zero_ok=False) == 2.5
    assert ini_number({"t": ""}, "t", 5.0, zero_ok=False) == 5.0
    assert ini_number({}, "t", 5.0, zero_ok=False) == 5.0
    assert ini_number({"t": 0}, "t", 5.0, zero_ok=True) == 0.0


@pytest.mark.parametrize(
    ("value", "zero_ok", "wanted"),
    [
        (0, False, "a positive number"),
        (-1, True, "a number of 0 or more"),
        ("soon", True, "a number of 0 or more"),
        (True, False, "a positive number"),  # a bare key
        ("inf", True, "a number of 0 or more"),
        ("nan", False, "a positive number"),
    ],
)
def test_ini_number_refuses_what_is_not_a_usable_number(
    value: object, zero_ok: bool, wanted: str
) -> None:
    """Anything else is a ValueError naming the key, the value and what was wanted."""
    with pytest.raises(ValueError, match=rf"^\[main\] t: .* is not {wanted}$"):
        ini_number({"t": value}, "t", 5.0, zero_ok=zero_ok)


def test_json_parses() -> None:
    """A JSON document parses to Python values."""
    assert parse_json('{"a": [1, 2], "b": null}', "x.json") == {"a": [1, 2], "b": None}


def test_json_error_names_file_and_line() -> None:
    """Malformed JSON is a ConfigError with the path and the line of the fault."""
    with pytest.raises(ConfigError) as caught:
        parse_json('{\n  "a": 1,\n  "b": \n}\n', "/cfg/x.json")
    assert caught.value.path == "/cfg/x.json"
    assert caught.value.line == 4
    assert str(caught.value).startswith("/cfg/x.json:4: ")


def test_json_too_deep_is_config_error() -> None:
    """Absurdly nested JSON is a ConfigError, not a RecursionError."""
    with pytest.raises(ConfigError):
        parse_json("[" * 100_000, "deep.json")


def test_yaml_without_pyyaml_names_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PyYAML, reading YAML is a ConfigError naming the file."""
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ConfigError) as caught:
        parse_yaml("a: 1\n", "/cfg/x.yaml")
    assert caught.value.path == "/cfg/x.yaml"
    assert "PyYAML" in caught.value.message


def test_yaml_parses() -> None:
    """A YAML document parses with the safe loader."""
    pytest.importorskip("yaml")
    assert parse_yaml("a:\n  - 1\n  - two\n", "x.yaml") == {"a": [1, "two"]}


def test_yaml_error_names_file_and_line() -> None:
    """Malformed YAML is a ConfigError with the path and the line of the fault."""
    pytest.importorskip("yaml")
    with pytest.raises(ConfigError) as caught:
        parse_yaml("a: 1\nb: [1, 2\nc: 3\n", "/cfg/x.yaml")
    assert caught.value.path == "/cfg/x.yaml"
    assert caught.value.line == 3


def test_yaml_unsafe_tag_is_config_error() -> None:
    """The safe loader refuses Python object tags with a ConfigError."""
    pytest.importorskip("yaml")
    with pytest.raises(ConfigError):
        parse_yaml("!!python/object/apply:os.system ['true']\n", "x.yaml")
