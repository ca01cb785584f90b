"""Reply values: filling placeholders, and the wire form."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from haraka_tw.smtp.replies import Reply

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
FIELDS = {"me": "mx.test", "remote": "[192.0.2.1]", "sender": "<{me}@x>", "uuid": "U-1"}


def by_regex(line: str, fields: dict[str, str]) -> str:
    """The rule, as a regex substitution: each {name} with a known name, in one pass."""
    return _PLACEHOLDER.sub(lambda m: fields.get(m.group(1), m.group(0)), line)


def test_fill_replaces_known_names_once() -> None:
    """Known names are filled; unknown, upper-case and empty braces stay; a value holding
    a placeholder is not filled again; a reply without fields is returned as it is."""
    reply = Reply(250, "2.0.0", ("{me} hi {remote}", "{{me}} {} {ME} {nope}", "<{sender}>"))
    assert reply.fill(FIELDS).lines == (
        "mx.test hi [192.0.2.1]",
        "{mx.test} {} {ME} {nope}",
        "<<{me}@x>>",
    )
    plain = Reply(221, None, ("bye",))
    assert plain.fill(FIELDS) is plain
    assert reply.fill(lambda name: FIELDS.get(name)).lines == reply.fill(FIELDS).lines


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="{}meuidrotsn_x ", max_size=30), min_size=1, max_size=3))
def test_fill_is_the_regex_rule(lines: list[str]) -> None:
    """Whatever the braces, fill gives what the one-pass regex substitution gives."""
    filled = Reply(250, None, tuple(lines)).fill(FIELDS)
    assert filled.lines == tuple(by_regex(line, FIELDS) for line in lines)
