"""Tests for haraka_tw.smtp.proxy: PROXY protocol v1 and v2 headers, byte by byte."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from haraka_tw.smtp.proxy import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    crc32c,
    parse_proxy_header,
)
from tests.haproxy import v2_header, v2_local


def header(**fields: object) -> ProxyHeader:
    """A ProxyHeader with defaults for the fields a test does not care about."""
    values: dict[str, object] = {
        "version": 1,
        "local": False,
        "family": "TCP4",
        "source_ip": None,
        "source_port": None,
        "dest_ip": None,
        "dest_port": None,
        "tlvs": {},
        "length": 0,
    }
    values.update(fields)
    return ProxyHeader(**values)  # type: ignore[arg-type]


def rejects(buf: bytes, reason: str | None = None) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_proxy_header(buf)
    if reason is not None:
        assert reason in str(caught.value)


def v2(version_command: int, family_transport: int, body: bytes) -> bytes:
    """A v2 header with the given raw fields and its length taken from C{body}."""
    return (
        V2_SIGNATURE
        + bytes([version_command, family_transport])
        + struct.pack("!H", len(body))
        + body
    )


INET_BLOCK = bytes([198, 51, 100, 7, 192, 0, 2, 1]) + struct.pack("!HH", 40000, 25)


# -- version 1: valid lines -----------------------------------------------------------


def test_v1_tcp4() -> None:
    """A TCP4 line gives the client and destination addresses and ports."""
    line = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n"
    assert parse_proxy_header(line) == header(
        source_ip="198.51.100.7",
        source_port=40000,
        dest_ip="192.0.2.1",
        dest_port=25,
        length=len(line),
    )


def test_v1_tcp6_normalised() -> None:
    """A TCP6 line's addresses come back in compressed, lower-case form."""
    line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::1 65535 0\r\n"
    got = parse_proxy_header(line)
    assert got == header(
        family="TCP6",
        source_ip="2001:db8::7",
        source_port=65535,
        dest_ip="::1",
        dest_port=0,
        length=len(line),
    )


def test_v1_tcp6_ipv4_mapped() -> None:
    """An IPv4-mapped IPv6 literal is a valid TCP6 address."""
    got = parse_proxy_header(b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1 2\r\n")
    assert got is not None
    assert got.source_ip == str(ipaddress.IPv6Address("::ffff:192.0.2.9"))


def test_v1_unknown() -> None:
    """PROXY UNKNOWN is a local header: no family, no addresses."""
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == header(local=True, family=None, length=15)


def test_v1_unknown_rest_ignored() -> None:
    """After UNKNOWN and a space, the rest of the line is ignored, whatever it holds."""
    line = b"PROXY UNKNOWN ffff::1 garbage  \t\x00\xff 99999\r\n"
    assert parse_proxy_header(line) == header(local=True, family=None, length=len(line))


def test_v1_trailing_bytes_not_consumed() -> None:
    """Bytes after the CRLF are left for the caller; length points at them."""
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25\r\n"
    got = parse_proxy_header(line + b"EHLO x\r\n")
    assert got is not None and got.length == len(line)


def test_v1_max_length_accepted() -> None:
    """A line of exactly 107 bytes, CRLF included, is accepted."""
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    got = parse_proxy_header(line)
    assert got is not None and got.length == V1_MAX_LENGTH


def test_v1_port_zero() -> None:
    """Port 0 is written as "0" and accepted."""
    got = parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 0\r\n")
    assert got is not None and (got.source_port, got.dest_port) == (0, 0)


# -- version 1: incomplete ------------------------------------------------------------


@pytest.mark.parametrize(
    "buf",
    [
        b"",
        b"P",
        b"PROXY",
        b"PROXY ",
        b"PROXY T",
        b"PROXY UNK",
        b"PROXY UNKNOWN",
        b"PROXY UNKNOWN junk",
        b"PROXY TCP4",
        b"PROXY TCP4 ",
        b"PROXY TCP4 1.2.3",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 0",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25\r",
        b"PROXY TCP6 2001:db8::1 ::",
    ],
)
def test_v1_incomplete_waits(buf: bytes) -> None:
    """A valid beginning of a v1 line asks for more bytes (None)."""
    assert parse_proxy_header(buf) is None


# -- version 1: errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "buf",
    [b"X", b"EHLO x\r\n", b"GET / HTTP/1.0\r\n", b"proxy ", b"PROXY\t", b"PROXX", b"\x16\x03\x01"],
)
def test_not_a_header_rejected_at_once(buf: bytes) -> None:
    """Bytes that cannot begin either signature are rejected from the first bytes."""
    rejects(buf)


def test_v1_too_long_without_lf() -> None:
    """107 bytes with no LF is too long, even before more bytes arrive."""
    rejects(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 14), "v1 line too long")


def test_v1_too_long_with_crlf() -> None:
    """A 108-byte line is too long even though its CRLF has arrived."""
    rejects(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n", "v1 line too long")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25\n",
        b"PROXY UNKNOWN\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25\r\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8\r100 25\r\n",
        b"PROXY UNKNOWN a\rb\r\n",
    ],
)
def test_v1_line_ending(line: bytes) -> None:
    """The line ends in CRLF exactly: bare LF and stray CR are errors."""
    rejects(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY tcp4 1.2.3.4 5.6.7.8 100 25\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 100 25\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 100 25\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY \r\n",
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 100 25\r\n",
    ],
)
def test_v1_bad_protocol(line: bytes) -> None:
    """Only TCP4, TCP6 and UNKNOWN, upper case, after exactly one space."""
    rejects(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4  5.6.7.8 100 25\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25 26\r\n",
        b"PROXY TCP4\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100\t25\r\n",
    ],
)
def test_v1_fields(line: bytes) -> None:
    """Exactly five fields separated by single spaces."""
    rejects(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 ::1 5.6.7.8 100 25\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 100 25\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 100 25\r\n",
        b"PROXY TCP4 256.2.3.4 5.6.7.8 100 25\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 100 25\r\n",
        b"PROXY TCP4 1.2.3.4.5 5.6.7.8 100 25\r\n",
        b"PROXY TCP4 localhost 5.6.7.8 100 25\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 100 25\r\n",
        b"PROXY TCP6 ::1::2 ::1 100 25\r\n",
        b"PROXY TCP6 [::1] ::1 100 25\r\n",
    ],
)
def test_v1_addresses(line: bytes) -> None:
    """Addresses are literals of the line's family: no leading zeros, names or scopes."""
    rejects(line)


@pytest.mark.parametrize("port", [b"65536", b"99999", b"025", b"00", b"+25", b"-1", b"2a", b""])
def test_v1_ports(port: bytes) -> None:
    """Ports are 0-65535 in decimal without sign or leading zeros."""
    rejects(b"PROXY TCP4 1.2.3.4 5.6.7.8 " + port + b" 25\r\n")
    rejects(b"PROXY TCP4 1.2.3.4 5.6.7.8 25 " + port + b"\r\n")


@pytest.mark.parametrize(
    "partial",
    [
        b"PROXY TCP ",
        b"PROXY UNKNOW ",
        b"PROXY TCP4 1.2.3.4x",
        b"PROXY TCP4 ::",
        b"PROXY TCP4 1.2.3.4  ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 65536",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25 ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25x",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 2\r5",
        b"PROXY TCP6 g",
        b"PROXY TCP6 " + b"1" * 46,
        b"PROXY TCP4 999.1.1.1 ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100 25 \r",
    ],
)
def test_v1_rejected_before_the_line_ends(partial: bytes) -> None:
    """A partial line that no continuation can make valid is rejected without waiting."""
    rejects(partial)


# -- version 2: valid headers ---------------------------------------------------------


def test_v2_tcp4() -> None:
    """A v2 PROXY over INET/STREAM gives addresses and ports; length is 16 + 12."""
    assert parse_proxy_header(v2(0x21, 0x11, INET_BLOCK)) == header(
        version=2,
        source_ip="198.51.100.7",
        source_port=40000,
        dest_ip="192.0.2.1",
        dest_port=25,
        length=28,
    )


def test_v2_tcp6() -> None:
    """INET6 addresses come back compressed."""
    buf = v2_header(("2001:db8::7", 1234), ("2001:db8::1", 587))
    assert parse_proxy_header(buf) == header(
        version=2,
        family="TCP6",
        source_ip="2001:db8::7",
        source_port=1234,
        dest_ip="2001:db8::1",
        dest_port=587,
        length=16 + 36,
    )


def test_v2_unix() -> None:
    """UNIX addresses are the paths up to their first NUL; no ports."""
    buf = v2_header("/run/client.sock", "/run/smtp.sock")
    assert parse_proxy_header(buf) == header(
        version=2,
        family="UNIX",
        source_ip="/run/client.sock",
        dest_ip="/run/smtp.sock",
        length=16 + 216,
    )


def test_v2_unix_path_with_control_bytes() -> None:
    """A UNIX address holding CR, LF or another control byte is refused: it would reach the
    log and headers as it is."""
    for path in ("/x\r\nX-Evil: 1", "/x\x1b[2J", "/x\x7f"):
        with pytest.raises(ProxyError, match="control bytes"):
            parse_proxy_header(v2_header(path, "/run/smtp.sock"))


def test_v2_local_unspec() -> None:
    """LOCAL with UNSPEC (a health check) is local: no family, no addresses."""
    assert parse_proxy_header(v2_local()) == header(version=2, local=True, family=None, length=16)


def test_v2_local_ignores_address_block() -> None:
    """LOCAL discards whatever address block and family byte come with it."""
    for family_transport in (0x11, 0x22, 0xFF):
        buf = v2(0x20, family_transport, INET_BLOCK + b"\x99")
        assert parse_proxy_header(buf) == header(
            version=2, local=True, family=None, length=len(buf)
        )


def test_v2_proxy_unspec_is_local() -> None:
    """PROXY with UNSPEC/UNSPEC is treated like v1 UNKNOWN: keep the real endpoints."""
    got = parse_proxy_header(v2(0x21, 0x00, b"abc"))
    assert got == header(version=2, local=True, family=None, length=19)


def test_v2_tlvs() -> None:
    """TLVs after the addresses are returned by type; NOOP padding is left out."""
    buf = v2_header(
        ("192.0.2.7", 1), ("192.0.2.1", 25), [(0x01, b"h2"), (0x04, b"\0" * 3), (0xE0, b"")]
    )
    got = parse_proxy_header(buf)
    assert got is not None and got.tlvs == {0x01: b"h2", 0xE0: b""}


def test_v2_tlvs_after_bigger_address_block() -> None:
    """An INET header may carry a longer block than its addresses; the rest is TLVs."""
    got = parse_proxy_header(v2(0x21, 0x11, INET_BLOCK + b"\x05\x00\x02id"))
    assert got is not None and got.tlvs == {0x05: b"id"}


def test_v2_crc32c_valid() -> None:
    """A CRC32C TLV that matches the header is accepted (and kept)."""
    buf = v2_header(("192.0.2.7", 1), ("192.0.2.1", 25), [(0x05, b"uid")], crc=True)
    got = parse_proxy_header(buf)
    assert got is not None and set(got.tlvs) == {0x03, 0x05}


def test_v2_crc32c_mismatch() -> None:
    """A header whose CRC32C does not match is rejected."""
    buf = bytearray(v2_header(("192.0.2.7", 1), ("192.0.2.1", 25), crc=True))
    buf[20] ^= 0x01  # an address byte
    rejects(bytes(buf), "CRC32C mismatch")


def test_v2_crc32c_bad_size() -> None:
    """A CRC32C TLV whose value is not 4 bytes is rejected."""
    rejects(v2(0x21, 0x11, INET_BLOCK + b"\x03\x00\x02ab"), "CRC32C")


def test_crc32c_check_value() -> None:
    """crc32c is CRC-32C: the standard check value for "123456789" is 0xE3069283."""
    assert crc32c(b"123456789") == 0xE3069283


def test_v2_trailing_bytes_not_consumed() -> None:
    """Bytes after the header are left alone; length points at them."""
    got = parse_proxy_header(v2(0x21, 0x11, INET_BLOCK) + b"EHLO x\r\n")
    assert got is not None and got.length == 28


def test_v2_largest_header() -> None:
    """The 16-bit length is honoured up to 65535: the parser waits for all of it."""
    value = b"v" * (65535 - 12 - 3)
    buf = v2(0x21, 0x11, INET_BLOCK + b"\xe0" + struct.pack("!H", len(value)) + value)
    assert len(buf) == 16 + 65535
    assert parse_proxy_header(buf[:-1]) is None
    got = parse_proxy_header(buf)
    assert got is not None and got.length == len(buf) and len(got.tlvs[0xE0]) == 65520


# -- version 2: incomplete ------------------------------------------------------------


def test_v2_incomplete_waits() -> None:
    """Every proper prefix of a valid v2 header asks for more bytes."""
    buf = v2(0x21, 0x11, INET_BLOCK + b"\x05\x00\x02id")
    for n in range(len(buf)):
        assert parse_proxy_header(buf[:n]) is None, n


# -- version 2: errors ----------------------------------------------------------------


@pytest.mark.parametrize("position", range(12))
def test_v2_bad_signature_byte(position: int) -> None:
    """A wrong byte anywhere in the signature is rejected as soon as it arrives."""
    sig = bytearray(V2_SIGNATURE)
    sig[position] ^= 0x40
    rejects(bytes(sig[: position + 1]))


@pytest.mark.parametrize("version_command", [0x11, 0x31, 0x01, 0xF1, 0x22, 0x2F])
def test_v2_bad_version_or_command(version_command: int) -> None:
    """Version must be 2 and command LOCAL or PROXY; checked from the 13th byte."""
    rejects(V2_SIGNATURE + bytes([version_command]))


@pytest.mark.parametrize(
    ("family_transport", "reason"),
    [
        (0x41, "family"),
        (0xF1, "family"),
        (0x01, "family"),
        (0x12, "STREAM"),
        (0x22, "STREAM"),
        (0x32, "STREAM"),
        (0x10, "STREAM"),
        (0x13, "STREAM"),
    ],
)
def test_v2_bad_family_or_transport(family_transport: int, reason: str) -> None:
    """PROXY needs INET, INET6 or UNIX over STREAM; checked before the body arrives."""
    rejects(V2_SIGNATURE + bytes([0x21, family_transport, 0, 12]), reason)


@pytest.mark.parametrize(("family_transport", "needed"), [(0x11, 12), (0x21, 36), (0x31, 216)])
def test_v2_length_too_short_for_family(family_transport: int, needed: int) -> None:
    """A length shorter than the family's address block is rejected before the body."""
    rejects(V2_SIGNATURE + bytes([0x21, family_transport]) + struct.pack("!H", needed - 1))
    assert (
        parse_proxy_header(
            V2_SIGNATURE + bytes([0x21, family_transport]) + struct.pack("!H", needed)
        )
        is None
    )


@pytest.mark.parametrize(
    "tlvs",
    [b"\x05", b"\x05\x00", b"\x05\x00\x03ab", b"\x05\x00\x01a\x06\x00"],
)
def test_v2_truncated_tlv(tlvs: bytes) -> None:
    """A TLV whose header or value runs past the end of the header is rejected."""
    rejects(v2(0x21, 0x11, INET_BLOCK + tlvs), "TLV truncated")


def test_v2_duplicate_tlv() -> None:
    """The same TLV type twice is ambiguous and rejected (NOOP excepted)."""
    rejects(v2(0x21, 0x11, INET_BLOCK + b"\x05\x00\x01a\x05\x00\x01b"), "duplicate")
    assert parse_proxy_header(v2(0x21, 0x11, INET_BLOCK + b"\x04\x00\x00\x04\x00\x01x"))


# -- properties -----------------------------------------------------------------------


def _never_crashes(buf: bytes) -> None:
    try:
        got = parse_proxy_header(buf)
    except ProxyError:
        return
    if got is not None:
        assert 0 < got.length <= len(buf)


@given(st.binary(max_size=300))
def test_any_bytes_only_proxy_error(buf: bytes) -> None:
    """Arbitrary bytes give a header, None or ProxyError, never another exception."""
    _never_crashes(buf)


@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, V2_SIGNATURE + b"!"]),
    st.binary(max_size=300),
)
def test_signature_then_any_bytes_only_proxy_error(prefix: bytes, rest: bytes) -> None:
    """Past either signature, arbitrary bytes still only give ProxyError on failure."""
    _never_crashes(prefix + rest)


@given(st.sampled_from([b"PROXY TCP", b"PROXY TCP4 1.2.3.4 ", b"PROXY TCP6 ::1 "]), st.text())
def test_v1_text_only_proxy_error(prefix: bytes, rest: str) -> None:
    """Past a v1 prefix, arbitrary (UTF-8) text only gives ProxyError on failure."""
    _never_crashes(prefix + rest.encode())


ports = st.integers(0, 65535)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v1 line and what it must parse to."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        rest = draw(
            st.none()
            | st.binary(max_size=V1_MAX_LENGTH - 16).filter(
                lambda b: b"\r" not in b and b"\n" not in b
            )
        )
        line = b"PROXY UNKNOWN" + (b"" if rest is None else b" " + rest) + b"\r\n"
        return line, header(local=True, family=None, length=len(line))
    addresses = st.ip_addresses(v=4) if kind == "TCP4" else st.ip_addresses(v=6)
    src, dst = draw(addresses), draw(addresses)
    sport, dport = draw(ports), draw(ports)
    texts = []
    for ip in (src, dst):
        if isinstance(ip, ipaddress.IPv6Address) and draw(st.booleans()):
            texts.append(ip.exploded.upper() if draw(st.booleans()) else ip.exploded)
        else:
            texts.append(str(ip))
    line = f"PROXY {kind} {texts[0]} {texts[1]} {sport} {dport}\r\n".encode()
    expected = header(
        family=kind,
        source_ip=str(src),
        source_port=sport,
        dest_ip=str(dst),
        dest_port=dport,
        length=len(line),
    )
    return line, expected


tlv_types = st.integers(0, 255).filter(lambda t: t not in (0x03, 0x04))


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v2 header (PROXY over INET/INET6/UNIX with TLVs, or LOCAL) and its parse."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNIX", "LOCAL"]))
    if kind == "LOCAL":
        buf = v2_local(draw(st.binary(max_size=40)))
        return buf, header(version=2, local=True, family=None, length=len(buf))
    tlvs = draw(st.dictionaries(tlv_types, st.binary(max_size=20), max_size=4))
    noops = draw(st.lists(st.binary(max_size=5), max_size=2))
    items = list(tlvs.items()) + [(0x04, value) for value in noops]
    items = draw(st.permutations(items))
    crc = draw(st.booleans())
    if kind == "UNIX":
        path = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
        src_path, dst_path = draw(path), draw(path)
        buf = v2_header(src_path, dst_path, items, crc=crc)
        src, sport, dst, dport = src_path, None, dst_path, None
    else:
        addresses = st.ip_addresses(v=4) if kind == "TCP4" else st.ip_addresses(v=6)
        src_ip, dst_ip = draw(addresses), draw(addresses)
        sport, dport = draw(ports), draw(ports)
        buf = v2_header((str(src_ip), sport), (str(dst_ip), dport), items, crc=crc)
        src, dst = str(src_ip), str(dst_ip)
    expected_tlvs = dict(tlvs)
    if crc:
        expected_tlvs[0x03] = buf[-4:]
    expected = header(
        version=2,
        family=kind,
        source_ip=src,
        source_port=sport,
        dest_ip=dst,
        dest_port=dport,
        tlvs=expected_tlvs,
        length=len(buf),
    )
    return buf, expected


valid_headers = v1_headers() | v2_headers()


@given(valid_headers, st.binary(max_size=20))
@settings(max_examples=300)
def test_valid_header_parses(case: tuple[bytes, ProxyHeader], trailing: bytes) -> None:
    """A valid header parses to what was built, with or without bytes after it."""
    buf, expected = case
    assert parse_proxy_header(buf) == expected
    assert parse_proxy_header(buf + trailing) == expected


@given(valid_headers)
@settings(max_examples=200)
def test_valid_header_prefixes_wait(case: tuple[bytes, ProxyHeader]) -> None:
    """Every proper prefix of a valid header gives None: never a premature ProxyError."""
    buf, _ = case
    for n in range(len(buf)):
        assert parse_proxy_header(buf[:n]) is None, (n, buf[:n])


@given(valid_headers, st.data())
def test_chunked_feed_matches_whole(case: tuple[bytes, ProxyHeader], data: st.DataObject) -> None:
    """Feeding a header in arbitrary chunks (re-parsing the growing buffer) gives the
    whole-buffer result at exactly the chunk that completes it."""
    buf, expected = case
    stream = buf + b"MAIL FROM:<a@b>\r\n"
    received = b""
    while True:
        size = data.draw(st.integers(1, max(1, len(stream) - len(received))))
        received = stream[: len(received) + size]
        got = parse_proxy_header(received)
        if len(received) < len(buf):
            assert got is None
        else:
            assert got == expected
            break


@given(valid_headers, st.data())
def test_corrupted_header_only_proxy_error(
    case: tuple[bytes, ProxyHeader], data: st.DataObject
) -> None:
    """A valid header with one byte changed still gives only a header, None or ProxyError."""
    buf, _ = case
    assume(buf)
    at = data.draw(st.integers(0, len(buf) - 1))
    value = data.draw(st.integers(0, 255))
    _never_crashes(buf[:at] + bytes([value]) + buf[at + 1 :])
