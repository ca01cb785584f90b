"""The streaming body search of haraka_tw.plugins.data."""

from __future__ import annotations

import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from haraka_tw.plugins.data import BodySearch, search_body


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(st.binary(max_size=200), st.binary(min_size=1, max_size=12), st.lists(st.integers(0, 300)))
def test_found_however_the_body_is_cut(body: bytes, needle: bytes, cuts: list[int]) -> None:
    """A literal is found in a body cut into any chunks exactly when the whole body holds it."""
    search = BodySearch(re.compile(re.escape(needle)), len(needle))
    search_body(_chunks(body, cuts), search)
    assert search.found == (needle in body)


@given(st.binary(max_size=100), st.binary(max_size=100), st.lists(st.integers(0, 300)))
def test_needle_straddling_chunks(before: bytes, after: bytes, cuts: list[int]) -> None:
    """A needle placed anywhere is found, whatever the chunk boundaries cut it into."""
    body = before + b"SIGNATURE" + after
    search = BodySearch(re.compile(b"SIGNATURE"), 9)
    search_body(_chunks(body, cuts), search)
    assert search.match is not None and search.match.group(0) == b"SIGNATURE"


def test_reading_stops_once_everything_is_found() -> None:
    """search_body feeds every search each chunk and stops once all have matched."""
    pulled: list[bytes] = []

    def chunks() -> object:
        for piece in (b"user ", b"and pass", b"word", b"never read"):
            pulled.append(piece)
            yield piece

    user = BodySearch(re.compile(b"user"), 4)
    password = BodySearch(re.compile(b"password"), 8)
    search_body(chunks(), user, password)  # type: ignore[arg-type]
    assert user.found and password.found
    assert pulled == [b"user ", b"and pass", b"word"]
