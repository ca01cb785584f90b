"""Tests for haraka_tw.config.ini: Haraka's INI dialect and boolean declarations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from haraka_tw.config import ConfigError
from haraka_tw.config.ini import BooleanRules, is_truthy, parse_ini


def parse(text: str, *booleans: str) -> dict[str, dict[str, object]]:
    rules = BooleanRules.parse(booleans)
    return rules.apply(parse_ini(text, "t.ini", rules))


def test_keys_before_a_section_are_in_main() -> None:
    """Keys before any [section] land in the implicit main section."""
    assert parse("a=1\n[s]\nb=x\n") == {"main": {"a": 1}, "s": {"b": "x"}}


def test_main_always_present() -> None:
    """An empty file still has a main section."""
    assert parse("") == {"main": {}}


def test_whitespace_trimmed_around_key_and_value() -> None:
    """Whitespace around the key, the '=' and the value is trimmed; inner spaces stay."""
    assert parse("  greeting =  hello  world \t\n")["main"] == {"greeting": "hello  world"}


def test_section_name_trimmed_and_reopened() -> None:
    """A section header's name is trimmed, and naming it again adds to the same section."""
    assert parse("[ s ]\na=1\n[other]\n[s]\nb=2\n")["s"] == {"a": 1, "b": 2}


def test_numbers_converted() -> None:
    """Integers become int and plain decimals float; other values stay strings."""
    text = "i=26214400\nn=-1\nf=0.5\ne=1e3\nv=1.2.3\nip=127.0.0.1\n"
    assert parse(text)["main"] == {
        "i": 26214400,
        "n": -1,
        "f": 0.5,
        "e": "1e3",
        "v": "1.2.3",
        "ip": "127.0.0.1",
    }


def test_quotes_and_trailing_text_kept() -> None:
    """Quotes are part of the value and a ';' after a value is not a comment (as Haraka)."""
    assert parse('q="a b"\nt=x ; y\n')["main"] == {"q": '"a b"', "t": "x ; y"}


def test_value_may_contain_equals_and_brackets() -> None:
    """Everything after the first '=' is the value."""
    assert parse("listen=[::0]:25,0.0.0.0:587\nk=a=b\n")["main"] == {
        "listen": "[::0]:25,0.0.0.0:587",
        "k": "a=b",
    }


def test_empty_value_is_empty_string() -> None:
    """'key=' gives an empty string."""
    assert parse("k=\n")["main"] == {"k": ""}


def test_comments_and_blank_lines_skipped() -> None:
    """Whole-line ';' and '#' comments, indented or not, and blank lines are skipped."""
    assert parse(";inactivity_timeout=300\n  # note\n\n\t\nnodes=cpus\n")["main"] == {
        "nodes": "cpus"
    }


def test_array_keys_append() -> None:
    """key[]=value lines collect into a list, converting numbers."""
    text = "[haproxy]\nhosts[]=192.0.2.1\nhosts[] = 192.0.2.0/24\nports[]=25\n"
    assert parse(text)["haproxy"] == {"hosts": ["192.0.2.1", "192.0.2.0/24"], "ports": [25]}


def test_array_replaces_earlier_scalar() -> None:
    """An array key after a scalar of the same name starts a fresh list."""
    assert parse("h=one\nh[]=two\n")["main"] == {"h": ["two"]}


def test_bare_key_is_true() -> None:
    """A key without '=' is a flag and reads True."""
    assert parse("[projects]\nharaka\nqpsmtpd\n")["projects"] == {"haraka": True, "qpsmtpd": True}


def test_continuation_joins_lines() -> None:
    """A line ending in a backslash continues on the next line."""
    text = "list=a,\\\n b,\\  \n c\nafter=1\n"
    assert parse(text)["main"] == {"list": "a, b, c", "after": 1}


def test_continuation_at_end_of_file() -> None:
    """A continuation on the last line still yields its key."""
    assert parse("k=v\\")["main"] == {"k": "v"}


def test_crlf_line_endings() -> None:
    """CRLF files parse like LF files."""
    assert parse("[s]\r\na=1\r\n") == {"main": {}, "s": {"a": 1}}


def test_unclosed_section_names_file_and_line() -> None:
    """'[section' without ']' is a ConfigError naming the file and line."""
    with pytest.raises(ConfigError) as caught:
        parse_ini("a=1\n\n[section\nb=2\n", "/cfg/x.ini")
    assert (caught.value.path, caught.value.line) == ("/cfg/x.ini", 3)
    assert str(caught.value).startswith("/cfg/x.ini:3: section header")


def test_garbage_line_names_line() -> None:
    """A line that is not a section, key=value, bare key or comment is a ConfigError."""
    with pytest.raises(ConfigError) as caught:
        parse_ini("a=1\nthis is not ini\n", "x.ini")
    assert caught.value.line == 2


def test_error_in_continued_line_names_its_first_line() -> None:
    """An error in a continued line is reported at the line where it starts."""
    with pytest.raises(ConfigError) as caught:
        parse_ini("a=1\nbad key \\\n=2\n", "x.ini")
    assert caught.value.line == 2


def test_declared_booleans_converted() -> None:
    """Declared booleans take Haraka's truthy words, any case; anything else is False."""
    words = ["true", "YES", "ok", "Enabled", "on", "1", "false", "no", "2", ""]
    text = "".join(f"k{i}={word}\n" for i, word in enumerate(words))
    section = parse(text, *(f"k{i}" for i in range(len(words))))["main"]
    assert list(section.values()) == [True] * 6 + [False] * 4


def test_boolean_defaults() -> None:
    """'+' defaults a declared boolean to True, '-' or no sign to False, even if absent."""
    result = parse("", "+main.enabled", "-main.foo", "main.bar", "+quiet", "-haproxy.enabled")
    assert result == {
        "main": {"enabled": True, "foo": False, "bar": False, "quiet": True},
        "haproxy": {"enabled": False},
    }


def test_boolean_default_overridden_by_file() -> None:
    """A declared boolean present in the file takes the file's value, not its default."""
    assert parse("enabled=false\n", "+main.enabled")["main"] == {"enabled": False}


def test_wildcard_boolean_every_section() -> None:
    """'*.key' converts that key in every section but adds no default."""
    result = parse("[a]\nenabled=yes\n[b]\nenabled=0\n[c]\n", "*.enabled")
    assert result == {"main": {}, "a": {"enabled": True}, "b": {"enabled": False}, "c": {}}


def test_bare_declared_boolean_is_true() -> None:
    """A declared boolean written as a bare key is True."""
    assert parse("[tls]\nenabled\n", "-tls.enabled")["tls"] == {"enabled": True}


def test_undeclared_truthy_word_stays_string() -> None:
    """Without a declaration, 'true' stays the string 'true'."""
    assert parse("flag=true\n")["main"] == {"flag": "true"}


def test_bad_boolean_declaration() -> None:
    """A declaration with no key is a programming error."""
    with pytest.raises(ValueError):
        BooleanRules.parse(["main."])


def test_is_truthy() -> None:
    """is_truthy accepts the truthy words and real booleans, and nothing else."""
    assert is_truthy(" On ") and is_truthy(True) and is_truthy(1)
    assert not is_truthy(False) and not is_truthy("y") and not is_truthy("\u212aok")


@given(st.text())
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    """parse_ini never raises anything but ConfigError on arbitrary text."""
    rules = BooleanRules.parse(["+main.enabled", "*.on"])
    try:
        result = parse_ini(text, "fuzz.ini", rules)
    except ConfigError:
        return
    assert "main" in result


@given(
    st.lists(st.sampled_from(["[s]", "[", "a=1", "b[]=2", "c\\", "#x", ";y", "", " ", "=", "d"]))
)
def test_ini_like_lines_raise_only_config_error(lines: list[str]) -> None:
    """Text built from INI fragments parses or raises ConfigError, nothing else."""
    try:
        parse_ini("\n".join(lines), "fuzz.ini")
    except ConfigError as error:
        assert error.line is not None and 1 <= error.line <= len(lines)
