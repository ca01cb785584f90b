"""Tests for haraka_tw.smtp.address: RFC 5321 paths and ESMTP parameters."""

from __future__ import annotations

import contextlib
import re
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haraka_tw.smtp import address
from haraka_tw.smtp.address import (
    Address,
    AddressError,
    parse_esmtp_params,
    parse_mail_argument,
    parse_path,
    parse_rcpt_argument,
)

# -- Haraka's own cases ---------------------------------------------------------------------


def test_haraka_empty_mail_from_is_null_sender() -> None:
    """`MAIL FROM:` with nothing after the colon is the null sender in lenient mode."""
    address, params = parse_mail_argument("FROM:")
    assert address.is_null
    assert params == {}


def test_haraka_rcpt_with_numeric_params() -> None:
    """`RCPT TO: 0@mailblog.biz 0=9 1=9` gives the address plus two parameters."""
    address, params = parse_rcpt_argument("TO: 0@mailblog.biz 0=9 1=9")
    assert (address.local, address.domain) == ("0", "mailblog.biz")
    assert params == {"0": "9", "1": "9"}


def test_haraka_rcpt_without_domain_rejected() -> None:
    """`TO:unknown` (no @, not postmaster) is an error."""
    with pytest.raises(AddressError):
        parse_rcpt_argument("TO:unknown")


@pytest.mark.parametrize("arg", ["TO:<a b@example.com>", "TO:<ab@exa mple.com>", "TO:<a@b "])
def test_haraka_space_inside_brackets_rejected(arg: str) -> None:
    """A space inside <> (outside a quoted local part) is an error."""
    with pytest.raises(AddressError, match="Space"):
        parse_rcpt_argument(arg)


@pytest.mark.parametrize("arg", ["FROM:user@example.com", "FROM:"])
def test_haraka_strict_requires_brackets(arg: str) -> None:
    """Strict mode requires the path in angle brackets."""
    with pytest.raises(AddressError, match="<>"):
        parse_mail_argument(arg, strict=True)


# -- MAIL / RCPT argument shape -------------------------------------------------------------


def test_mail_with_params() -> None:
    """The path is followed by space-separated ESMTP parameters."""
    address, params = parse_mail_argument("FROM:<a@example.com> SIZE=100 BODY=8BITMIME")
    assert address.address == "a@example.com"
    assert params == {"SIZE": "100", "BODY": "8BITMIME"}


@pytest.mark.parametrize(
    "arg", ["from:<a@b.c>", "From:<a@b.c>", "FROM: <a@b.c>", "FROM:   <a@b.c>"]
)
def test_mail_prefix_case_and_spaces(arg: str) -> None:
    """FROM: is case-insensitive and may be followed by spaces."""
    assert parse_mail_argument(arg)[0].address == "a@b.c"


def test_rcpt_prefix_case_insensitive() -> None:
    """TO: is case-insensitive."""
    assert parse_rcpt_argument("to:<a@b.c>")[0].address == "a@b.c"


@pytest.mark.parametrize("arg", ["FROM <a@b.c>", "<a@b.c>", "TO:<a@b.c>", "FROM :<a@b.c>", ""])
def test_mail_bad_prefix(arg: str) -> None:
    """Anything but FROM: before the path is a syntax error."""
    with pytest.raises(AddressError):
        parse_mail_argument(arg)


def test_mail_null_sender() -> None:
    """`<>` is the null sender for MAIL."""
    address, _ = parse_mail_argument("FROM:<> BODY=7BIT", strict=True)
    assert address.is_null
    assert address.format() == "<>"
    assert address.address == ""


def test_rcpt_null_rejected() -> None:
    """`<>` is not allowed for RCPT."""
    with pytest.raises(AddressError):
        parse_rcpt_argument("TO:<>")


def test_rcpt_empty_rejected() -> None:
    """RCPT with nothing after the colon is an error even in lenient mode."""
    with pytest.raises(AddressError):
        parse_rcpt_argument("TO:")


def test_lenient_unbracketed_path() -> None:
    """Lenient mode accepts a path without angle brackets, with parameters after it."""
    address, params = parse_mail_argument("FROM:user@host.example SIZE=5")
    assert address.address == "user@host.example"
    assert address.original == "user@host.example"
    assert params == {"SIZE": "5"}


@pytest.mark.parametrize("local", ["postmaster", "Postmaster", "POSTMASTER"])
def test_rcpt_bare_postmaster(local: str) -> None:
    """`<postmaster>` without a domain is accepted for RCPT, in any case."""
    address, _ = parse_rcpt_argument(f"TO:<{local}>", strict=True)
    assert (address.local, address.domain) == (local, "")
    assert address.address == local
    assert address.format() == f"<{local}>"
    assert not address.is_null


def test_mail_bare_postmaster_rejected() -> None:
    """A bare postmaster is not a valid reverse-path."""
    with pytest.raises(AddressError):
        parse_mail_argument("FROM:<postmaster>")


def test_junk_after_path() -> None:
    """Text stuck to the closing bracket is an error."""
    with pytest.raises(AddressError, match="Junk"):
        parse_mail_argument("FROM:<a@b.c>SIZE=1")


def test_unterminated_path() -> None:
    """A path opened with < but never closed is an error."""
    with pytest.raises(AddressError, match="Unterminated"):
        parse_mail_argument("FROM:<a@b.c")


def test_quoted_local_with_space_and_bracket() -> None:
    """A quoted local part may hold spaces and '>' without ending the path."""
    address, params = parse_rcpt_argument('TO:<"john >smith"@example.com> NOTIFY=NEVER')
    assert address.local == "john >smith"
    assert params == {"NOTIFY": "NEVER"}


# -- paths ----------------------------------------------------------------------------------


def test_source_route_dropped() -> None:
    """A source route is accepted and dropped."""
    address = parse_path("<@a.example,@b.example:user@host.example>")
    assert address.address == "user@host.example"
    assert address.original == "<@a.example,@b.example:user@host.example>"


def test_source_route_with_literal() -> None:
    """A source route hop may be an address literal containing colons."""
    assert parse_path("<@[IPv6:2001:db8::1]:u@h.example>").address == "u@h.example"


@pytest.mark.parametrize("path", ["<@a.example:>", "<@:u@h>", "<@a..b:u@h>", "<@a.example;u@h>"])
def test_bad_source_route(path: str) -> None:
    """A malformed source route is an error."""
    with pytest.raises(AddressError):
        parse_path(path)


def test_quoted_local_part() -> None:
    """A quoted local part is unquoted in local and re-quoted by format()."""
    address = parse_path('<"john smith"@example.com>')
    assert address.local == "john smith"
    assert address.address == "john smith@example.com"
    assert address.format() == '<"john smith"@example.com>'
    assert str(address) == address.format()


def test_quoted_pair() -> None:
    """Backslash escapes in a quoted local part are removed, and restored by format()."""
    address = parse_path(r'<"a\"b\\c"@example.com>')
    assert address.local == 'a"b\\c'
    assert address.format() == r'<"a\"b\\c"@example.com>'


def test_needlessly_quoted_local_formats_bare() -> None:
    """A quoted local part that is a valid dot-string is formatted without quotes."""
    assert parse_path('<"john"@example.com>').format() == "<john@example.com>"


def test_empty_quoted_local() -> None:
    """An empty quoted local part is valid and stays quoted."""
    address = parse_path('<""@example.com>')
    assert address.local == ""
    assert not address.is_null
    assert address.format() == '<""@example.com>'


@pytest.mark.parametrize("path", ['<"abc@example.com>', '<"a"b@example.com>', '<"a\tb"@x.com>'])
def test_bad_quoted_local(path: str) -> None:
    """An unterminated quoted string, text after it, or a control character is an error."""
    with pytest.raises(AddressError):
        parse_path(path)


@pytest.mark.parametrize(
    "path,domain",
    [
        ("<u@[192.0.2.1]>", "[192.0.2.1]"),
        ("<u@[IPv6:2001:db8::1]>", "[IPv6:2001:db8::1]"),
        ("<u@[ipv6:::1]>", "[ipv6:::1]"),
        ("<u@[x-tag:stuff]>", "[x-tag:stuff]"),
    ],
)
def test_address_literals(path: str, domain: str) -> None:
    """IPv4, IPv6 and general address literals are accepted, brackets kept in domain."""
    assert parse_path(path).domain == domain


@pytest.mark.parametrize(
    "path",
    ["<u@[192.0.2.256]>", "<u@[IPv6:zz::1]>", "<u@[IPv6:fe80::1%eth0]>", "<u@[1.2.3.4>", "<u@[]>"],
)
def test_bad_address_literals(path: str) -> None:
    """Malformed address literals are errors."""
    with pytest.raises(AddressError):
        parse_path(path)


@pytest.mark.parametrize(
    "domain", ["-a.example", "a-.example", "a..example", "a.example.", "a_b.example", "", "a@b"]
)
def test_bad_domains(domain: str) -> None:
    """Domains must be dot-separated LDH labels not starting or ending with a hyphen."""
    with pytest.raises(AddressError):
        parse_path(f"<user@{domain}>")


def test_single_label_domain() -> None:
    """A one-label domain is syntactically valid."""
    assert parse_path("<root@localhost>").domain == "localhost"


def test_domain_case_kept() -> None:
    """The domain keeps the client's case; domain_lower gives the folded form."""
    address = parse_path("<User@Example.COM>")
    assert (address.user, address.host) == ("User", "Example.COM")
    assert address.domain_lower == "example.com"


def test_local_part_length_limit() -> None:
    """A local part over 64 octets is an error; 64 is fine."""
    assert parse_path(f"<{'a' * 64}@example.com>").local == "a" * 64
    with pytest.raises(AddressError, match="Local part too long"):
        parse_path(f"<{'a' * 65}@example.com>")


def test_domain_length_limit() -> None:
    """A domain over 255 octets is an error."""
    domain = ".".join(["a" * 63] * 4) + "a"
    assert len(domain) == 256
    with pytest.raises(AddressError, match="Domain too long"):
        parse_path(f"<u@{domain}>")


def test_label_length_limit() -> None:
    """A domain label over 63 octets is an error."""
    with pytest.raises(AddressError, match="label"):
        parse_path(f"<u@{'a' * 64}.example>")


_DOMAIN_189 = ".".join(["a" * 63, "a" * 63, "a" * 61])


def test_path_length_limit() -> None:
    """A path over 256 octets (brackets included) is an error; 256 is fine."""
    ok = f"<{'u' * 64}@{_DOMAIN_189}>"
    assert len(ok) == 256
    assert parse_path(ok).local == "u" * 64
    with pytest.raises(AddressError, match="Path too long"):
        parse_path(f"<{'u' * 64}@{_DOMAIN_189}a>")


def test_unbracketed_path_length_counts_brackets() -> None:
    """An unbracketed path is measured as if it had its brackets."""
    assert parse_path(f"{'u' * 64}@{_DOMAIN_189}").local == "u" * 64
    with pytest.raises(AddressError, match="Path too long"):
        parse_path(f"{'u' * 64}@{_DOMAIN_189}a")


def test_lenient_dots_in_local() -> None:
    """Lenient mode accepts leading, trailing and doubled dots in the local part."""
    assert parse_path("<john..doe.@example.com>").local == "john..doe."
    assert parse_path("<john..doe.@example.com>").format() == "<john..doe.@example.com>"


@pytest.mark.parametrize("local", ["john..doe", ".john", "john."])
def test_strict_dots_in_local(local: str) -> None:
    """Strict mode wants an RFC 5321 dot-string."""
    with pytest.raises(AddressError):
        parse_path(f"<{local}@example.com>", strict=True)


@pytest.mark.parametrize("local", ["a(b)", "a,b", "a;b", "a[b]", "a\\b", "a:b"])
def test_specials_in_local_rejected(local: str) -> None:
    """Specials outside a quoted local part are errors."""
    with pytest.raises(AddressError):
        parse_path(f"<{local}@example.com>")


def test_atext_specials_in_local_accepted() -> None:
    """Every atext special is accepted unquoted and formats unquoted."""
    local = "!#$%&'*+-/=?^_`{|}~"
    assert parse_path(f"<{local}@example.com>", strict=True).format() == f"<{local}@example.com>"


def test_null_path_needs_allow_null() -> None:
    """`<>` is an error unless allow_null is given."""
    with pytest.raises(AddressError, match="Null"):
        parse_path("<>")
    assert parse_path("<>", allow_null=True).is_null


def test_empty_text_null_only_lenient() -> None:
    """An empty path is the null sender only in lenient mode with allow_null."""
    assert parse_path("", allow_null=True).is_null
    with pytest.raises(AddressError):
        parse_path("", allow_null=True, strict=True)
    with pytest.raises(AddressError):
        parse_path("")


# -- UTF-8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["<jöran@example.com>", "<user@exämple.com>", '<"jö"@x.com>'])
def test_utf8_requires_smtputf8(path: str) -> None:
    """Non-ASCII without allow_utf8 is an error naming SMTPUTF8."""
    with pytest.raises(AddressError, match=r"UTF-8.*SMTPUTF8"):
        parse_path(path)


def test_utf8_allowed() -> None:
    """With allow_utf8, UTF-8 local parts and domain labels are accepted."""
    address = parse_path("<jöran@exämple.com>", allow_utf8=True, strict=True)
    assert (address.local, address.domain) == ("jöran", "exämple.com")
    assert address.is_utf8
    assert address.format() == "<jöran@exämple.com>"


def test_ascii_address_not_utf8() -> None:
    """An ASCII address is not is_utf8."""
    assert not parse_path("<a@b.c>").is_utf8


def test_utf8_octet_limits() -> None:
    """Length limits count UTF-8 octets, not characters."""
    with pytest.raises(AddressError, match="Local part too long"):
        parse_path(f"<{'ö' * 33}@example.com>", allow_utf8=True)


def test_invalid_utf8_rejected() -> None:
    """Surrogate-escaped invalid UTF-8 is an error even with allow_utf8."""
    with pytest.raises(AddressError, match="Invalid UTF-8"):
        parse_path("<a\udcff@example.com>", allow_utf8=True)


def test_utf8_domain_symbols_rejected() -> None:
    """A UTF-8 domain label must be letters, marks, digits or hyphens."""
    with pytest.raises(AddressError):
        parse_path("<a@ex\u2603mple.com>", allow_utf8=True)


def test_mail_argument_utf8() -> None:
    """parse_mail_argument passes allow_utf8 through."""
    with pytest.raises(AddressError, match="SMTPUTF8"):
        parse_mail_argument("FROM:<ö@x.com> SMTPUTF8")
    address, params = parse_mail_argument("FROM:<ö@x.com> SMTPUTF8", allow_utf8=True)
    assert address.local == "ö"
    assert params == {"SMTPUTF8": None}


# -- ESMTP parameters -----------------------------------------------------------------------


def test_params_keys_upper_cased_values_kept() -> None:
    """Keys are upper-cased, values are kept as given, a bare keyword maps to None."""
    assert parse_esmtp_params(["size=10", "Ret=hdrs", "smtputf8"]) == {
        "SIZE": "10",
        "RET": "hdrs",
        "SMTPUTF8": None,
    }


def test_params_value_may_hold_plus_and_slash() -> None:
    """xtext-style values such as ORCPT pass through."""
    assert parse_esmtp_params(["ORCPT=rfc822;a+2Bb@x.com"]) == {"ORCPT": "rfc822;a+2Bb@x.com"}


@pytest.mark.parametrize("word", ["-SIZE=1", "SI_ZE=1", "=1", "", "SIZE=", "SIZE=a=b", "K=\x01"])
def test_params_bad_syntax(word: str) -> None:
    """Bad keywords or values are errors."""
    with pytest.raises(AddressError):
        parse_esmtp_params([word])


def test_params_duplicate_key() -> None:
    """A key given twice (in any case) is an error."""
    with pytest.raises(AddressError, match="Duplicate"):
        parse_esmtp_params(["SIZE=1", "size=2"])


def test_params_utf8_value() -> None:
    """RFC 6531 lets values hold non-ASCII characters."""
    assert parse_esmtp_params(["X-NAME=jö"]) == {"X-NAME": "jö"}


def test_params_multiple_spaces_between() -> None:
    """Several spaces between parameters are tolerated."""
    assert parse_mail_argument("FROM:<a@b.c>   SIZE=1  BODY=7BIT")[1] == {
        "SIZE": "1",
        "BODY": "7BIT",
    }


def test_params_tab_rejected() -> None:
    """A tab between parameters is not a separator."""
    with pytest.raises(AddressError):
        parse_mail_argument("FROM:<a@b.c> SIZE=1\tBODY=7BIT")


# -- Address value --------------------------------------------------------------------------


def test_address_constructed_directly() -> None:
    """An Address can be built from parts; original defaults to empty."""
    address = Address("a b", "example.com")
    assert address.format() == '<"a b"@example.com>'
    assert address.original == ""
    assert Address("", "").is_null


# -- properties -----------------------------------------------------------------------------

_ATEXT = "abcXYZ0189!#$%&'*+-/=?^_`{|}~"
_locals = st.one_of(
    st.text(alphabet=_ATEXT + ".", min_size=1, max_size=20),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_domains = st.lists(_labels, min_size=1, max_size=4).map(".".join)


@settings(max_examples=200)
@given(_locals, _domains)
def test_format_round_trips(local: str, domain: str) -> None:
    """format() produces a path that parses back to the same local part and domain."""
    address = Address(local, domain)
    parsed = parse_path(address.format())
    assert (parsed.local, parsed.domain) == (local, domain)


@settings(max_examples=300)
@given(st.text())
def test_parse_path_only_raises_address_error(text: str) -> None:
    """parse_path raises nothing but AddressError on any text."""
    for strict in (False, True):
        for allow in (False, True):
            with contextlib.suppress(AddressError):
                parse_path(
                    text, strict=strict, allow_null=allow, allow_utf8=allow, allow_postmaster=allow
                )


@settings(max_examples=300)
@given(st.binary())
def test_parse_arguments_only_raise_address_error_binary(raw: bytes) -> None:
    """parse_mail_argument / parse_rcpt_argument raise only AddressError on any decoded bytes."""
    text = raw.decode("utf-8", "surrogateescape")
    for parse in (parse_mail_argument, parse_rcpt_argument):
        for strict in (False, True):
            for allow_utf8 in (False, True):
                for arg in (text, "FROM:" + text, "TO:" + text, "FROM:<" + text):
                    with contextlib.suppress(AddressError):
                        parse(arg, strict=strict, allow_utf8=allow_utf8)


_path_alphabet = st.sampled_from([*list('<>@:,."\\ []aZ09-=éx\x00'), "IPv6:", "postmaster"])


@settings(max_examples=300)
@given(st.lists(_path_alphabet, max_size=24).map("".join))
def test_parse_arguments_only_raise_address_error_structured(text: str) -> None:
    """Path-like junk built from the significant characters raises only AddressError."""
    for arg in ("FROM:" + text, "TO:" + text):
        for parse in (parse_mail_argument, parse_rcpt_argument):
            with contextlib.suppress(AddressError):
                parse(arg, allow_utf8=True)


@settings(max_examples=200)
@given(st.lists(st.text(max_size=12), max_size=5))
def test_parse_esmtp_params_only_raises_address_error(words: list[str]) -> None:
    """parse_esmtp_params raises only AddressError on any words."""
    with contextlib.suppress(AddressError):
        parse_esmtp_params(words)


_PATHISH = st.text(alphabet='ab.-_+@<>" :[]1é\t=', max_size=30)


@settings(max_examples=500, deadline=None)
@given(
    _PATHISH,
    st.sampled_from(["", " ", " SIZE=10", " BODY=8BITMIME x", "x"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([parse_mail_argument, parse_rcpt_argument]),
)
def test_simple_path_fast_path_is_the_general_parser(
    path: str, tail: str, strict: bool, utf8: bool, parse: Any
) -> None:
    """The one-match path for <dot-atom@domain> gives what the general parser gives."""
    prefix = "FROM:" if parse is parse_mail_argument else "TO:"

    def outcome(arg: str) -> object:
        try:
            return parse(arg, strict=strict, allow_utf8=utf8)
        except AddressError as e:
            return ("error", str(e))

    for arg in (f"{prefix}{path}{tail}", f"{prefix}<{path}>{tail}", f"{prefix}<a{path}@b.c>{tail}"):
        fast = outcome(arg)
        with mock.patch.object(address, "_SIMPLE_PATH", re.compile("(?!)")):
            general = outcome(arg)
        assert fast == general, arg


def test_simple_path_lengths_left_to_the_general_parser() -> None:
    """A long local part or path still gets the general parser's reasons."""
    with pytest.raises(AddressError, match="Local part too long"):
        parse_mail_argument(f"FROM:<{'a' * 65}@b.c>")
    with pytest.raises(AddressError, match="Path too long"):
        parse_mail_argument(f"FROM:<{'a' * 60}@{'b' * 48}.{'c' * 48}.{'d' * 48}.{'e' * 48}>")
    address_, params = parse_mail_argument("FROM:<a.b@c-d.e> SIZE=10")
    assert (address_.local, address_.domain, address_.original, params) == (
        "a.b",
        "c-d.e",
        "<a.b@c-d.e>",
        {"SIZE": "10"},
    )
