"""Tests for haraka_tw.smtp.command: splitting a command line into verb and argument."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haraka_tw.smtp.command import Command, parse_command


@pytest.mark.parametrize("line", [b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>\n", b"MAIL FROM:<a@b>"])
def test_line_endings_stripped(line: bytes) -> None:
    """CRLF, bare LF or no ending at all give the same command."""
    cmd = parse_command(line)
    assert cmd == Command("MAIL", "FROM:<a@b>", b"MAIL FROM:<a@b>", False, False)


def test_only_one_line_ending_stripped() -> None:
    """Only one trailing line ending is removed from raw; the rest counts as bad bytes."""
    cmd = parse_command(b"NOOP\r\n\r\n")
    assert cmd.raw == b"NOOP\r\n"
    assert cmd.bad_bytes


def test_verb_upper_cased() -> None:
    """The verb is upper-cased."""
    assert parse_command(b"ehlo example.com\r\n").verb == "EHLO"


def test_argument_after_run_of_spaces() -> None:
    """The argument starts after the whole run of spaces following the verb."""
    assert parse_command(b"HELO    example.com\r\n").argument == "example.com"


def test_argument_keeps_inner_spaces() -> None:
    """Spaces inside the argument are kept."""
    assert parse_command(b"MAIL FROM:<a@b>  SIZE=1\r\n").argument == "FROM:<a@b>  SIZE=1"


def test_trailing_whitespace_stripped() -> None:
    """Trailing spaces and tabs are removed from the argument."""
    assert parse_command(b"HELO example.com \t \r\n").argument == "example.com"


def test_no_argument() -> None:
    """A bare verb has an empty argument, with or without trailing spaces."""
    assert parse_command(b"QUIT\r\n").argument == ""
    assert parse_command(b"QUIT   \r\n") == Command("QUIT", "", b"QUIT   ", False, False)


def test_leading_space_gives_empty_verb() -> None:
    """As in Haraka, a line starting with a space has an empty verb."""
    cmd = parse_command(b" NOOP\r\n")
    assert (cmd.verb, cmd.argument) == ("", "NOOP")


def test_tab_is_not_a_separator() -> None:
    """Only SP separates verb and argument; a tab stays inside the verb."""
    assert parse_command(b"NOOP\tx\r\n").verb == "NOOP\tX"


def test_empty_line() -> None:
    """An empty line parses to an empty command."""
    assert parse_command(b"\r\n") == Command("", "", b"", False, False)


def test_utf8_argument_decoded() -> None:
    """A UTF-8 argument is decoded and flagged as 8-bit."""
    cmd = parse_command("MAIL FROM:<jöran@exämple.com>\r\n".encode())
    assert cmd.argument == "FROM:<jöran@exämple.com>"
    assert cmd.has_8bit
    assert not cmd.bad_bytes


def test_invalid_utf8_argument_surrogateescaped() -> None:
    """Invalid UTF-8 in the argument survives as surrogate escapes."""
    cmd = parse_command(b"HELO \xff\xfe\r\n")
    assert cmd.argument == "\udcff\udcfe"
    assert cmd.argument.encode("utf-8", "surrogateescape") == b"\xff\xfe"


def test_non_ascii_verb_replaced() -> None:
    """A verb with 8-bit bytes is decoded with replacement characters instead of raising."""
    cmd = parse_command(b"M\xc3\xa4IL x\r\n")
    assert cmd.verb == "M\ufffd\ufffdIL"
    assert cmd.has_8bit


@pytest.mark.parametrize("byte", [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])
def test_control_bytes_flagged(byte: int) -> None:
    """NUL, C0 controls other than HTAB, and DEL anywhere in the line set bad_bytes."""
    assert parse_command(b"NOOP a" + bytes([byte]) + b"b\r\n").bad_bytes


def test_htab_not_flagged() -> None:
    """HTAB is not a bad byte."""
    assert not parse_command(b"NOOP a\tb\r\n").bad_bytes


def test_bare_cr_inside_line_flagged() -> None:
    """A CR that is not part of the line ending is a bad byte."""
    assert parse_command(b"NOOP a\rb\r\n").bad_bytes


@settings(max_examples=300)
@given(st.binary())
def test_never_raises(line: bytes) -> None:
    """Any bytes parse without raising, and the argument's bytes come from the line."""
    cmd = parse_command(line)
    assert line.startswith(cmd.raw)
    assert cmd.argument.encode("utf-8", "surrogateescape") in cmd.raw
    assert cmd.has_8bit == any(b >= 0x80 for b in cmd.raw)
